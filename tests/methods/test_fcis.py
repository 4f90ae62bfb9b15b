"""FCIS: RoI targets and OHEM against float64 NumPy encodings of msracver/FCIS's rules
(fcis/operator_py/proposal_annotator.py ProposalAnnotatorOperator.sample_rois with BATCH_ROIS
-1, fcis/operator_py/box_annotator_ohem.py BoxAnnotatorOHEMOperator.forward, the loss heads of
fcis/symbols/resnet_v1_101_fcis.py get_symbol), the assembling of the position-sensitive maps,
the smoke step, and (slow) over-fitting 4 scenes and the COCO step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.methods import fcis
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step
from tests.ops.test_ps_roi_pool import reference_pool

SMOKE = "experiments/fcis_nuclei.py:smoke"

CFG = fcis.FCISConfig(
    num_classes=2,
    canvas_hw=(128, 128),
    ps_group_size=3,
    mask_size=8,
    ohem_rois=3,
    mask_target_sampling_ratio=0,
)


def iou(a, b):
    """float64[len(a), len(b)] IoU of continuous xyxy boxes."""
    a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    inter = w * h
    return inter / (area(a) + area(b) - inter)


def encode(gt, roi, weights):
    """bbox_transform divided by BBOX_STDS (weights = 1 / stds), continuous boxes."""
    gt, roi = np.asarray(gt, np.float64), np.asarray(roi, np.float64)
    rw, rh = roi[:, 2] - roi[:, 0], roi[:, 3] - roi[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    dx = (gt[:, 0] + gw / 2 - roi[:, 0] - rw / 2) / rw
    dy = (gt[:, 1] + gh / 2 - roi[:, 1] - rh / 2) / rh
    return np.stack([dx, dy, np.log(gw / rw), np.log(gh / rh)], 1) * np.asarray(weights)


def annotate(proposals, gt_boxes, gt_classes, num_classes, weights, threshold=0.5):
    """sample_rois with BATCH_ROIS -1: every proposal and ground truth, labelled by its best
    ground truth (class at IoU >= 0.5, background below), box targets of the foreground.
    Returns {tuple(box): (label, target deltas or None)}."""
    candidates = np.concatenate([proposals, gt_boxes])
    overlaps = iou(candidates, gt_boxes)
    best, best_iou = overlaps.argmax(1), overlaps.max(1)
    targets = encode(gt_boxes[best], candidates, weights)
    out = {}
    for box, g, o, t in zip(candidates, best, best_iou, targets, strict=True):
        fg = o >= threshold
        out[tuple(np.round(box, 3))] = (gt_classes[g] if fg else num_classes, t if fg else None)
    return out


# A hand-made scene on a 128 canvas: two ground truths (A class 0 filled box, B class 1 with
# its left half filled), a padding slot; proposals: one on A, one on B, one on background, one
# padding.
GT_BOXES = np.array([[10, 10, 50, 50], [60, 20, 100, 90], [0, 0, 0, 0]], np.float32)
GT_CLASSES = np.array([0, 1, 0], np.int32)
GT_VALID = np.array([True, True, False])
PROPOSALS = np.array([[12, 12, 52.75, 48], [60, 30, 100, 80], [0, 60, 30, 120], [0, 0, 0, 0]])
PROPOSAL_VALID = np.array([True, True, True, False])
CROP = 16


def scene_batch():
    crops = np.zeros((3, CROP, CROP), np.uint8)
    crops[0] = 1
    crops[1, :, : CROP // 2] = 1
    return {
        "gt_boxes": jnp.asarray(GT_BOXES[None]),
        "gt_classes": jnp.asarray(GT_CLASSES[None]),
        "gt_valid": jnp.asarray(GT_VALID[None]),
        "gt_masks": jnp.asarray(crops[None]),
    }


def reference_mask_target(roi, gt_box, filled_right_edge, size, threshold, supersample=64):
    """The ground truth's mask inside the RoI (intersect_box_mask) resized to size x size as
    each bin's covered fraction (the area rule cv2's resize approaches), >= threshold. The mask
    is its box up to x = filled_right_edge."""
    x0, y0, x1, y1 = roi
    offsets = (np.arange(size * supersample) + 0.5) / (size * supersample)
    xs, ys = x0 + offsets * (x1 - x0), y0 + offsets * (y1 - y0)
    inside_x = (xs >= gt_box[0]) & (xs < min(gt_box[2], filled_right_edge))
    inside_y = (ys >= gt_box[1]) & (ys < gt_box[3])
    cover = inside_y[:, None] & inside_x[None, :]
    fraction = cover.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return fraction >= threshold, fraction


def test_training_rois_are_every_proposal_and_ground_truth_labelled_by_the_annotator_rules():
    batch = scene_batch()
    outputs = {
        "proposal_boxes": jnp.asarray(PROPOSALS[None], jnp.float32),
        "proposal_valid": jnp.asarray(PROPOSAL_VALID[None]),
    }
    build = jax.jit(lambda o, b: fcis.training_rois(o, b, CFG, jax.random.key(0)))
    rois = jax.tree.map(np.asarray, build(outputs, batch))
    keep = GT_VALID
    want = annotate(PROPOSALS[PROPOSAL_VALID], GT_BOXES[keep], GT_CLASSES[keep], 2, CFG.box_weights)
    got = {tuple(np.round(b, 3)): i for i, b in enumerate(rois["boxes"][0]) if rois["valid"][0, i]}
    assert set(got) == set(want)  # 3 proposals + 2 ground truths, padding left out
    for box, i in got.items():
        label, deltas = want[box]
        assert rois["classes"][0, i] == label, box
        assert rois["foreground"][0, i] == (label < 2), box
        if deltas is not None:
            np.testing.assert_allclose(rois["target_deltas"][0, i], deltas, atol=1e-5)
    # Foreground first: the 4 foreground RoIs (2 proposals, 2 ground truths) lead.
    assert rois["foreground"][0, :4].all() and not rois["foreground"][0, 4:].any()

    # Mask targets: B's left half inside B's proposal, A's full box inside A's proposal (which
    # overhangs A by 2.75 px on the right: its last column is 45% covered, a target at 0.4
    # and not at detectron2's 0.5).
    b_roi = got[tuple(np.round(PROPOSALS[1], 3))]
    want_b, _ = reference_mask_target(PROPOSALS[1], GT_BOXES[1], 80.0, 8, 0.4)
    np.testing.assert_array_equal(rois["mask_targets"][0, b_roi], want_b)
    a_roi = got[tuple(np.round(PROPOSALS[0], 3))]
    want_a, fraction = reference_mask_target(PROPOSALS[0], GT_BOXES[0], 50.0, 8, 0.4)
    assert 0.4 <= fraction[3, 7] < 0.5  # the threshold decides this column
    np.testing.assert_array_equal(rois["mask_targets"][0, a_roi], want_a)


def reference_ohem(cls_logits, labels, mask_logits, mask_targets, fg, deltas, targets, budget):
    """box_annotator_ohem for one image: per-RoI cls CE + 10 x mean over cells of the mask CE
    (0 for background: their targets are all -1) + 1 x smooth L1 (sigma 1) summed over the
    foreground's deltas; the top `budget` by that loss are kept (argsort, descending)."""
    log_p = cls_logits - np.log(np.exp(cls_logits).sum(-1, keepdims=True))
    cls = -log_p[np.arange(len(labels)), labels]
    mask_log = mask_logits - np.log(np.exp(mask_logits).sum(-1, keepdims=True))
    picked = np.where(mask_targets > 0.5, mask_log[..., 1], mask_log[..., 0])
    seg = np.where(fg, -picked.mean(axis=(1, 2)), 0.0)
    d = np.abs(deltas - targets)
    box = np.where(fg, np.where(d < 1, 0.5 * d * d, d - 0.5).sum(-1), 0.0)
    total = cls + 10 * seg + box
    return set(np.argsort(total)[::-1][:budget].tolist()), cls, seg, box


