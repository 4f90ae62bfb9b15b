"""YOLACT's training augmentation (input/ssd_augment.py) against float64 NumPy encodings of
mmdetection's rules, written from mmdet/datasets/transforms/transforms.py (classes Expand,
MinIoURandomCrop and PhotoMetricDistortion) with dense masks and per-pixel colorsys HSV, on
hand-built examples with explicit parameters; and the pipeline with them on."""

from __future__ import annotations

import colorsys
import dataclasses
import json

import numpy as np
import pytest

from instseg_jax.input import report, ssd_augment
from instseg_jax.input.instances import InstanceMasks
from instseg_jax.input.pipeline import InputPipeline
from instseg_jax.input.synthetic import SyntheticSource
from instseg_jax.input.transforms import TransformConfig
from tests.input.streams import assert_same, take

MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)


def hand_built(height=30, width=40):
    """Three instances (one crowd) with rectangles and a notch as masks, keypoints on two."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    masks = np.zeros((3, height, width), bool)
    masks[0, 2:12, 3:15] = True
    masks[0, 5:8, 3:6] = False
    masks[1, 14:28, 20:37] = True
    masks[2, 0:6, 30:40] = True
    boxes = np.array([[3, 2, 15, 12], [20, 14, 37, 28], [30, 0, 40, 6]], np.float32)
    keypoints = np.zeros((3, 2, 3), np.float32)
    keypoints[0] = [[4.5, 3.5, 2], [14.0, 11.0, 1]]
    keypoints[1] = [[21.0, 15.0, 2], [0, 0, 0]]
    return {
        "image": image,
        "masks": InstanceMasks.from_dense(masks),
        "boxes": boxes,
        "classes": np.array([1, 2, 3], np.int32),
        "iscrowd": np.array([False, False, True]),
        "keypoints": keypoints,
        "image_id": 7,
    }


# --- Expand ----------------------------------------------------------------------------


def reference_expand(example, ratio, left, top, mean):
    """mmdetection Expand.transform with its draws given: an int(h r) x int(w r) image of the
    mean (a uint8 image filled with float values: truncated), the image at (top, left), boxes
    translated, BitmapMasks.expand (dense zeros, the mask at the same place)."""
    image = example["image"]
    h, w, c = image.shape
    out_h, out_w = int(h * ratio), int(w * ratio)
    canvas = np.full((out_h, out_w, c), mean, dtype=np.uint8)
    canvas[top : top + h, left : left + w] = image
    dense = np.asarray(example["masks"])
    masks = np.zeros((len(dense), out_h, out_w), bool)
    masks[:, top : top + h, left : left + w] = dense
    boxes = np.asarray(example["boxes"], np.float64) + [left, top, left, top]
    return canvas, masks, boxes


def test_expand_moves_image_masks_boxes_and_keypoints_together():
    example = hand_built()
    mean = (123.68, 116.78, 103.94)
    ratio, left, top = 2.37, 11, 29
    out_hw = (int(30 * ratio), int(40 * ratio))
    out = ssd_augment.expand(example, ssd_augment.Expansion(out_hw, top, left), mean)
    image, masks, boxes = reference_expand(example, ratio, left, top, mean)
    np.testing.assert_array_equal(out["image"], image)
    assert tuple(out["image"][0, 0]) == (123, 116, 103)
    np.testing.assert_array_equal(np.asarray(out["masks"]), masks)
    np.testing.assert_allclose(out["boxes"], boxes)
    labelled = example["keypoints"][..., 2] > 0
    np.testing.assert_allclose(
        out["keypoints"][..., :2],
        (example["keypoints"][..., :2] + [left, top]) * labelled[..., None],
    )


def test_expansion_draws_follow_mmdetection():
    """Expand: applied when U <= prob (0.5), ratio ~ U(1, 4), left = int(U(0, w r - w)) and
    top likewise: the offsets always keep the image inside the canvas."""
    rng = np.random.default_rng(0)
    draws = [ssd_augment.draw_expansion((30, 40), (1.0, 4.0), 0.5, rng) for _ in range(2000)]
    applied = [d for d in draws if d is not None]
    assert abs(len(applied) / len(draws) - 0.5) < 0.04
    ratios = np.array([d.out_hw[1] / 40 for d in applied])
    assert ratios.min() >= 1 and ratios.max() < 4 and abs(ratios.mean() - 2.5) < 0.1
    for d in applied:
        assert 0 <= d.top <= d.out_hw[0] - 30 and 0 <= d.left <= d.out_hw[1] - 40


# --- MinIoURandomCrop -------------------------------------------------------------------


def reference_crop(example, patch):
    """MinIoURandomCrop.transform once its patch is accepted: instances whose box centre is
    strictly inside the patch kept; boxes translated by the patch corner and clipped to its
    size; BitmapMasks.crop (the dense masks sliced); keypoints (not handled by mmdetection)
    are expected shifted, those cut off unlabelled."""
    x0, y0, x1, y1 = patch
    boxes = np.asarray(example["boxes"], np.float64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    keep = (centres[:, 0] > x0) & (centres[:, 1] > y0) & (centres[:, 0] < x1) & (centres[:, 1] < y1)
    kept = boxes[keep] - [x0, y0, x0, y0]
    kept = np.clip(kept, 0, [x1 - x0, y1 - y0, x1 - x0, y1 - y0])
    masks = np.asarray(example["masks"])[keep][:, y0:y1, x0:x1]
    return example["image"][y0:y1, x0:x1], masks, kept, keep


def test_crop_cuts_masks_and_boxes_and_counts_the_instances_it_drops():
    example = hand_built()
    patch = (8, 4, 33, 29)  # instance 0's centre (9, 7) inside, 1's (28.5, 21) inside, 2 not
    counts = report.new_counts()
    out = ssd_augment.crop(example, patch, counts)
    image, masks, boxes, keep = reference_crop(example, patch)
    assert list(keep) == [True, True, False]
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(np.asarray(out["masks"]), masks)
    np.testing.assert_allclose(out["boxes"], boxes)
    np.testing.assert_array_equal(out["classes"], [1, 2])
    np.testing.assert_array_equal(out["iscrowd"], [False, False])
    assert report.as_dict(counts)["min_iou_crop_dropped"] == 1
    # instance 0's first keypoint (4.5, 3.5) is left of the window: unlabelled; its second
    # (14, 11) moves to (6, 7); instance 1's (21, 15) to (13, 11)
    np.testing.assert_allclose(out["keypoints"], [[[0, 0, 0], [6, 7, 1]], [[13, 11, 2], [0, 0, 0]]])


def reference_window(hw, boxes, min_ious, min_crop_size, rng):
    """MinIoURandomCrop's loop, written from the file: mode = random.choice((1, *min_ious, 0))
    (1: no crop), 50 trials of new_w = uniform(min_crop_size w, w), new_h likewise, h/w in
    [0.5, 2], left = random.uniform(w - new_w) (numpy: low = w - new_w, high = 1), top
    likewise, patch = ints, no line or point patch, IoU (bbox_overlaps) of every box >= the
    mode, some box centre strictly inside; else a new mode. Generator use as the code under
    test (a test device, not the reference's: it draws left and top only after the aspect
    test): one integer for the mode, then four uniforms per trial, all 50 trials' at once."""
    h, w = hw
    boxes = np.asarray(boxes, np.float64)
    modes = (1, *min_ious, 0)
    while True:
        mode = modes[int(rng.integers(len(modes)))]
        if mode == 1:
            return None
        draws = rng.random((50, 4))
        for u_w, u_h, u_left, u_top in draws:
            new_w = min_crop_size * w + (w - min_crop_size * w) * u_w
            new_h = min_crop_size * h + (h - min_crop_size * h) * u_h
            if new_h / new_w < 0.5 or new_h / new_w > 2:
                continue
            left = (w - new_w) + (1.0 - (w - new_w)) * u_left
            top = (h - new_h) + (1.0 - (h - new_h)) * u_top
            patch = np.array((int(left), int(top), int(left + new_w), int(top + new_h)))
            if patch[2] == patch[0] or patch[3] == patch[1]:
                continue
            ious = []
            for b in boxes:
                iw = max(min(b[2], patch[2]) - max(b[0], patch[0]), 0)
                ih = max(min(b[3], patch[3]) - max(b[1], patch[1]), 0)
                inter = iw * ih
                area_b = (b[2] - b[0]) * (b[3] - b[1])
                area_p = (patch[2] - patch[0]) * (patch[3] - patch[1])
                ious.append(inter / max(area_b + area_p - inter, 1e-6))
            if ious and min(ious) < mode:
                continue
            if len(boxes):
                cx = (boxes[:, 0] + boxes[:, 2]) / 2
                cy = (boxes[:, 1] + boxes[:, 3]) / 2
                inside = (cx > patch[0]) & (cy > patch[1]) & (cx < patch[2]) & (cy < patch[3])
                if not inside.any():
                    continue
            return tuple(int(v) for v in patch)


