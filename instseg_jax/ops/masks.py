"""Instance masks: paste RoI masks into images, crop masks into RoI targets, boxes of masks, IoU."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from instseg_jax.ops.roi_align import roi_align

# Exact float32 products on every backend (TPUs default to bfloat16 passes in matmuls).
_EXACT = jax.lax.Precision.HIGHEST


def _paste_weights(start, length, mask_side: int, num_pixels: int):
    """float32[K, num_pixels, mask_side] bilinear weights of one axis for pasting.

    Pixel p (centre p + 0.5) maps to mask coordinate u = (p + 0.5 - start) / length * M - 0.5
    (mask cell centres at integer u). Neighbours outside [0, M) contribute 0, so the pasted
    value fades to zero across the box border, as grid_sample with zero padding does.
    Boxes with length <= 0 get all-zero weights.
    """
    centres = jnp.arange(num_pixels, dtype=jnp.float32) + 0.5  # [P]
    safe_length = jnp.where(length > 0, length, 1.0)
    u = (centres[None, :] - start[:, None]) / safe_length[:, None] * mask_side - 0.5  # [K, P]
    low = jnp.floor(u)
    frac = u - low
    low = low.astype(jnp.int32)
    # one_hot of an index outside [0, M) is all zeros: the zero padding.
    weights = (
        jax.nn.one_hot(low, mask_side) * (1.0 - frac)[..., None]
        + jax.nn.one_hot(low + 1, mask_side) * frac[..., None]
    )
    return weights * (length > 0)[:, None, None]


def paste_mask_probabilities(
    masks: jnp.ndarray, boxes: jnp.ndarray, image_hw: Sequence[int]
) -> jnp.ndarray:
    """float32[K, H, W] soft masks: masks[K, M, M] resampled bilinearly into boxes[K, 4].

    image_hw is a static (H, W). Zero outside each box's footprint.
    """
    height, width = (int(v) for v in image_hw)
    side = masks.shape[-1]
    masks = masks.astype(jnp.float32)
    wy = _paste_weights(boxes[:, 1], boxes[:, 3] - boxes[:, 1], masks.shape[-2], height)
    wx = _paste_weights(boxes[:, 0], boxes[:, 2] - boxes[:, 0], side, width)
    rows = jnp.einsum("kym,kmn->kyn", wy, masks, precision=_EXACT)  # [K, H, M]
    return jnp.einsum("kyn,kxn->kyx", rows, wx, precision=_EXACT)  # [K, H, W]


def paste_masks(
    masks: jnp.ndarray,
    boxes: jnp.ndarray,
    image_hw: Sequence[int],
    threshold: float = 0.5,
) -> jnp.ndarray:
    """bool[K, H, W]: RoI masks[K, M, M] (probabilities) pasted into boxes[K, 4] of an image.

    Bilinear sampling at image pixel centres inside each box, zero outside the mask,
    foreground where the sampled value >= threshold. image_hw = (H, W) is static.
    """
    return paste_mask_probabilities(masks, boxes, image_hw) >= threshold


def mirror_box_masks(masks: jnp.ndarray, flipped: jnp.ndarray) -> jnp.ndarray:
    """masks[B, K, M, M] box-relative, mirrored along x in the images where flipped bool[B]:
    a box-relative mask predicted on a mirrored canvas, made relative to the unmirrored box."""
    return jnp.where(flipped[:, None, None, None], masks[..., ::-1], masks)


def crop_and_resize_masks(
    masks: jnp.ndarray, boxes: jnp.ndarray, size: int, sampling_ratio: int = 2
) -> jnp.ndarray:
    """float32[N, size, size] mask targets: masks[N, H, W] each cropped to its own boxes[N, 4].

    The crop is an aligned RoIAlign of mask n inside box n (values in [0, 1]; threshold at 0.5
    for a binary target), the way detectron2 builds its Mask R-CNN targets.
    """
    pooled = roi_align(
        masks.astype(jnp.float32)[..., None],
        boxes[:, None, :],
        size,
        1.0,
        sampling_ratio=sampling_ratio,
        aligned=True,
    )  # [N, 1, size, size, 1]
    return pooled[:, 0, :, :, 0]


def mask_targets(
    gt_crops,
    gt_boxes,
    rois: dict,
    num_fg: int,
    size: int,
    sampling_ratio: int = 2,
    threshold: float = 0.5,
):
    """float32[B, F, size, size] {0, 1} targets of the first F = num_fg boxes of `rois`, and
    their validity bool[B, F].

    gt_crops uint8[B, N, Mc, Mc]: each ground truth's mask inside its box gt_boxes float32[B, N,
    4] (canvas xyxy); rois: {"boxes" float32[B, R, 4] canvas xyxy, "gt_index" int32[B, R] the
    ground-truth slot each box takes its target from, "foreground" bool[B, R] its validity}, R
    >= F. Each box samples its ground truth's crop at its bins: the box is mapped into the crop's
    frame and pooled with aligned RoIAlign, then thresholded at 0.5 as detectron2 does (Mask
    R-CNN's RoIs; BlendMask's ground-truth boxes; `threshold` another cut, FCIS's 0.4).
    Full-resolution masks never reach the device.

    The crop is padded with one zero cell per side before pooling: RoIAlign reads a sample up to
    one cell outside its input as the edge cell, which inside a crop is the mask's edge but on
    detectron2's full mask is the zero just outside the box (an RoI reaching past its box got
    a target dilated by up to a cell along the box's edges without the padding).

    sampling_ratio: samples per bin axis on the crop (2: Mask R-CNN's targets here), or 0 for
    detectron2's BitMasks.crop_and_resize rule (ROIAlign sampling ratio 0: ceil(RoI side /
    size) samples per axis), the side in crop cells, exact up to twice the crop's side (an RoI
    matched at IoU >= 0.5 is at most twice its box's side), pooled in RoIAlign's matmul form
    (whose cost does not grow with the samples). For size far below the crop (PointRend's 7 x 7
    from 224 crops) 2 samples per bin misjudge a mask's share of a bin enough to flip 3-5% of
    the cells of detectron2's targets (experiments/parity/pointrend_loss.py).
    """
    b, _, crop, _ = gt_crops.shape
    index = rois["gt_index"][:, :num_fg]  # [B, F]
    boxes = rois["boxes"][:, :num_fg]
    valid = rois["foreground"][:, :num_fg]
    gt = jnp.take_along_axis(gt_boxes, index[..., None], axis=1)  # [B, F, 4]
    crops = jnp.take_along_axis(gt_crops, index[..., None, None], axis=1)  # [B, F, Mc, Mc]
    scale = crop / jnp.maximum(gt[..., 2:] - gt[..., :2], 1e-6)  # crop cells per pixel
    in_crop = (boxes - jnp.concatenate([gt[..., :2]] * 2, -1)) * jnp.concatenate([scale] * 2, -1)
    in_crop = in_crop + 1.0  # the padding cell
    padded = jnp.pad(crops, ((0, 0), (0, 0), (1, 1), (1, 1)))
    pooled = roi_align(
        padded.reshape(b * num_fg, crop + 2, crop + 2, 1).astype(jnp.float32),
        in_crop.reshape(b * num_fg, 1, 4),
        size,
        1.0,
        sampling_ratio,
        True,
        method="einsum" if sampling_ratio == 0 else "gather",
        sampling_ratio_max=-(-2 * crop // size) if sampling_ratio == 0 else 0,
    )
    targets = (pooled.reshape(b, num_fg, size, size) >= threshold).astype(jnp.float32)
    return jax.lax.stop_gradient(targets), valid


def masks_to_boxes(masks: jnp.ndarray) -> jnp.ndarray:
    """float32[K, 4] tight boxes [xmin, ymin, xmax + 1, ymax + 1] of masks[K, H, W]; 0 if empty."""
    masks = masks.astype(bool)
    rows = masks.any(axis=2)  # [K, H]
    cols = masks.any(axis=1)  # [K, W]
    height, width = masks.shape[1:]
    y_min = jnp.argmax(rows, axis=1)
    y_max = height - 1 - jnp.argmax(rows[:, ::-1], axis=1)
    x_min = jnp.argmax(cols, axis=1)
    x_max = width - 1 - jnp.argmax(cols[:, ::-1], axis=1)
    boxes = jnp.stack([x_min, y_min, x_max + 1, y_max + 1], axis=1).astype(jnp.float32)
    return jnp.where(rows.any(axis=1)[:, None], boxes, 0.0)


def mask_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """float32[N, M] IoU of binary masks a[N, H, W] and b[M, H, W]; 0 where the union is empty."""
    a = a.reshape(a.shape[0], -1).astype(jnp.float32)
    b = b.reshape(b.shape[0], -1).astype(jnp.float32)
    intersection = jnp.matmul(a, b.T, precision=_EXACT)
    union = a.sum(axis=1)[:, None] + b.sum(axis=1)[None, :] - intersection
    positive = union > 0
    return jnp.where(positive, intersection / jnp.where(positive, union, 1.0), 0.0)