def test_ohem_keeps_the_hardest_rois_and_the_losses_are_the_reference_heads():
    rng = np.random.default_rng(0)
    b, r, s, c = 2, 7, 8, 2
    fg = rng.random((b, r)) < 0.5
    classes = np.where(fg, rng.integers(0, c, (b, r)), c)
    valid = np.ones((b, r), bool)
    valid[1, 5:] = False  # padding RoIs never train
    rois = {
        "classes": jnp.asarray(classes, jnp.int32),
        "foreground": jnp.asarray(fg),
        "valid": jnp.asarray(valid),
        "target_deltas": jnp.asarray(np.where(fg[..., None], rng.normal(size=(b, r, 4)), 0.0)),
        "mask_targets": jnp.asarray((rng.random((b, r, s, s)) < 0.5).astype(np.float32)),
    }
    outputs = {
        "rois": rois,
        "class_logits": jnp.asarray(rng.normal(size=(b, r, c + 1)), jnp.float32),
        "mask_logits": jnp.asarray(rng.normal(size=(b, r, s, s, 2)), jnp.float32),
        "box_deltas": jnp.asarray(rng.normal(size=(b, r, 4)), jnp.float32),
        "rpn_logits": jnp.zeros((b, 6)),
        "rpn_deltas": jnp.zeros((b, 6, 4)),
        "rpn_labels": jnp.zeros((b, 6), jnp.int32),
        "rpn_target_deltas": jnp.zeros((b, 6, 4)),
    }

    @jax.jit
    def ohem_and_losses(outputs):
        outputs = dict(outputs, ohem=fcis.ohem_selection(outputs, CFG))
        return outputs["ohem"], fcis.loss_fn(outputs, {}, CFG)[1]

    kept, metrics = ohem_and_losses(outputs)
    kept = np.asarray(kept)
    sums = {"cls": 0.0, "seg": 0.0, "box": 0.0}
    for i in range(b):
        n = valid[i].sum()
        chosen, cls, seg, box = reference_ohem(
            np.asarray(outputs["class_logits"][i, :n], np.float64),
            classes[i, :n],
            np.asarray(outputs["mask_logits"][i, :n], np.float64),
            np.asarray(rois["mask_targets"][i, :n]),
            fg[i, :n],
            np.asarray(outputs["box_deltas"][i, :n], np.float64),
            np.asarray(rois["target_deltas"][i, :n], np.float64),
            CFG.ohem_rois,
        )
        assert set(np.flatnonzero(kept[i]).tolist()) == chosen
        idx = sorted(chosen)
        sums["cls"] += cls[idx].sum()
        sums["seg"] += seg[idx].sum()
        sums["box"] += box[idx].sum()
    # normalization 'valid' for the class loss; grad_scale 10 / BATCH_ROIS_OHEM (mask, the
    # 441 cells averaged by multi_output) and 1 / BATCH_ROIS_OHEM (box), per image -> x images.
    assert float(metrics["loss_cls"]) == pytest.approx(sums["cls"] / kept.sum(), rel=1e-5)
    budget = CFG.ohem_rois * b
    assert float(metrics["loss_mask"]) == pytest.approx(10 * sums["seg"] / budget, rel=1e-5)
    assert float(metrics["loss_box_reg"]) == pytest.approx(sums["box"] / budget, rel=1e-5)


