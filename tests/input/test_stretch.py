"""input.resize = "stretch" against mmdetection's Resize(keep_ratio=False).

The reference (open-mmlab/mmdetection mmdet/datasets/transforms/transforms.py, Resize and
FixShapeResize; mmcv's Resize._resize_img): with keep_ratio False the image is resized to exactly
scale = (new_w, new_h); scale_factor = (w_scale, h_scale) = (new_w / w, new_h / h);
_resize_bboxes multiplies x by w_scale and y by h_scale and clips to img_shape; _resize_masks
resizes each mask to img_shape. At test time the same Resize runs and detections come back
divided by scale_factor per axis (mmdet/models/dense_heads/yolact_head.py:
bboxes /= scale_factor.repeat((1, 2))). `reference_resize` below encodes that in float64 NumPy.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import ops
from instseg_jax.config import ConfigValueError
from instseg_jax.detections import CanvasResampler
from instseg_jax.input import report
from instseg_jax.input.transforms import TransformConfig, transform
from instseg_jax.structures import ImageGeometry

ORIG_HW = (60, 100)
RECTS = ((10, 5, 30, 25), (52, 30, 97, 58))  # xyxy, pixel edges


def example():
    masks = np.zeros((len(RECTS), *ORIG_HW), bool)
    for i, (x0, y0, x1, y1) in enumerate(RECTS):
        masks[i, y0:y1, x0:x1] = True
    image = np.zeros((*ORIG_HW, 3), np.uint8)
    image[..., 0] = np.arange(ORIG_HW[1])[None, :] * 2
    return {
        "image": image,
        "masks": masks,
        "boxes": np.array(RECTS, np.float32),
        "classes": np.zeros(len(RECTS), np.int32),
        "iscrowd": np.zeros(len(RECTS), bool),
        "image_id": 3,
    }


def reference_resize(boxes, orig_hw, new_hw):
    """mmdetection Resize(scale=(new_w, new_h), keep_ratio=False) of xyxy boxes, float64:
    (boxes on the resized image, (w_scale, h_scale))."""
    h, w = orig_hw
    new_h, new_w = new_hw
    w_scale, h_scale = new_w / w, new_h / h
    out = np.asarray(boxes, np.float64) * np.array([w_scale, h_scale, w_scale, h_scale])
    out[:, 0::2] = np.clip(out[:, 0::2], 0, new_w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, new_h)
    return out, (w_scale, h_scale)


def stretch_config(**overrides):
    fields = dict(
        canvas_hw=(64, 64),
        resize="stretch",
        stretch_hw=(55, 40),  # (h, w): 60x100 -> 55x40, y scaled by 11/12, x by 2/5
        train=False,
        max_instances=4,
        mask_size=8,
        centers=True,
        contour_points=64,
    )
    fields.update(overrides)
    return TransformConfig(**fields)


@pytest.mark.parametrize("train", [False, True])
def test_stretch_matches_mmdetection_resize_without_keeping_ratio(train):
    config = stretch_config(train=train, hflip=0.0)
    out = transform(example(), config, np.random.default_rng(0), report.new_counts())
    expected, (w_scale, h_scale) = reference_resize(RECTS, ORIG_HW, config.stretch_hw)
    assert out["image_hw"].tolist() == [55, 40] and out["orig_hw"].tolist() == list(ORIG_HW)
    np.testing.assert_allclose(out["scale_yx"], [h_scale, w_scale], rtol=1e-6)
    assert (out["image"][55:] == 0).all() and (out["image"][:, 40:] == 0).all()
    np.testing.assert_allclose(out["gt_boxes"][:2], expected, rtol=1e-6, atol=1e-5)
    # A rectangle stays a rectangle under a per-axis resize: its box crop is full, its mass
    # centre is its box's centre, and its contour lies on its box's border.
    assert (out["gt_masks"][:2] == 1).all()
    centres = np.stack([expected[:, 0::2].mean(1), expected[:, 1::2].mean(1)], 1)
    np.testing.assert_allclose(out["gt_centers"][:2], centres, atol=0.5)
    for slot, box in enumerate(expected):
        points = out["gt_contours"][slot]
        to_border = np.minimum(
            np.minimum(np.abs(points[:, 0] - box[0]), np.abs(points[:, 0] - box[2])),
            np.minimum(np.abs(points[:, 1] - box[1]), np.abs(points[:, 1] - box[3])),
        )
        assert (to_border <= 1.0).all(), "contour points are on the stretched rectangle's edge"


def test_stretched_ignore_regions_scale_per_axis():
    """An instance over input.max_instances becomes an ignore region: its box resized as
    mmdetection's _resize_bboxes resizes every box."""
    config = stretch_config(max_instances=1, max_ignore_regions=2, train=True, hflip=0.0)
    out = transform(example(), config, np.random.default_rng(0), report.new_counts())
    expected, _ = reference_resize(RECTS, ORIG_HW, config.stretch_hw)
    np.testing.assert_allclose(out["gt_boxes"][0], expected[1], rtol=1e-6, atol=1e-5)
    assert out["ignore_valid"].tolist() == [True, False]
    np.testing.assert_allclose(out["ignore_boxes"][0], expected[0], rtol=1e-6, atol=1e-5)


