"""RDSNet: anchor assignment, the mask crop, the OHEM mask loss, the correlation and MBRM
against float64 NumPy encodings of the reference's rules (tests/methods/rdsnet_reference.py,
written from wangsr126/RDSNet), the smoke step, and (slow) over-fitting 4 scenes and the COCO
experiment's step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.methods import rdsnet
from tests.methods import rdsnet_reference as reference
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step

SMOKE = "experiments/rdsnet_nuclei.py:smoke"
CFG = rdsnet.RDSNetConfig(num_classes=3, canvas_hw=(128, 128), anchor_octave_base=1.5)


def targets(cfg, anchors, boxes, classes, valid=None, area=None, key=None):
    n = len(boxes)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid)
    area = np.full(n, 1e4) if area is None else np.asarray(area)
    return jax.jit(rdsnet.anchor_targets, static_argnums=5)(
        jnp.asarray(anchors, jnp.float32),
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(classes, jnp.int32),
        jnp.asarray(valid),
        jnp.asarray(area, jnp.float32),
        cfg,
        key,
    )


def test_anchor_targets_of_a_hand_made_scene():
    """MaxIoUAssigner(0.5, 0.4, min_pos_iou=0, gt_max_assign_all=True), mmdetection v1's, as
    configs/rdsnet/rdsnet_r50_fpn_1x.py sets it: positives >= 0.5, negatives < 0.4, then every
    anchor at a ground truth's best IoU (ties included) is its positive, the later ground truth
    winning. Fails on detectron2's Matcher rule (the argmax ground truth keeps a claimed
    anchor) and on a single best anchor per ground truth (YOLACT's)."""
    anchors = np.array(
        [
            [0, 0, 10, 10],  # IoU 1.0 with A: positive for A
            [0, 0, 10, 12],  # IoU 0.83 with A: positive for A
            [0, 0, 10, 22],  # IoU 0.45 with A: ignored
            [0, 0, 10, 30],  # IoU 0.33 with A: negative
            [100, 100, 160, 120],  # IoU 1/3 with B, its best, tied with the next: positive
            [60, 100, 120, 120],  # IoU 1/3 with B (the tie): positive for B
            [60, 60, 80, 80],  # IoU 0.54 with C: positive for C
            [0, 40, 30, 70],  # overlaps nothing: negative
        ],
        np.float32,
    )
    boxes = [[0, 0, 10, 10], [100, 100, 120, 120], [62, 62, 74, 80]]
    out = targets(CFG, anchors, boxes, [0, 1, 2])
    labels, matched = reference.assign(anchors, boxes)
    np.testing.assert_array_equal(np.asarray(out["labels"]), labels)
    assert labels.tolist() == [1, 1, -1, 0, 1, 1, 1, 0]
    positive = labels == 1
    np.testing.assert_array_equal(np.asarray(out["matched"])[positive], matched[positive])
    np.testing.assert_array_equal(np.asarray(out["classes"])[~positive], 3)
    assert int(out["positives"]) == positive.sum()


def test_a_claimed_anchor_goes_to_the_later_ground_truth_that_claims_it():
    """Anchors 0 and 1 are both A's best (IoU 0.5 each: a tie, both claimed), and anchor 0 is
    also B's best (0.25): it goes to B, the later ground truth (assign_wrt_overlaps' loop over
    the ground truth overwrites), although its IoU with A is higher; anchor 1 stays A's."""
    anchors = np.array([[0, 0, 20, 20], [20, 0, 40, 20]], np.float32)
    boxes = [[0, 0, 40, 20], [5, 5, 15, 15]]
    out = targets(CFG, anchors, boxes, [0, 1])
    labels, matched = reference.assign(anchors, boxes)
    assert labels.tolist() == [1, 1] and matched.tolist() == [1, 0]
    np.testing.assert_array_equal(np.asarray(out["labels"]), labels)
    np.testing.assert_array_equal(np.asarray(out["matched"]), matched)


@pytest.mark.parametrize("seed", range(2))
def test_anchor_targets_match_the_reference_assigner_on_random_scenes(seed):
    rng = np.random.default_rng(seed)
    anchors = np.concatenate([np.asarray(a) for a in CFG.anchors()])
    n = 10
    size = rng.uniform(6, 80, (n, 2))
    x0 = rng.uniform(0, 128 - size[:, 0])
    y0 = rng.uniform(0, 128 - size[:, 1])
    boxes = np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], 1).astype(np.float32)
    out = targets(CFG, anchors, boxes, rng.integers(0, 3, n))
    labels, matched = reference.assign(anchors, boxes)
    # Exact float64 ties (a box symmetric between anchors) may break either way in float32:
    # compare where no ground truth's best IoU is tied within 1e-6.
    iou = reference.iou_matrix(boxes, anchors)
    tied = np.zeros(len(anchors), bool)
    for row in iou:
        near = np.abs(row - row.max()) < 1e-6
        if near.sum() > 1 and not (row[near] == row.max()).all():
            tied |= near
    ours = np.asarray(out["labels"])
    np.testing.assert_array_equal(ours[~tied], labels[~tied])
    positive = (labels == 1) & ~tied
    assert positive.sum() >= n
    np.testing.assert_array_equal(np.asarray(out["matched"])[positive], matched[positive])
    box_targets = np.asarray(out["box_targets"])[positive]
    a, g = anchors[positive].astype(np.float64), boxes[matched[positive]].astype(np.float64)
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    expected = np.stack(  # bbox2delta with means 0, stds 1 (continuous coordinates)
        [
            (g[:, 0] + gw / 2 - a[:, 0] - aw / 2) / aw,
            (g[:, 1] + gh / 2 - a[:, 1] - ah / 2) / ah,
            np.log(gw / aw),
            np.log(gh / ah),
        ],
        1,
    )
    np.testing.assert_allclose(box_targets, expected, atol=1e-5)


