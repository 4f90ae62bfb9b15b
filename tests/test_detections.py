"""Detections -> original pixels: both mask payloads land where the objects are.

The round trip takes ground truth through the input transforms (test-time resize, large-scale
jitter with a crop, a flip), turns the canvas targets into Detections with the mapping the
models use (ops.canvas_to_original_boxes, ops.mirror_box_masks, the canvas-mask resampler) and
scores them with pycocotools against the same objects in the original image: AP 1.0 for bbox
and segm. Mapping boxes back with `* scale` instead of `/ scale`, or dropping the crop offset or
the flip, fails it.
"""

import jax
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from instseg_jax import detections, evaluate, ops, structures
from instseg_jax.input import report
from instseg_jax.input.pipeline import stack_examples
from instseg_jax.input.synthetic import SyntheticSource
from instseg_jax.input.transforms import TransformConfig, _geometry, transform

HW = (48, 64)  # original images: even sides, so every geometry below is exact at stride 4
SOURCE = SyntheticSource(6, HW, seed=11, min_size=10)
STRIDE = 4

GEOMETRIES = {
    # test-time resize: short side 192 -> scale 4, no crop, no flip
    "resize": dict(train=False, canvas_hw=(192, 256), short_side=(192,), max_long_side=256),
    # large-scale jitter: fit 2 x jitter 2 = scale 4, a 96x128 window cropped out of 192x256,
    # then mirrored
    "lsj_crop_flip": dict(
        train=True,
        canvas_hw=(96, 128),
        resize="lsj",
        lsj_scale=(2.0, 2.0),
        hflip=1.0,
        drop_crowd=False,
    ),
}


def transform_config(name: str) -> TransformConfig:
    return TransformConfig(
        max_instances=16,
        box_masks=True,
        full_mask_stride=STRIDE,
        mask_size=112,
        min_box_size=1.0,
        **GEOMETRIES[name],
    )


def aligned_rng(config, index: int) -> np.random.Generator:
    """A generator whose crop offset is a multiple of the stride (canvas cells then sit on
    original pixel centres, so the stride-4 targets are exact)."""
    for seed in range(1000):
        (scale, _), (oy, ox), _ = _geometry(config, HW, np.random.default_rng([seed, index]))
        if oy % STRIDE == 0 and ox % STRIDE == 0 and (scale * 2).is_integer():
            return np.random.default_rng([seed, index])
    raise AssertionError("no aligned crop found")


def batch_and_ground_truth(name: str):
    """(host batch, COCO ground truth of what is visible in each example's window)."""
    config = transform_config(name)
    examples, images, annotations = [], [], []
    for index in range(len(SOURCE)):
        decoded = SOURCE.load(index)
        example = transform(decoded, config, aligned_rng(config, index), report.new_counts())
        examples.append(example)
        scale, (oy, ox) = float(example["scale"]), example["crop_offset"]
        valid_h, valid_w = example["image_hw"]
        # The window's pre-image: original pixels whose centres land inside the valid region.
        ys = (np.arange(HW[0]) + 0.5) * scale - oy
        xs = (np.arange(HW[1]) + 0.5) * scale - ox
        window = ((ys >= 0) & (ys < valid_h))[:, None] & ((xs >= 0) & (xs < valid_w))[None, :]
        x0, y0 = ox / scale, oy / scale
        x1, y1 = (ox + valid_w) / scale, (oy + valid_h) / scale
        images.append({"id": index, "height": HW[0], "width": HW[1]})
        for mask, box, cls in zip(
            decoded["masks"], decoded["boxes"], decoded["classes"], strict=True
        ):
            visible = mask & window
            clipped = np.clip(box, [x0, y0, x0, y0], [x1, y1, x1, y1])
            if not visible.any() or (clipped[2:] - clipped[:2] < 1 / scale).any():
                continue  # outside the window: the transforms drop it too
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            bx0, by0, bx1, by1 = (float(v) for v in clipped)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": int(cls) + 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [bx0, by0, bx1 - bx0, by1 - by0],
                    "iscrowd": 0,
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(SOURCE.class_names)],
    }
    gt.createIndex()
    return stack_examples(examples), gt