def test_crop_windows_follow_the_reference_loop():
    example = hand_built()
    found = []
    for seed in range(60):
        ours = ssd_augment.draw_crop_window(
            (30, 40), example["boxes"], MIN_IOUS, 0.3, np.random.default_rng(seed)
        )
        want = reference_window(
            (30, 40), example["boxes"], MIN_IOUS, 0.3, np.random.default_rng(seed)
        )
        assert ours == want, seed
        found.append(ours)
    # Both occur: with three boxes of different sizes the high thresholds are unreachable,
    # so the loop redraws its mode until no-crop or a reachable threshold comes up.
    assert 0 < sum(w is None for w in found) < len(found)
    empty = ssd_augment.draw_crop_window(
        (30, 40), np.zeros((0, 4)), MIN_IOUS, 0.3, np.random.default_rng(1)
    )
    assert empty == reference_window(
        (30, 40), np.zeros((0, 4)), MIN_IOUS, 0.3, np.random.default_rng(1)
    )


def test_composed_zoom_and_crop_equals_expand_then_crop():
    """The pipeline builds the image once from the composed window: the same pixels,
    masks, boxes and counts as expand followed by crop with the same draws."""
    config = TransformConfig(
        expand_ratio=(1.0, 4.0), expand_prob=1.0, min_iou_crop=(0.0,), expand_fill=(9, 8, 7)
    )
    example = hand_built()
    for seed in range(6):
        counts = report.new_counts()
        out = ssd_augment.zoom_and_crop(example, config, np.random.default_rng(seed), counts)
        rng = np.random.default_rng(seed)
        expansion = ssd_augment.draw_expansion((30, 40), (1.0, 4.0), 1.0, rng)
        step = ssd_augment.expand(example, expansion, (9, 8, 7))
        window = ssd_augment.draw_crop_window(expansion.out_hw, step["boxes"], (0.0,), 0.3, rng)
        want_counts = report.new_counts()
        if window is not None:
            step = ssd_augment.crop(step, window, want_counts)
        np.testing.assert_array_equal(out["image"], step["image"])
        np.testing.assert_array_equal(np.asarray(out["masks"]), np.asarray(step["masks"]))
        np.testing.assert_array_equal(out["boxes"], step["boxes"])
        np.testing.assert_array_equal(counts, want_counts)