def test_only_positives_of_masks_over_the_area_floor_take_mask_slots():
    """mask_sampler: positives whose ground-truth mask is larger than ignore_area (100 px),
    a random subset of at most masks_to_train; here 3 slots."""
    anchors = np.concatenate([np.asarray(a) for a in CFG.anchors()])
    boxes = anchors[[100, 400, 800, 2000]]  # four ground truths, each exactly an anchor
    cfg = dataclasses.replace(CFG, masks_per_image=3)
    area = [50.0, 101.0, 400.0, 100.0]  # only the second and third exceed 100
    out = targets(cfg, anchors, boxes, [0, 1, 2, 0], area=area, key=jax.random.key(0))
    matched = np.asarray(out["matched"])
    eligible = np.flatnonzero((np.asarray(out["labels"]) == 1) & np.isin(matched, [1, 2]))
    chosen = np.asarray(out["slot_anchor"])[np.asarray(out["slot_valid"])]
    assert len(chosen) == min(3, len(eligible)) and set(chosen) <= set(eligible)
    assert int(out["overflow"]) == max(len(eligible) - 3, 0)
    assert set(np.asarray(out["slot_gt"])[np.asarray(out["slot_valid"])]) <= {1, 2}


def test_the_crop_grows_boxes_to_1_5x_in_training_and_1_2x_at_test():
    """sanitize_coordinates(padding) + RdsMaskHead.crop on random boxes (in mask cells) at the
    training (0.25) and test (0.1) paddings and none; a known answer: the 8-cell box [4, 4, 12,
    12] at 0.25 grows by 0.25 x 9 = 2.25 cells a side: cells 1..13 (13 = 1.5 x 8 + 1 after
    truncation)."""
    rng = np.random.default_rng(0)
    h, w = 20, 24
    x0, y0 = rng.uniform(-2, 20, 12), rng.uniform(-2, 16, 12)
    boxes = np.stack([x0, y0, x0 + rng.uniform(0.3, 10, 12), y0 + rng.uniform(0.3, 10, 12)], 1)
    boxes[0] = [4, 4, 12, 12]
    crop = jax.jit(rdsnet.crop_region, static_argnums=(1, 2))
    for padding in (0.25, 0.1, 0.0):
        ours = np.asarray(crop(jnp.asarray(boxes, jnp.float32), (h, w), padding))
        for k, box in enumerate(boxes):
            np.testing.assert_array_equal(ours[k], reference.crop(box, h, w, padding), (padding, k))
    inside = np.asarray(crop(jnp.asarray(boxes, jnp.float32), (h, w), 0.25))[0]
    assert np.flatnonzero(inside.any(axis=0)).tolist() == list(range(1, 14))


