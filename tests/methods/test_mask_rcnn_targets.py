"""Mask R-CNN's training side against answers computed without instseg_jax: RPN anchor labels
and regression targets, RoI sampling, mask targets and the three losses with their normalisers,
on hand-made scenes (IoUs written as fractions) and against the float64 loops of
tests/methods/mask_rcnn_reference.py (detectron2's rules).

Every function is called directly on a few boxes: no backbone, one small jit per function.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import ops
from instseg_jax.methods import roi_heads, rpn
from tests.methods import mask_rcnn_reference as reference
from tests.ops import reference as ops_reference

# ----------------------------------------------------------------------------- RPN targets

anchor_targets = jax.jit(rpn.anchor_targets, static_argnums=(4, 5))

A = [0, 0, 10, 10]  # area 100
B = [100, 100, 120, 120]  # area 400, overlapped by no anchor at IoU >= 0.3
C = [50, 50, 60, 60]
HAND_ANCHORS = np.array(
    [
        [0, 0, 10, 10],  # A: IoU 1
        [0, 0, 10, 14],  # A: IoU 100/140 = 5/7
        [0, 0, 10, 7],  # A: IoU 70/100, exactly the upper threshold: positive
        [0, 0, 10, 20],  # A: IoU 1/2: between the thresholds, ignored
        [0, 0, 3, 10],  # A: IoU 30/100, exactly the lower threshold: ignored
        [0, 0, 10, 40],  # A: IoU 1/4: negative
        [50, 50, 60, 60],  # C: IoU 1
        [100, 100, 140, 140],  # B: IoU 400/1600 = 1/4, B's best: positive as a low-quality match
        [80, 80, 120, 120],  # B: IoU 1/4 as well, a tie for B's best: positive too
        [110, 100, 150, 140],  # B: IoU 200/1800 = 1/9: negative
    ],
    np.float32,
)


def test_rpn_anchor_labels_and_targets_of_a_hand_made_scene():
    """detectron2's RPN matcher: thresholds (0.3, 0.7) on half-open intervals, every anchor that
    is a ground truth's best (ties included) positive, padded ground truth never matched (its
    slots hold real-looking boxes), an image without ground truth all background; targets are
    the matched box encoded against the anchor with unit weights. The sample budget (16 per
    image, half positive) holds every labelled anchor, so sampling drops nothing.

    Fails if a threshold moves, the low-quality rule is dropped, gt_valid is ignored, or the
    encoding's weights or argument order change."""
    gt_boxes = np.array([[A, B, C], [C, B, A], [A, B, C]], np.float32)
    gt_valid = np.array([[True, True, False], [True, False, False], [False, False, False]])
    labels, targets = anchor_targets(
        jnp.asarray(HAND_ANCHORS), gt_boxes, gt_valid, jax.random.key(0), 16, 0.5
    )
    labels, targets = np.asarray(labels), np.asarray(targets)
    np.testing.assert_array_equal(
        labels,
        [
            [1, 1, 1, -1, -1, 0, 0, 1, 1, 0],  # C padded: anchor 6 stays background
            [0, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # only C is real here
            [0] * 10,  # no ground truth: every anchor background
        ],
    )
    # A from anchor 1 by hand: centres (5, 5) and (5, 7), sizes (10, 10) and (10, 14).
    np.testing.assert_allclose(targets[0, 1], [0, -2 / 14, 0, math.log(10 / 14)], atol=1e-6)
    for image in range(3):
        want_labels, want_targets = reference.rpn_anchor_targets(
            HAND_ANCHORS, gt_boxes[image], gt_valid[image]
        )
        np.testing.assert_array_equal(labels[image], want_labels)
        positive = want_labels == 1
        np.testing.assert_allclose(
            targets[image][positive], want_targets[positive], rtol=1e-5, atol=1e-6
        )


def jittered(rng, boxes, count, spread):
    """float32[count, 4]: copies of boxes picked at random, each side moved by up to
    spread x the box's size."""
    boxes = np.asarray(boxes, np.float64)[rng.integers(0, len(boxes), count)]
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    return (boxes + rng.uniform(-spread, spread, boxes.shape) * size).astype(np.float32)


def random_boxes(rng, count, canvas=128.0, low=6.0, high=48.0):
    size = rng.uniform(low, high, (count, 2))
    corner = rng.uniform(0, canvas - size)
    return np.concatenate([corner, corner + size], axis=1).astype(np.float32)


def test_rpn_straddling_anchors_are_left_out_of_matching_and_sampling():
    """PANet's TRAIN.RPN_STRADDLE_THRESH 0 against the encoding of _get_rpn_blobs: anchors
    reaching outside the image (valid region 64 x 48, the canvas is larger) are labelled -1,
    and a ground truth whose best anchor straddles gets its best inside anchor as positive.
    With a budget above the anchor count every label is sampled, so labels compare exactly.

    Fails if outside anchors stay negatives, still win a ground truth's low-quality match, or
    the edge test is off by the inclusive pixel (anchors ending exactly at the border)."""
    anchors = []
    for size in (16, 32):
        for y in range(-8, 72, 8):
            for x in range(-8, 88, 8):
                anchors.append([x, y, x + size, y + size])
    anchors = np.asarray(anchors, np.float32)
    gt_boxes = np.array([[[0, 0, 30, 30], [50, 20, 70, 52], [0, 0, 0, 0]]], np.float32)
    gt_valid = np.array([[True, True, False]])
    image_hw = np.array([[48, 64]], np.int32)
    labels, _ = rpn.anchor_targets(
        jnp.asarray(anchors),
        jnp.asarray(gt_boxes),
        jnp.asarray(gt_valid),
        jax.random.key(0),
        batch_per_image=len(anchors),
        positive_fraction=1.0,
        image_hw=jnp.asarray(image_hw),
        straddle_threshold=0.0,
    )
    want = reference.rpn_anchor_labels_inside(anchors, gt_boxes[0], gt_valid[0], (48, 64), 0.0)
    np.testing.assert_array_equal(np.asarray(labels[0]), want)
    assert (want == -1).sum() > 0 and (want == 1).sum() > 0  # the scene exercises both
    # The second box reaches below the image: its overall best anchor straddles.
    assert want[np.argmax(reference._iou_matrix(gt_boxes[0, 1:2], anchors)[0])] == -1


def test_rpn_sampling_keeps_the_positive_fraction_and_the_labels():
    """subsample_labels' counts: min(#positive, int(30 x 0.25) = 7) positives, then negatives up
    to 30 in all; each sampled anchor keeps its matcher label and target, the rest are -1.
    Image 0 has more positives than the quota, image 1 (one random box, none of the jittered
    anchors near it) fewer; two keys draw different anchors with the same counts.

    Fails if the fraction or its rounding (int, not round: 7.5 -> 7) changes, sampled anchors
    change label, or ignored anchors are drawn."""
    rng = np.random.default_rng(0)
    gt = random_boxes(rng, 3, low=20.0)
    anchors = np.concatenate([jittered(rng, gt, 40, 0.15), random_boxes(rng, 60)])
    lone = random_boxes(rng, 1)[0]
    gt_boxes = np.stack([gt, [lone, gt[0], gt[1]]])
    gt_valid = np.array([[True, True, True], [True, False, False]])
    drawn = []
    for key in (1, 2):
        labels, targets = anchor_targets(
            jnp.asarray(anchors), gt_boxes, gt_valid, jax.random.key(key), 30, 0.25
        )
        labels, targets = np.asarray(labels), np.asarray(targets)
        for image in range(2):
            want_labels, want_targets = reference.rpn_anchor_targets(
                anchors, gt_boxes[image], gt_valid[image]
            )
            num_pos, num_neg = reference.subsample_counts(want_labels, 30, 0.25)
            assert (labels[image] == 1).sum() == num_pos
            assert (labels[image] == 0).sum() == num_neg
            sampled = labels[image] >= 0
            np.testing.assert_array_equal(labels[image][sampled], want_labels[sampled])
            positive = labels[image] == 1
            np.testing.assert_allclose(
                targets[image][positive], want_targets[positive], rtol=1e-5, atol=1e-5
            )
        drawn.append(labels)
    assert not np.array_equal(drawn[0], drawn[1])
    counts = [
        reference.subsample_counts(reference.rpn_anchor_targets(anchors, g, v)[0], 30, 0.25)
        for g, v in zip(gt_boxes, gt_valid, strict=True)
    ]
    assert counts[0] == (7, 23) and counts[1][0] < 7  # both regimes of the quota are exercised


# ----------------------------------------------------------------------------- RoI sampling

sample_rois = jax.jit(roi_heads.sample_rois, static_argnums=(6, 7, 8, 9))

GT0, GT1, GT2 = [0, 0, 10, 10], [20, 20, 40, 40], [60, 60, 70, 70]
HAND_PROPOSALS = np.array(
    [
        [0, 0, 10, 20],  # GT0: IoU 100/200, exactly the threshold: foreground
        [0, 0, 10, 21],  # GT0: IoU 100/210: background
        [20, 20, 40, 44],  # GT1: IoU 400/480 = 5/6: foreground
        [100, 100, 110, 110],  # overlaps nothing: background
        [60, 60, 70, 70],  # overlaps only the padded GT2: background
        [1, 1, 11, 11],  # GT0: IoU 81/119, but not a valid proposal: never sampled
    ],
    np.float32,
)


def rows_by_box(rois, image):
    """{box tuple: row index} of one image's valid sampled RoIs (boxes are distinct here)."""
    valid = np.flatnonzero(np.asarray(rois["valid"][image]))
    boxes = np.asarray(rois["boxes"][image])
    return {tuple(boxes[r].tolist()): int(r) for r in valid}


def test_roi_sampling_of_a_hand_made_scene():
    """ROIHeads.label_and_sample_proposals: the valid ground truth joins the valid proposals,
    IoU >= 0.5 is foreground (no low-quality matches), foreground RoIs take their box's class
    and the box encoded with weights (10, 10, 5, 5), background takes class C = 3; invalid
    proposals and padded ground truth are never candidates; an image without ground truth
    samples only background. The budget (16, half positive) holds every candidate: positives
    first, then negatives, then padding.

    Fails if the threshold moves (or compares with >), the ground truth is not appended,
    proposal_valid or gt_valid is ignored, the box weights change, or background's class does."""
    gt_boxes = np.array([[GT0, GT1, GT2], [GT0, GT1, GT2]], np.float32)
    gt_classes = np.array([[2, 0, 1], [2, 0, 1]], np.int32)
    gt_valid = np.array([[True, True, False], [False, False, False]])
    proposals = np.stack([HAND_PROPOSALS, HAND_PROPOSALS])
    proposal_valid = np.array([[True] * 5 + [False], [True, True, True, False, False, False]])
    rois = sample_rois(
        proposals,
        proposal_valid,
        gt_boxes,
        gt_classes,
        gt_valid,
        jax.random.key(0),
        16,
        0.5,
        0.5,
        3,
    )
    rois = jax.device_get(rois)
    # box -> (class, matched slot, target deltas); 5 log 2 = 5 log(20 / 10), 5 log(5/6) likewise.
    want = {
        (0, 0, 10, 20): (2, 0, [0, 10 * (5 - 10) / 20, 0, 5 * math.log(10 / 20)]),
        (20, 20, 40, 44): (0, 1, [0, 10 * (30 - 32) / 24, 0, 5 * math.log(20 / 24)]),
        tuple(GT0): (2, 0, [0, 0, 0, 0]),
        tuple(GT1): (0, 1, [0, 0, 0, 0]),
        (0, 0, 10, 21): (3, None, [0, 0, 0, 0]),
        (100, 100, 110, 110): (3, None, [0, 0, 0, 0]),
        (60, 60, 70, 70): (3, None, [0, 0, 0, 0]),
    }
    rows = rows_by_box(rois, 0)
    assert set(rows) == set(want)
    assert rois["foreground"][0].tolist() == [True] * 4 + [False] * 12  # positives first
    assert rois["valid"][0].tolist() == [True] * 7 + [False] * 9
    for box, (cls, slot, deltas) in want.items():
        r = rows[box]
        assert rois["classes"][0, r] == cls, box
        if slot is not None:
            assert rois["gt_index"][0, r] == slot, box
        np.testing.assert_allclose(rois["target_deltas"][0, r], deltas, atol=1e-5, err_msg=box)
    # No ground truth: the three valid proposals, all background.
    assert set(rows_by_box(rois, 1)) == {tuple(b) for b in HAND_PROPOSALS[:3].tolist()}
    assert not rois["foreground"][1].any() and (rois["classes"][1] == 3).all()
    for image in range(2):  # the reference agrees on every sampled row
        check_rows_against_reference(rois, image, gt_boxes, gt_classes, gt_valid, 0.5, 3)


def check_rows_against_reference(rois, image, gt_boxes, gt_classes, gt_valid, threshold, c):
    valid = np.asarray(rois["valid"][image])
    boxes = np.asarray(rois["boxes"][image])[valid]
    foreground, classes, slots, targets = reference.roi_targets(
        boxes, gt_boxes[image], gt_classes[image], gt_valid[image], threshold, c
    )
    np.testing.assert_array_equal(np.asarray(rois["foreground"][image])[valid], foreground)
    np.testing.assert_array_equal(np.asarray(rois["classes"][image])[valid], classes)
    np.testing.assert_array_equal(
        np.asarray(rois["gt_index"][image])[valid][foreground], slots[foreground]
    )
    np.testing.assert_allclose(
        np.asarray(rois["target_deltas"][image])[valid], targets, rtol=1e-5, atol=1e-5
    )


def test_roi_sampling_counts_and_labels_on_random_scenes():
    """512 x 0.25 in miniature: 20 RoIs, at most int(20 x 0.25) = 5 foreground, the rest
    background from the valid proposals and ground truth; every sampled row's class, match and
    target equal the reference's for its box, each candidate is drawn at most once, and
    foreground rows come first. Image 0 has more positives than the quota, image 1 fewer.

    Fails if the fraction, the candidates (appended ground truth, validity) or the per-row
    labels change."""
    rng = np.random.default_rng(1)
    gt_boxes = np.stack([random_boxes(rng, 3, low=16.0), random_boxes(rng, 3, low=16.0)])
    gt_valid = np.array([[True, True, False], [True, False, False]])
    gt_classes = rng.integers(0, 4, (2, 3)).astype(np.int32)
    proposals = np.stack(
        [
            np.concatenate([jittered(rng, gt_boxes[0, :2], 30, 0.2), random_boxes(rng, 18)]),
            np.concatenate([jittered(rng, gt_boxes[1, 1:], 30, 0.2), random_boxes(rng, 18)]),
        ]
    )  # image 1 jitters its padded boxes: few real positives
    proposal_valid = rng.uniform(size=(2, 48)) > 0.1
    rois = jax.device_get(
        sample_rois(
            proposals,
            proposal_valid,
            gt_boxes,
            gt_classes,
            gt_valid,
            jax.random.key(3),
            20,
            0.25,
            0.5,
            4,
        )
    )
    quota = []
    for image in range(2):
        candidates = reference.roi_candidates(
            proposals[image], proposal_valid[image], gt_boxes[image], gt_valid[image]
        )
        foreground = reference.roi_targets(
            candidates, gt_boxes[image], gt_classes[image], gt_valid[image], 0.5, 4
        )[0]
        num_pos, num_neg = reference.subsample_counts(foreground.astype(int), 20, 0.25)
        quota.append(num_pos)
        fg, valid = rois["foreground"][image], rois["valid"][image]
        assert fg.tolist() == [True] * num_pos + [False] * (20 - num_pos)
        assert valid.tolist() == [True] * (num_pos + num_neg) + [False] * (20 - num_pos - num_neg)
        boxes = [tuple(b) for b in rois["boxes"][image][valid].tolist()]
        assert len(set(boxes)) == len(boxes)  # no candidate twice
        assert set(boxes) <= {tuple(b) for b in candidates.astype(np.float32).tolist()}
        check_rows_against_reference(rois, image, gt_boxes, gt_classes, gt_valid, 0.5, 4)
    assert quota[0] == 5 and 0 < quota[1] < 5  # both regimes of the quota are exercised


# ----------------------------------------------------------------------------- mask targets

MASK_HW = (64, 64)
CROP = 40  # the crop side Mc equals the boxes' 40 px width: crop cells are the mask's pixels


def disc(centre_x, centre_y, radius):
    """uint8[64, 64]: pixels whose centre lies in the disc (never exactly on its rim: centres
    sit at half-integers and the centre at integers)."""
    ys, xs = np.mgrid[: MASK_HW[0], : MASK_HW[1]] + 0.5
    return ((xs - centre_x) ** 2 + (ys - centre_y) ** 2 <= radius**2).astype(np.uint8)


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def mask_scene():
    """Two images of full masks, their boxes and 40 x 40 box crops built by hand.

    Image 0: a disc of radius 20 (tight box 40 x 40, its crop is the mask's pixels) and a
    rectangle spanning the full height of a 40 x 32 box wider than it (every crop row is the
    mask's row, so the crop is exact although the box is not square). Image 1: another disc,
    then padding.
    """
    disc_a = disc(32, 30, 20)
    disc_b = disc(36, 34, 20)
    rectangle = np.zeros(MASK_HW, np.uint8)
    rectangle[8:40, 26:47] = 1
    rectangle_box = [20, 8, 60, 40]
    assert tight_box(disc_a) == [12, 10, 52, 50] and tight_box(disc_b) == [16, 14, 56, 54]
    masks = [[disc_a, rectangle], [disc_b, np.zeros(MASK_HW, np.uint8)]]
    boxes = np.array([[[12, 10, 52, 50], rectangle_box], [[16, 14, 56, 54], [0, 0, 0, 0]]])
    crops = np.zeros((2, 2, CROP, CROP), np.uint8)
    crops[0, 0] = disc_a[10:50, 12:52]
    crops[0, 1] = np.tile(rectangle[8, 20:60], (CROP, 1))
    crops[1, 0] = disc_b[14:54, 16:56]
    return masks, boxes.astype(np.float32), crops


def targets_for(rois, gt_index, foreground, num_fg):
    masks, boxes, crops = mask_scene()
    rois = {
        "boxes": jnp.asarray(rois, jnp.float32),
        "gt_index": jnp.asarray(gt_index, jnp.int32),
        "foreground": jnp.asarray(foreground),
    }
    targets, valid = jax.jit(ops.mask_targets, static_argnums=(3, 4))(
        jnp.asarray(crops), jnp.asarray(boxes), rois, num_fg, 28
    )
    return masks, np.asarray(targets), np.asarray(valid)


def assert_targets_match(got, mask, roi):
    """got {0, 1}[28, 28] equals detectron2's target of the full mask in roi, except where the
    float64 soft value is within 1e-4 of 0.5 (float32 may round either way there)."""
    soft = reference.mask_target(mask, roi)
    decided = np.abs(soft - 0.5) > 1e-4
    assert decided.sum() >= 28 * 28 - 4
    assert 50 < (soft >= 0.5).sum() < 28 * 28 - 50  # the mask's edge crosses the RoI
    mismatched = np.argwhere((got != (soft >= 0.5)) & decided)
    assert len(mismatched) == 0, (
        f"{len(mismatched)} bins differ for {roi}, first (row, col): {mismatched[:6].tolist()}"
    )


def test_mask_targets_of_rois_shifted_inside_their_boxes():
    """BitMasks.crop_and_resize: aligned RoIAlign of the instance's mask at the RoI's 28 x 28
    bins (2 x 2 samples: the RoIs are 28-56 px, where detectron2's adaptive count is 2), then
    >= 0.5. The library pools the box crop instead of the full mask; with crops that hold the
    mask's pixels exactly and RoIs inside their boxes (shifted by fractions of a pixel, not
    square) the two must give the same bins. Only the first F = 3 RoIs get targets, valid
    where foreground; each RoI reads its own matched ground truth.

    Fails with aligned=False (a half-cell shift), a crop-frame mapping with the axes or the
    box corner wrong, another threshold, or a wrong ground-truth gather."""
    rois = [
        [[22.6, 9.3, 57.1, 38.2], [14.4, 11.7, 49.2, 46.3], [0, 0, 8, 8], [0, 0, 8, 8]],
        [[17.5, 16.25, 53.75, 51.5], [0, 0, 8, 8], [0, 0, 8, 8], [0, 0, 8, 8]],
    ]
    gt_index = [[1, 0, 0, 0], [0, 1, 0, 0]]
    foreground = [[True, True, False, False], [True, False, False, False]]
    masks, targets, valid = targets_for(rois, gt_index, foreground, 3)
    assert targets.shape == (2, 3, 28, 28)
    np.testing.assert_array_equal(valid, [[True, True, False], [True, False, False]])
    for image, slot in ((0, 0), (0, 1), (1, 0)):
        mask = masks[image][gt_index[image][slot]]
        assert_targets_match(targets[image, slot], mask, rois[image][slot])


def test_mask_targets_of_an_roi_reaching_past_its_box():
    """The same rule for an RoI 2-4 px larger than the disc's tight box on every side, the
    usual case for a positive RoI: detectron2's bins next to the box's edges sample the zeros
    outside the box (mask_targets pads each crop with one zero cell for this; without the
    padding 30 more bins are foreground along the box's edges)."""
    roi = [8.7, 7.4, 54.1, 53.3]
    masks, targets, _ = targets_for([[roi], [roi]], [[0], [0]], [[True], [False]], 1)
    assert_targets_match(targets[0, 0], masks[0][0], roi)


def test_adaptive_mask_targets_of_large_rois_match_detectron2_bitmasks():
    """mask_targets at sampling ratio 0 (model.mask_target_sampling_ratio of the COCO recipes)
    is detectron2/structures/masks.py BitMasks.crop_and_resize: aligned ROIAlign with sampling
    ratio 0 (ceil(RoI side / 28) samples per bin axis, each axis its own), then >= 0.5, as
    encoded in float64 by tests/ops/reference.py bitmask_crop_and_resize. A wavy blob in a
    96 px box whose 96 x 96 crop holds its pixels; RoIs of 60-119 px (3 to 5 samples per axis,
    one reaching 21 px past the box). Fails if the sampling ratio is ignored: the default 2
    samples per bin give other bins for these RoIs."""
    ys, xs = np.mgrid[:160, :160] + 0.5
    angle = np.arctan2(ys - 78, xs - 77)
    radius = 40 + 6 * np.cos(5 * angle) + 3 * np.sin(9 * angle)
    mask = (np.hypot(xs - 77, ys - 78) <= radius).astype(np.uint8)
    box = [30, 30, 126, 126]
    assert mask.sum() == mask[30:126, 30:126].sum()  # the box holds the whole mask
    rois = np.array(
        [[25.3, 33.7, 120.2, 131.9], [40.6, 28.1, 100.9, 119.4], [28.2, 26.5, 147.1, 140.3]]
    )
    batch_rois = {
        "boxes": jnp.asarray(rois[None], jnp.float32),
        "gt_index": jnp.zeros((1, 3), jnp.int32),
        "foreground": jnp.ones((1, 3), bool),
    }
    crops = jnp.asarray(mask[None, None, 30:126, 30:126])
    boxes = jnp.asarray([[box]], jnp.float32)
    build = jax.jit(ops.mask_targets, static_argnums=(3, 4, 5))
    adaptive = np.asarray(build(crops, boxes, batch_rois, 3, 28, 0)[0])[0]
    fixed = np.asarray(build(crops, boxes, batch_rois, 3, 28, 2)[0])[0]
    fixed_misses = 0
    for got, got_fixed, roi in zip(adaptive, fixed, rois, strict=True):
        soft = ops_reference.bitmask_roi_align(mask, roi, 28, 0)
        decided = np.abs(soft - 0.5) > 1e-4  # float32 may round either way within 1e-4
        assert decided.sum() >= 28 * 28 - 4
        np.testing.assert_array_equal((got > 0.5)[decided], (soft >= 0.5)[decided])
        fixed_misses += int(((got_fixed > 0.5) != (soft >= 0.5))[decided].sum())
    assert fixed_misses > 0


# ----------------------------------------------------------------------------- losses


def test_rpn_losses_are_normalised_by_the_anchor_budget_not_the_sampled_count():
    """detectron2's RPN losses: BCE over sampled anchors and L1 (smooth L1 with beta 0) over
    positive ones, both divided by batch_per_image x images = 3 x 2 = 6 although only 5 anchors
    were sampled. By hand: logits 0 and +-log 3 make every sampled BCE log 2 or log 4, total
    6 log 2; the positives' L1 distances are 2.75 and 1.5 (components above and below 1, so
    any beta > 0 changes the sum); deltas on negatives and unsampled anchors do not count.

    Fails with another normaliser (sampled or positive count, per image), beta > 0, or the
    regression weighted by sampled instead of positive anchors."""
    l3 = math.log(3.0)
    labels = np.array([[1, 0, -1, 1], [0, -1, -1, -1]], np.int32)
    logits = np.array([[0.0, l3, 5.0, -l3], [0.0, 7.0, -7.0, 7.0]], np.float32)
    deltas = np.full((2, 4, 4), 10.0, np.float32)
    targets = np.zeros((2, 4, 4), np.float32)
    deltas[0, 0], targets[0, 0] = [0.5, -2.0, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0]  # 2.75
    deltas[0, 3], targets[0, 3] = [1.0, 0.5, -0.5, 0.0], [0.0, 0.5, 0.0, 0.0]  # 1.5
    got = rpn.rpn_losses(logits, deltas, labels, targets, 3)
    # BCE: (1, 0) log 2; (0, log 3) -log(1/4); (1, -log 3) -log(1/4); (0, 0) log 2.
    assert float(got["loss_rpn_cls"]) == pytest.approx(6 * math.log(2.0) / 6, rel=1e-6)
    assert float(got["loss_rpn_loc"]) == pytest.approx((2.75 + 1.5) / 6, rel=1e-6)
    want = reference.rpn_losses(logits, deltas, labels, targets, 3)
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-6), name
    # Random inputs against the reference's loops.
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, -1, 0, 1], (2, 30)).astype(np.int32)
    logits = rng.normal(0, 3, (2, 30)).astype(np.float32)
    deltas = rng.normal(0, 1, (2, 30, 4)).astype(np.float32)
    targets = rng.normal(0, 1, (2, 30, 4)).astype(np.float32)
    got = rpn.rpn_losses(logits, deltas, labels, targets, 16)
    for name, value in reference.rpn_losses(logits, deltas, labels, targets, 16).items():
        assert float(got[name]) == pytest.approx(value, rel=1e-5), name
    # PANet's RPN beta 1/9 (MODEL.RPN.SMOOTH_L1_BETA): both sides of the quadratic zone.
    got = rpn.rpn_losses(logits, deltas, labels, targets, 16, beta=1 / 9)
    for name, value in reference.rpn_losses(logits, deltas, labels, targets, 16, 1 / 9).items():
        assert float(got[name]) == pytest.approx(value, rel=1e-5), name


