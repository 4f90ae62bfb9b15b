"""Example -> fixed-shape training / evaluation example (host side, NumPy).

Geometry is one affine map per example: a scale per axis (sy, sx), then a crop offset
(large-scale jitter) and an optional horizontal flip, then padding to the canvas. Canvas pixel
(x, y) is original pixel ((x + ox) / sx, (y + oy) / sy) (before the flip), so predictions map
back exactly. "short_side" and "lsj" keep the aspect ratio (sy = sx = the batch's `scale`);
"stretch" resizes every image to exactly input.stretch_hw, as mmdetection's
Resize(keep_ratio=False) (YOLACT's 550 x 550, PolarMask's 1280 x 768): sy = stretch_h / h and
sx = stretch_w / w, carried in the batch's `scale_yx`, which the mapping back to original
pixels reads (ops.canvas_to_original_boxes, structures.ImageGeometry).

What an example carries besides image, boxes and classes is what the method's INPUTS ask
(structures.Inputs): box-crop masks, full masks at a stride, mass centres, or several of them.
Full-resolution masks are never built here: each instance's mask is held over its own box
(instances.InstanceMasks); box-crop targets are sampled straight from it inside each box's
pre-image, and stride-s masks at the pre-images of the stride-s cell centres that reach it, so
an example's memory is its instances' box areas, not N full masks.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from instseg_jax.config import ConfigValueError
from instseg_jax.input import report
from instseg_jax.input.contours import grid_subsample, outer_contour_pixels
from instseg_jax.input.instances import InstanceMasks


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Fields of the `input` config section that shape an example."""

    canvas_hw: tuple[int, int] = (512, 512)
    max_instances: int = 100  # N: instances padded (or trimmed, largest kept) to this
    # I: slots for the boxes of the instances that limit drops (largest first), which methods
    # treat as ignore regions; dropped instances beyond I are counted and left as background.
    max_ignore_regions: int = 32
    box_masks: bool = True  # gt_masks uint8[N, Mc, Mc]
    full_mask_stride: int = 0  # s > 0: gt_full_masks uint8[N, H/s, W/s]
    centers: bool = False  # gt_centers float32[N, 2]
    contour_points: int = 0  # L > 0: gt_contours float32[N, L, 2]
    keypoints: int = 0  # K > 0: gt_keypoints float32[N, K, 3] (x, y, visibility)
    keypoint_flip: tuple[int, ...] = ()  # the mirror of each keypoint (input/keypoints.py)
    semantic_stride: int = 0  # s > 0: gt_semantic uint8[H/s, W/s] (255 = ignored)
    mask_size: int = 112  # Mc
    train: bool = True
    resize: str = "short_side"  # "short_side", "lsj" (large-scale jitter) or "stretch"
    # resize "stretch": every image (training and evaluation) resized to exactly this (h, w),
    # its aspect ratio not kept (mmdetection's Resize(keep_ratio=False)); must fit the canvas.
    stretch_hw: tuple[int, int] = (0, 0)
    short_side: tuple[int, ...] = (512,)  # training draws one; evaluation uses the first (the
    # test size: builders pass input.test_short_side here for evaluation)
    max_long_side: int = 512
    lsj_scale: tuple[float, float] = (0.1, 2.0)
    hflip: float = 0.5  # probability, training only
    drop_crowd: bool = True  # training only: crowd regions are not targets
    min_box_size: float = 1.0
    # "detectron2": rounded sizes, PIL bilinear; "torchvision": floor(size * scale) and torch's
    # bilinear interpolation (align_corners=False, no antialiasing) on float pixels.
    resize_rule: str = "detectron2"
    pad_value: tuple[int, int, int] = (0, 0, 0)  # RGB of the canvas outside the image
    # Copy-paste (input/copy_paste.py), training only: the probability that an example gets
    # another example's instances pasted on (0: off); the partner's own scale range (a factor
    # of its fit to this image); the pixels an occluded instance must keep; whether the
    # pasted region grows by 2 px around the objects (torchvision's blending=True).
    copy_paste: float = 0.0
    copy_paste_scale: tuple[float, float] = (0.1, 2.0)
    copy_paste_min_area: int = 1
    copy_paste_blend: bool = True
    # SSD-style augmentation (input/ssd_augment.py), training only: zoom-out by a ratio drawn
    # from expand_ratio ((1, 1): off) with probability expand_prob, the new area filled with
    # expand_fill (RGB, truncated to uint8); the min-IoU random crop's thresholds (empty: off)
    # and smallest side fraction; photometric distortion of the canvas.
    expand_ratio: tuple[float, float] = (1.0, 1.0)
    expand_prob: float = 0.5
    expand_fill: tuple[float, float, float] = (0.0, 0.0, 0.0)
    min_iou_crop: tuple[float, ...] = ()
    min_crop_size: float = 0.3
    photometric: bool = False
    # Training only: "coco_seg" drops small instances by the rule of xieenze/PolarMask's coco_seg.py
    # (mask of 15 pixels or fewer, or box under 10 px in both width and height, on the
    # original image; counted as small_instance_dropped); "none" keeps them.
    instance_filter: str = "none"

    @property
    def zooms_or_crops(self) -> bool:
        return tuple(self.expand_ratio) != (1.0, 1.0) or bool(self.min_iou_crop)

    def __post_init__(self):
        low, high = self.expand_ratio
        if not 1.0 <= low <= high:
            raise ConfigValueError(
                f"input.expand_ratio must be (low, high) with 1 <= low <= high, got "
                f"{self.expand_ratio}"
            )
        if not 0.0 <= self.expand_prob <= 1.0:
            raise ConfigValueError(
                f"input.expand_prob is a probability in [0, 1], got {self.expand_prob}"
            )
        if any(not 0.0 <= v <= 1.0 for v in self.min_iou_crop) or not (
            0.0 < self.min_crop_size <= 1.0
        ):
            raise ConfigValueError(
                f"input.min_iou_crop must hold IoUs in [0, 1] (got {self.min_iou_crop}) and "
                f"input.min_crop_size a fraction in (0, 1] (got {self.min_crop_size})"
            )
        if not 0.0 <= self.copy_paste <= 1.0:
            raise ConfigValueError(
                f"input.copy_paste is a probability in [0, 1], got {self.copy_paste}"
            )
        if self.copy_paste and (self.keypoints or self.semantic_stride):
            raise ConfigValueError(
                "input.copy_paste does not paste keypoints or semantic maps, which this "
                "method trains on; set input.copy_paste=0"
            )
        low, high = self.copy_paste_scale
        if self.copy_paste and not 0 < low <= high:
            raise ConfigValueError(
                f"input.copy_paste_scale must be (low, high) with 0 < low <= high, got "
                f"{self.copy_paste_scale}"
            )
        if self.instance_filter not in ("none", "coco_seg"):
            raise ConfigValueError(
                f"input.instance_filter must be 'none' or 'coco_seg', got {self.instance_filter!r}"
            )
        if self.resize_rule not in ("detectron2", "torchvision"):
            raise ConfigValueError(
                f"input.resize_rule must be 'detectron2' or 'torchvision', got {self.resize_rule!r}"
            )
        if self.resize not in ("short_side", "lsj", "stretch"):
            raise ConfigValueError(
                f"input.resize must be 'short_side', 'lsj' or 'stretch', got {self.resize!r}"
            )
        if self.resize == "stretch":
            stretch_h, stretch_w = self.stretch_hw
            if not (0 < stretch_h <= self.canvas_hw[0] and 0 < stretch_w <= self.canvas_hw[1]):
                raise ConfigValueError(
                    f"input.resize='stretch' needs input.stretch_hw (h, w) positive and within "
                    f"input.canvas_hw {tuple(self.canvas_hw)}, got {tuple(self.stretch_hw)}"
                )
            if self.keypoints or self.copy_paste:
                raise ConfigValueError(
                    "input.resize='stretch' does not carry keypoints (their mapping back uses "
                    "one scale) or copy-paste; set input.resize to 'short_side' or 'lsj', or "
                    "use a method without keypoints and input.copy_paste=0"
                )
        if self.max_ignore_regions < 0:
            raise ConfigValueError(
                f"input.max_ignore_regions must be >= 0, got {self.max_ignore_regions}"
            )
        stride = self.full_mask_stride
        if stride and (self.canvas_hw[0] % stride or self.canvas_hw[1] % stride):
            raise ConfigValueError(
                f"input.canvas_hw {self.canvas_hw} must be divisible by {stride} for the "
                f"method's stride-{stride} masks"
            )