def test_assembling_is_the_group_max_mean_and_the_class_pair():
    """Class logits = mean over the S x S bins of max(outside, inside) per class (Group_Max,
    global average pool); pairs and box deltas from PSROIPooling of the two map sets."""
    cfg = dataclasses.replace(CFG, mask_size=5)
    k, s, c = cfg.ps_group_size, cfg.mask_size, cfg.num_classes
    rng = np.random.default_rng(3)
    cls_seg = rng.normal(size=(1, 6, 7, k * k * (c + 1) * 2)).astype(np.float32)
    box = rng.normal(size=(1, 6, 7, k * k * 4)).astype(np.float32)
    boxes = np.array([[[3.0, 5.0, 70.0, 90.0], [40.0, 10.0, 100.0, 60.0]]], np.float32)
    logits, pairs, deltas = jax.jit(
        lambda maps, b: fcis.FCIS(cfg).apply({}, maps, b, method=fcis.FCIS.assemble)
    )((jnp.asarray(cls_seg), jnp.asarray(box)), jnp.asarray(boxes))
    zero = np.zeros((1, 2, s, s, (c + 1) * 2))
    want_pairs, _ = reference_pool(cls_seg, boxes, k, s, 1 / 16, zero)
    want_pairs = want_pairs.reshape(1, 2, s, s, c + 1, 2)
    np.testing.assert_allclose(np.asarray(pairs), want_pairs, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), want_pairs.max(-1).mean((2, 3)), atol=1e-5)
    want_box, _ = reference_pool(box, boxes, k, s, 1 / 16, np.zeros((1, 2, s, s, 4)))
    np.testing.assert_allclose(np.asarray(deltas), want_box.mean((2, 3)), atol=1e-5)