def box_rois(classes, valid, foreground, target_deltas):
    return {
        "classes": jnp.asarray(classes, jnp.int32),
        "valid": jnp.asarray(valid),
        "foreground": jnp.asarray(foreground),
        "target_deltas": jnp.asarray(target_deltas, jnp.float32),
    }


def test_box_losses_average_over_every_sampled_roi_of_the_batch():
    """FastRCNNOutputLayers.losses: cross-entropy over C + 1 = 3 classes (2 = background)
    averaged over the batch's 4 sampled RoIs (not per image: image 1 has one), and the L1 of
    the ground-truth class's deltas over the 3 foreground RoIs, divided by the same 4. By hand:
    CE log 3, log 2 (logits (0, log 2, 0): p = 2/4), log 5 (logits (log 3, 0, 0) for
    background: p = 1/5), log 3; L1 1.5 + 2.5 + 2. Padding rows hold wrong logits and deltas.

    Fails with the foreground count or per-image means as normaliser, padding counted,
    class-agnostic or wrong-class deltas, or the background class's deltas counted."""
    l2, l3 = math.log(2.0), math.log(3.0)
    logits = np.zeros((2, 4, 3), np.float32)
    logits[0, 1] = [0, l2, 0]
    logits[0, 2] = [l3, 0, 0]
    logits[0, 3] = logits[1, 1:] = [9, -9, 0]  # padding
    deltas = np.full((2, 4, 2, 4), 7.0, np.float32)
    deltas[0, 0, 0] = [0.5, 0, 0, -1]  # class 0, target 0: 1.5
    deltas[0, 1, 1] = [0.25, 0.25, 0, 0]  # class 1, target (0, 0, 0, 2): 2.5
    deltas[1, 0, 1] = [1, -1, 0, 0]  # class 1, target 0: 2
    target_deltas = np.zeros((2, 4, 4), np.float32)
    target_deltas[0, 1] = [0, 0, 0, 2]
    classes = [[0, 1, 2, 2], [1, 2, 2, 2]]
    valid = [[True, True, True, False], [True, False, False, False]]
    foreground = [[True, True, False, False], [True, False, False, False]]
    rois = box_rois(classes, valid, foreground, target_deltas)
    losses, metrics = roi_heads.box_losses(jnp.asarray(logits), jnp.asarray(deltas), rois)
    assert float(losses["loss_cls"]) == pytest.approx((l3 + l2 + math.log(5.0) + l3) / 4, rel=1e-6)
    assert float(losses["loss_box_reg"]) == pytest.approx((1.5 + 2.5 + 2.0) / 4, rel=1e-6)
    # argmax (ties to class 0): rows (0, 0) and (0, 1) right, (0, 2) and (1, 0) wrong.
    assert float(metrics["cls_accuracy"]) == pytest.approx(2 / 4)
    want = reference.box_losses(logits, deltas, classes, target_deltas, valid, foreground)
    for name, value in want.items():
        assert float(losses[name]) == pytest.approx(value, rel=1e-6), name
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 4, (2, 12))
    foreground = classes < 3
    valid = foreground | (rng.uniform(size=(2, 12)) > 0.3)
    foreground &= valid
    logits = rng.normal(0, 2, (2, 12, 4)).astype(np.float32)
    deltas = rng.normal(0, 1, (2, 12, 3, 4)).astype(np.float32)
    target_deltas = np.where(foreground[..., None], rng.normal(0, 1, (2, 12, 4)), 0.0)
    rois = box_rois(classes, valid, foreground, target_deltas)
    losses, _ = roi_heads.box_losses(jnp.asarray(logits), jnp.asarray(deltas), rois)
    want = reference.box_losses(logits, deltas, classes, target_deltas, valid, foreground)
    for name, value in want.items():
        assert float(losses[name]) == pytest.approx(value, rel=1e-5), name
    # Keypoint R-CNN's box beta 0.5 (Base-Keypoint-RCNN-FPN.yaml ROI_BOX_HEAD.SMOOTH_L1_BETA).
    losses, _ = roi_heads.box_losses(jnp.asarray(logits), jnp.asarray(deltas), rois, beta=0.5)
    want = reference.box_losses(logits, deltas, classes, target_deltas, valid, foreground, 0.5)
    assert float(losses["loss_box_reg"]) == pytest.approx(want["loss_box_reg"], rel=1e-5)


