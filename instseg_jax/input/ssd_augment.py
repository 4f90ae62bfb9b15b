"""SSD-style training augmentation on decoded examples (host side, NumPy): zoom-out (Expand),
min-IoU random crop and photometric distortion, as mmdetection's YOLACT recipe
(configs/yolact/yolact_r50_1xb8-55e_coco.py) runs them: Expand, MinIoURandomCrop, Resize,
RandomFlip, PhotoMetricDistortion (mmdet/datasets/transforms/transforms.py; dbolya/yolact's
utils/augmentations.py SSDAugmentation is the same family).

Each transform is (draw its parameters from a generator) + (apply given parameters), so tests
can give the window, the offset or the deltas themselves:

- expand (input.expand_ratio, input.expand_prob): with probability p the image is placed at
  a random offset on a canvas ratio x its size, ratio ~ U(expand_ratio), filled with the
  method's pixel mean truncated to uint8 (mmdetection fills a uint8 image with the float mean);
  left = int(U(0, w r - w)), then top likewise. Masks, boxes, keypoints and semantic maps (255
  outside the image: mmdetection's seg_ignore_label) move with it.
- min-IoU crop (input.min_iou_crop: the min IoUs, input.min_crop_size): a mode is drawn from
  (1, *min_ious, 0), 1 meaning no crop; for a threshold, up to 50 windows are tried (in one
  vectorised draw, the first that passes taken): w' ~ U(min_crop_size w, w), h' likewise,
  rejected unless 0.5 <= h'/w' <= 2; left is drawn as the
  reference's random.uniform(w - w') does, i.e. numpy's uniform(low=w - w', high=1) (a window
  starts at column 1 or later unless w - w' < 1; dbolya/yolact draws the same way), top
  likewise; the window (int(left), int(top), int(left + w'), int(top + h')) must have area, an
  IoU >= the threshold with every ground-truth box and at least one box centre strictly
  inside; after 50 failures a new mode is drawn. Instances whose box centre lies outside the
  window are dropped (crowd regions included: they take part in the rule as mmdetection's
  ignore-flagged boxes do), counted as min_iou_crop_dropped; the rest have their boxes shifted
  and clipped to the window (not recomputed from the masks) and their masks cropped. An image
  without boxes takes any window.
- photometric distortion (input.photometric), on the canvas's valid region after resize and
  flip, where the reference applies it: brightness +U(-32, 32), contrast xU(0.5, 1.5) before
  or after (at random) the HSV steps, saturation xU(0.5, 1.5), hue +U(-18, 18) degrees
  (wrapped to [0, 360]), a random channel permutation; each step with probability 1/2, in
  float32 with OpenCV's float HSV conversion (what mmcv.bgr2hsv calls). Deviation: the result
  is rounded and clipped to uint8 (the canvas's type) where the reference hands its float image,
  values beyond [0, 255] included, to normalisation.

Expand and crop run on the decoded example before the shared transform (copy-paste runs there
too), so the ignore regions it makes (instances beyond input.max_instances) and its
input.min_box_size rule see the augmented instances; when both are drawn the image is built
once, straight from the composed window, so a zoom-out that is then cropped is never
materialised in full.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from instseg_jax.input import report
from instseg_jax.input.instances import InstanceMasks

# Keys the generator of an example's augmentation apart from its transform's and copy-paste's.
AUGMENT_SALT = 0x55D_A06

# mmdetection's PhotoMetricDistortion arguments in the YOLACT recipe (its defaults too).
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0

# MinIoURandomCrop: windows tried per drawn threshold, and the allowed h / w of a window.
CROP_TRIALS = 50
CROP_ASPECT = (0.5, 2.0)


# ---------------------------------------------------------------------------------- expand


@dataclasses.dataclass(frozen=True)
class Expansion:
    """A zoom-out: the image at rows top.., columns left.. of an out_hw canvas."""

    out_hw: tuple[int, int]
    top: int
    left: int


def draw_expansion(hw, ratio_range, prob: float, rng: np.random.Generator) -> Expansion | None:
    """mmdetection's Expand draws: applied when U(0, 1) <= prob; ratio ~ U(ratio_range);
    left = int(U(0, w r - w)), top = int(U(0, h r - h)); None when not applied."""
    if rng.uniform() > prob:
        return None
    height, width = hw
    ratio = rng.uniform(*ratio_range)
    left = int(rng.uniform(0, width * ratio - width))
    top = int(rng.uniform(0, height * ratio - height))
    return Expansion((int(height * ratio), int(width * ratio)), top, left)


def _place(image: np.ndarray, offset, out_hw, fill) -> np.ndarray:
    """uint8[out_h, out_w, 3]: image with its pixel [0, 0] at (dy, dx) (either may be
    negative), `fill` (truncated to uint8) wherever the image does not reach."""
    dy, dx = offset
    out_h, out_w = out_hw
    height, width = image.shape[:2]
    out = np.empty((out_h, out_w, 3), np.uint8)
    # Filled from a whole row, and only outside the image: broadcasting the 3-vector over
    # the canvas costs several times the copy.
    fill_row = np.tile(np.asarray(fill, np.float64).astype(np.uint8), (out_w, 1))
    y0, x0 = max(dy, 0), max(dx, 0)
    y1, x1 = min(dy + height, out_h), min(dx + width, out_w)
    if y1 <= y0 or x1 <= x0:  # a window beside the image (possible without boxes)
        out[:] = fill_row
        return out
    out[:y0] = fill_row
    out[y1:] = fill_row
    out[y0:y1, :x0] = fill_row[:x0]
    out[y0:y1, x1:] = fill_row[x1:]
    out[y0:y1, x0:x1] = image[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
    return out


def _shifted(example: dict, dy: int, dx: int, out_hw) -> dict:
    """The example's annotations moved by (dy, dx) >= 0 onto a larger out_hw frame (the image
    is left to the caller); semantic maps are 255 (ignored) on the new area."""
    masks = InstanceMasks.from_dense(example["masks"])
    out = dict(example)
    out["masks"] = InstanceMasks(masks.crops, masks.origins + np.array([dy, dx]), out_hw)
    boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
    out["boxes"] = boxes + np.array([dx, dy, dx, dy], np.float32)
    if example.get("keypoints") is not None:
        points = np.array(example["keypoints"], np.float32)
        labelled = points[..., 2] > 0  # unlabelled points stay (0, 0, 0)
        points[..., 0] += dx * labelled
        points[..., 1] += dy * labelled
        out["keypoints"] = points
    if example.get("semantic") is not None:
        semantic = np.full(out_hw, 255, np.uint8)
        height, width = example["semantic"].shape
        semantic[dy : dy + height, dx : dx + width] = example["semantic"]
        out["semantic"] = semantic
    return out


def expand(example: dict, expansion: Expansion, fill) -> dict:
    """`example` zoomed out by `expansion` (module docstring), its image filled with `fill`."""
    dy, dx = expansion.top, expansion.left
    out = _shifted(example, dy, dx, expansion.out_hw)
    out["image"] = _place(example["image"], (dy, dx), expansion.out_hw, fill)
    return out


# ------------------------------------------------------------------------- min-IoU crop


def _window_ious(windows: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float64[t, n] IoU of each window (x0, y0, x1, y1) with each box."""
    windows, boxes = windows[:, None, :], boxes[None, :, :]
    width = np.minimum(boxes[..., 2], windows[..., 2]) - np.maximum(boxes[..., 0], windows[..., 0])
    height = np.minimum(boxes[..., 3], windows[..., 3]) - np.maximum(boxes[..., 1], windows[..., 1])
    inter = np.maximum(width, 0) * np.maximum(height, 0)
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    window_areas = (windows[..., 2] - windows[..., 0]) * (windows[..., 3] - windows[..., 1])
    return inter / np.maximum(window_areas + areas - inter, 1e-6)