def _geometry(config: TransformConfig, orig_hw, rng):
    """((sy, sx) scale per axis, (oy, ox) crop offset, flip) for an image of orig_hw."""
    height, width = orig_hw
    canvas_h, canvas_w = config.canvas_hw
    fit = min(canvas_h / height, canvas_w / width)
    offset = (0, 0)
    if config.resize == "stretch":  # mmcv Resize, keep_ratio False: new size / old, per axis
        flip = bool(config.train and rng.uniform() < config.hflip)
        return (config.stretch_hw[0] / height, config.stretch_hw[1] / width), offset, flip
    if config.train and config.resize == "lsj":
        scale = fit * rng.uniform(*config.lsj_scale)
        scaled_h, scaled_w = round(height * scale), round(width * scale)
        offset = (
            int(rng.integers(0, max(scaled_h - canvas_h, 0) + 1)),
            int(rng.integers(0, max(scaled_w - canvas_w, 0) + 1)),
        )
    else:
        short = (
            config.short_side[int(rng.integers(len(config.short_side)))]
            if config.train
            else config.short_side[0]
        )
        scale = min(short / min(height, width), config.max_long_side / max(height, width), fit)
    flip = bool(config.train and rng.uniform() < config.hflip)
    return (scale, scale), offset, flip


def _per_axis(scale) -> tuple[float, float]:
    """(sy, sx) of a scale given as one number (both axes) or as a (sy, sx) pair."""
    if np.ndim(scale) == 0:
        return float(scale), float(scale)
    sy, sx = scale
    return float(sy), float(sx)