def test_mask_loss_is_the_mean_bce_over_foreground_pixels_of_the_right_class():
    """mask_rcnn_loss: BCE of the ground-truth class's map, averaged over all pixels of the
    valid (foreground) RoIs. By hand: the chosen class's logits are +log 3 on target pixels and
    -log 3 elsewhere, so every counted pixel costs log(4/3) and the mean is log(4/3) for any
    count; the other class's map and the invalid slot are wrong (log 4 per pixel) and must not
    count. No foreground RoI: the loss is 0, not NaN.

    Fails if the wrong class's map is read, the invalid slot counts, or the normaliser drops
    the pixels or counts every slot."""
    l3 = math.log(3.0)
    rng = np.random.default_rng(2)
    targets = (rng.uniform(size=(2, 3, 4, 4)) > 0.5).astype(np.float32)
    sign = 2 * targets - 1  # +1 on target pixels
    classes = np.array([[1, 0, 2], [0, 2, 2]], np.int32)  # 2: background, invalid slots
    valid = np.array([[True, True, False], [True, False, False]])
    logits = np.empty((2, 3, 4, 4, 2), np.float32)
    for b, f in np.ndindex(2, 3):
        right = classes[b, f] if valid[b, f] else 0
        logits[b, f, ..., right] = l3 * sign[b, f] if valid[b, f] else -l3 * sign[b, f]
        logits[b, f, ..., 1 - right] = -l3 * sign[b, f]
    got = roi_heads.mask_loss(jnp.asarray(logits), classes, jnp.asarray(targets), valid)
    assert float(got) == pytest.approx(math.log(4 / 3), rel=1e-6)
    assert float(got) == pytest.approx(
        reference.mask_loss(logits, classes, targets, valid), rel=1e-6
    )
    none = roi_heads.mask_loss(jnp.asarray(logits), classes, jnp.asarray(targets), valid & False)
    assert float(none) == 0.0
    logits = rng.normal(0, 2, (2, 3, 4, 4, 2)).astype(np.float32)
    got = roi_heads.mask_loss(jnp.asarray(logits), classes, jnp.asarray(targets), valid)
    assert float(got) == pytest.approx(
        reference.mask_loss(logits, classes, targets, valid), rel=1e-5
    )
