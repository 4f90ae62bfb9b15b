"""BlendMask: the blender against a float64 NumPy loop (RoIAlign per bin and sample, bilinear
upsampling per pixel, softmax per pixel), the semantic labels against a loop over instances, the
smoke step, and (slow) over-fitting 4 scenes and the COCO experiment's step. FCOS's parts are
tested in test_fcos.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import config as config_lib
from instseg_jax.methods import blendmask
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step
from tests.ops import reference

SMOKE = "experiments/blendmask_nuclei.py:smoke"
CFG = blendmask.BlendMaskConfig(
    num_classes=3, canvas_hw=(128, 128), attention_size=5, bottom_resolution=12
)


def upsample_reference(grid, out_size):
    """float64 [out, out] of a square grid, torch's bilinear with align_corners=False."""
    n = grid.shape[0]
    out = np.zeros((out_size, out_size))
    for i in range(out_size):
        for j in range(out_size):
            y = min(max((i + 0.5) * n / out_size - 0.5, 0.0), n - 1)
            x = min(max((j + 0.5) * n / out_size - 0.5, 0.0), n - 1)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, n - 1), min(x0 + 1, n - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = (
                grid[y0, x0] * (1 - fy) * (1 - fx)
                + grid[y0, x1] * (1 - fy) * fx
                + grid[y1, x0] * fy * (1 - fx)
                + grid[y1, x1] * fy * fx
            )
    return out


def blend_reference(bases, box, attention, cfg):
    """float64 [R, R]: one instance's blended logits, pixel by pixel."""
    r, a, k = cfg.bottom_resolution, cfg.attention_size, cfg.num_bases
    pooled = reference.roi_align(bases[None], box[None, None], r, 0.25, 1, True)[0, 0]
    grids = attention.reshape(k, a, a)  # channel = base x a^2 + row x a + column
    upsampled = np.stack([upsample_reference(grids[base], r) for base in range(k)], axis=-1)
    out = np.zeros((r, r))
    for i in range(r):
        for j in range(r):
            e = np.exp(upsampled[i, j] - upsampled[i, j].max())
            out[i, j] = (pooled[i, j] * e / e.sum()).sum()
    return out


def test_blender_matches_a_per_instance_loop():
    rng = np.random.default_rng(0)
    bases = rng.normal(0, 1, (2, 20, 24, CFG.num_bases))  # stride 4: an 80 x 96 canvas
    boxes = np.array(
        [
            [[3.0, 5.0, 41.0, 30.0], [10.5, 0.0, 95.0, 79.0], [60.0, 60.0, 66.0, 63.0]],
            [[0.0, 0.0, 8.0, 8.0], [20.0, 30.0, 70.0, 35.5], [-4.0, 70.0, 30.0, 84.0]],
        ]
    )
    attentions = rng.normal(0, 2, (2, 3, CFG.attention_length))
    ours = jax.jit(blendmask.blend, static_argnums=3)(
        jnp.asarray(bases, jnp.float32),
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(attentions, jnp.float32),
        CFG,
    )
    r = CFG.bottom_resolution
    assert ours.shape == (2, 3, r, r)
    for b in range(2):
        for p in range(3):
            expected = blend_reference(bases[b], boxes[b, p], attentions[b, p], CFG)
            np.testing.assert_allclose(np.asarray(ours[b, p]), expected, rtol=1e-4, atol=1e-5)


def test_semantic_labels_take_the_class_of_the_last_covering_instance():
    masks = np.zeros((1, 3, 4, 5), np.uint8)
    masks[0, 0, :2, :3] = 1
    masks[0, 1, 1:3, 2:5] = 1  # overlaps slot 0 at (1, 2)
    masks[0, 2, 3, :] = 1  # padding slot: ignored
    classes = np.array([[2, 0, 1]], np.int32)
    valid = np.array([[True, True, False]])
    expected = np.zeros((1, 4, 5), np.int64)
    for n in range(3):  # later slots overwrite earlier ones
        if valid[0, n]:
            expected[0][masks[0, n] > 0] = classes[0, n] + 1
    ours = blendmask.semantic_labels(jnp.asarray(masks), jnp.asarray(classes), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(ours), expected)
    assert expected[0, 1, 2] == 1  # the overlap went to slot 1 (class 0)


def test_semantic_loss_averages_over_the_extent_the_reference_pads_to():
    """AdelaiDet blendmask.py BlendMask.forward pads basis_sem with 0 (background) to the batch
    size rounded up to size_divisibility 32, and basis_module.py ProtoNet.forward takes
    F.cross_entropy (mean) of the stride-8 map over all of it. Encoded in float64 for images of
    50 x 70 and 96 x 40 pixels alone in their batch (extents 64 x 96 and 96 x 64, i.e. 8 x 12
    and 12 x 8 cells) on a 128 x 128 canvas (16 x 16 cells).

    Fails if the whole canvas is averaged (the former rule), the padding of the extent is left
    out, or the extent is not rounded up to 32."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (2, 16, 16, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 16, 16)).astype(np.int32)
    image_hw = np.array([[50, 70], [96, 40]], np.int32)
    total, count = 0.0, 0
    for b, (h, w) in enumerate(image_hw):
        padded_h, padded_w = -(-h // 32) * 32, -(-w // 32) * 32
        # The reference's target: labels inside the image, background 0 on its padding.
        rows, cols = padded_h // 8, padded_w // 8
        row = logits[b, :rows, :cols].astype(np.float64)
        log_probs = row - np.log(np.exp(row).sum(-1, keepdims=True))
        target = labels[b, :rows, :cols]
        total += -np.take_along_axis(log_probs, target[..., None], -1).sum()
        count += rows * cols
    ours = blendmask.semantic_loss(
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(image_hw), stride=8
    )
    assert float(ours) == pytest.approx(total / count, rel=1e-5)


def test_the_default_attentions_are_4_by_14_by_14():
    cfg = blendmask.BlendMaskConfig(num_classes=80)
    assert cfg.attention_length == 784 and cfg.bottom_resolution == 56
    assert not cfg.level_scales and cfg.score_threshold_on == "product"
    with pytest.raises(config_lib.ConfigValueError, match=r"model\.num_bases"):
        blendmask.BlendMaskConfig(num_classes=80, num_bases=0)


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(blendmask, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert np.isfinite(step.total)
    assert_total_is_the_sum(
        step, ("loss_cls", "loss_box_reg", "loss_centerness", "loss_mask", "loss_semantic")
    )
    # At initialisation the bases are near zero: every mask logit near 0, BCE near log 2.
    assert float(metrics["loss_mask"]) == pytest.approx(np.log(2), abs=0.2)
    assert float(metrics["loss_semantic"]) > 0
    for name in ("fpn", "head", "top_layer", "bottom", "semantic_head"):
        assert magnitude(grads[name]) > 0, name

    k, r = cfg.detections_per_image, cfg.bottom_resolution
    assert det["masks"].shape == (2, k, r, r) and det["boxes"].shape == (2, k, 4)
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
            *CANVAS_4X,
        ],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("blendmask")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