def _resize_image(image, scale, offset, config, flip: bool = False):
    """uint8[H, W, 3] canvas (its valid region mirrored when flip), and the (h, w) of that
    region. scale: one number or (sy, sx)."""
    canvas_h, canvas_w = config.canvas_hw
    height, width = image.shape[:2]
    sy, sx = _per_axis(scale)
    if config.resize == "stretch":  # exactly the target size (no rounding of h * sy)
        scaled_h, scaled_w = (int(v) for v in config.stretch_hw)
    elif config.resize_rule == "torchvision":
        scaled_h, scaled_w = max(1, math.floor(height * sy)), max(1, math.floor(width * sx))
    else:
        scaled_h, scaled_w = max(1, round(height * sy)), max(1, round(width * sx))
    if config.resize_rule == "torchvision":
        resized = resize_bilinear(image.astype(np.float32), (scaled_h, scaled_w))
        resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
    else:
        resized = np.asarray(Image.fromarray(image).resize((scaled_w, scaled_h), Image.BILINEAR))
    oy, ox = offset
    window = resized[oy : oy + canvas_h, ox : ox + canvas_w]
    valid_h, valid_w = window.shape[:2]
    canvas = np.empty((canvas_h, canvas_w, 3), np.uint8)
    # One pass over the canvas: the window (mirrored in the same copy), then only the padding.
    # Filling the whole canvas from a 3-vector first cost 3x the resize on a COCO canvas.
    canvas[:valid_h, :valid_w] = window[:, ::-1] if flip else window
    padding_row = np.tile(np.asarray(config.pad_value, np.uint8), (canvas_w, 1))  # [W, 3]
    canvas[:valid_h, valid_w:] = padding_row[valid_w:]
    canvas[valid_h:] = padding_row
    return canvas, (valid_h, valid_w)