# --- PhotoMetricDistortion --------------------------------------------------------------


def reference_distort(image, d: ssd_augment.Distortion):
    """PhotoMetricDistortion.transform with its flags and values given, in float64: brightness,
    contrast first (mode 1), BGR -> HSV (here per pixel with colorsys, H in degrees), S x
    saturation, H + hue wrapped (> 360: - 360, < 0: + 360), HSV -> BGR, contrast last (mode
    0), the channel permutation; float64, unclipped, as mmdetection hands it on."""
    img = image.astype(np.float64)
    if d.brightness is not None:
        img = img + d.brightness
    if d.contrast is not None and not d.contrast_last:
        img = img * d.contrast
    if d.saturation is not None or d.hue is not None:
        out = np.empty_like(img)
        for index in np.ndindex(img.shape[:2]):
            r, g, b = img[index]
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            h = h * 360
            if d.saturation is not None:
                s = s * d.saturation
            if d.hue is not None:
                h = h + d.hue
                h = h - 360 if h > 360 else h
                h = h + 360 if h < 0 else h
            out[index] = colorsys.hsv_to_rgb((h / 360) % 1.0, s, v)
        img = out
    if d.contrast is not None and d.contrast_last:
        img = img * d.contrast
    if d.permutation is not None:
        img = img[..., list(d.permutation)]
    return img