def test_stretched_predictions_map_back_per_axis():
    config = stretch_config()
    out = transform(example(), config, np.random.default_rng(0), report.new_counts())
    expected, (w_scale, h_scale) = reference_resize(RECTS, ORIG_HW, config.stretch_hw)
    predicted = np.array([[4.0, 7.5, 30.0, 50.0]])  # canvas xyxy
    # mmdetection: bboxes / scale_factor per axis (then clipped to the original image)
    reference = predicted / np.array([w_scale, h_scale, w_scale, h_scale])
    back = ops.canvas_to_original_boxes(
        jnp.asarray(predicted[None], jnp.float32),
        jnp.asarray(out["image_hw"][None]),
        jnp.asarray(out["orig_hw"][None]),
        jnp.asarray(out["scale_yx"][None]),
        jnp.asarray(out["crop_offset"][None]),
    )
    np.testing.assert_allclose(np.asarray(back)[0], reference, rtol=1e-5)
    # A canvas mask of the second stretched rectangle maps back onto the original rectangle
    # (pixels whose centre is at least a canvas pixel inside or outside its border).
    batch = {k: np.asarray(v)[None] for k, v in out.items()}
    geometry = ImageGeometry.of_batch(batch, 0)
    canvas_mask = np.zeros(config.canvas_hw, np.float32)
    x0, y0, x1, y1 = expected[1]
    ys, xs = np.mgrid[: config.canvas_hw[0], : config.canvas_hw[1]] + 0.5
    canvas_mask[(xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)] = 1.0
    region, top, left = CanvasResampler(geometry, config.canvas_hw).region(canvas_mask)
    full = np.zeros(ORIG_HW, bool)
    full[top : top + region.shape[0], left : left + region.shape[1]] = region
    truth = example()["masks"][1]
    cy, cx = np.mgrid[: ORIG_HW[0], : ORIG_HW[1]] + 0.5
    rx0, ry0, rx1, ry1 = RECTS[1]
    margin_x, margin_y = 1 / w_scale, 1 / h_scale  # one canvas pixel in original pixels
    decided = (
        (np.minimum(np.abs(cx - rx0), np.abs(cx - rx1)) > margin_x)
        | (cy < ry0 - margin_y) | (cy > ry1 + margin_y)
    ) & (
        (np.minimum(np.abs(cy - ry0), np.abs(cy - ry1)) > margin_y)
        | (cx < rx0 - margin_x) | (cx > rx1 + margin_x)
    )  # fmt: skip
    np.testing.assert_array_equal(full[decided], truth[decided])


def test_stretch_refuses_a_size_off_the_canvas_and_keypoints():
    with pytest.raises(ConfigValueError, match=r"input\.stretch_hw"):
        stretch_config(stretch_hw=(80, 40))
    with pytest.raises(ConfigValueError, match=r"input\.stretch_hw"):
        stretch_config(stretch_hw=(0, 0))
    with pytest.raises(ConfigValueError, match="keypoints"):
        stretch_config(keypoints=17, keypoint_flip=tuple(range(17)))