def test_detect_scores_the_proposals_and_their_regressed_boxes_and_reports_the_candidates():
    """TEST.ITER 2 (fcis/core/tester.py im_detect with the test graph of get_symbol): constant
    maps make every RoI's class logits (4, 0, 0) (class 0's inside score 4) and its deltas
    (1, 0, 0, 0) after the (5, 5, 2, 2) weights, so each proposal's regressed box is its own
    width to the right (clipped to the image). Both sets are candidates with the same scores;
    per class NMS at 0.3 keeps all four boxes, reported as the candidates themselves, with class
    0's masks sigmoid(4) and class 1's 0.5."""
    cfg = dataclasses.replace(CFG, detections_per_image=10, test_mask_voting=False)
    k, c = cfg.ps_group_size, cfg.num_classes
    cls_seg = np.zeros((1, 8, 8, k * k, c + 1, 2), np.float32)
    cls_seg[..., 0, 1] = 4.0
    box = np.zeros((1, 8, 8, k * k, 4), np.float32)
    box[..., 0] = 5.0
    maps = (jnp.asarray(cls_seg.reshape(1, 8, 8, -1)), jnp.asarray(box.reshape(1, 8, 8, -1)))
    proposals = np.array([[[10, 10, 30, 30], [60, 60, 100, 90], [0, 0, 0, 0]]], np.float32)
    outputs = {
        "proposal_boxes": jnp.asarray(proposals),
        "proposal_valid": jnp.asarray([[True, True, False]]),
    }
    batch = {
        "image_hw": jnp.asarray([[128, 128]], jnp.int32),
        "orig_hw": jnp.asarray([[128, 128]], jnp.int32),
        "scale": jnp.asarray([1.0]),
        "crop_offset": jnp.zeros((1, 2), jnp.int32),
    }
    det = jax.jit(lambda m, o, b: fcis.FCIS(cfg).apply({}, m, o, b, method=fcis.FCIS.detect))(
        maps, outputs, batch
    )
    det = jax.tree.map(np.asarray, det)
    assert det["valid"].sum() == 8 and det["valid"][0, :8].all()
    top = np.exp(4.0) / (np.exp(4.0) + 2.0)
    np.testing.assert_allclose(det["scores"][0, :4], top, rtol=1e-5)
    np.testing.assert_allclose(det["scores"][0, 4:8], 1.0 / (np.exp(4.0) + 2.0), rtol=1e-5)
    assert det["classes"][0, :8].tolist() == [0] * 4 + [1] * 4
    want = {(10, 10, 30, 30), (60, 60, 100, 90), (30, 10, 50, 30), (100, 60, 128, 90)}
    for first in (0, 4):
        got = {tuple(np.round(b).astype(int).tolist()) for b in det["boxes"][0, first : first + 4]}
        assert got == want
    sigmoid4 = 1.0 / (1.0 + np.exp(-4.0))
    np.testing.assert_allclose(det["masks"][0, :4], sigmoid4, rtol=1e-5)
    np.testing.assert_allclose(det["masks"][0, 4:8], 0.5, rtol=1e-5)