def test_mask_loss_matches_the_reference_with_ohem():
    """RdsMaskHead.loss: 2-class cross-entropy in the 1.5x crop, OHEM keeping as many hardest
    background pixels as foreground ones, each mask / (its counted pixels + 1), the sum over
    trained masks / (their number + 1). Two images of three slots, one slot empty; one mask
    with more background than its quota and one whose crop holds fewer background pixels than
    the quota (every background pixel counts)."""
    rng = np.random.default_rng(1)
    b, p, h, w = 2, 3, 12, 16
    logits = rng.normal(0, 2, (b, p, 2, h, w)).astype(np.float32)
    targets_ = np.zeros((b, p, h, w), np.uint8)
    boxes = np.array(
        [
            [[8, 8, 32, 28], [20, 4, 60, 44], [0, 0, 64, 48]],
            [[4, 4, 24, 40], [36, 12, 48, 24], [0, 0, 8, 8]],
        ],
        np.float32,
    )  # canvas pixels: stride-4 cells are / 4
    for i in range(b):
        for k in range(p):
            x0, y0, x1, y1 = (boxes[i, k] / 4).astype(int)
            targets_[i, k, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.8
    targets_[0, 2] = 1
    targets_[0, 2, :2] = 0  # a full-canvas box: 32 background pixels, quota 160
    slot_valid = np.array([[True, True, True], [True, True, False]])
    total, per_mask = jax.jit(rdsnet.mask_loss, static_argnums=4)(
        jnp.asarray(logits),
        jnp.asarray(targets_),
        jnp.asarray(boxes),
        jnp.asarray(slot_valid),
        CFG,
    )
    expected_sum, count = 0.0, 0
    for i in range(b):
        kept = slot_valid[i]
        _, per, _ = reference.mask_loss(logits[i], targets_[i], boxes[i] / 4.0, 0.25, 1.0)
        np.testing.assert_allclose(np.asarray(per_mask[i]), per, rtol=1e-5)
        expected_sum += per[kept].sum()
        count += kept.sum()
    assert float(total) == pytest.approx(expected_sum / (count + 1), rel=1e-5)


def test_the_correlation_gives_background_and_foreground_logits_per_instance():
    rng = np.random.default_rng(2)
    pixels = rng.normal(size=(1, 5, 6, 4)).astype(np.float32)
    kernels = rng.normal(size=(1, 3, 8)).astype(np.float32)
    ours = np.asarray(rdsnet.correlate(jnp.asarray(pixels), jnp.asarray(kernels)))[0]
    np.testing.assert_allclose(ours, reference.correlate(pixels[0], kernels[0]), atol=1e-5)


def test_mbrm_moves_box_edges_as_the_reference():
    """MBRM.forward/get_boxes at pixel resolution (probabilities at stride 1, so the resampling
    to canvas pixels is the identity): random soft rectangles and boxes a few pixels off their
    edges; every refined edge equals the reference's, and the refined boxes lie closer to the
    masks' edges than the given ones."""
    rng = np.random.default_rng(3)
    k, h, w = 6, 48, 56
    masks = np.zeros((k, h, w), np.float32)
    boxes = np.zeros((k, 4), np.float32)
    edges = []
    for n in range(k):
        x0, y0 = rng.integers(4, 16), rng.integers(4, 14)
        x1, y1 = x0 + rng.integers(12, 30), y0 + rng.integers(12, 26)
        masks[n, y0:y1, x0:x1] = rng.uniform(0.6, 1.0, (y1 - y0, x1 - x0))
        masks[n] += rng.uniform(0, 0.1, (h, w)).astype(np.float32)
        boxes[n] = [x0, y0, x1, y1] + rng.uniform(-3, 3, 4)
        edges.append([x0, y0, x1, y1])
    ours = np.asarray(
        jax.jit(rdsnet.mbrm_boxes, static_argnums=(2, 3))(
            jnp.asarray(masks), jnp.asarray(boxes), (h, w), 0.05
        )
    )
    np.testing.assert_array_equal(ours, reference.mbrm(masks, boxes))
    assert np.abs(ours - np.asarray(edges)).mean() < np.abs(boxes - np.asarray(edges)).mean()


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(rdsnet, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert np.isfinite(step.total)
    assert_total_is_the_sum(step, ("loss_cls", "loss_box_reg", "loss_mask"))
    assert float(metrics["positive_anchors"]) > 0 and float(metrics["trained_masks"]) > 0
    assert float(metrics["loss_mask"]) > 0
    for name in ("fpn", "objects", "pixels"):
        assert magnitude(grads[name]) > 0, name
    for tower in ("cls0", "reg0", "rep0", "rep_out"):
        assert magnitude(grads["objects"][tower]) > 0, tower
    for name, group in grads["backbone"].items():
        assert (magnitude(group) > 0) == (name != "stem"), name

    k, (h, w) = cfg.detections_per_image, (v // 4 for v in cfg.canvas_hw)
    assert det["canvas_masks"].shape == (2, k, h, w) and det["boxes"].shape == (2, k, 4)
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)
    assert np.isfinite(np.asarray(det["boxes"])).all()


def overfit_overrides() -> list[str]:
    """The over-fitting runs' flags: AdamW, the reference's anchors (octave base 4: 32..645 px)
    and mask-area floor (100 px) for the scenes drawn at 4x on the 512 canvas."""
    from tests.methods.overfit import CANVAS_4X

    return [
        "--config.optim.name=adamw",
        "--config.optim.lr=0.002",
        "--config.model.anchor_octave_base=4.0",
        "--config.model.mask_min_area=100.0",
        *CANVAS_4X,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipe's compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import overfit_report

    report = overfit_report(
        SMOKE.split(":")[0],
        tmp_path / "overfit",
        steps=300,
        overrides=[f"--config.model.compute_dtype={dtype}", *overfit_overrides()],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("rdsnet")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
