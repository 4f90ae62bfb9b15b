"""PointRend: adaptive subdivision against a float64 NumPy version of the rule, the point labels
against bilinear samples of the full-resolution mask, the subdivision plan, the smoke step; and
(slow) over-fitting 4 scenes and the COCO experiment's step. Point sampling itself is tested
in tests/ops/test_sampling.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.methods import pointrend
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step
from tests.ops.test_sampling import grid_sample_point

SMOKE = "experiments/pointrend_nuclei.py:smoke"


def logit_field(u, v, n):
    """A smooth logit over box-relative (u, v) for box n: an ellipse edge whose position
    depends on n, with no ties between cells."""
    cx, cy = 0.45 + 0.05 * n, 0.5 - 0.03 * n
    return 1.0 - ((u - cx) / 0.31) ** 2 - ((v - cy) / 0.23) ** 2 + 0.01 * u * v


def numpy_subdivision(num, side, steps, num_points):
    def upsample(grid):  # half-pixel bilinear, edge clamped, float64
        size = grid.shape[0]
        src = np.maximum((np.arange(2 * size) + 0.5) / 2 - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), size - 1)
        hi = np.minimum(lo + 1, size - 1)
        frac = src - lo
        rows = grid[lo] * (1 - frac)[:, None] + grid[hi] * frac[:, None]
        return rows[:, lo] * (1 - frac)[None] + rows[:, hi] * frac[None]

    out = []
    for n in range(num):
        size = side
        centres = (np.arange(size) + 0.5) / size
        grid = logit_field(centres[None, :], centres[:, None], n)
        for _ in range(steps):
            grid = upsample(grid)
            size *= 2
            flat = grid.ravel()
            chosen = np.argsort(np.abs(flat), kind="stable")[:num_points]  # most uncertain
            rows, cols = np.divmod(chosen, size)
            flat[chosen] = logit_field((cols + 0.5) / size, (rows + 0.5) / size, n)
            grid = flat.reshape(size, size)
        out.append(grid)
    return np.stack(out)


def test_adaptive_subdivision_matches_numpy():
    num, side, steps, num_points = 3, 7, 3, 40

    def predict(points):
        n = jnp.arange(num, dtype=jnp.float32)[:, None]
        return logit_field(points[..., 0], points[..., 1], n)

    got = np.asarray(
        jax.jit(lambda: pointrend.adaptive_subdivision(predict, num, side, steps, num_points))()
    )
    want = numpy_subdivision(num, side, steps, num_points)
    assert got.shape == (3, 56, 56)
    assert np.allclose(got, want, atol=1e-4)
    # Refinement changed something: the upsampled coarse grid alone differs along the edge.
    assert np.abs(want - numpy_subdivision(num, side, steps, 0)).max() > 1e-3


def test_subdivision_plan_follows_detectron2():
    cfg = pointrend.PointRendConfig(num_classes=3)
    assert cfg.subdivision_plan() == (28, 3)  # 7 -> 14 -> 28 on every point, then 3 steps
    small = pointrend.PointRendConfig(num_classes=3, subdivision_num_points=196)
    assert small.subdivision_plan() == (14, 4)
    assert 14 * 2**4 == 28 * 2**3 == 224


def test_point_labels_are_bilinear_samples_of_the_full_mask():
    rng = np.random.default_rng(0)
    full = np.zeros((40, 48), np.uint8)
    yy, xx = np.mgrid[:40, :48]
    full[(xx - 25.5) ** 2 / 64 + (yy - 17.5) ** 2 / 49 <= 1] = 1
    # A 20 x 20 px box around the ellipse and a crop of side 20: the crop is the mask's own
    # pixels, so bilinear samples of it (zero outside) must be those of the full mask.
    box = np.array([16.0, 8.0, 36.0, 28.0])
    assert full.sum() == full[8:28, 16:36].sum()
    crop = full[8:28, 16:36][None, None]  # [B=1, N=1, 20, 20]
    points = rng.uniform([10, 4], [42, 32], (1, 1, 50, 2)).astype(np.float32)  # pixels
    got = np.asarray(
        pointrend.point_labels(
            jnp.asarray(crop),
            jnp.asarray(box[None, None], jnp.float32),
            jnp.zeros((1, 1), jnp.int32),
            jnp.asarray(points),
        )
    )
    for p in range(50):
        x, y = points[0, 0, p]
        want = grid_sample_point(full.astype(np.float64)[..., None], x / 48, y / 40)[0]
        assert got[0, 0, p] == pytest.approx(want, abs=1e-5)


def ellipse_and_pipeline_crop(crop_side):
    """A 28 x 20 px ellipse mask on a 64 x 64 image, its tight box, and the box crop the input
    pipeline makes of it (input/transforms.py box_crop_target) at crop_side cells."""
    from instseg_jax.input.transforms import box_crop_target

    full = np.zeros((64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    full[(xx - 31.5) ** 2 / 14**2 + (yy - 29.5) ** 2 / 10**2 <= 1] = 1
    ys, xs = np.nonzero(full)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    return full, box, box_crop_target(full.astype(np.float32), box, crop_side)


@pytest.mark.parametrize("crop_side", [56, 14])
def test_point_labels_from_pipeline_crops_against_the_full_mask(crop_side):
    """detectron2's labels are bilinear samples of the full mask (sample_point_labels); ours
    read the crop. A box up to 0.58 crop sides wide (here 0.5: 56 cells over 28 px) gives the
    full mask's labels exactly; a box 2 crop sides wide (14 cells) does not, and this measures
    by how much: of 400 points uniform within 3 px of the box, 11.5% differ, by 0.032 on
    average and 0.77 at most (the COCO recipe's 224 cells reach 2 px a cell on 448 px boxes)."""
    full, box, crop = ellipse_and_pipeline_crop(crop_side)
    rng = np.random.default_rng(0)
    points = rng.uniform(box[:2] - 3, box[2:] + 3, (400, 2)).astype(np.float32)
    image = full.astype(np.float64)[..., None]
    want = np.array([grid_sample_point(image, x / 64, y / 64)[0] for x, y in points])
    got = np.asarray(
        pointrend.point_labels(
            jnp.asarray(crop[None, None]),
            jnp.asarray(box[None, None], jnp.float32),
            jnp.zeros((1, 1), jnp.int32),
            jnp.asarray(points[None, None]),
        )
    )[0, 0]
    difference = np.abs(got - want)
    if crop_side == 56:
        np.testing.assert_allclose(got, want, atol=1e-6)
    else:
        assert 0.08 < np.mean(difference > 1e-3) < 0.15
        assert 0.02 < difference.mean() < 0.04


def test_one_step_trains_both_heads_and_inference_ships_224_masks():
    step = smoke_step(pointrend, SMOKE)
    terms = [
        "loss_rpn_cls",
        "loss_rpn_loc",
        "loss_cls",
        "loss_box_reg",
        "loss_mask",
        "loss_mask_point",
    ]
    assert all(np.isfinite(float(step.metrics[k])) for k in terms)
    assert_total_is_the_sum(step, terms)
    # Zero-initialised predictors: both mask losses start at BCE of logit 0 on {0, 1} labels.
    assert float(step.metrics["loss_mask"]) == pytest.approx(np.log(2), abs=0.02)
    assert float(step.metrics["loss_mask_point"]) == pytest.approx(np.log(2), abs=0.02)
    params = step.grads
    for head in ("coarse_head", "point_head", "box_head", "backbone"):
        assert magnitude(params[head]) > 0, head
    masks = step.detections["masks"]
    assert masks.shape[-2:] == (224, 224) and masks.dtype == jnp.bfloat16
    values = np.asarray(masks.astype(jnp.float32))
    assert values.min() >= 0 and values.max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipes' compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import overfit_report

    report = overfit_report(
        SMOKE.split(":")[0],
        tmp_path / "overfit",
        steps=300,
        overrides=[
            f"--config.model.compute_dtype={dtype}",
            "--config.optim.name=adamw",
            "--config.optim.lr=0.002",
        ],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("pointrend")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