def as_detections(batch: dict, payload: str) -> dict:
    """Ground-truth targets on the canvas as a model's Detections, mapped as models map them."""
    boxes = ops.canvas_to_original_boxes(
        batch["gt_boxes"],
        batch["image_hw"],
        batch["orig_hw"],
        batch["scale"],
        batch["crop_offset"],
        batch["flipped"],
    )
    found = {
        "boxes": np.asarray(boxes),
        "scores": batch["gt_valid"].astype(np.float32),
        "classes": batch["gt_classes"],
        "valid": batch["gt_valid"],
    }
    if payload == "masks":
        masks = batch["gt_masks"].astype(np.float32)
        found["masks"] = np.asarray(ops.mirror_box_masks(masks, batch["flipped"]))
    else:
        found["canvas_masks"] = batch["gt_full_masks"].astype(np.float32)
    return found


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("payload", ["masks", "canvas_masks"])
def test_ground_truth_round_trip_scores_ap_one(geometry, payload):
    batch, gt = batch_and_ground_truth(geometry)
    assert batch["gt_valid"].sum() == len(gt.anns) > 10
    if geometry == "lsj_crop_flip":  # the case exercises what it names
        assert batch["flipped"].all() and (batch["crop_offset"] > 0).any()
        assert batch["gt_valid"].sum() < sum(len(SOURCE.load(i)["masks"]) for i in range(6))
    found = as_detections(batch, payload)
    results = detections.detections_to_results(found, batch, [1, 2, 3])
    stats = evaluate.coco_evaluate(gt, results, ("bbox", "segm"), print_tables=False)
    assert stats["bbox"][0] == pytest.approx(1.0) and stats["segm"][0] == pytest.approx(1.0)


def test_round_trip_fails_when_the_scale_is_applied_the_wrong_way():
    """The test above can fail: boxes multiplied by the scale instead of divided."""
    batch, gt = batch_and_ground_truth("resize")
    found = as_detections(batch, "masks")
    wrong = dict(batch, scale=1.0 / batch["scale"])
    found["boxes"] = np.asarray(
        ops.canvas_to_original_boxes(
            batch["gt_boxes"], batch["image_hw"], batch["orig_hw"], wrong["scale"],
            batch["crop_offset"], batch["flipped"],
        )
    )  # fmt: skip
    results = detections.detections_to_results(found, batch, [1, 2, 3])
    assert evaluate.coco_evaluate(gt, results, ("bbox",), print_tables=False)["bbox"][0] < 0.1


def test_boxes_from_canvas_masks_when_a_method_predicts_none():
    batch, gt = batch_and_ground_truth("resize")
    found = as_detections(batch, "canvas_masks")
    del found["boxes"]
    results = detections.detections_to_results(found, batch, [1, 2, 3])
    for result in results:
        np.testing.assert_allclose(
            result["bbox"], mask_utils.toBbox(result["segmentation"]), atol=1e-6
        )
    assert evaluate.coco_evaluate(gt, results, ("segm",), print_tables=False)["segm"][0] == 1.0


