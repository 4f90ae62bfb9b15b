"""Box geometry: areas, overlaps, delta coding, clipping and format conversion.

Boxes are float32 ``[..., 4]`` in xyxy absolute pixels with continuous coordinates (no "+1":
a box ``[0, 0, 1, 1]`` covers exactly one pixel). This module is the only place that converts
between formats. Every function is pure ``jnp``, traceable under ``jit``, ``vmap`` and ``grad``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

# detectron2's bound on exp(dw): a box never grows past 1000/16 of its source in one decode.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _safe_divide(numerator: jnp.ndarray, denominator: jnp.ndarray) -> jnp.ndarray:
    """numerator / denominator, 0 where the denominator is <= 0 (and a zero gradient there)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """float32[...] area of float32[..., 4] xyxy boxes; inverted boxes have area 0."""
    width = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    height = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return width * height


def _intersection_and_union(a: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Intersection and union areas of boxes a[..., 4] and b[..., 4] (broadcast)."""
    top_left = jnp.maximum(a[..., :2], b[..., :2])
    bottom_right = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(bottom_right - top_left, 0.0)
    intersection = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - intersection
    return intersection, union


def paired_box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """float32[...] IoU of a[..., 4] and b[..., 4] element by element (broadcast); 0 if no union."""
    intersection, union = _intersection_and_union(a, b)
    return _safe_divide(intersection, union)


def box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """float32[N, M] pairwise IoU of a[N, 4] and b[M, 4]; 0 where the union is 0, never NaN."""
    return paired_box_iou(a[:, None, :], b[None, :, :])


def box_ioa(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """float32[N, M] intersection of a[N, 4] and b[M, 4] over the area of b; 0 where b is empty."""
    intersection, _ = _intersection_and_union(a[:, None, :], b[None, :, :])
    return _safe_divide(intersection, box_area(b)[None, :])


def paired_generalized_box_iou(a: jnp.ndarray, b: jnp.ndarray, smooth: float = 0.0) -> jnp.ndarray:
    """float32[...] GIoU of a[..., 4] with b[..., 4], element by element (broadcast).

    GIoU = IoU - (|C| - |A u B|) / |C| with C the smallest enclosing box; in [-1, 1]. Where the
    enclosing box has zero area (both boxes are the same point or line), the penalty is 0.
    smooth > 0: the IoU term is (|A n B| + smooth) / (|A u B| + smooth), the penalty unchanged
    (AdelaiDet's adet/utils/comm.py compute_ious, with 1 in its boxes' units).
    """
    intersection, union = _intersection_and_union(a, b)
    if smooth > 0:
        iou = (intersection + smooth) / (union + smooth)
    else:
        iou = _safe_divide(intersection, union)
    enclosing_wh = jnp.maximum(
        jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0.0
    )
    enclosing = enclosing_wh[..., 0] * enclosing_wh[..., 1]
    return iou - _safe_divide(enclosing - union, enclosing)


def generalized_box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """float32[N, M] pairwise generalized IoU of a[N, 4] and b[M, 4]."""
    return paired_generalized_box_iou(a[:, None, :], b[None, :, :])


def _centers_and_sizes(boxes: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * width, boxes[..., 1] + 0.5 * height, width, height


def encode_boxes(
    targets: jnp.ndarray,
    sources: jnp.ndarray,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> jnp.ndarray:
    """float32[..., 4] deltas (dx, dy, dw, dh) that turn sources[..., 4] into targets[..., 4].

    dx = wx * (tx - sx) / sw, dw = ww * log(tw / sw) (likewise y, h), with centres and sizes of
    xyxy boxes. Sources must have positive size; targets too for finite dw, dh.
    """
    wx, wy, ww, wh = weights
    sx, sy, sw, sh = _centers_and_sizes(sources)
    tx, ty, tw, th = _centers_and_sizes(targets)
    return jnp.stack(
        [
            wx * (tx - sx) / sw,
            wy * (ty - sy) / sh,
            ww * jnp.log(tw / sw),
            wh * jnp.log(th / sh),
        ],
        axis=-1,
    )


def decode_boxes(
    deltas: jnp.ndarray,
    sources: jnp.ndarray,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clamp: float = DEFAULT_SCALE_CLAMP,
) -> jnp.ndarray:
    """float32[..., 4] xyxy boxes from deltas[..., 4] applied to sources[..., 4].

    The inverse of `encode_boxes`. dw and dh are clamped from above at ``clamp`` (only from
    above: a strongly shrinking delta is kept). ``sources`` may have fewer leading dims than
    ``deltas``: sources[N, 4] with class-specific deltas[N, K, 4] decodes every class of a box
    against that box (size-1 axes are inserted before the last axis).
    """
    extra_dims = deltas.ndim - sources.ndim
    if extra_dims > 0:
        sources = sources.reshape(sources.shape[:-1] + (1,) * extra_dims + (4,))
    wx, wy, ww, wh = weights
    sx, sy, sw, sh = _centers_and_sizes(sources)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, clamp)
    cx = dx * sw + sx
    cy = dy * sh + sy
    half_w = 0.5 * jnp.exp(dw) * sw
    half_h = 0.5 * jnp.exp(dh) * sh
    return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def clip_boxes(boxes: jnp.ndarray, hw) -> jnp.ndarray:
    """float32[..., 4] boxes clipped to [0, w] x [0, h].

    ``hw`` is ``(h, w)`` or an array [..., 2] that broadcasts against the boxes' leading dims
    (e.g. int32[B, 2] image sizes with boxes[B, P, 4] after adding an axis).
    """
    hw = jnp.asarray(hw, dtype=boxes.dtype)
    h = hw[..., 0:1]
    w = hw[..., 1:2]
    upper = jnp.concatenate([w, h, w, h], axis=-1)
    return jnp.clip(boxes, 0.0, upper)


def xyxy_to_xywh(boxes: jnp.ndarray) -> jnp.ndarray:
    """[..., 4] (x0, y0, x1, y1) -> (x0, y0, w, h), COCO's bbox format."""
    return jnp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
    """[..., 4] (x0, y0, w, h) -> (x0, y0, x1, y1)."""
    return jnp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
    """[..., 4] (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    cx, cy, w, h = _centers_and_sizes(boxes)
    return jnp.stack([cx, cy, w, h], axis=-1)


def cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
    """[..., 4] (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    half = 0.5 * boxes[..., 2:]
    return jnp.concatenate([boxes[..., :2] - half, boxes[..., :2] + half], axis=-1)


def canvas_to_original_boxes(
    boxes: jnp.ndarray,
    image_hw: jnp.ndarray,
    orig_hw: jnp.ndarray,
    scale: jnp.ndarray,
    crop_offset: jnp.ndarray,
    flipped: jnp.ndarray | None = None,
    per_axis: bool = False,
) -> jnp.ndarray:
    """float32[B, K, 4] xyxy original-image pixels of canvas boxes[B, K, 4], clipped to it.

    The inverse of the input transforms' geometry (instseg_jax.input.transforms): undo the flip
    (bool[B]) inside the valid region image_hw int32[B, 2], add the crop offset int32[B, 2]
    (oy, ox), divide by scale: float32[B], or float32[B, 2] (sy, sx) per axis (the batch's
    scale_yx, input.resize "stretch"). per_axis (torchvision's rule) rescales each axis by
    orig_hw / image_hw instead of 1 / scale.
    """
    if flipped is not None:
        valid_w = image_hw[:, 1].astype(jnp.float32)[:, None]
        mirrored = jnp.stack(
            [valid_w - boxes[..., 2], boxes[..., 1], valid_w - boxes[..., 0], boxes[..., 3]], -1
        )
        boxes = jnp.where(flipped[:, None, None], mirrored, boxes)
    offset = crop_offset[:, ::-1].astype(jnp.float32)  # (ox, oy)
    uncropped = boxes + jnp.tile(offset, 2)[:, None, :]
    if per_axis:
        ratio = orig_hw.astype(jnp.float32) / image_hw.astype(jnp.float32)
        original = uncropped * jnp.tile(ratio[:, ::-1], 2)[:, None, :]  # (rx, ry, rx, ry)
    elif scale.ndim == 2:  # (sy, sx) -> (sx, sy, sx, sy)
        original = uncropped / jnp.tile(scale[:, ::-1], 2)[:, None, :]
    else:
        original = uncropped / scale[:, None, None]
    return clip_boxes(original, orig_hw[:, None, :])


def original_detection_boxes(
    boxes: jnp.ndarray, valid: jnp.ndarray, batch: dict, per_axis: bool = False
) -> jnp.ndarray:
    """float32[B, K, 4]: canvas_to_original_boxes of detections' canvas boxes[B, K, 4] under
    the batch's geometry (image_hw, orig_hw, scale_yx or scale, crop_offset, flipped), zero on
    slots that are not valid bool[B, K] (the Detections' boxes)."""
    original = canvas_to_original_boxes(
        boxes,
        batch["image_hw"],
        batch["orig_hw"],
        batch.get("scale_yx", batch["scale"]),
        batch["crop_offset"],
        batch.get("flipped"),
        per_axis=per_axis,
    )
    return jnp.where(valid[..., None], original, 0.0)
