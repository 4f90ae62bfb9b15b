"""YOLACT: anchor matching, OHEM, per-class Fast NMS and the box crop against float64 NumPy loops
of the reference's rules (tests/methods/yolact_reference.py), the smoke step, and (slow)
over-fitting 4 scenes and the COCO experiment's step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import ops
from instseg_jax.methods import yolact
from tests.methods import yolact_reference as reference
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step

SMOKE = "experiments/yolact_nuclei.py:smoke"
CFG = yolact.YOLACTConfig(num_classes=3, canvas_hw=(128, 128), anchor_sizes=(12, 24, 48, 96, 192))


def targets(cfg, anchors, boxes, classes, valid=None, key=None, scale=1.0):
    valid = np.ones(len(boxes), bool) if valid is None else np.asarray(valid)
    return jax.jit(yolact.anchor_targets, static_argnums=4)(
        jnp.asarray(anchors, jnp.float32),
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(classes, jnp.int32),
        jnp.asarray(valid),
        cfg,
        key,
        None,
        None,
        jnp.float32(scale),
    )


def test_anchor_targets_of_a_hand_made_scene():
    anchors = np.array(
        [
            [0, 0, 10, 10],  # IoU 1.0 with A: positive
            [0, 0, 10, 12],  # IoU 0.83 with A: positive
            [0, 0, 10, 22],  # IoU 0.45 with A: ignored
            [0, 0, 10, 30],  # IoU 0.33 with A: negative
            [50, 50, 60, 60],  # overlaps nothing: negative
            [100, 100, 140, 140],  # IoU 0.16 with B, its best anchor: positive by B's claim
        ],
        np.float32,
    )
    boxes = [[0, 0, 10, 10], [95, 95, 115, 115], [50, 50, 53, 60], [0, 0, 5, 5]]
    # C (class 2) is 3 px wide: left out of training; D is padding.
    out = targets(CFG, anchors, boxes, [0, 1, 2, 0], valid=[True, True, True, False])
    np.testing.assert_array_equal(np.asarray(out["labels"]), [1, 1, -1, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(out["classes"]), [0, 0, 3, 3, 3, 1])
    assert np.asarray(out["matched"])[[0, 1, 5]].tolist() == [0, 0, 1]
    expected = ops.encode_boxes(jnp.asarray(boxes[1], jnp.float32), jnp.asarray(anchors[5]))
    np.testing.assert_allclose(
        np.asarray(out["box_targets"][5]), np.asarray(expected) * [10, 10, 5, 5], rtol=1e-5
    )
    assert int(out["positives"]) == 3


def test_negative_anchors_on_an_ignore_region_are_ignored():
    """The hand-made scene with two ignore regions (instances beyond input.max_instances):
    [48, 48, 62, 62] covers the negative anchor 4 (-1 now); [0, 0, 12, 12] covers the positive
    anchors 0 and 1 (still positive) and 120 of anchor 3's 300 px (IoA 0.4: still negative).
    With the same regions in padding slots nothing changes."""
    anchors = jnp.array(
        [[0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 22], [0, 0, 10, 30], [50, 50, 60, 60],
         [100, 100, 140, 140]],
        jnp.float32,
    )  # fmt: skip
    boxes = jnp.array(
        [[0, 0, 10, 10], [95, 95, 115, 115], [50, 50, 53, 60], [0, 0, 5, 5]], jnp.float32
    )
    regions = jnp.array([[48, 48, 62, 62], [0, 0, 12, 12]], jnp.float32)
    run = jax.jit(yolact.anchor_targets, static_argnums=4)
    classes = jnp.array([0, 1, 2, 0], jnp.int32)
    args = (anchors, boxes, classes, jnp.array([True, True, True, False]), CFG)
    out = run(*args, None, regions, jnp.array([True, True]))
    plain = run(*args, None, regions, jnp.array([False, False]))
    assert np.asarray(plain["labels"]).tolist() == [1, 1, -1, 0, 0, 1]
    assert np.asarray(out["labels"]).tolist() == [1, 1, -1, 0, -1, 1]
    for name in ("classes", "box_targets", "positives"):
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(plain[name]))


@pytest.mark.parametrize("seed", range(3))
def test_anchor_targets_match_the_reference_assigner_on_random_scenes(seed):
    rng = np.random.default_rng(seed)
    anchors = np.concatenate([np.asarray(a) for a in CFG.anchors()])
    n = 12
    size = rng.uniform(2, 80, (n, 2))
    x0 = rng.uniform(0, 128 - size[:, 0])
    y0 = rng.uniform(0, 128 - size[:, 1])
    boxes = np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], 1).astype(np.float32)
    boxes[3] = boxes[2] + 1.0  # two near-identical boxes claim the same best anchor
    classes = rng.integers(0, 3, n)
    out = targets(CFG, anchors, boxes, classes)
    labels, matched = reference.assign(anchors, boxes)
    # A ground truth whose two best anchors tie in exact arithmetic (boxes placed symmetrically
    # between two anchors) may take either in float32: compare everywhere else.
    iou = reference.iou_matrix(boxes, anchors)
    tied = np.zeros(len(anchors), bool)
    usable = ((boxes[:, 2:] - boxes[:, :2]) > 4).all(axis=1)
    for row in iou[usable]:
        best = row.max()
        if np.sum(np.abs(row - best) < 1e-6) > 1:
            tied |= np.abs(row - best) < 1e-6
            assert np.asarray(out["labels"])[np.abs(row - best) < 1e-6].max() == 1
    ours = np.asarray(out["labels"])
    np.testing.assert_array_equal(ours[~tied], labels[~tied])
    positive = (labels == 1) & ~tied
    assert positive.sum() >= n // 2  # one anchor scale per level: a few positives per box
    np.testing.assert_array_equal(np.asarray(out["matched"])[positive], matched[positive])


def test_small_ground_truth_is_filtered_on_the_original_image():
    """FilterAnnotations(min_gt_bbox_wh=(4.0, 4.0)) opens mmdetection's YOLACT train pipeline:
    boxes wider and higher than 4 original pixels, strictly, before any resize. On a canvas at
    scale 2 (canvas pixels per original pixel), boxes of 3.9, 4.0 and 4.1 original pixels are
    7.8, 8 and 8.2 canvas pixels: only the last trains. Fails on the former canvas rule
    (>= 4 canvas pixels keeps all three) and on >= instead of >."""
    anchors = np.concatenate([np.asarray(a) for a in CFG.anchors()])
    boxes = np.array([[10, 10, 17.8, 17.8], [40, 40, 48, 48], [80, 80, 88.2, 88.2]], np.float32)
    out = targets(CFG, anchors, boxes, [0, 1, 2], scale=2.0)
    labels, _ = reference.assign(anchors, boxes, scale=2.0)
    np.testing.assert_array_equal(np.asarray(out["labels"]), labels)
    positives = np.asarray(out["labels"]) == 1
    assert set(np.asarray(out["matched"])[positives]) == {2}


def test_mask_slots_are_a_random_subset_of_the_positives_when_they_overflow():
    anchors = np.concatenate([np.asarray(a) for a in CFG.anchors()])
    boxes = anchors[[100, 400, 800, 900, 1000]]  # five ground truths, each exactly an anchor
    cfg = dataclasses.replace(CFG, masks_per_image=3)
    out = targets(cfg, anchors, boxes, [0, 1, 2, 0, 1], key=jax.random.key(0))
    positives = np.flatnonzero(np.asarray(out["labels"]) == 1)
    chosen = np.asarray(out["slot_anchor"])[np.asarray(out["slot_valid"])]
    assert len(positives) > 3 and len(set(chosen)) == 3 and set(chosen) <= set(positives)
    assert int(out["overflow"]) == len(positives) - 3
    np.testing.assert_array_equal(
        np.asarray(out["slot_gt"]), np.asarray(out["matched"])[np.asarray(out["slot_anchor"])]
    )


def test_ohem_keeps_the_positives_and_three_hardest_negatives_per_positive():
    rng = np.random.default_rng(0)
    b, t, c = 3, 40, 4
    logits = rng.normal(0, 2, (b, t, c + 1)).astype(np.float32)
    labels = rng.choice([1, 0, 0, 0, 0, -1], (b, t))
    labels[2, :] = np.where(labels[2] == 1, 0, labels[2])  # an image without positives
    labels[1, :30] = 1  # more positives than 3x negatives exist: every negative
    classes = np.where(labels == 1, rng.integers(0, c, (b, t)), c)
    for rule in ("all", "none"):
        out = yolact.ohem_class_loss(
            jnp.asarray(logits), jnp.asarray(classes), jnp.asarray(labels), 3, rule
        )
        for i in range(b):
            expected = reference.ohem_loss(logits[i], classes[i], labels[i], 3, rule)
            assert float(out[i]) == pytest.approx(expected, rel=1e-5), (rule, i)
    # The image without positives is where the two references differ.
    assert reference.ohem_loss(logits[2], classes[2], labels[2], 3, "all") > 0
    assert reference.ohem_loss(logits[2], classes[2], labels[2], 3, "none") == 0


def test_per_class_fast_nms_matches_the_reference_loop():
    rng = np.random.default_rng(3)
    m, c = 60, 3
    centres = rng.uniform(20, 100, (m, 2))
    half = rng.uniform(5, 25, (m, 2))
    boxes = np.concatenate([centres - half, centres + half], 1).astype(np.float32)
    scores = rng.uniform(0, 0.3, (m, c)).astype(np.float32)
    idx, cls, sc, valid = ops.per_class_fast_nms(
        jnp.asarray(boxes), jnp.asarray(scores), 20, 0.5, 0.05, 25
    )
    expected = reference.fast_nms(boxes, scores, 20, 0.5, 0.05, 25)
    assert int(np.asarray(valid).sum()) == len(expected) > 10
    got = list(zip(np.asarray(idx).tolist(), np.asarray(cls).tolist(), strict=True))
    assert got[: len(expected)] == [(i, k) for i, k, _ in expected]
    np.testing.assert_allclose(
        np.asarray(sc)[: len(expected)], [s for *_, s in expected], rtol=1e-6
    )
    assert not np.asarray(valid)[len(expected) :].any()


def test_crop_keeps_the_cells_of_the_box_with_one_cell_of_padding():
    masks = jnp.ones((2, 16, 16))
    boxes = jnp.asarray([[8.0, 20.0, 30.0, 41.0], [0.0, 0.0, 64.0, 64.0]])
    inside = np.asarray(yolact.crop_masks(masks, boxes, 4))
    expected = np.zeros((2, 16, 16), bool)
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes) / 4):
        for r in range(16):
            for col in range(16):
                expected[k, r, col] = max(x0 - 1, 0) <= col < min(x1 + 1, 16) and max(
                    y0 - 1, 0
                ) <= r < min(y1 + 1, 16)
    np.testing.assert_array_equal(inside, expected)
    assert inside[0].sum() == 8 * 8  # columns 1..8 (x 2..7.5), rows 4..11 (y 5..10.25)


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(yolact, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert np.isfinite(step.total)
    assert_total_is_the_sum(step, ("loss_cls", "loss_box_reg", "loss_mask", "loss_semantic"))
    assert float(metrics["positive_anchors"]) > 0
    for name in ("fpn", "head", "protonet", "semantic"):
        assert magnitude(grads[name]) > 0, name
    for name, group in grads["backbone"].items():
        assert (magnitude(group) > 0) == (name != "stem"), name

    k, (h, w) = cfg.detections_per_image, (v // 4 for v in cfg.canvas_hw)
    assert det["canvas_masks"].shape == (2, k, h, w) and det["boxes"].shape == (2, k, 4)
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)


def overfit_overrides() -> list[str]:
    """The over-fitting runs' flags (test_yolact_plus's too): AdamW, the reference's anchor
    sizes, the 4x canvas."""
    from tests.methods.overfit import CANVAS_4X

    return [
        "--config.optim.name=adamw",
        "--config.optim.lr=0.002",
        "--config.model.anchor_sizes=(24, 48, 96, 192, 384)",  # the reference's
        *CANVAS_4X,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipes' compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import overfit_report

    report = overfit_report(
        "experiments/yolact_nuclei.py",
        tmp_path / "overfit",
        steps=300,
        overrides=[f"--config.model.compute_dtype={dtype}", *overfit_overrides()],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("yolact")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
