"""Keypoint R-CNN: heatmap targets, the loss, the transposed convolution and the host decoding
against float64 NumPy written from the definitions (torchvision's keypoints_to_heatmap and
heatmaps_to_keypoints, torch's ConvTranspose2d and bicubic interpolation)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import detections
from instseg_jax.methods import keypoint_rcnn


def test_heatmap_targets_follow_the_floor_rule_with_the_right_edge_inside():
    rois = np.array([[10.0, 20.0, 38.0, 76.0]], np.float32)  # 28 x 56 px
    keypoints = np.array(
        [
            [
                [10.0, 20.0, 2],  # the top-left corner: cell (0, 0)
                [38.0, 76.0, 1],  # the bottom-right corner: the last cell, not outside
                [24.3, 47.9, 2],  # inside
                [9.9, 30.0, 2],  # left of the box
                [20.0, 30.0, 0],  # not labelled
                [38.01, 30.0, 2],  # right of the box
            ]
        ],
        np.float32,
    )
    index, valid = (np.asarray(a) for a in keypoint_rcnn.heatmap_targets(keypoints, rois, 56))
    assert valid.tolist() == [[True, True, True, False, False, False]]
    want_x = [0, 55, math.floor((24.3 - 10) * 56 / 28)]
    want_y = [0, 55, math.floor((47.9 - 20) * 56 / 56)]
    assert index[0, :3].tolist() == [y * 56 + x for x, y in zip(want_x, want_y, strict=True)]


def test_keypoint_loss_is_the_mean_cross_entropy_over_keypoints_with_targets():
    rng = np.random.default_rng(0)
    heatmaps = rng.normal(size=(2, 3, 4, 5, 5)).astype(np.float32)
    targets = rng.integers(0, 25, (2, 3, 4))
    valid = rng.random((2, 3, 4)) > 0.4
    got = float(keypoint_rcnn.keypoint_loss(heatmaps, targets, valid))
    flat = heatmaps.reshape(2, 3, 4, 25).astype(np.float64)
    terms = [
        np.log(np.exp(flat[i, j, k]).sum()) - flat[i, j, k, targets[i, j, k]]
        for i, j, k in zip(*np.nonzero(valid), strict=True)
    ]
    assert got == pytest.approx(np.mean(terms), rel=1e-5)
    assert float(keypoint_rcnn.keypoint_loss(heatmaps, targets, valid & False)) == 0.0


def test_transposed_convolution_matches_torchs_scatter_definition():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    layer = keypoint_rcnn.TransposedConv4x4(4)
    params = layer.init(jax.random.key(0), x)["params"]
    params = {"kernel": rng.normal(size=(4, 4, 3, 4)).astype(np.float32), "bias": np.arange(4.0)}
    got = np.asarray(layer.apply({"params": params}, jnp.asarray(x)))
    assert got.shape == (2, 10, 12, 4)
    # ConvTranspose2d(stride 2, padding 1): input cell (i, j) adds x * w[a, b] at output
    # (2i - 1 + a, 2j - 1 + b), cropped to [0, 2H) x [0, 2W).
    want = np.zeros((2, 12, 14, 4))  # one cell of margin per side
    for i in range(5):
        for j in range(6):
            for a in range(4):
                for b in range(4):
                    want[:, 2 * i + a, 2 * j + b] += x[:, i, j] @ params["kernel"][a, b]
    want = want[:, 1:-1, 1:-1] + params["bias"]
    assert np.allclose(got, want, atol=1e-4)


def bicubic_resize_loop(grid, out_h, out_w, a=-0.75):
    """float64 torch bicubic (align_corners=False, clamped taps), one output cell at a time."""

    def weight(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    in_h, in_w = grid.shape
    out = np.zeros((out_h, out_w))
    for oy in range(out_h):
        sy = (oy + 0.5) * in_h / out_h - 0.5
        fy = math.floor(sy)
        for ox in range(out_w):
            sx = (ox + 0.5) * in_w / out_w - 0.5
            fx = math.floor(sx)
            total = 0.0
            for ty in range(-1, 3):
                for tx in range(-1, 3):
                    yy = min(max(fy + ty, 0), in_h - 1)
                    xx = min(max(fx + tx, 0), in_w - 1)
                    total += weight(sy - (fy + ty)) * weight(sx - (fx + tx)) * grid[yy, xx]
            out[oy, ox] = total
    return out


def test_decoding_matches_bicubic_resize_argmax_and_cell_centres():
    rng = np.random.default_rng(2)
    heatmaps = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    boxes = np.array([[3.2, 4.0, 15.7, 11.5], [0.0, 0.0, 0.6, 20.0]], np.float32)
    keypoints, scores = detections.decode_keypoints(heatmaps, boxes)
    for r in range(2):
        x0, y0, x1, y1 = boxes[r].astype(np.float64)
        w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cw, ch = math.ceil(w), math.ceil(h)
        for k in range(3):
            resized = bicubic_resize_loop(heatmaps[r, k].astype(np.float64), ch, cw)
            cy, cx = np.unravel_index(np.argmax(resized), resized.shape)
            assert keypoints[r, k, 0] == pytest.approx((cx + 0.5) * w / cw + x0, abs=1e-4)
            assert keypoints[r, k, 1] == pytest.approx((cy + 0.5) * h / ch + y0, abs=1e-4)
            assert keypoints[r, k, 2] == 1.0
            assert scores[r, k] == pytest.approx(resized.max(), abs=1e-4)


def one_hot_heatmaps(cells, size=56):
    """float32[R, K, size, size] logits with a single peak at cells[R, K] (row, col)."""
    r, k = cells.shape[:2]
    maps = np.full((r, k, size, size), -5.0, np.float32)
    for i in range(r):
        for j in range(k):
            maps[i, j, cells[i, j, 0], cells[i, j, 1]] = 5.0
    return maps


def test_host_results_carry_keypoints_in_original_pixels_through_scale_crop_and_flip():
    canvas_box = np.array([8.0, 4.0, 64.0, 60.0], np.float32)  # 56 x 56 canvas px
    cells = np.array([[[10, 20], [30, 40]]])
    found = {
        "boxes": np.array([[[0.0, 0.0, 10.0, 10.0]]], np.float32),
        "scores": np.array([[0.9]], np.float32),
        "classes": np.zeros((1, 1), np.int32),
        "valid": np.ones((1, 1), bool),
        "keypoint_heatmaps": one_hot_heatmaps(cells)[None],
        "keypoint_boxes": canvas_box[None, None],
        "keypoint_frame": np.array([[0.5, 0.5, -0.5]], np.float32),  # scale 2
    }
    for flipped in (False, True):
        batch = {
            "image_id": np.array([3]),
            "example_valid": np.array([True]),
            "orig_hw": np.array([[100, 120]]),
            "image_hw": np.array([[80, 90]]),
            "image": np.zeros((1, 96, 96, 3), np.uint8),
            "scale": np.array([2.0], np.float32),
            "crop_offset": np.array([[6, 10]]),
            "flipped": np.array([flipped]),
        }
        (result,) = detections.detections_to_results(found, batch, [1])
        points = np.asarray(result["keypoints"]).reshape(2, 3)
        for k, (row, col) in enumerate(cells[0]):
            # Cell centre in the box (1 canvas px per cell here), unflipped, uncropped, / 2.
            x = canvas_box[0] + col + 0.5
            y = canvas_box[1] + row + 0.5
            if flipped:
                x = 90 - x
            assert points[k, 0] == pytest.approx((x + 10) / 2 - 0.5, abs=1e-4)
            assert points[k, 1] == pytest.approx((y + 6) / 2 - 0.5, abs=1e-4)


def test_perfect_keypoints_score_ap_1_and_a_shifted_set_scores_less():
    from instseg_jax import evaluate
    from instseg_jax.input.keypoints import SYNTHETIC_SHAPES
    from instseg_jax.input.synthetic import SyntheticSource

    source = SyntheticSource(length=3, canvas_hw=(96, 96), seed=2)
    gt = evaluate.ground_truth(source)
    results = []
    for ann in gt.dataset["annotations"]:
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": 0.9,
                "keypoints": ann["keypoints"],
            }
        )
    stats = evaluate.coco_evaluate(
        gt, results, ("keypoints",), False, keypoint_sigmas=SYNTHETIC_SHAPES.sigmas
    )
    assert evaluate.named(stats["keypoints"])["AP"] == pytest.approx(1.0)
    for r in results:
        r["keypoints"] = [v + 3.0 if i % 3 == 0 else v for i, v in enumerate(r["keypoints"])]
    stats = evaluate.coco_evaluate(
        gt, results, ("keypoints",), False, keypoint_sigmas=SYNTHETIC_SHAPES.sigmas
    )
    assert evaluate.named(stats["keypoints"])["AP"] < 0.9


def test_one_step_trains_the_keypoint_head_and_inference_ships_heatmaps():
    from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step

    step = smoke_step(keypoint_rcnn, "experiments/keypoint_rcnn_synthetic.py:smoke")
    terms = ["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_keypoint"]
    assert all(np.isfinite(float(step.metrics[k])) for k in terms)
    assert_total_is_the_sum(step, terms)
    # Near-uniform heatmaps at initialisation: the cross-entropy starts near log(56 x 56).
    assert float(step.metrics["loss_keypoint"]) == pytest.approx(np.log(56 * 56), abs=1.5)
    assert float(step.metrics["num_keypoint_targets"]) > 0
    assert magnitude(step.grads["keypoint_head"]) > 0
    assert step.detections["keypoint_heatmaps"].shape[2:] == (5, 56, 56)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipes' compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import overfit_report

    report = overfit_report(
        "experiments/keypoint_rcnn_synthetic.py",
        tmp_path / "overfit",
        steps=300,
        overrides=[
            f"--config.model.compute_dtype={dtype}",
            "--config.optim.name=adamw",
            "--config.optim.lr=0.002",
        ],
    )
    assert report["keypoints"]["AP"] >= 0.9, report["keypoints"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("keypoint_rcnn")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