def reference_resize(image, out_h, out_w, y0=0.0, x0=0.0, span_h=None, span_w=None):
    """float64[out_h, out_w]: the span of `image` starting at (y0, x0) (default: all of it)
    resampled bilinearly at the output's cell centres, the coordinates clamped into the image
    (cv2.resize's INTER_LINEAR on a whole image; lib/mask/mv_kernel.cu bilinear_interpolate:
    below 0 to 0, at or beyond the last cell onto it)."""
    image = np.asarray(image, np.float64)
    h, w = image.shape
    span_h = h if span_h is None else span_h
    span_w = w if span_w is None else span_w

    def axis(start, span, out, size):
        u = np.maximum(start + (np.arange(out) + 0.5) * span / out - 0.5, 0.0)
        low = np.minimum(np.floor(u).astype(int), size - 1)
        frac = np.where(low >= size - 1, 0.0, u - low)
        return low, np.minimum(low + 1, size - 1), frac

    ya, yb, fy = axis(y0, span_h, out_h, h)
    xa, xb, fx = axis(x0, span_w, out_w, w)
    top = image[ya][:, xa] * (1 - fx) + image[ya][:, xb] * fx
    bottom = image[yb][:, xa] * (1 - fx) + image[yb][:, xb] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def reference_vote(kept_box, c, boxes, scores, masks, im_hw, merge=0.5, binary=0.4):
    """One kept detection's (mask float64[S, S], box) by msracver/FCIS's mask voting, in the
    reference's inclusive pixel boxes (x1, y1, x2, y2): lib/mask/mask_transform.py
    cpu_mask_voting's loop over a class's kept boxes (lines 167-180: voters at box IoU >= merge,
    weights their class-c scores normalised) and mask_aggregation (lines 95-125: each voter's
    mask resized to its rounded box, binarised, weighted and summed on the image; the tight box
    of the sum >= binary), the merged map resized into that box as the recipe's GPU path does
    (lib/mask/mv_kernel.cu mask_resize, bilinear on the whole image map). boxes [Q, 4]
    inclusive, scores [Q, C], masks [Q, C, S, S] (each candidate's mask of each class)."""
    boxes = np.asarray(boxes, np.float64)
    s = masks.shape[-1]
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    kx1, ky1, kx2, ky2 = kept_box
    iw = np.clip(np.minimum(x2, kx2) - np.maximum(x1, kx1) + 1, 0, None)
    ih = np.clip(np.minimum(y2, ky2) - np.maximum(y1, ky1) + 1, 0, None)
    inter = iw * ih
    union = (x2 - x1 + 1) * (y2 - y1 + 1) + (kx2 - kx1 + 1) * (ky2 - ky1 + 1) - inter
    voters = np.flatnonzero(inter / union >= merge)
    weights = scores[voters, c] / scores[voters, c].sum()
    # (The test's scenes: no subset of the weights sums within 1e-3 of the cut, so float
    # rounding cannot move a cell across it between the two encodings.)
    sums = [weights[np.array(bits, bool)].sum() for bits in np.ndindex(*[2] * len(weights))]
    assert np.abs(np.array(sums) - binary).min() > 1e-3
    image = np.zeros(im_hw)
    for j, weight in zip(voters, weights, strict=True):
        bx1, by1, bx2, by2 = np.round(boxes[j]).astype(int)
        resized = reference_resize(masks[j, c], by2 - by1 + 1, bx2 - bx1 + 1)
        image[by1 : by2 + 1, bx1 : bx2 + 1] += (resized >= binary) * weight
    rows, cols = np.nonzero(image >= binary)
    box = (cols.min(), rows.min(), cols.max(), rows.max())
    mask = reference_resize(image, s, s, box[1], box[0], box[3] - box[1] + 1, box[2] - box[0] + 1)
    return mask, box