def centres_inside(boxes: np.ndarray, window) -> np.ndarray:
    """bool[n]: box centres strictly inside the window (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = window
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return (cx > x0) & (cy > y0) & (cx < x1) & (cy < y1)


def draw_crop_window(hw, boxes, min_ious, min_crop_size: float, rng: np.random.Generator):
    """mmdetection's MinIoURandomCrop draws (module docstring): the window (x0, y0, x1, y1) in
    pixels, or None for its no-crop mode.

    The 50 trials of a threshold are drawn at once (four uniforms each: w', h', and the U of
    left and top, which the reference draws only for trials that pass the aspect test) and
    the first that passes every test is taken: the reference's windows with the reference's
    probabilities, from one vectorised pass instead of a Python loop of 50."""
    height, width = hw
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    modes = (1.0, *(float(v) for v in min_ious), 0.0)
    while True:
        min_iou = modes[int(rng.integers(len(modes)))]
        if min_iou == 1.0:
            return None
        draws = rng.random((CROP_TRIALS, 4))
        low_w, low_h = min_crop_size * width, min_crop_size * height  # U(low, high) as numpy
        new_w = low_w + (width - low_w) * draws[:, 0]
        new_h = low_h + (height - low_h) * draws[:, 1]
        # The reference's random.uniform(w - w'): numpy's legacy uniform(low=w - w', high=1),
        # low + (high - low) U even where high < low (a Generator refuses that order).
        left = (width - new_w) + (1 - (width - new_w)) * draws[:, 2]
        top = (height - new_h) + (1 - (height - new_h)) * draws[:, 3]
        windows = np.stack([left, top, left + new_w, top + new_h], axis=1).astype(np.int64)
        ok = (new_h / new_w >= CROP_ASPECT[0]) & (new_h / new_w <= CROP_ASPECT[1])
        ok &= (windows[:, 2] != windows[:, 0]) & (windows[:, 3] != windows[:, 1])
        if len(boxes):
            ok &= _window_ious(windows.astype(np.float64), boxes).min(axis=1) >= min_iou
            inside = (
                (centres[None, :, 0] > windows[:, None, 0])
                & (centres[None, :, 1] > windows[:, None, 1])
                & (centres[None, :, 0] < windows[:, None, 2])
                & (centres[None, :, 1] < windows[:, None, 3])
            )
            ok &= inside.any(axis=1)
        passed = np.flatnonzero(ok)
        if len(passed):
            return tuple(int(v) for v in windows[passed[0]])


def _cropped(example: dict, window, counts) -> dict:
    """The example's annotations in the window (the image is left to the caller): instances
    whose box centre is outside dropped (counted), boxes shifted and clipped, masks cut."""
    x0, y0, x1, y1 = window
    out_hw = (y1 - y0, x1 - x0)
    boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
    keep = np.flatnonzero(centres_inside(boxes.astype(np.float64), window))
    if len(keep) < len(boxes):
        report.count(counts, "min_iou_crop_dropped", len(boxes) - len(keep))
    limits = np.array([out_hw[1], out_hw[0], out_hw[1], out_hw[0]], np.float32)
    shifted = boxes[keep] - np.array([x0, y0, x0, y0], np.float32)
    masks = InstanceMasks.from_dense(example["masks"])
    crops, origins = [], []
    for i in keep:
        crop = masks.crops[i]
        top, left = (int(v) for v in masks.origins[i])
        r0, c0 = max(top, y0), max(left, x0)
        r1, c1 = min(top + crop.shape[0], y1), min(left + crop.shape[1], x1)
        if r1 <= r0 or c1 <= c0:
            crops.append(np.zeros((0, 0), bool))
            origins.append((0, 0))
            continue
        crops.append(crop[r0 - top : r1 - top, c0 - left : c1 - left])
        origins.append((r0 - y0, c0 - x0))
    out = dict(example)
    out.update(
        masks=InstanceMasks(crops, origins, out_hw),
        boxes=np.clip(shifted, 0, limits),
        classes=np.asarray(example["classes"], np.int32)[keep],
        iscrowd=np.asarray(example["iscrowd"], bool)[keep],
    )
    if example.get("keypoints") is not None:
        points = np.array(example["keypoints"], np.float32)[keep]
        points[..., 0] -= x0
        points[..., 1] -= y0
        x, y = points[..., 0], points[..., 1]
        inside = (points[..., 2] > 0) & (x >= 0) & (x < out_hw[1]) & (y >= 0) & (y < out_hw[0])
        out["keypoints"] = points * inside[..., None]  # cut off: unlabelled (0, 0, 0)
    if example.get("semantic") is not None:
        out["semantic"] = np.ascontiguousarray(example["semantic"][y0:y1, x0:x1])
    return out


def crop(example: dict, window, counts) -> dict:
    """`example` cut to the window (x0, y0, x1, y1) by MinIoURandomCrop's rule."""
    x0, y0, x1, y1 = window
    out = _cropped(example, window, counts)
    out["image"] = np.ascontiguousarray(example["image"][y0:y1, x0:x1])
    return out