DISTORTIONS = [
    ssd_augment.Distortion(False, 25.0, 1.4, 1.3, 15.0, (2, 0, 1)),
    ssd_augment.Distortion(True, -30.0, 0.6, 0.55, -17.0, None),
    ssd_augment.Distortion(True, None, 1.2, None, 10.0, (1, 2, 0)),
    ssd_augment.Distortion(False, 5.0, None, 1.5, None, None),
    ssd_augment.Distortion(True, None, None, None, None, None),
]


@pytest.mark.parametrize("distortion", DISTORTIONS)
def test_photometric_distortion_matches_a_float64_encoding(distortion):
    # Values in [40, 215] keep every pixel positive before the HSV step (colorsys and OpenCV
    # differ only for negative V); includes greys (S = 0) and pure hues.
    rng = np.random.default_rng(11)
    image = rng.integers(40, 216, (9, 11, 3), dtype=np.uint8)
    image[0, :3] = [[100, 100, 100], [200, 40, 40], [40, 200, 40]]
    want = reference_distort(image, distortion)
    np.testing.assert_allclose(ssd_augment.distorted_pixels(image, distortion), want, atol=2e-3)
    # Back to uint8 (our documented deviation: rounded and clipped): float32 against float64
    # can only differ at a .5 tie, which integer pixels x 1.5 often reach.
    ours = ssd_augment.distort(image, distortion).astype(int)
    assert np.abs(ours - np.clip(np.rint(want), 0, 255)).max() <= 1


def test_photometric_draws_flip_each_step_with_probability_one_half():
    rng = np.random.default_rng(4)
    draws = [ssd_augment.draw_distortion(rng) for _ in range(2000)]
    for field in ("brightness", "contrast", "saturation", "hue", "permutation"):
        rate = np.mean([getattr(d, field) is not None for d in draws])
        assert abs(rate - 0.5) < 0.04, field
    assert abs(np.mean([d.contrast_last for d in draws]) - 0.5) < 0.04
    deltas = [d.brightness for d in draws if d.brightness is not None]
    hues = [d.hue for d in draws if d.hue is not None]
    assert -32 <= min(deltas) and max(deltas) <= 32 and -18 <= min(hues) and max(hues) <= 18


# --- pipeline -----------------------------------------------------------------------------

TRAIN = TransformConfig(
    canvas_hw=(48, 48), short_side=(40, 48), max_long_side=48, max_instances=6, mask_size=8
)
AUGMENTED = dataclasses.replace(
    TRAIN,
    expand_ratio=(1.0, 4.0),
    min_iou_crop=MIN_IOUS,
    photometric=True,
    expand_fill=(123.68, 116.78, 103.94),
)


def stream(config=AUGMENTED):
    source = SyntheticSource(10, (40, 56), seed=2, max_shapes=5)
    return InputPipeline(source, config, 4, seed=5, process_index=0, process_count=1)


def test_pipeline_with_augmentation_is_a_function_of_seed_and_position():
    expected = take(stream(), 5)
    assert_same(take(stream(), 5), expected)
    plain = take(stream(TRAIN), 5)
    assert not any(
        np.array_equal(a["image"], b["image"]) for a, b in zip(plain, expected, strict=True)
    )
    first = stream()
    take(first, 2)
    resumed = stream()
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    assert_same(take(resumed, 3), expected[2:])
    assert resumed.total_counts[report.ISSUE_KINDS.index("min_iou_crop_dropped")] > 0


def test_yolact_coco_recipe_augments_as_mmdetection_and_evaluation_does_not():
    """mmdetection configs/yolact/yolact_r50_1xb8-55e_coco.py train_pipeline: Expand(mean=
    img_norm_cfg mean [123.68, 116.78, 103.94], ratio_range=(1, 4)) with Expand's default prob
    0.5, MinIoURandomCrop(min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size=0.3),
    PhotoMetricDistortion; the test pipeline has none of them."""
    from instseg_jax import builders
    from instseg_jax import config as config_lib

    config = config_lib.load("experiments/yolact_r50_coco.py")
    train = builders.transform_config(config, train=True)
    assert train.expand_ratio == (1.0, 4.0) and train.expand_prob == 0.5
    assert train.expand_fill == (123.68, 116.78, 103.94)
    assert train.min_iou_crop == MIN_IOUS and train.min_crop_size == 0.3
    assert train.photometric
    test = builders.transform_config(config, train=False)
    assert not test.zooms_or_crops and not test.photometric