def test_host_paste_equals_the_device_op():
    """detections.paste_box_mask (NumPy, per box region) against ops.paste_masks (jnp, whole
    image): the same pixels, boxes inside, across and outside the image."""
    rng = np.random.default_rng(0)
    masks = rng.uniform(size=(40, 28, 28)).astype(np.float32)
    corners = rng.uniform(-30, 150, size=(40, 2))
    sizes = rng.uniform(0.5, 90, size=(40, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)
    hw = (97, 131)
    device = np.asarray(ops.paste_masks(masks, boxes, hw))
    for k in range(len(masks)):
        full = np.zeros(hw, bool)
        region, top, left = detections.paste_box_mask(masks[k], boxes[k], hw)
        full[top : top + region.shape[0], left : left + region.shape[1]] = region
        assert (full != device[k]).sum() == 0, k


def test_canvas_resampler_against_a_float64_reference():
    """Bilinear taps shared by the masks of one image against a direct float64 evaluation of
    the mapping original pixel -> canvas (scale, crop, flip) -> stride-4 cell coordinate."""
    rng = np.random.default_rng(1)
    geometry = structures.ImageGeometry(
        orig_hw=(53, 71), image_hw=(96, 118), canvas_hw=(128, 128), scale=1.7,
        crop_offset=(9, 3), flipped=True,
    )  # fmt: skip
    masks = rng.uniform(size=(5, 32, 32)).astype(np.float32)
    resampler = detections.CanvasResampler(geometry, (32, 32))
    cells_y = int(np.ceil(96 / 4 - 0.5))
    cells_x = int(np.ceil(118 / 4 - 0.5))
    canvas_y = (np.arange(53) + 0.5) * 1.7 - 9
    canvas_x = (np.arange(71) + 0.5) * 1.7 - 3  # before the flip
    seen = ((canvas_y >= 0) & (canvas_y < 96))[:, None] & ((canvas_x >= 0) & (canvas_x < 118))
    assert 0 < seen.sum() < seen.size  # the crop cuts pixels off: they must stay 0
    y = np.clip(canvas_y / 4 - 0.5, 0, cells_y - 1)
    x = np.clip((118 - canvas_x) / 4 - 0.5, 0, cells_x - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - y0, x - x0
    y1, x1 = np.minimum(y0 + 1, 31), np.minimum(x0 + 1, 31)
    for mask in masks:
        m = mask.astype(np.float64)
        expected = (
            (1 - fy)[:, None] * ((1 - fx) * m[y0][:, x0] + fx * m[y0][:, x1])
            + fy[:, None] * ((1 - fx) * m[y1][:, x0] + fx * m[y1][:, x1])
        ) >= 0.5
        expected &= seen
        full = np.zeros((53, 71), bool)
        region, top, left = resampler.region(mask)
        full[top : top + region.shape[0], left : left + region.shape[1]] = region
        assert (full != expected).sum() <= 1  # float32 against float64 at the 0.5 boundary


def test_host_side_compiles_nothing_for_new_image_sizes():
    """Pasting and encoding detections of images of 12 sizes: no XLA compilation at all."""
    rng = np.random.default_rng(2)
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiled.append(event) if "compile" in event else None
    )
    for size in range(12):
        hw = (100 + 13 * size, 90 + 7 * size)
        k = 1 + size * 8
        found = {
            "boxes": np.sort(rng.uniform(0, 90, (1, k, 4)), axis=-1).astype(np.float32),
            "scores": np.ones((1, k), np.float32),
            "classes": np.zeros((1, k), np.int32),
            "valid": np.ones((1, k), bool),
            "masks": rng.uniform(size=(1, k, 28, 28)).astype(np.float32),
        }
        batch = {
            "image": np.zeros((1, 128, 128, 3), np.uint8),
            "image_id": np.array([size]),
            "example_valid": np.array([True]),
            "orig_hw": np.array([hw]),
            "image_hw": np.array([hw]),
            "scale": np.ones(1, np.float32),
            "crop_offset": np.zeros((1, 2), np.int32),
        }
        assert len(detections.detections_to_results(found, batch, [1])) == k
    assert compiled == []


def test_paste_threshold_is_the_method_configs_choice():
    """A box-relative mask of probabilities 0.30-0.62 pasted by detections_to_results at the cut
    builders.mask_paste reads from each method config: FCIS's keeps the pixels >= 0.4, its
    reference's rule (lib/utils/mask_voc2coco.py mask_voc2coco, line 51: `pred_mask >=
    binary_thresh`, BINARY_THRESH 0.4 in fcis/config/config.py); a config without the
    mask_paste_threshold field (Mask R-CNN's) keeps those >= 0.5, as before the field existed.

    Expected pixels: the mask evaluated in float64 at each pixel centre as a sum of tent weights
    max(0, 1 - |u - i|) over its cells (bilinear with zero beyond the mask, the paste rule of
    detectron2's paste_masks_in_image), cut in NumPy."""
    from instseg_jax import builders
    from instseg_jax.methods import fcis, mask_rcnn

    side, hw = 7, (48, 56)
    cells = np.arange(side)
    mask = 0.30 + 0.32 * (cells[:, None] + cells[None, :]) / (2 * (side - 1))
    box = np.array([6.2, 4.6, 40.3, 37.7])  # xyxy
    found = {
        "boxes": box[None, None].astype(np.float32),
        "scores": np.ones((1, 1), np.float32),
        "classes": np.zeros((1, 1), np.int32),
        "valid": np.ones((1, 1), bool),
        "masks": mask[None, None].astype(np.float32),
    }
    batch = {
        "image": np.zeros((1, 64, 64, 3), np.uint8),
        "image_id": np.array([3]),
        "example_valid": np.array([True]),
        "orig_hw": np.array([hw]),
        "image_hw": np.array([hw]),
        "scale": np.ones(1, np.float32),
        "crop_offset": np.zeros((1, 2), np.int32),
    }

    def tent_weights(centres, lo, hi):
        u = (centres - lo) / (hi - lo) * side - 0.5
        return np.maximum(0.0, 1.0 - np.abs(u[:, None] - cells[None, :]))

    weights_y = tent_weights(np.arange(hw[0]) + 0.5, box[1], box[3])
    weights_x = tent_weights(np.arange(hw[1]) + 0.5, box[0], box[2])
    values = weights_y @ mask @ weights_x.T  # [H, W] float64

    fcis_cfg = fcis.Config(num_classes=3)
    mask_rcnn_cfg = mask_rcnn.Config(num_classes=3)
    assert not hasattr(mask_rcnn_cfg, "mask_paste_threshold")
    pasted = {}
    for name, cfg, cut in (("fcis", fcis_cfg, 0.4), ("mask_rcnn", mask_rcnn_cfg, 0.5)):
        # No pixel within float32 rounding of the cut: the comparison is exact either way.
        assert np.abs(values - cut).min() > 1e-4
        (result,) = detections.detections_to_results(found, batch, [1], builders.mask_paste(cfg))
        segmentation = dict(result["segmentation"])
        segmentation["counts"] = segmentation["counts"].encode("ascii")
        pasted[name] = mask_utils.decode(segmentation).astype(bool)
        np.testing.assert_array_equal(pasted[name], values >= cut, err_msg=name)
    # The soft band [0.4, 0.5) is in FCIS's mask and not in the default one.
    band = pasted["fcis"] & ~pasted["mask_rcnn"]
    assert band.sum() > 100 and (pasted["mask_rcnn"] <= pasted["fcis"]).all()
    assert ((values[band] >= 0.4) & (values[band] < 0.5)).all()