# ------------------------------------------------------------------------- photometric


@dataclasses.dataclass(frozen=True)
class Distortion:
    """PhotoMetricDistortion's draws: which steps run and their values."""

    contrast_last: bool  # the reference's mode 0: contrast after the HSV steps
    brightness: float | None  # added
    contrast: float | None  # multiplied
    saturation: float | None  # multiplies S
    hue: float | None  # added to H (degrees)
    permutation: tuple[int, int, int] | None  # channel order


def draw_distortion(rng: np.random.Generator) -> Distortion:
    """Every draw of mmdetection's PhotoMetricDistortion._random_flags: a mode and five coin
    flips, then all five values whether used or not."""
    mode, bright, contrast, saturation, hue, swap = (int(v) for v in rng.integers(0, 2, 6))
    delta = rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    alpha = rng.uniform(*CONTRAST_RANGE)
    sat = rng.uniform(*SATURATION_RANGE)
    shift = rng.uniform(-HUE_DELTA, HUE_DELTA)
    order = tuple(int(v) for v in rng.permutation(3))
    return Distortion(
        contrast_last=mode == 0,
        brightness=delta if bright else None,
        contrast=alpha if contrast else None,
        saturation=sat if saturation else None,
        hue=shift if hue else None,
        permutation=order if swap else None,
    )


