"""Mask Scoring R-CNN: the MaskIoU head's targets (the ground truth's share inside each RoI, the
IoU target, which RoIs train) against a float64 NumPy encoding of mmdetection 3.3's
mmdet/models/roi_heads/mask_heads/maskiou_head.py (MaskIoUHead._get_area_ratio with
BitmapMasks.crop on the full-resolution mask, MaskIoUHead.get_targets, loss_and_target's
`mask_iou_targets > 0`), the smoke step; and (slow) the two-program inference against the
one-program forward, over-fitting 4 scenes and the COCO experiment's step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.methods import ms_rcnn
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step

SMOKE = "experiments/ms_rcnn_nuclei.py:smoke"


# ------------------------------------------------------------------ float64 NumPy reference


def mmdet_area_ratio(full_mask: np.ndarray, roi: np.ndarray) -> float:
    """MaskIoUHead._get_area_ratio for one RoI: the box cast to int32 (towards zero), clipped
    to the mask by BitmapMasks.crop (x to [0, W], y to [0, H], at least 1 px a side), the
    mask's pixels in that crop over all its pixels + 1e-7."""
    h, w = full_mask.shape
    box = roi.astype(np.int32)
    box[0::2] = np.clip(box[0::2], 0, w)
    box[1::2] = np.clip(box[1::2], 0, h)
    x1, y1, x2, y2 = box
    bw, bh = max(x2 - x1, 1), max(y2 - y1, 1)
    inside = full_mask[y1 : y1 + bh, x1 : x1 + bw].astype(np.float64).sum()
    return inside / (full_mask.astype(np.float64).sum() + 1e-7)


def mmdet_iou_targets(logits, targets, ratios, threshold):
    """MaskIoUHead.get_targets and the positives of loss_and_target, float64: (targets,
    trained); a 0/0 target (NaN there) is not trained."""
    predicted = (logits > threshold).astype(np.float64)
    targets = targets.astype(np.float64)
    overlap = (predicted * targets).sum((-1, -2))
    full = targets.sum((-1, -2)) / (ratios + 1e-7)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = overlap / (predicted.sum((-1, -2)) + full - overlap)
    trained = iou > 0  # NaN > 0 is False, as torch's
    return np.where(trained, iou, 0.0), trained


# ------------------------------------------------------------------ a hand-made scene

CANVAS = (48, 64)  # H, W
CROP = 16


def scene():
    """Two ground truths on a 48 x 64 canvas in 16 x 16 px boxes of integer corners (their
    crops of side 16 are their own pixels), and RoIs: the first box exactly, its left half at
    fractional corners, one reaching past the canvas's top-left, one past its bottom-right, a
    sliver under 1 px, one off the mask, and the second box shifted."""
    yy, xx = np.mgrid[: CANVAS[0], : CANVAS[1]]
    first = ((xx - 17.3) ** 2 / 49 + (yy - 19.6) ** 2 / 36 <= 1).astype(np.uint8)
    second = ((xx >= 44) & (xx < 58) & (yy >= 30) & (yy < 41)).astype(np.uint8)
    gt_boxes = np.array([[10.0, 12.0, 26.0, 28.0], [42.0, 28.0, 58.0, 44.0]])
    assert first.sum() == first[12:28, 10:26].sum() and second.sum() == second[28:44, 42:58].sum()
    crops = np.stack([first[12:28, 10:26], second[28:44, 42:58]])
    rois = np.array(
        [
            [10.0, 12.0, 26.0, 28.0],
            [9.6, 11.2, 18.9, 29.7],
            [-3.7, -2.2, 15.4, 20.8],
            [20.5, 16.9, 70.0, 60.0],
            [17.2, 12.0, 17.9, 28.0],  # 0.7 px wide: int32 gives 0 width, crop keeps 1 px
            [30.0, 2.0, 40.0, 10.0],
            [46.6, 33.3, 63.9, 47.99],
        ]
    )
    gt_index = np.array([0, 0, 0, 0, 0, 0, 1])
    return (first, second), gt_boxes, crops, rois, gt_index