def _torch_bilinear_taps(in_size: int, out_size: int):
    """(first, second, w_first, w_second) of torch's bilinear resize along one axis
    (align_corners=False, size given): float32 source = max((i + 0.5) * in/out - 0.5, 0)."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.maximum(
        scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
        np.float32(0),
    )
    first = source.astype(np.int64)
    second = np.minimum(first + 1, in_size - 1)
    w_second = source - first.astype(np.float32)
    return first, second, np.float32(1) - w_second, w_second


def resize_bilinear(image: np.ndarray, out_hw) -> np.ndarray:
    """float32[h, w, ...] resize of float image[H, W, ...] as torch.nn.functional.interpolate
    (mode="bilinear", align_corners=False, antialias=False) does it."""
    out_h, out_w = (int(v) for v in out_hw)
    y0, y1, wy0, wy1 = _torch_bilinear_taps(image.shape[0], out_h)
    x0, x1, wx0, wx1 = _torch_bilinear_taps(image.shape[1], out_w)
    extra = (1,) * (image.ndim - 2)
    wy0, wy1 = wy0.reshape((-1, 1) + extra), wy1.reshape((-1, 1) + extra)
    wx0, wx1 = wx0.reshape((1, -1) + extra), wx1.reshape((1, -1) + extra)
    top, bottom = image[y0], image[y1]
    return (
        wy0 * (wx0 * top[:, x0] + wx1 * top[:, x1])
        + wy1 * (wx0 * bottom[:, x0] + wx1 * bottom[:, x1])
    ).astype(np.float32)


def _bilinear_sample(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, origin=(0, 0)) -> np.ndarray:
    """float32[len(ys), len(xs)] of a bool mask at pixel-centre coordinates, zero outside.

    ``mask`` may be a crop whose pixel [0, 0] is image pixel ``origin`` (y0, x0), the mask being
    zero outside it: coordinates stay the image's, so the result is the full mask's exactly."""
    height, width = mask.shape
    y = ys - 0.5
    x = xs - 0.5
    y0 = np.floor(y).astype(np.int64)
    x0 = np.floor(x).astype(np.int64)
    fy = (y - y0).astype(np.float32)
    fx = (x - x0).astype(np.float32)
    y0, x0 = y0 - origin[0], x0 - origin[1]  # rows and columns of the crop
    padded = np.pad(mask, 1).astype(np.float32)  # one zero cell around: outside reads zero
    r0 = np.clip(y0 + 1, 0, height + 1)
    r1 = np.clip(y0 + 2, 0, height + 1)
    c0 = np.clip(x0 + 1, 0, width + 1)
    c1 = np.clip(x0 + 2, 0, width + 1)
    top = padded[r0][:, c0] * (1 - fx) + padded[r0][:, c1] * fx
    bottom = padded[r1][:, c0] * (1 - fx) + padded[r1][:, c1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def box_crop_target(mask: np.ndarray, box, size: int, origin=(0, 0)) -> np.ndarray:
    """uint8[size, size] {0, 1}: mask[H, W] sampled at the bin centres of box (xyxy, mask px).

    ``mask`` may be a crop of the mask starting at image pixel ``origin`` (y0, x0)."""
    x0, y0, x1, y1 = box
    steps = (np.arange(size) + 0.5) / size
    ys = y0 + steps * (y1 - y0)
    xs = x0 + steps * (x1 - x0)
    return (_bilinear_sample(mask, ys, xs, origin) >= 0.5).astype(np.uint8)


def transform(
    example: dict, config: TransformConfig, rng: np.random.Generator, counts: np.ndarray
) -> dict:
    """A fixed-shape example (the per-example slice of DESIGN's Batch) from a decoded one.

    ``example["masks"]``: instances.InstanceMasks (what the sources give) or bool[n, H, W]."""
    image = example["image"]
    orig_hw = image.shape[:2]
    scale, (oy, ox), flip = _geometry(config, orig_hw, rng)  # scale: (sy, sx)
    sy, sx = scale
    canvas, (valid_h, valid_w) = _resize_image(image, scale, (oy, ox), config, flip)
    masks = InstanceMasks.from_dense(example["masks"])  # each instance over its own box

    # Boxes on the canvas: the visible part of each mask's tight box, clipped to the valid
    # region (a crop can cut an instance: its target covers what is left in the window).
    canvas_boxes = example["boxes"].astype(np.float64) * np.array([sx, sy, sx, sy]) - np.array(
        [ox, oy, ox, oy]
    )
    canvas_boxes = np.clip(canvas_boxes, 0, np.array([valid_w, valid_h, valid_w, valid_h]))
    keep = _trainable_instances(example, canvas_boxes, config, counts, masks)
    kept, dropped = _instance_limit(np.flatnonzero(keep), masks, config, counts)

    limit = config.max_instances
    gt_boxes = _padded(canvas_boxes[kept], limit, np.float32)
    gt_classes = _padded(example["classes"][kept], limit, np.int32)
    gt_valid = _padded(np.ones(len(kept), bool), limit, bool)
    ignore_boxes = _padded(canvas_boxes[dropped], config.max_ignore_regions, np.float32)
    ignore_valid = _padded(np.ones(len(dropped), bool), config.max_ignore_regions, bool)
    extra = _mask_targets(
        masks, kept, gt_boxes, config, scale, (oy, ox), (valid_h, valid_w), flip, counts
    )
    if config.semantic_stride:
        extra["gt_semantic"] = _semantic_target(
            example, config, scale, (oy, ox), (valid_h, valid_w), flip
        )
    if config.keypoints:
        extra["gt_keypoints"] = _keypoint_targets(
            example, kept, config, scale, (oy, ox), (valid_h, valid_w), flip
        )

    if flip:  # the canvas came mirrored from _resize_image
        gt_boxes = _mirror_boxes(gt_boxes, gt_valid, valid_w)
        ignore_boxes = _mirror_boxes(ignore_boxes, ignore_valid, valid_w)

    return {
        "image": canvas,
        "image_hw": np.array([valid_h, valid_w], np.int32),
        "orig_hw": np.array(orig_hw, np.int32),
        # One number per image for what reads a single scale (sy = sx but for "stretch",
        # where it is their geometric mean); the geometry's mapping back reads scale_yx.
        "scale": np.float32(sy if sy == sx else math.sqrt(sy * sx)),
        "scale_yx": np.array([sy, sx], np.float32),
        "crop_offset": np.array([oy, ox], np.int32),
        "flipped": np.bool_(flip),
        "image_id": np.int64(example["image_id"]),
        "example_valid": np.bool_(True),
        "gt_boxes": gt_boxes,
        "gt_classes": gt_classes,
        "gt_valid": gt_valid,
        "ignore_boxes": ignore_boxes,
        "ignore_valid": ignore_valid,
        **{k: np.ascontiguousarray(v) for k, v in extra.items()},
    }


def _trainable_instances(
    example, canvas_boxes, config: TransformConfig, counts, masks=None
) -> np.ndarray:
    """bool[n]: the instances that become targets, before the instance limit: in training,
    what config.instance_filter drops (counted as small_instance_dropped) and crowd regions
    (counted) are dropped, and so are boxes narrower or lower on the canvas than
    config.min_box_size (counted as degenerate)."""
    keep = np.ones(len(canvas_boxes), bool)
    if config.train and config.instance_filter == "coco_seg" and len(canvas_boxes):
        # xieenze/PolarMask mmdet/datasets/coco_seg.py _parse_ann_info drops, crowd regions
        # included, annotations with area <= 15, with w < 10 and h < 10, or with a mask under
        # 15 pixels, on the original image. The annotation's polygon area is not carried
        # here: its mask's pixel count stands for it (<= 15 covers both area tests).
        pixels = masks if masks is not None else InstanceMasks.from_dense(example["masks"])
        sizes = example["boxes"][:, 2:] - example["boxes"][:, :2]
        small = (pixels.areas() <= 15) | ((sizes[:, 0] < 10) & (sizes[:, 1] < 10))
        if small.any():
            report.count(counts, "small_instance_dropped", int(small.sum()))
        keep &= ~small
    if config.train and config.drop_crowd:
        crowd = example["iscrowd"].astype(bool)
        crowd &= keep  # what the filter dropped is not counted twice
        if crowd.any():
            report.count(counts, "crowd_dropped", int(crowd.sum()))
            if not (keep & ~crowd).any():
                report.count(counts, "crowd_only_image")
        keep &= ~crowd
    sizes = canvas_boxes[:, 2:] - canvas_boxes[:, :2]
    degenerate = keep & ((sizes < config.min_box_size).any(axis=1))
    if degenerate.any():
        report.count(counts, "degenerate_box", int(degenerate.sum()))
    return keep & ~degenerate


def _instance_limit(kept, masks, config: TransformConfig, counts):
    """(kept, dropped) instance indices under config.max_instances: the largest masks keep
    their slots (in index order); what the limit drops is still an object, so its box becomes
    an ignore region (anchors and RoIs on it are not trained as background), the largest first
    up to config.max_ignore_regions. Everything dropped is counted."""
    limit = config.max_instances
    if len(kept) <= limit:
        return kept, kept[:0]
    report.count(counts, "image_over_instance_limit")
    report.count(counts, "instances_over_limit", len(kept) - limit)
    by_area = np.argsort(-masks.areas()[kept], kind="stable")
    dropped = kept[by_area[limit:]]
    unslotted = len(dropped) - config.max_ignore_regions
    if unslotted > 0:
        report.count(counts, "ignore_regions_over_limit", unslotted)
        dropped = dropped[: config.max_ignore_regions]
    return np.sort(kept[by_area[:limit]]), dropped


def _padded(values: np.ndarray, length: int, dtype) -> np.ndarray:
    """values[k, ...] in the first k of `length` zero slots."""
    out = np.zeros((length, *values.shape[1:]), dtype)
    out[: len(values)] = values
    return out


def _mask_targets(
    masks, kept, gt_boxes, config: TransformConfig, scale, offset, valid_hw, flip, counts=None
):
    """What the method's INPUTS ask besides boxes: box-crop masks, stride-s full masks, mass
    centres, each for the kept instances in their slots."""
    oy, ox = offset
    sy, sx = _per_axis(scale)
    limit = config.max_instances
    extra = {}
    if config.box_masks:
        size = config.mask_size
        box_masks = np.zeros((limit, size, size), np.uint8)
        for slot, i in enumerate(kept):
            # The box's pre-image in original pixels: sample the original mask there.
            pre_image = (gt_boxes[slot] + np.array([ox, oy, ox, oy])) / np.array([sx, sy, sx, sy])
            box_masks[slot] = box_crop_target(masks.crops[i], pre_image, size, masks.origins[i])
        if flip:
            box_masks = box_masks[:, :, ::-1]
        extra["gt_masks"] = box_masks
    if config.full_mask_stride:
        extra["gt_full_masks"] = _strided_masks(masks, kept, config, scale, offset, valid_hw, flip)
    if config.centers:
        extra["gt_centers"] = _mass_centres(masks, kept, limit, scale, offset, valid_hw, flip)
    if config.contour_points:
        extra["gt_contours"] = _contours(
            masks, kept, limit, config.contour_points, scale, offset, valid_hw, flip, counts
        )
    return extra


def _keypoint_targets(example, kept, config: TransformConfig, scale, offset, valid_hw, flip):
    """float32[N, K, 3] keypoints of the kept instances on the canvas: positions scaled and
    shifted like the boxes, visibility 0 (and position 0) where a point is unlabelled or falls
    outside the valid region (a crop can cut it off); on a flipped canvas x mirrors and each
    keypoint takes its mirror's slot (left and right swap)."""
    k = config.keypoints
    points = example.get("keypoints")
    if points is None and len(example["boxes"]) == 0:  # unannotated images (predict)
        points = np.zeros((0, k, 3), np.float32)
    if points is None or np.shape(points)[1:] != (k, 3):
        raise ConfigValueError(
            f"image id {example.get('image_id')}: the method trains on {k} keypoints per "
            f"instance (input.keypoints), but the source gives "
            f"{'none' if points is None else f'shape {np.shape(points)}'}; use annotations "
            "with a 'keypoints' list of that many (x, y, v) per instance"
        )
    (oy, ox), (valid_h, valid_w) = offset, valid_hw
    sy, sx = _per_axis(scale)
    points = np.asarray(points, np.float64)[kept]
    x = points[..., 0] * sx - ox
    y = points[..., 1] * sy - oy
    visible = (points[..., 2] > 0) & (x >= 0) & (x < valid_w) & (y >= 0) & (y < valid_h)
    if flip:
        x = valid_w - x
        order = np.asarray(config.keypoint_flip or range(k))
        x, y, visible = x[:, order], y[:, order], visible[:, order]
        points = points[:, order]
    out = np.stack([x, y, points[..., 2]], axis=-1) * visible[..., None]
    return _padded(out.astype(np.float32), config.max_instances, np.float32)


def _semantic_target(example, config: TransformConfig, scale, offset, valid_hw, flip):
    """uint8[H/s, W/s]: the example's semantic map (0 things, 1 + s stuff, 255 ignored) at the
    stride-s cell centres of the canvas, read at the nearest original pixel through the flip,
    crop and resize; 255 outside the valid region, and everywhere for test-time examples
    without a map (prediction on plain images)."""
    semantic = example.get("semantic")
    if semantic is None and not config.train:  # inference on images without annotations
        height, width = config.canvas_hw
        s = config.semantic_stride
        return np.full((height // s, width // s), 255, np.uint8)
    if semantic is None:
        raise ConfigValueError(
            f"image id {example.get('image_id')}: the method trains a semantic head, but the "
            "source gives no semantic map; use a panoptic source (or synthetic scenes with "
            "input.synthetic_stuff = True)"
        )
    ys, xs, inside = _cell_centres_in_original(
        config, config.semantic_stride, scale, offset, valid_hw, flip
    )
    height, width = semantic.shape
    rows = np.clip(np.floor(ys).astype(np.int64), 0, height - 1)
    cols = np.clip(np.floor(xs).astype(np.int64), 0, width - 1)
    out = np.asarray(semantic, np.uint8)[rows[:, None], cols[None, :]].copy()
    out[~inside] = 255
    return out


def _cell_centres_in_original(config, stride, scale, offset, valid_hw, flip):
    """(ys, xs, inside): the stride-s cell centres of the canvas mapped back through the flip,
    crop and resize to original-pixel coordinates (rows ys[H/s], columns xs[W/s]), and
    bool[H/s, W/s] whether each centre lies in the valid region."""
    canvas_h, canvas_w = config.canvas_hw
    (oy, ox), (valid_h, valid_w) = offset, valid_hw
    centres_y = (np.arange(canvas_h // stride) + 0.5) * stride
    centres_x = (np.arange(canvas_w // stride) + 0.5) * stride
    source_x = valid_w - centres_x if flip else centres_x
    inside = (centres_y < valid_h)[:, None] & (centres_x < valid_w)[None, :]
    sy, sx = _per_axis(scale)
    return (centres_y + oy) / sy, (source_x + ox) / sx, inside


def _mirror_boxes(boxes: np.ndarray, valid: np.ndarray, valid_w: int) -> np.ndarray:
    """float32[n, 4] boxes mirrored across the valid region of width valid_w; padding stays 0."""
    mirrored = boxes.copy()
    mirrored[:, 0] = valid_w - boxes[:, 2]
    mirrored[:, 2] = valid_w - boxes[:, 0]
    return np.where(valid[:, None], mirrored, 0.0).astype(np.float32)


def _strided_masks(masks, kept, config, scale, offset, valid_hw, flip) -> np.ndarray:
    """uint8[N, H/s, W/s]: each kept mask at the stride-s cell centres of the canvas, mapped
    back (through the flip) to the original; cells outside the valid region are 0."""
    stride = config.full_mask_stride
    canvas_h, canvas_w = config.canvas_hw
    ys, xs, inside = _cell_centres_in_original(config, stride, scale, offset, valid_hw, flip)
    out = np.zeros((config.max_instances, canvas_h // stride, canvas_w // stride), np.uint8)
    for slot, i in enumerate(kept):
        crop, (top, left) = masks.crops[i], masks.origins[i]
        # Only the cells whose bilinear taps reach the crop can be non-zero (ys increase, xs
        # increase or, flipped, decrease: each range is one run of cells).
        rows = _reaching(ys, top, crop.shape[0])
        cols = _reaching(xs, left, crop.shape[1])
        if rows is None or cols is None:
            continue
        sampled = _bilinear_sample(crop, ys[rows], xs[cols], (top, left)) >= 0.5
        out[slot, rows, cols] = sampled & inside[rows, cols]
    return out


def _reaching(coords: np.ndarray, start: int, length: int):
    """The slice of monotonic pixel-centre coordinates whose two bilinear taps (pixels
    floor(c - 0.5) and the next) can fall in pixels [start, start + length); None if none."""
    if not length:
        return None
    taps = np.floor(coords - 0.5)
    hits = np.flatnonzero((taps >= start - 1) & (taps <= start + length - 1))
    if not len(hits):
        return None
    return slice(int(hits[0]), int(hits[-1]) + 1)


def _contours(masks, kept, limit, length, scale, offset, valid_hw, flip, counts) -> np.ndarray:
    """float32[N, L, 2] (x, y) canvas points of each kept mask's outer contour (structures.py:
    gt_contours; input/contours.py: the largest part's outer-border pixels, PolarMask's rule),
    traced on the mask at canvas resolution as the reference traces the resized mask: each
    canvas pixel of the valid region takes the original pixel under its centre. A point is its
    pixel's centre. Contours of more than L points keep L of them on a grid
    (contours.grid_subsample; counted as contour_subsampled); shorter ones repeat their points
    (the rays take maxima: repeats change nothing). A mask no canvas pixel centre falls on
    gives its box centre. Padding slots are 0."""
    (oy, ox), (valid_h, valid_w) = offset, valid_hw
    sy, sx = _per_axis(scale)
    out = np.zeros((limit, length, 2), np.float32)
    for slot, i in enumerate(kept):
        crop, (top, left) = masks.crops[i], masks.origins[i]
        if not crop.size:
            continue
        # The canvas rows and columns the crop's pre-image covers, inside the valid region.
        r0 = max(math.floor(top * sy - oy), 0)
        r1 = min(math.ceil((top + crop.shape[0]) * sy - oy), valid_h)
        c0 = max(math.floor(left * sx - ox), 0)
        c1 = min(math.ceil((left + crop.shape[1]) * sx - ox), valid_w)
        src_r = np.floor((np.arange(r0, max(r1, r0)) + 0.5 + oy) / sy).astype(np.int64) - top
        src_c = np.floor((np.arange(c0, max(c1, c0)) + 0.5 + ox) / sx).astype(np.int64) - left
        ok_r = (src_r >= 0) & (src_r < crop.shape[0])
        ok_c = (src_c >= 0) & (src_c < crop.shape[1])
        # The nearest original pixel of each canvas pixel (none past the crop's edge).
        canvas_mask = crop.take(np.clip(src_r, 0, crop.shape[0] - 1), axis=0)
        canvas_mask = canvas_mask.take(np.clip(src_c, 0, crop.shape[1] - 1), axis=1)
        canvas_mask &= ok_r[:, None] & ok_c[None, :]
        rows, cols = outer_contour_pixels(canvas_mask)
        if len(rows):
            points = np.stack([cols + c0 + 0.5, rows + r0 + 0.5], axis=1)
        else:  # a sliver between canvas pixel centres
            box = (np.array([left, top, left + crop.shape[1], top + crop.shape[0]])
                   * np.array([sx, sy, sx, sy]) - np.array([ox, oy, ox, oy]))  # fmt: skip
            points = np.clip(
                [[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]], 0, [valid_w, valid_h]
            )
        if len(points) > length:
            if counts is not None:
                report.count(counts, "contour_subsampled")
            points = grid_subsample(points, length)
        if flip:
            points = np.stack([valid_w - points[:, 0], points[:, 1]], axis=1)
        out[slot] = points[np.arange(length) % len(points)]
    return out


def _mass_centres(masks, kept, limit, scale, offset, valid_hw, flip) -> np.ndarray:
    """float32[N, 2] (x, y) canvas mass centre of the visible part of each kept mask (centres
    of its pixels that land in the valid region, averaged); padding slots are 0."""
    (oy, ox), (valid_h, valid_w) = offset, valid_hw
    sy, sx = _per_axis(scale)
    out = np.zeros((limit, 2), np.float32)
    for slot, i in enumerate(kept):
        ys, xs = np.nonzero(masks.crops[i])
        ys, xs = ys + masks.origins[i][0], xs + masks.origins[i][1]
        x = (xs + 0.5) * sx - ox
        y = (ys + 0.5) * sy - oy
        visible = (x >= 0) & (x < valid_w) & (y >= 0) & (y < valid_h)
        if visible.any():
            cx, cy = float(x[visible].mean()), float(y[visible].mean())
        else:  # a sliver between pixel centres: the centre of its pixels clipped to the window
            cx = float(np.clip(x, 0, valid_w).mean())
            cy = float(np.clip(y, 0, valid_h).mean())
        out[slot] = (valid_w - cx if flip else cx, cy)
    return out