_EPS = np.float32(np.finfo(np.float32).eps)  # OpenCV's FLT_EPSILON


def _hsv_adjusted(planes: np.ndarray, saturation, hue) -> np.ndarray:
    """float32[3, ...] RGB planes through OpenCV's float RGB -> HSV (cv::RGB2HSV_f: V = max,
    S = (V - min) / (|V| + eps), H in degrees from the channel that is the max, + 360 where
    negative), S x saturation, H + hue wrapped as mmdetection does (> 360: - 360, < 0: + 360),
    and back (cv::HSV2RGB_f: channel = V (1 - S w), w the channel's weight in H's sector).

    The weights are written per channel as w = clip(min(k, 4 - k), 0, 1), k = (n + H / 60)
    mod 6 with n = 5, 3, 1 for R, G, B: the same values as OpenCV's sector table (0, f, 1, 1,
    1 - f, 0 for R over the six sectors), without building the table and gathering from it."""
    r, g, b = planes
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    vs = diff / (np.abs(v) + _EPS)  # S
    if saturation is not None:
        vs *= np.float32(saturation)
    vs *= v  # V S: the channels are V - V S w
    step = np.float32(60) / (diff + _EPS)
    # H, in place and branch-free (boolean-mask indexing costs 10x a pass here)
    h = (r - g) * step + np.float32(240)  # B is the max
    np.copyto(h, (b - r) * step + np.float32(120), where=v == g)
    np.copyto(h, (g - b) * step, where=v == r)  # OpenCV tests R first
    h += np.float32(360) * (h < 0)
    if hue is not None:
        h += np.float32(hue)
        h -= np.float32(360) * (h > 360)
        h += np.float32(360) * (h < 0)
    h *= np.float32(6 / 360)  # the sector position, in [0, 6]
    out = np.empty_like(planes)
    k = np.empty_like(h)
    w = np.empty_like(h)
    for channel, n in enumerate((5, 3, 1)):
        np.add(h, np.float32(n), out=k)
        k -= np.float32(6) * (k >= 6)
        np.subtract(np.float32(4), k, out=w)
        np.minimum(w, k, out=w)
        np.minimum(w, np.float32(1), out=w)
        np.maximum(w, np.float32(0), out=w)
        w *= vs
        np.subtract(v, w, out=out[channel])
    return out


