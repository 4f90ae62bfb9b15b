"""CondInst: the dynamic mask head against a per-instance float64 NumPy evaluation (one
instance, one pixel at a time, parameters unpacked by the paper's layout), the smoke step, and
(slow) over-fitting 4 scenes and the COCO experiment's step. FCOS's parts are tested in
test_fcos.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.methods import condinst
from instseg_jax.ops import dense
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step
from tests.methods.test_solov2 import one_pixel_masks

SMOKE = "experiments/condinst_nuclei.py:smoke"
CFG = condinst.CondInstConfig(num_classes=3, canvas_hw=(128, 128))


def reference_mask_logits(features, params, point, scale, cfg):
    """float64 [h, w]: the dynamic head of one instance, pixel by pixel."""
    h, w, _ = features.shape
    shapes = cfg.dynamic_shapes()
    weights, biases, at = [], [], 0
    for fan_in, fan_out in shapes:  # every weight first ([out, in] row-major) ...
        weights.append(params[at : at + fan_in * fan_out].reshape(fan_out, fan_in))
        at += fan_in * fan_out
    for _, fan_out in shapes:  # ... then every bias
        biases.append(params[at : at + fan_out])
        at += fan_out
    assert at == len(params) == cfg.num_dynamic_params
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            cell = ((j + 0.5) * 8, (i + 0.5) * 8)  # mask-branch cell centre (x, y), stride 8
            v = np.concatenate(
                [[(point[0] - cell[0]) / scale, (point[1] - cell[1]) / scale], features[i, j]]
            )
            for k, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
                v = weight @ v + bias
                if k < len(weights) - 1:
                    v = np.maximum(v, 0)
            out[i, j] = v[0]
    return out


def test_the_default_dynamic_head_has_169_parameters():
    assert CFG.num_dynamic_params == 169
    assert dataclasses.replace(CFG, dynamic_layers=2).num_dynamic_params == 10 * 8 + 8 + 8 + 1


def test_dynamic_head_matches_a_per_instance_evaluation():
    rng = np.random.default_rng(0)
    h, w, p = 6, 7, 4
    features = rng.normal(0, 1, (h, w, CFG.mask_channels))
    params = rng.normal(0, 0.5, (p, CFG.num_dynamic_params))
    points = rng.uniform(0, 56, (p, 2))
    scales = np.array([64.0, 128.0, 32.0, 256.0])
    ours = jax.jit(condinst.dynamic_mask_logits, static_argnums=4)(
        jnp.asarray(features, jnp.float32),
        jnp.asarray(params, jnp.float32),
        jnp.asarray(points, jnp.float32),
        jnp.asarray(scales, jnp.float32),
        CFG,
    )
    assert ours.shape == (p, h, w)
    for k in range(p):
        expected = reference_mask_logits(features, params[k], points[k], scales[k], CFG)
        np.testing.assert_allclose(np.asarray(ours[k]), expected, rtol=1e-4, atol=1e-4)


def test_centre_sampling_is_about_the_mass_centre():
    """AdelaiDet's FCOS outputs sample positives within 1.5 strides of the mask's mass centre
    when the instances carry bitmasks, as CondInst's do (fcos_outputs.py get_sample_region),
    encoded in tests/methods/fcos_reference.py. An L-shaped instance's mass centre lies far
    from its box centre. Fails if the box centre is used (the former rule)."""
    from tests.methods import fcos_reference as reference

    boxes = np.array([[8, 8, 120, 72], [70, 80, 110, 120], [0, 0, 0, 0]], np.float32)
    centres = np.array([[28.0, 22.0], [90.0, 100.0], [0.0, 0.0]], np.float32)
    valid = np.array([True, True, False])
    batch = {
        "gt_boxes": jnp.asarray(boxes[None]),
        "gt_classes": jnp.zeros((1, 3), jnp.int32),
        "gt_valid": jnp.asarray(valid[None]),
        "gt_centers": jnp.asarray(centres[None]),
    }
    out = condinst.CondInst(CFG).assign(batch)
    points = reference.locations(CFG.level_shapes(), (8, 16, 32, 64, 128), CFG.location_offset)
    # gt_centers average pixel centres; the reference's centroid (integer pixel indices) is
    # half a pixel up and left (CondInstConfig.mass_centre_convention "pixel_index")
    matched, _ = reference.assign(points, boxes, valid, CFG.sizes_of_interest, 1.5, centres - 0.5)
    np.testing.assert_array_equal(np.asarray(out["matched"][0]), matched)
    by_box, _ = reference.assign(points, boxes, valid, CFG.sizes_of_interest, 1.5)
    assert (matched != by_box).sum() > 4  # the scene tells the two rules apart
    plain = dataclasses.replace(CFG, mass_centre_sampling=False)
    out = condinst.CondInst(plain).assign({k: v for k, v in batch.items() if k != "gt_centers"})
    np.testing.assert_array_equal(np.asarray(out["matched"][0]), by_box)


def reference_aligned_bilinear(x, factor):
    """float64 [P, f h, f w]: AdelaiDet adet/utils/comm.py aligned_bilinear step by step (the
    copy in mmdetection mmdet/models/utils/misc.py): replicate-pad one row and column at the
    end, resize to (f h + 1, f w + 1) bilinearly with align_corners=True, replicate-pad f // 2
    at the start, crop the first f h x f w."""
    x = np.pad(x, ((0, 0), (0, 1), (0, 1)), mode="edge")

    def corners_aligned(v, out, axis):  # align_corners=True: output j at j (in - 1) / (out - 1)
        src = np.arange(out) * (v.shape[axis] - 1) / (out - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, v.shape[axis] - 1)
        frac = (src - low).reshape([-1 if a == axis else 1 for a in range(v.ndim)])
        return np.take(v, low, axis) * (1 - frac) + np.take(v, high, axis) * frac

    _, h, w = x.shape
    up = corners_aligned(corners_aligned(x, factor * (h - 1) + 1, 1), factor * (w - 1) + 1, 2)
    shift = factor // 2
    up = np.pad(up, ((0, 0), (shift, 0), (shift, 0)), mode="edge")
    return up[:, : factor * (h - 1), : factor * (w - 1)]


def test_aligned_upsampling_is_the_references_aligned_bilinear():
    """The matrices upsample_logits applies on each axis under mask_upsampling "aligned" (its
    einsum path runs in the mmdetection loss parity, tests/weights/test_mmdet_condinst_loss.py)."""
    rng = np.random.default_rng(1)
    for (h, w), factor in [((16, 16), 2), ((5, 7), 2), ((3, 4), 4)]:
        logits = rng.normal(size=(3, h, w))
        rows = condinst.aligned_bilinear_matrix(h, factor)
        cols = condinst.aligned_bilinear_matrix(w, factor)
        ours = np.einsum("oh,phw,qw->poq", rows, logits, cols)
        expected = reference_aligned_bilinear(logits, factor)
        np.testing.assert_allclose(ours, expected, atol=1e-6)
        # half_pixel (torch's align_corners=False) samples elsewhere: the option matters
        half = np.einsum(
            "oh,phw,qw->poq",
            dense.bilinear_matrix(h, factor * h),
            logits,
            dense.bilinear_matrix(w, factor * w),
        )
        assert np.abs(half - expected).max() > 0.01


def test_location_scales_follow_the_levels():
    scales = CFG.location_scales()
    sizes = [h * w for h, w in CFG.level_shapes()]
    assert scales[0] == 64 and scales[sizes[0]] == 128 and scales[-1] == 1024
    assert len(scales) == sum(sizes)


def test_dice_loss_is_the_references_with_its_eps(monkeypatch):
    """loss_fn's mask term against AdelaiDet's dynamic_mask_head.py dice_coefficient: eps 1e-5
    added once to sum(p^2) + sum(t^2), none to the numerator, then mask_losses.mean() over the
    instances, float64 here. One-pixel targets predicted confidently make the loss of order
    eps / 2 per mask, so eps 1e-3 (SOLO's), or eps in the numerator, would show."""
    monkeypatch.setattr(condinst.fcos, "loss_fn", lambda outputs, batch, cfg: (0.0, {}))
    rng = np.random.default_rng(5)
    b, p, h, w = 2, 6, 4, 4
    targets, logits = one_pixel_masks(rng, b, p, h, -16.0, (14.0, 16.0))
    logits[1, :2] = rng.normal(0, 2, (2, h, w))  # and two poor predictions

    def loss_and_reference(slot_valid):
        outputs = {
            "targets": {
                "slot_valid": jnp.asarray(slot_valid),
                "overflow": jnp.zeros(b, jnp.int32),
                "positives": jnp.asarray(slot_valid.sum(1)),
            },
            "mask_logits": jnp.asarray(logits),
            "mask_targets": jnp.asarray(targets),
        }
        loss_mask = float(
            jax.jit(condinst.loss_fn, static_argnums=2)(outputs, {}, CFG)[1]["loss_mask"]
        )
        x = 1.0 / (1.0 + np.exp(-logits[slot_valid].astype(np.float64).reshape(-1, h * w)))
        t = targets[slot_valid].reshape(-1, h * w).astype(np.float64)
        per_mask = 1.0 - 2 * (x * t).sum(1) / ((x**2).sum(1) + (t**2).sum(1) + 1e-5)
        return loss_mask, per_mask.mean()

    slot_valid = np.zeros((b, p), bool)
    slot_valid[0, :4], slot_valid[1, :5] = True, True
    loss_mask, expected = loss_and_reference(slot_valid)
    assert loss_mask == pytest.approx(expected, rel=1e-4)
    # The confident ones alone: a loss of ~5e-6 that is all eps (float32 resolves it to ~2%).
    slot_valid[1, :2] = False
    loss_mask, expected = loss_and_reference(slot_valid)
    assert 2e-6 < expected < 1e-5
    assert loss_mask == pytest.approx(expected, rel=5e-2)


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(condinst, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert np.isfinite(step.total)
    assert_total_is_the_sum(step, ("loss_cls", "loss_box_reg", "loss_centerness", "loss_mask"))
    assert 0 < float(metrics["loss_mask"]) <= 1.0  # a dice loss
    for name in ("fpn", "head", "controller", "mask_branch"):
        assert magnitude(grads[name]) > 0, name

    k, (h, w) = cfg.detections_per_image, (v // 4 for v in cfg.canvas_hw)
    assert det["canvas_masks"].shape == (2, k, h, w) and det["boxes"].shape == (2, k, 4)
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipes' compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import CANVAS_4X, overfit_report

    report = overfit_report(
        SMOKE.split(":")[0],
        tmp_path / "overfit",
        steps=300,
        overrides=[
            f"--config.model.compute_dtype={dtype}",
            "--config.optim.name=adamw",
            "--config.optim.lr=0.002",
            "--config.model.sizes_of_interest=(64, 128, 256, 512)",
            "--config.model.relative_scales=(64, 128, 256, 512, 1024)",
            *CANVAS_4X,
        ],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("condinst")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