def test_area_ratios_match_mmdetection_on_full_masks():
    masks, gt_boxes, crops, rois, gt_index = scene()
    got = np.asarray(
        jax.jit(ms_rcnn.area_ratios, static_argnums=4)(
            jnp.asarray(crops[None]),
            jnp.asarray(gt_boxes[None], jnp.float32),
            jnp.asarray(gt_index[None], jnp.int32),
            jnp.asarray(rois[None], jnp.float32),
            CANVAS,
        )
    )[0]
    want = np.array(
        [mmdet_area_ratio(masks[n], roi) for n, roi in zip(gt_index, rois, strict=True)]
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Known answers: the whole mask, nothing off it, and strict shares in between.
    assert got[0] == pytest.approx(1.0, abs=1e-6) and got[5] == 0.0
    assert 0.0 < got[1] < 1.0 and 0.0 < got[4] < 0.2 and 0.0 < got[6] < 1.0


def test_iou_targets_and_trained_rois_match_mmdetection():
    rng = np.random.default_rng(0)
    f = 7
    logits = rng.normal(0.5, 1.0, (f, 28, 28))
    targets = (rng.uniform(size=(f, 28, 28)) < 0.4).astype(np.float64)
    ratios = rng.uniform(0.3, 1.0, f)
    logits[1] = -1.0  # nothing predicted: IoU 0, not trained
    targets[2] = 0.0
    logits[2] = -1.0  # nothing predicted, nothing there: 0 / 0, not trained
    logits[3] = 2.0  # everything predicted
    targets[3] = 0.0
    targets[3, :14] = 1.0  # the top half
    ratios[3] = 0.5  # half the ground truth inside the RoI
    valid = np.array([True, True, True, True, True, True, False])
    got_iou, got_trained = jax.jit(ms_rcnn.maskiou_targets, static_argnums=4)(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(targets, jnp.float32),
        jnp.asarray(ratios, jnp.float32),
        jnp.asarray(valid),
        0.5,
    )
    want_iou, want_trained = mmdet_iou_targets(logits, targets, ratios, 0.5)
    want_trained &= valid
    np.testing.assert_array_equal(np.asarray(got_trained), want_trained)
    np.testing.assert_allclose(np.asarray(got_iou), np.where(want_trained, want_iou, 0), atol=1e-6)
    # Known answer: 392 cells overlap of 784 predicted, the full area 392 / 0.5 = 784.
    assert float(got_iou[3]) == pytest.approx(392 / (784 + 784 - 392), abs=1e-6)
    assert list(np.asarray(got_trained)) == [True, False, False, True, True, True, False]


def test_the_loss_is_half_the_mean_squared_error_over_trained_rois():
    predicted = np.array([[0.2, 0.9, -0.1], [0.5, 0.0, 0.3]])
    targets = np.array([[0.4, 0.6, 0.0], [0.7, 0.0, 0.0]])
    trained = np.array([[True, True, False], [True, False, False]])
    cfg = ms_rcnn.MSRCNNConfig(num_classes=1, mask_fg_per_image=3)
    outputs = {
        "mask_logits": jnp.zeros((2, 3, 28, 28, 1)),
        "mask_targets": jnp.zeros((2, 3, 28, 28)),
        "mask_valid": jnp.asarray(trained),
        "rois": {"classes": jnp.zeros((2, 3), jnp.int32)},
        "mask_iou": jnp.asarray(predicted, jnp.float32),
        "mask_iou_targets": jnp.asarray(targets, jnp.float32),
        "mask_iou_trained": jnp.asarray(trained),
    }
    losses = ms_rcnn.mask_scoring_losses(outputs, cfg)
    want = 0.5 * np.mean((predicted[trained] - targets[trained]) ** 2)  # MSELoss, weight 0.5
    assert float(losses["loss_mask_iou"]) == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------ the smoke step


def test_one_step_trains_the_maskiou_head_and_inference_rescored():
    # mmdetection's threshold on the logits (0.5) predicts no pixel with the initial mask
    # head (logits ~ 0): every IoU target is 0 and nothing trains the head; at -1 every
    # pixel is predicted and each RoI with a non-empty target trains.
    step = smoke_step(ms_rcnn, SMOKE, ["--config.model.maskiou_logit_threshold=-1.0"])
    terms = ["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"]
    terms.append("loss_mask_iou")
    assert all(np.isfinite(float(step.metrics[k])) for k in terms)
    assert_total_is_the_sum(step, terms)
    assert float(step.metrics["loss_mask"]) == pytest.approx(np.log(2), abs=0.02)
    # Predicted IoUs start near 0 (std 0.01 predictor): the loss is half the targets' mean square.
    assert 0.0 < float(step.metrics["loss_mask_iou"]) < 0.5
    for head in ("maskiou_head", "mask_head", "box_head", "backbone"):
        assert magnitude(step.grads[head]) > 0, head
    det = step.detections
    k = step.cfg.detections_per_image
    assert det["masks"].shape == (det["scores"].shape[0], k, 28, 28)
    assert det["scores"].shape == det["valid"].shape == det["classes"].shape
    # Box scores are above score_threshold (0.05); times the untrained predicted IoUs (a few
    # hundredths either side of 0) some fall below it: the detections carry the product.
    scores = np.asarray(det["scores"])[np.asarray(det["valid"])]
    assert scores.size and (scores < step.cfg.score_threshold).any()


# ------------------------------------------------------------------ slow tier


@pytest.mark.slow
def test_two_program_inference_rescored_as_the_one_program_forward():
    from instseg_jax import builders
    from instseg_jax import config as config_lib
    from tests.methods.test_mask_rcnn import first_batch, init_variables

    config = config_lib.load(SMOKE, ["--config.model.score_threshold=0.0"])
    source, batch = first_batch(config)
    batch = {k: v for k, v in batch.items() if not k.startswith("gt_")}
    cfg = builders.model_config(config, source.num_classes)
    model = ms_rcnn.Model(cfg)
    variables = init_variables(model, batch, train=False)
    everything = jax.device_get(
        jax.jit(lambda v, b: model.apply(v, b, train=False)["detections"])(variables, batch)
    )
    staged = jax.device_get(ms_rcnn.make_inference(ms_rcnn.Model(cfg))(variables, batch))
    valid = everything["valid"]
    np.testing.assert_array_equal(staged["valid"], valid)
    for key in ("classes", "scores", "masks"):
        np.testing.assert_allclose(staged[key][valid], everything[key][valid], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipe's compute dtype
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

    result = coco_step_result("ms_rcnn")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