def disc_mask(box, size, centre=(20.0, 20.0), radius=12.0, inside=0.9, outside=0.1):
    """float32[size, size]: a candidate's mask in its box (x0, y0, x1, y1): `inside` at the cell
    centres within the disc, `outside` elsewhere (values whose bilinear mixes never land on 0.4
    for the integer boxes here)."""
    x0, y0, x1, y1 = box
    ys = y0 + (np.arange(size) + 0.5) * (y1 - y0) / size
    xs = x0 + (np.arange(size) + 0.5) * (x1 - x0) / size
    hit = (ys[:, None] - centre[1]) ** 2 + (xs[None, :] - centre[0]) ** 2 <= radius**2
    return np.where(hit, inside, outside).astype(np.float32)


# A 64 x 64 image: a disc (centre (20, 20), radius 12, tight box T) found by candidates T,
# two partial ones (A, B) and a box P over its top 14 rows whose mask claims all of P (the
# over-fitted model's failure), the highest-scoring; L alone elsewhere; X overlapping P below
# the merge threshold; a dropped slot. Boxes continuous (x0, y0, x1, y1), integer. Class 1:
# smaller scores, masks filled on the left half of each box.
VOTE_BOXES = np.array(
    [
        [8, 8, 32, 32],  # T
        [8, 8, 28, 30],  # A: IoU 0.76 with T, 0.56 with P
        [10, 8, 32, 26],  # B
        [8, 8, 32, 22],  # P: IoU 0.58 with T
        [36, 36, 60, 60],  # L
        [20, 20, 44, 44],  # X
        [0, 0, 30, 30],  # dropped (MIN_DROP_SIZE or padding)
    ],
    np.float32,
)
VOTE_VALID = np.array([True] * 6 + [False])
VOTE_SCORES = np.array(
    [[0.9, 0.3], [0.6, 0.05], [0.7, 0.2], [0.99, 0.1], [0.8, 0.01], [0.95, 0.01], [0.99, 0.5]],
    np.float32,
)
# Kept detections (as the NMS would leave them): P and L of class 0, T of class 1, an empty slot.
KEPT = np.array([3, 4, 0, 0])
KEPT_CLASSES = np.array([0, 0, 1, 0], np.int32)
KEPT_VALID = np.array([True, True, True, False])
VOTE_SIZE = 8


