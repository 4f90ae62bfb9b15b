"""FCOS: location assignment (sizes of interest, centre sampling, smallest-box ties), the losses
and the test procedure against float64 NumPy loops of the rules (tests/methods/fcos_reference.py),
the smoke step, and (slow) over-fitting 4 scenes and the COCO experiment's step."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import builders
from instseg_jax import config as config_lib
from instseg_jax.methods import fcos
from tests.methods import fcos_reference as reference
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step

SMOKE = "experiments/fcos_nuclei.py:smoke"
CFG = fcos.FCOSConfig(num_classes=3, canvas_hw=(128, 128), sizes_of_interest=(32, 64, 128, 256))


def targets(cfg, boxes, classes, valid=None):
    valid = np.ones(len(boxes), bool) if valid is None else np.asarray(valid)
    points, strides, ranges = cfg.locations()
    return jax.jit(fcos.location_targets, static_argnums=6)(
        jnp.asarray(points),
        jnp.asarray(strides),
        jnp.asarray(ranges),
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(classes, jnp.int32),
        jnp.asarray(valid),
        cfg,
    )


def reference_points(cfg):
    return reference.locations(cfg.level_shapes(), fcos.LEVEL_STRIDES, cfg.location_offset)


def index_of(cfg, level, row, col):
    shapes = cfg.level_shapes()
    return sum(h * w for h, w in shapes[:level]) + row * shapes[level][1] + col


def test_locations_are_the_cell_centres_or_torchvision_anchor_centres():
    points, strides, ranges = CFG.locations()
    assert len(points) == sum(h * w for h, w in CFG.level_shapes()) == 16**2 + 8**2 + 16 + 4 + 1
    np.testing.assert_array_equal(points[index_of(CFG, 1, 2, 3)], [(3 + 0.5) * 16, 2.5 * 16])
    assert strides[index_of(CFG, 4, 0, 0)] == 128
    np.testing.assert_array_equal(ranges[index_of(CFG, 0, 0, 0)], [0, 32])
    np.testing.assert_array_equal(ranges[index_of(CFG, 4, 0, 0)], [256, np.inf])
    tv_points, _, _ = dataclasses.replace(CFG, location_offset=0.0).locations()
    np.testing.assert_array_equal(tv_points[index_of(CFG, 1, 2, 3)], [3 * 16, 2 * 16])


def test_assignment_of_a_hand_made_scene():
    boxes = [
        [0, 0, 40, 40],  # A: max distance <= 40 puts it on P3 (range [0, 32]) near its centre
        [8, 8, 24, 24],  # B: inside A and smaller: wins the locations both claim
        [60, 60, 124, 124],  # C: 64 px, centre (92, 92): P3 never (needs max <= 32), P4 yes
        [100, 0, 102, 2],  # D: 2 px: no location strictly inside
        [0, 0, 40, 40],  # E: padding (a copy of A that must not count)
    ]
    out = targets(CFG, boxes, [0, 1, 2, 0, 1], valid=[True, True, True, True, False])
    matched = np.asarray(out["matched"])
    # (20, 20) is the centre of A and inside B (8..24): B is smaller.
    assert matched[index_of(CFG, 0, 2, 2)] == 1
    # (28, 12) is in A (max distance 28 <= 32), within 1.5 x 8 = 12 of A's centre (20, 20) on
    # both axes (8, 8), outside B: A.
    assert matched[index_of(CFG, 0, 1, 3)] == 0
    # (36, 20): 16 from A's centre on x, more than 12: centre sampling leaves it out.
    assert matched[index_of(CFG, 0, 2, 4)] == -1
    # C on P4 (stride 16) at (88, 88): distances 28, 28, 36, 36; max 36 in [32, 64].
    assert matched[index_of(CFG, 1, 5, 5)] == 2
    # C's P3 location (92, 92) has max distance 32 on both sides... 32 <= 32: P3 claims it too.
    assert matched[index_of(CFG, 0, 11, 11)] == 2
    assert (matched == 3).sum() == 0 and (matched == 4).sum() == 0
    assert int(out["unassigned"]) == 1  # D
    classes = np.asarray(out["classes"])
    np.testing.assert_array_equal(classes[matched == -1], 3)
    np.testing.assert_array_equal(classes[matched >= 0], np.array([0, 1, 2])[matched[matched >= 0]])
    t = index_of(CFG, 1, 5, 5)
    np.testing.assert_allclose(np.asarray(out["distances"][t]), np.array([28, 28, 36, 36]) / 16)
    assert float(out["centerness"][t]) == pytest.approx(28 / 36, rel=1e-6)


def test_equal_areas_go_to_the_first_slot():
    boxes = [[0, 0, 32, 32], [8, 8, 40, 40]]  # the same area; both claim (20, 20)
    matched = np.asarray(targets(CFG, boxes, [0, 1])["matched"])
    assert matched[index_of(CFG, 0, 2, 2)] == 0
    # (28, 28) is exactly 12 = 1.5 strides from the first box's centre: only the second's.
    assert matched[index_of(CFG, 0, 3, 3)] == 1


def test_locations_in_an_ignore_region_take_no_class_loss():
    points, strides, ranges = CFG.locations()
    boxes = np.array([[0, 0, 40, 40], [0, 0, 1, 1]], np.float32)  # a kept box and padding
    ignore = np.array([[80, 80, 110, 100], [0, 0, 40, 40]], np.float32)
    out = jax.jit(fcos.location_targets, static_argnums=6)(
        jnp.asarray(points), jnp.asarray(strides), jnp.asarray(ranges), jnp.asarray(boxes),
        jnp.asarray([0, 0], jnp.int32), jnp.asarray([True, False]), CFG,
        jnp.asarray(ignore), jnp.asarray([True, False]),
    )  # fmt: skip
    ignored = np.asarray(out["ignored"])
    x, y = points[:, 0], points[:, 1]
    inside = (x >= 80) & (x < 110) & (y >= 80) & (y < 100)  # P3..P7 points in the valid region
    np.testing.assert_array_equal(ignored, inside)  # the padding slot covers the kept box
    assert inside.sum() >= 6 and not (ignored & (np.asarray(out["matched"]) >= 0)).any()
    # Their class logits no longer matter; everywhere else they do.
    tgt = jax.tree.map(lambda v: v[None], out)
    t = len(points)
    rng = np.random.default_rng(0)
    logits = rng.normal(-2, 1, (1, t, 3)).astype(np.float32)
    outputs = {
        "class_logits": jnp.asarray(logits),
        "distances": jnp.ones((1, t, 4)),
        "centerness_logits": jnp.zeros((1, t)),
        "targets": tgt,
    }
    base = float(fcos.loss_fn(outputs, {}, CFG)[1]["loss_cls"])
    changed = logits.copy()
    changed[0, inside] += 3.0
    outputs["class_logits"] = jnp.asarray(changed)
    assert float(fcos.loss_fn(outputs, {}, CFG)[1]["loss_cls"]) == pytest.approx(base, rel=1e-6)
    changed[0, ~inside & (np.asarray(out["matched"]) < 0)] += 3.0
    outputs["class_logits"] = jnp.asarray(changed)
    assert float(fcos.loss_fn(outputs, {}, CFG)[1]["loss_cls"]) > base * 1.5


@pytest.mark.parametrize("offset,radius", [(0.5, 1.5), (0.0, 1.5), (0.5, 0.0)])
def test_assignment_matches_the_reference_on_random_scenes(offset, radius):
    cfg = dataclasses.replace(CFG, location_offset=offset, center_sampling_radius=radius)
    rng = np.random.default_rng(int(offset * 10 + radius))
    n = 14
    size = rng.uniform(3, 120, (n, 2))
    x0 = rng.uniform(0, 128 - size[:, 0])
    y0 = rng.uniform(0, 128 - size[:, 1])
    # Coordinates on a 1/4 px grid: distances and areas are exact in float32.
    boxes = np.round(np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], 1) * 4) / 4
    boxes[5] = boxes[4] + [3, 0, 3, 0]  # equal areas overlapping
    valid = np.ones(n, bool)
    valid[-2:] = False
    out = targets(cfg, boxes, rng.integers(0, 3, n), valid)
    matched, ltrb = reference.assign(
        reference_points(cfg), boxes, valid, cfg.sizes_of_interest, radius
    )
    np.testing.assert_array_equal(np.asarray(out["matched"]), matched)
    assert (matched >= 0).sum() > 20
    strides = np.array([p[2] for p in reference_points(cfg)])
    np.testing.assert_allclose(
        np.asarray(out["distances"]), ltrb / strides[:, None], rtol=1e-6, atol=1e-6
    )
    expected_ctr = [
        reference.centerness(d) if m >= 0 else 0.0 for d, m in zip(ltrb, matched, strict=True)
    ]
    np.testing.assert_allclose(np.asarray(out["centerness"]), expected_ctr, rtol=1e-5, atol=1e-6)


def test_losses_match_the_reference_on_random_outputs():
    rng = np.random.default_rng(1)
    boxes = np.array([[4, 4, 40, 36], [50, 20, 120, 100], [70, 70, 90, 88]], np.float32)
    classes = np.array([2, 0, 1])
    tgt = jax.tree.map(lambda x: x[None], targets(CFG, boxes, classes))
    t = tgt["classes"].shape[1]
    outputs = {
        "class_logits": jnp.asarray(rng.normal(-2, 1.5, (1, t, 3)), jnp.float32),
        "distances": jnp.asarray(rng.uniform(0.1, 4, (1, t, 4)), jnp.float32),
        "centerness_logits": jnp.asarray(rng.normal(0, 1, (1, t)), jnp.float32),
        "targets": tgt,
    }
    for weighting, smoothing in (("centerness", 1.0), ("none", 1.0), ("centerness", 0.0)):
        cfg = dataclasses.replace(CFG, box_loss_weighting=weighting, giou_smoothing=smoothing)
        _, metrics = fcos.loss_fn(outputs, {}, cfg)
        logits = np.asarray(outputs["class_logits"][0], np.float64)
        dist = np.asarray(outputs["distances"][0], np.float64)
        ctr_logit = np.asarray(outputs["centerness_logits"][0], np.float64)
        target_cls = np.asarray(tgt["classes"][0])
        target_dist = np.asarray(tgt["distances"][0], np.float64)
        ctr_t = np.asarray(tgt["centerness"][0], np.float64)
        pos = np.flatnonzero(target_cls < 3)
        focal = sum(
            reference.focal(logits[i, k], target_cls[i] == k) for i in range(t) for k in range(3)
        )
        assert float(metrics["loss_cls"]) == pytest.approx(focal / len(pos), rel=1e-4)

        giou_terms = [1 - reference.giou_ltrb(dist[i], target_dist[i], smoothing) for i in pos]
        if weighting == "centerness":
            weighted = sum(c * g for c, g in zip(ctr_t[pos], giou_terms, strict=True))
            expected = weighted / ctr_t[pos].sum()
        else:
            expected = sum(giou_terms) / len(pos)
        assert float(metrics["loss_box_reg"]) == pytest.approx(expected, rel=1e-4)
        ctr = sum(reference.bce(ctr_logit[i], ctr_t[i]) for i in pos) / len(pos)
        assert float(metrics["loss_centerness"]) == pytest.approx(ctr, rel=1e-4)


def unscaled_batch(height: int, width: int) -> dict:
    """The batch fields detection reads, for one image of height x width at scale 1."""
    image_hw = np.array([[height, width]], np.int32)
    return {
        "image_hw": image_hw,
        "orig_hw": image_hw,
        "scale": np.ones(1, np.float32),
        "crop_offset": np.zeros((1, 2), np.int32),
    }


@pytest.mark.parametrize("convention", ["adelaidet", "thresh_with_ctr", "torchvision"])
def test_detections_match_the_reference_procedure(convention):
    cfg = dataclasses.replace(
        CFG, candidates_per_level=7, detections_per_image=12, nms_threshold=0.5
    )
    if convention == "thresh_with_ctr":  # CondInst's and BlendMask's
        cfg = dataclasses.replace(cfg, score_threshold=0.02, score_threshold_on="product")
    if convention == "torchvision":
        cfg = dataclasses.replace(
            cfg, score_threshold=0.3, score_threshold_on="combined", clip_before_nms=True
        )
    rng = np.random.default_rng(5)
    points = reference_points(cfg)
    t = len(points)
    logits = rng.normal(-3, 2, (1, t, 3)).astype(np.float32)
    distances = rng.uniform(0.2, 3, (1, t, 4)).astype(np.float32)
    ctr = rng.normal(0, 1.5, (1, t)).astype(np.float32)
    batch = unscaled_batch(112, 128)
    det = jax.jit(fcos.detect, static_argnums=4)(
        jnp.asarray(logits), jnp.asarray(distances), jnp.asarray(ctr), batch, cfg
    )
    probs = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
    sizes = [h * w for h, w in cfg.level_shapes()]
    expected = reference.detect(
        probs, 1 / (1 + np.exp(-ctr[0].astype(np.float64))), distances[0], points, sizes,
        (112, 128), cfg,
    )  # fmt: skip
    valid = np.asarray(det["valid"][0])
    assert valid.sum() == len(expected) >= 10
    np.testing.assert_allclose(
        np.asarray(det["boxes"][0])[valid], [b for b, _, _ in expected], atol=1e-3
    )
    np.testing.assert_allclose(
        np.asarray(det["scores"][0])[valid], [s for _, s, _ in expected], rtol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(det["classes"][0])[valid], [k for *_, k in expected])


def test_nms_before_the_clip_and_the_product_threshold_as_their_references():
    """Two class-0 boxes reaching past the left border, [-60, 12, 20, 44] and
    [-10, 12, 20, 44], overlap by IoU 0.375 as decoded and 1.0 once clipped: AdelaiDet's NMS
    (before detector_postprocess clips) keeps both, torchvision's (after clip_boxes_to_image)
    only the first. A third candidate, class 1 at 0.3 with centerness 0.1, passes a class
    threshold of 0.05 but not AdelaiDet's THRESH_WITH_CTR (0.03 <= 0.05). Each rule is also
    the reference encoding's (fcos_reference.detect)."""
    cfg = dataclasses.replace(CFG, candidates_per_level=20, detections_per_image=10)
    points = reference_points(cfg)
    t = len(points)
    logit = lambda p: math.log(p / (1 - p))
    logits = np.full((1, t, 3), -20.0, np.float32)
    ctr = np.full((1, t), logit(0.9), np.float32)
    distances = np.ones((1, t, 4), np.float32)
    a, b, c = index_of(cfg, 0, 3, 0), index_of(cfg, 0, 3, 1), index_of(cfg, 0, 10, 10)
    logits[0, a, 0], logits[0, b, 0], logits[0, c, 1] = logit(0.9), logit(0.8), logit(0.3)
    ctr[0, c] = logit(0.1)
    distances[0, a] = [8.0, 2.0, 2.0, 2.0]  # location (4, 28), stride 8: [-60, 12, 20, 44]
    distances[0, b] = [2.75, 2.0, 1.0, 2.0]  # location (12, 28): [-10, 12, 20, 44]
    batch = unscaled_batch(112, 128)
    probs = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
    sizes = [h * w for h, w in cfg.level_shapes()]
    kept = {}
    for name, changes in {
        "adelaidet": {},
        "torchvision_clip": {"clip_before_nms": True},
        "thresh_with_ctr": {"score_threshold_on": "product"},
    }.items():
        run = dataclasses.replace(cfg, **changes)
        det = jax.jit(fcos.detect, static_argnums=4)(
            jnp.asarray(logits), jnp.asarray(distances), jnp.asarray(ctr), batch, run
        )
        valid = np.asarray(det["valid"][0])
        expected = reference.detect(
            probs, 1 / (1 + np.exp(-ctr[0].astype(np.float64))), distances[0], points, sizes,
            (112, 128), run,
        )  # fmt: skip
        np.testing.assert_allclose(
            np.asarray(det["boxes"][0])[valid], [box for box, _, _ in expected], atol=1e-3
        )
        kept[name] = np.asarray(det["classes"][0])[valid].tolist()
    assert kept == {
        "adelaidet": [0, 0, 1],
        "torchvision_clip": [0, 1],
        "thresh_with_ctr": [0, 0],
    }


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(fcos, SMOKE)
    metrics, grads, det = step.metrics, step.grads, step.detections
    assert np.isfinite(step.total)
    assert_total_is_the_sum(step, ("loss_cls", "loss_box_reg", "loss_centerness"))
    assert float(metrics["positive_locations"]) > 0
    # Focal loss at the prior: every location and class near -log(1 - 0.01) x 0.75 x 0.01^2.
    assert float(metrics["loss_cls"]) < 5
    for name in ("fpn", "head"):
        assert magnitude(grads[name]) > 0, name
    assert magnitude(grads["head"]["scales"]) > 0
    for name, group in grads["backbone"].items():
        assert (magnitude(group) > 0) == (name != "stem"), name

    k = step.cfg.detections_per_image
    assert det["boxes"].shape == (2, k, 4) and "masks" not in det and "canvas_masks" not in det
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipes' compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import overfit_report

    report = overfit_report(
        SMOKE.split(":")[0],
        tmp_path / "overfit",
        steps=300,
        overrides=[
            "--config.optim.name=adamw",
            "--config.optim.lr=0.002",
            f"--config.model.compute_dtype={dtype}",
        ],
    )
    assert report["bbox"]["AP"] >= 0.9, report["bbox"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("fcos")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
    assert math.isfinite(result["compile_s"])


@pytest.mark.parametrize("experiment", ["fcos_r50_fpn_coco_1x.py", "condinst_r50_fpn_coco_1x.py"])
def test_the_coco_experiments_have_a_canvas_every_level_divides(experiment):
    config = config_lib.load(f"experiments/{experiment}")
    cfg = builders.model_config(config, 80)  # refuses a canvas P7's stride does not divide
    assert cfg.canvas_hw == (1408, 1408) and max(config.input.max_long_side, 800) <= 1408