def distort(image: np.ndarray, distortion: Distortion) -> np.ndarray:
    """uint8[..., 3]: distorted_pixels rounded and clipped back to uint8 (module docstring)."""
    planes = _distorted_planes(image, distortion)
    np.rint(planes, out=planes)
    np.clip(planes, 0, 255, out=planes)
    return planes.transpose(tuple(range(1, planes.ndim)) + (0,)).astype(np.uint8)


def distorted_pixels(image: np.ndarray, distortion: Distortion) -> np.ndarray:
    """float32[..., 3]: PhotoMetricDistortion's steps on a uint8 RGB image, in float32 as the
    reference computes them (unclipped)."""
    planes = _distorted_planes(image, distortion)
    return np.ascontiguousarray(planes.transpose(tuple(range(1, planes.ndim)) + (0,)))


def _distorted_planes(image: np.ndarray, distortion: Distortion) -> np.ndarray:
    """float32[3, ...]: the distorted image as colour planes (contiguous planes make every
    per-channel step a contiguous pass)."""
    axes = (image.ndim - 1,) + tuple(range(image.ndim - 1))
    planes = np.array(image.transpose(axes), np.float32, order="C")
    if distortion.brightness is not None:
        planes += np.float32(distortion.brightness)
    if distortion.contrast is not None and not distortion.contrast_last:
        planes *= np.float32(distortion.contrast)
    if distortion.saturation is not None or distortion.hue is not None:
        planes = _hsv_adjusted(planes, distortion.saturation, distortion.hue)
    if distortion.contrast is not None and distortion.contrast_last:
        planes *= np.float32(distortion.contrast)
    if distortion.permutation is not None:
        planes = planes[list(distortion.permutation)]
    return planes


# ---------------------------------------------------------------------------- pipeline


def zoom_and_crop(example: dict, config, rng: np.random.Generator, counts) -> dict:
    """Expand, then the min-IoU crop, each as the config asks (training only), drawn from rng
    in that order; the image is built once from the composed window."""
    hw = example["image"].shape[:2]
    expansion = None
    if tuple(config.expand_ratio) != (1.0, 1.0):
        expansion = draw_expansion(hw, config.expand_ratio, config.expand_prob, rng)
    out = example
    offset, frame = (0, 0), hw
    if expansion is not None:
        offset, frame = (expansion.top, expansion.left), expansion.out_hw
        out = _shifted(example, expansion.top, expansion.left, frame)
    window = None
    if config.min_iou_crop:
        window = draw_crop_window(
            frame, out["boxes"], config.min_iou_crop, config.min_crop_size, rng
        )
    if window is not None:
        out = _cropped(out, window, counts)
        offset = (offset[0] - window[1], offset[1] - window[0])
        frame = (window[3] - window[1], window[2] - window[0])
    if expansion is None and window is None:
        return example
    if expansion is None:  # a crop alone: a view's copy, no fill
        x0, y0, x1, y1 = window
        out["image"] = np.ascontiguousarray(example["image"][y0:y1, x0:x1])
    else:
        out["image"] = _place(example["image"], offset, frame, config.expand_fill)
    return out


def distort_canvas(example: dict, rng: np.random.Generator) -> None:
    """PhotoMetricDistortion on the valid region of a transformed example's canvas, in place."""
    valid_h, valid_w = (int(v) for v in example["image_hw"])
    distortion = draw_distortion(rng)
    steps = dataclasses.astuple(distortion)[1:]
    if all(step is None for step in steps):
        return  # every step's coin came up tails: nothing changes
    region = example["image"][:valid_h, :valid_w]
    region[...] = distort(region, distortion)