def vote_masks():
    """float32[Q, C, S, S] candidate masks of VOTE_BOXES (module comment above)."""
    s = VOTE_SIZE
    masks = np.zeros((len(VOTE_BOXES), 2, s, s), np.float32)
    for q, box in enumerate(VOTE_BOXES):
        masks[q, 0] = disc_mask(box, s)
        masks[q, 1] = 0.1
        masks[q, 1, :, : s // 2] = 0.9
    masks[3, 0] = 0.9  # P claims its whole box
    masks[4, 0] = np.triu(np.full((s, s), 0.8)) + 0.1  # L: a triangle
    return masks


def run_vote(cfg):
    """mask_voting (jitted alone) of the scene above: (boxes, masks, valid) as NumPy."""
    probs = np.clip(vote_masks(), 1e-6, 1 - 1e-6).transpose(0, 2, 3, 1)  # [Q, S, S, C]
    pairs = np.zeros(probs.shape[:3] + (3, 2), np.float32)  # background pair (0, 0)
    pairs[..., :2, 1] = np.log(probs / (1 - probs))  # softmax((0, logit p)) = (1 - p, p)
    vote = jax.jit(lambda *a: fcis.mask_voting(*a, cfg=cfg))
    out = vote(
        jnp.asarray(VOTE_BOXES[KEPT]),
        jnp.asarray(KEPT_CLASSES),
        jnp.asarray(KEPT_VALID),
        jnp.asarray(VOTE_BOXES),
        jnp.asarray(VOTE_VALID),
        jnp.asarray(VOTE_SCORES),
        jnp.asarray(pairs),
    )
    return jax.tree.map(np.asarray, out)


def reference_paste(mask, box, hw, threshold=0.4):
    """bool[H, W]: lib/utils/mask_voc2coco.py mask_voc2coco's paste of one mask at its
    inclusive box (resized to the rounded box, >= BINARY_THRESH)."""
    out = np.zeros(hw, bool)
    x1, y1, x2, y2 = np.round(box).astype(int)
    out[y1 : y2 + 1, x1 : x2 + 1] = reference_resize(mask, y2 - y1 + 1, x2 - x1 + 1) >= threshold
    return out


def reference_votes():
    """The reference's (mask, inclusive box) of each valid kept detection of the scene."""
    valid = np.flatnonzero(VOTE_VALID)
    inclusive = VOTE_BOXES[valid] - np.array([0, 0, 1, 1], np.float32)
    masks = vote_masks()[valid]
    scores = VOTE_SCORES[valid]
    out = []
    for k in np.flatnonzero(KEPT_VALID):
        kept = VOTE_BOXES[KEPT[k]] - np.array([0, 0, 1, 1], np.float32)
        out.append(reference_vote(kept, KEPT_CLASSES[k], inclusive, scores, masks, (64, 64)))
    return out


def test_mask_voting_is_the_reference_vote_on_a_pixel_grid():
    """With one grid cell per pixel (the voters' union is 24 x 24 px for every detection here,
    the grid 24 x 24) the voted boxes and masks are the reference's (reference_vote: FCIS's
    cpu_mask_voting / mask_aggregation, the GPU path's final resize); an empty kept slot stays
    invalid; at a coarser grid (2 px cells) the boxes stay within a cell and the pasted masks
    agree."""
    want = reference_votes()
    cfg = dataclasses.replace(
        CFG, mask_size=VOTE_SIZE, test_mask_voters=8, test_mask_voting_grid=24
    )
    boxes, masks, valid = run_vote(cfg)
    assert valid.tolist() == KEPT_VALID.tolist()
    for k, (want_mask, want_box) in enumerate(want):
        np.testing.assert_allclose(boxes[k], np.add(want_box, [0, 0, 1, 1]), atol=1e-4)
        np.testing.assert_allclose(masks[k], want_mask, atol=1e-5)
    # P's vote is not P: the tight voters moved its box (the over-fitting miss's remedy).
    assert not np.allclose(boxes[0], VOTE_BOXES[3], atol=1.0)

    coarse = dataclasses.replace(cfg, test_mask_voting_grid=12)
    boxes, masks, valid = run_vote(coarse)
    assert valid.tolist() == KEPT_VALID.tolist()
    for k, (want_mask, want_box) in enumerate(want):
        assert np.abs(boxes[k] - np.add(want_box, [0, 0, 1, 1])).max() <= 2.0 + 1e-4
        got = reference_paste(masks[k], boxes[k] - np.array([0, 0, 1, 1]), (64, 64))
        ref = reference_paste(want_mask, want_box, (64, 64))
        assert (got & ref).sum() / (got | ref).sum() >= 0.85, k


def test_mask_voting_pulls_a_partial_box_toward_the_tight_voters():
    """P (the top 14 rows of the disc, score 0.99, its mask all inside) wins the NMS; without
    voting its box and mask are P's own, box IoU 0.58 with the disc's; with voting the region
    only P claims carries 31% of the weight, under the 0.4 cut, and the tight voters extend the
    box down the disc: the voted box and pasted mask are far closer to the disc's."""
    cfg = dataclasses.replace(
        CFG, mask_size=VOTE_SIZE, test_mask_voters=8, test_mask_voting_grid=24
    )
    boxes, masks, _ = run_vote(cfg)
    disc = np.zeros((64, 64), bool)
    yy, xx = np.mgrid[:64, :64] + 0.5
    disc[(yy - 20) ** 2 + (xx - 20) ** 2 <= 144] = True
    truth = np.array([[8, 8, 32, 32]], np.float32)

    def mask_iou(mask, box, threshold):
        pasted = reference_paste(mask, box - np.array([0, 0, 1, 1]), (64, 64), threshold)
        return (pasted & disc).sum() / (pasted | disc).sum()

    own_box, own_mask = VOTE_BOXES[3], vote_masks()[3, 0]
    assert iou(own_box[None], truth)[0, 0] < 0.6
    assert iou(boxes[:1], truth)[0, 0] > 0.9
    # Pasted at the reference's 0.4 (measured 0.87 voted, 0.53 P's own) and at the library's
    # 0.5, which drops the rows where only T and A (47% of the weight) voted (0.81).
    assert mask_iou(own_mask, own_box, 0.4) < 0.6
    assert mask_iou(masks[0], boxes[0], 0.4) > 0.85
    assert mask_iou(masks[0], boxes[0], 0.5) > 0.8


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(fcis, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert np.isfinite(step.total)
    terms = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_mask", "loss_box_reg")
    assert_total_is_the_sum(step, terms)
    assert float(metrics["num_fg_rois"]) > 0 and float(metrics["ohem_fg_rois"]) > 0
    for name in ("rpn_head", "score_maps"):
        assert magnitude(grads[name]) > 0, name
    for name, group in grads["backbone"].items():
        assert (magnitude(group) > 0) == (name != "stem"), name  # smoke: freeze_at=1
    k, s = cfg.detections_per_image, cfg.mask_size
    assert det["masks"].shape == (2, k, s, s)
    assert det["boxes"].shape == (2, k, 4)
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="measured 2026-12-07 with 6000 anchors before the proposals' NMS, mask voting and the "
    "reference's 0.4 paste cut: segm AP 0.837 (AP50 1.0, AP75 0.876; bbox 0.867) after 300 steps "
    "(0.849 at a 0.5 cut, 0.804 without voting, 0.517 with the smoke's 100 anchors), short of "
    "0.9: voting lifts the partial-box circles (segm 87.2 -> 94.6); the triangles "
    "stay at 61-66 (experiments/benchmarks/RESULTS.md)",
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipe's compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import CANVAS_4X, overfit_report

    # At 4x the scenes' shapes are 32-230 px on 32 x 32 score maps (stride 16): the reference's
    # k = 7 and 21 x 21 masks, anchors 32-256, and its 6000 anchors before the proposals' NMS
    # (RPN_PRE_NMS_TOP_N, resnet_v1_101_coco_fcis_end2end_ohem.yaml:121,150). The smoke's 100 at
    # test, 0.8% of the 12,288 anchors here, went to the anchors around the largest shapes:
    # 5 of the 14 shapes had no proposal at IoU 0.5, which capped segm AP near 0.52.
    report = overfit_report(
        "experiments/fcis_nuclei.py",
        tmp_path / "overfit",
        steps=300,
        overrides=[
            f"--config.model.compute_dtype={dtype}",
            "--config.optim.name=adamw",
            "--config.optim.lr=0.002",
            "--config.model.anchor_sizes=(32, 64, 128, 256)",
            "--config.model.ps_group_size=7",
            "--config.model.mask_size=21",
            "--config.model.rpn_pre_nms_topk_train=6000",
            "--config.model.rpn_pre_nms_topk_test=6000",
            "--config.model.rpn_post_nms_topk_train=64",
            "--config.model.rpn_post_nms_topk_test=64",
            "--config.model.ohem_rois=32",
            *CANVAS_4X,
        ],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("fcis")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
