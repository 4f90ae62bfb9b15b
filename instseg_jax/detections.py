"""Detections (structures.py) -> binary masks, RLE and COCO results at the original image's
pixels. Host side, NumPy: nothing here compiles, whatever the image sizes or detection counts.

Memory stays bounded: masks are resampled one at a time and only over the pixels they can
cover (a box-relative mask inside its box; a canvas mask inside the pre-image of its cells that
reach 0.5), and one uint8 H x W buffer per image is reused for RLE encoding, so a 4000x3000
photo with 100 detections never holds more than one full-resolution mask.

Both payloads use one separable bilinear resampler (two taps per axis):
  masks         pixel centre p + 0.5 maps to mask coordinate u = (p + 0.5 - x0) / w * M - 0.5;
                neighbours outside [0, M) read 0 (the mask fades out across its box border),
                exactly as `ops.paste_masks` on device
  canvas_masks  pixel centre of the original image -> canvas (scale, crop offset, flip) ->
                stride-s cell coordinate; coordinates are clamped to the cells whose centres
                lie inside the valid region, so padding never bleeds into a mask, and pixels a
                crop cut off the canvas stay 0. The taps are computed once per image and
                shared by its K masks.
  polygons      rasterised by pycocotools within each polygon's box (`polygon_region`)
Foreground is value >= 0.5; a box-relative mask's cut is its method's (`MaskPaste.threshold`,
builders.mask_paste: 0.5 unless the method config's mask_paste_threshold says otherwise).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from pycocotools import mask as mask_utils

from instseg_jax import structures
from instseg_jax.input.instances import mask_box
from instseg_jax.input.transforms import resize_bilinear
from instseg_jax.structures import ImageGeometry


def _taps(coords: np.ndarray, size: int, clamp_to: int | None = None):
    """Bilinear taps (i0, i1, w0, w1) of float32 grid coordinates (cell centres at integers).

    clamp_to=None: taps outside [0, size) get weight 0 (zero padding);
    clamp_to=n: coordinates are clamped to [0, n - 1] first (edge replication within n cells).
    """
    coords = coords.astype(np.float32)
    if clamp_to is not None:
        coords = np.clip(coords, 0, max(clamp_to - 1, 0)).astype(np.float32)
    low = np.floor(coords)
    frac = (coords - low).astype(np.float32)
    i0 = low.astype(np.int64)
    i1 = i0 + 1
    w0 = (np.float32(1) - frac) * ((i0 >= 0) & (i0 < size))
    w1 = frac * ((i1 >= 0) & (i1 < size))
    return np.clip(i0, 0, size - 1), np.clip(i1, 0, size - 1), w0, w1


def _resample(grid: np.ndarray, y_taps, x_taps) -> np.ndarray:
    """float32[len(y), len(x)]: grid[h, w] sampled at the taps, rows first."""
    y0, y1, wy0, wy1 = y_taps
    x0, x1, wx0, wx1 = x_taps
    rows = wy0[:, None] * grid[y0] + wy1[:, None] * grid[y1]  # [Y, w]
    return rows[:, x0] * wx0[None, :] + rows[:, x1] * wx1[None, :]  # [Y, X]


def paste_box_mask(mask: np.ndarray, box, image_hw, threshold: float = 0.5):
    """(bool[h, w] region, top, left): a box-relative mask[M, M] of probabilities pasted into
    box (xyxy, image pixels), over the rows and columns it can reach; foreground is value >=
    threshold."""
    height, width = (int(v) for v in image_hw)
    side_y, side_x = mask.shape
    x0, y0, x1, y1 = (np.float32(v) for v in box)
    box_w, box_h = x1 - x0, y1 - y0
    if not (box_w > 0 and box_h > 0):
        return np.zeros((0, 0), bool), 0, 0
    # A pixel is reached when its centre maps within one cell of [0, M): u in (-1, M).
    top = max(int(np.floor(y0 - box_h / side_y)) - 1, 0)
    bottom = min(int(np.ceil(y1 + box_h / side_y)) + 1, height)
    left = max(int(np.floor(x0 - box_w / side_x)) - 1, 0)
    right = min(int(np.ceil(x1 + box_w / side_x)) + 1, width)
    if bottom <= top or right <= left:
        return np.zeros((0, 0), bool), 0, 0
    ys = np.arange(top, bottom, dtype=np.float32) + np.float32(0.5)
    xs = np.arange(left, right, dtype=np.float32) + np.float32(0.5)
    u_y = (ys - y0) / box_h * np.float32(side_y) - np.float32(0.5)
    u_x = (xs - x0) / box_w * np.float32(side_x) - np.float32(0.5)
    values = _resample(np.asarray(mask, np.float32), _taps(u_y, side_y), _taps(u_x, side_x))
    return values >= np.float32(threshold), top, left


class CanvasResampler:
    """Canvas masks [h_s, w_s] of one image -> regions of its original pixels (shared taps)."""

    def __init__(self, geometry: ImageGeometry, mask_hw):
        g = geometry
        h_s, w_s = (int(v) for v in mask_hw)
        stride_y, stride_x = g.canvas_hw[0] / h_s, g.canvas_hw[1] / w_s
        valid_h, valid_w = g.image_hw
        canvas_y, canvas_x = g.pixel_centres_on_canvas()
        # Cells whose centres lie inside the valid region; coordinates clamp into them.
        cells_y = max(int(np.ceil(valid_h / stride_y - 0.5)), 1)
        cells_x = max(int(np.ceil(valid_w / stride_x - 0.5)), 1)
        y_taps = _taps(canvas_y / stride_y - 0.5, h_s, clamp_to=min(cells_y, h_s))
        x_taps = _taps(canvas_x / stride_x - 0.5, w_s, clamp_to=min(cells_x, w_s))
        # Pixels cropped out of the canvas (large-scale jitter) were never seen: zero weights.
        seen_y = ((canvas_y >= 0) & (canvas_y < valid_h)).astype(np.float32)
        seen_x = ((canvas_x >= 0) & (canvas_x < valid_w)).astype(np.float32)
        self.y_taps = (*y_taps[:2], y_taps[2] * seen_y, y_taps[3] * seen_y)
        self.x_taps = (*x_taps[:2], x_taps[2] * seen_x, x_taps[3] * seen_x)

    def region(self, mask: np.ndarray):
        """(bool[h, w] region, top, left) of one canvas mask of probabilities."""
        mask = np.asarray(mask, np.float32)
        rows_hit = (mask >= 0.5).any(axis=1)
        cols_hit = (mask >= 0.5).any(axis=0)
        if not rows_hit.any():
            return np.zeros((0, 0), bool), 0, 0
        # A pixel can reach 0.5 only when one of its two taps per axis is a cell >= 0.5.
        y_rows = _pixels_touching(self.y_taps, rows_hit)
        x_cols = _pixels_touching(self.x_taps, cols_hit)
        if y_rows is None or x_cols is None:
            return np.zeros((0, 0), bool), 0, 0
        (top, bottom), (left, right) = y_rows, x_cols
        y_taps = tuple(t[top:bottom] for t in self.y_taps)
        x_taps = tuple(t[left:right] for t in self.x_taps)
        return _resample(mask, y_taps, x_taps) >= 0.5, top, left


def _pixels_touching(taps, cells_hit: np.ndarray):
    """[first, last + 1) of the pixels with a tap on a hit cell, or None."""
    i0, i1, w0, w1 = taps
    touching = (cells_hit[i0] & (w0 > 0)) | (cells_hit[i1] & (w1 > 0))
    where = np.flatnonzero(touching)
    return (int(where[0]), int(where[-1]) + 1) if where.size else None


def encode_region(region: np.ndarray, top: int, left: int, buffer: np.ndarray) -> dict:
    """Compressed RLE (str counts) of a region placed in an image; buffer is a zeroed
    Fortran-ordered uint8[H, W] that is zeroed again on return."""
    h, w = region.shape
    window = buffer[top : top + h, left : left + w]
    window[...] = region
    rle = mask_utils.encode(buffer)
    window[...] = 0
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def paste_box_mask_torchvision(mask: np.ndarray, box, image_hw, threshold: float = 0.5):
    """As paste_box_mask, by torchvision's paste_masks_in_image (the torchvision preset):
    (bool[h, w] region, top, left) of one mask[M, M] of probabilities pasted with padding 1 into
    box (xyxy, original pixels), foreground above threshold (torchvision's > 0.5).

    The mask grows by one zero cell per side and its box by (M + 2) / M about its centre; the
    box is truncated to integers and the mask resized bilinearly to (y1 - y0 + 1, x1 - x0 + 1)
    pixels at (x0, y0).
    """
    mask = np.asarray(mask, np.float32)
    box = np.asarray(box, np.float32)
    height, width = (int(v) for v in image_hw)
    side = mask.shape[-1]
    padded = np.pad(mask, ((1, 1), (1, 1)))
    scale = np.float32((side + 2) / side)
    half_w = (box[2] - box[0]) * np.float32(0.5) * scale
    half_h = (box[3] - box[1]) * np.float32(0.5) * scale
    cx = (box[2] + box[0]) * np.float32(0.5)
    cy = (box[3] + box[1]) * np.float32(0.5)
    grown = np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h], np.float32)
    x0, y0, x1, y1 = (int(v) for v in np.trunc(grown))  # torch's .to(int64) truncates
    w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
    left, right = max(x0, 0), min(x1 + 1, width)
    top, bottom = max(y0, 0), min(y1 + 1, height)
    if right <= left or bottom <= top:
        return np.zeros((0, 0), bool), 0, 0
    resized = resize_bilinear(padded, (h, w))
    return resized[top - y0 : bottom - y0, left - x0 : right - x0] > threshold, top, left


PASTE_RULES = {"detectron2": paste_box_mask, "torchvision": paste_box_mask_torchvision}


@dataclasses.dataclass(frozen=True)
class MaskPaste:
    """How a method's box-relative masks reach the original image: pasted by `rule` (a key of
    PASTE_RULES) and cut at `threshold` (foreground >= it; > it under the torchvision rule).
    builders.mask_paste reads a model config's."""

    rule: str = "detectron2"
    threshold: float = 0.5


def polygon_region(polygon, image_hw):
    """(bool region[h, w], top, left) of a polygon float[V, 2] of (x, y) original pixels: its
    vertices clamped to the image (as PolarMask clamps its ray ends), rasterised by pycocotools
    over the polygon's box only (never a full image per mask). A degenerate polygon gives an
    empty region."""
    height, width = image_hw
    polygon = np.asarray(polygon, np.float64)
    x = np.clip(polygon[:, 0], 0, width)
    y = np.clip(polygon[:, 1], 0, height)
    left, top = int(np.floor(x.min())), int(np.floor(y.min()))
    right, bottom = int(np.ceil(x.max())), int(np.ceil(y.max()))
    if right <= left or bottom <= top:
        return np.zeros((0, 0), bool), top, left
    h, w = bottom - top, right - left
    vertices = np.stack([x - left, y - top], axis=1).ravel().tolist()
    rle = mask_utils.frPyObjects([vertices], h, w)
    return mask_utils.decode(rle)[..., 0].astype(bool), top, left


# ------------------------------------------------------------------------------ keypoints


def _cubic(t, a=-0.75):
    t = np.abs(t)
    return np.where(
        t <= 1,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0),
    )


@functools.lru_cache(maxsize=256)  # box sizes in px: a few MB at most
def _bicubic_matrix_f32(out_size: int, in_size: int) -> np.ndarray:
    matrix = bicubic_matrix(out_size, in_size).astype(np.float32)
    matrix.flags.writeable = False  # shared by every caller of the cache
    return matrix


def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """float64[out, in]: torch's bicubic interpolation (a = -0.75, align_corners=False, taps
    clamped to the edge) from in_size to out_size samples along one axis."""
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    low = np.floor(src)
    frac = src - low
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    for tap in (-1, 0, 1, 2):
        index = np.clip(low.astype(np.int64) + tap, 0, in_size - 1)
        np.add.at(matrix, (rows, index), _cubic(frac - tap))
    return matrix


def decode_keypoints(heatmaps: np.ndarray, boxes: np.ndarray):
    """(float32[R, K, 3] (x, y, 1), float32[R, K] scores) from heatmaps[R, K, S, S] logits in
    boxes[R, 4] (the pixels the heatmaps were predicted in): each map resized bicubically to
    ceil(w) x ceil(h) cells of the box (w, h at least 1), its first maximum's cell centre mapped
    back to the box; the score is the resized logit there (torchvision's heatmaps_to_keypoints).
    """
    heatmaps = np.asarray(heatmaps, np.float32)
    num, k, size, _ = heatmaps.shape
    out = np.zeros((num, k, 3), np.float32)
    scores = np.zeros((num, k), np.float32)
    for r in range(num):
        x0, y0, x1, y1 = (float(v) for v in boxes[r])
        width, height = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cells_w, cells_h = math.ceil(width), math.ceil(height)
        rows = _bicubic_matrix_f32(cells_h, size)
        cols = _bicubic_matrix_f32(cells_w, size)
        # Two matrix products (columns, then rows): a three-operand einsum would loop over
        # every (y, x, s, z) quadruple, ~1000x slower on 100 px boxes.
        resized = rows @ (heatmaps[r] @ cols.T)
        flat = resized.reshape(k, -1).argmax(axis=1)
        cy, cx = np.divmod(flat, cells_w)
        out[r, :, 0] = (cx + 0.5) * (width / cells_w) + x0
        out[r, :, 1] = (cy + 0.5) * (height / cells_h) + y0
        out[r, :, 2] = 1.0
        scores[r] = resized.reshape(k, -1)[np.arange(k), flat]
    return out, scores


def canvas_points_to_original(points: np.ndarray, geometry: ImageGeometry, rescale) -> np.ndarray:
    """points[..., >=2] (x, y) canvas pixels -> original image pixels (clipped to the image):
    the flip undone inside the valid region, the crop offset added, each axis multiplied by
    rescale (rx, ry) (1 / scale, or torchvision's original / resized size per axis)."""
    out = np.array(points, np.float32)
    if geometry.flipped:
        out[..., 0] = geometry.image_hw[1] - out[..., 0]
    oy, ox = geometry.crop_offset
    out[..., 0] = np.clip((out[..., 0] + ox) * rescale[0], 0, geometry.orig_hw[1])
    out[..., 1] = np.clip((out[..., 1] + oy) * rescale[1], 0, geometry.orig_hw[0])
    return out


def image_instances(
    detections: dict,
    b: int,
    geometry: ImageGeometry,
    paste: MaskPaste = MaskPaste(),
    min_score: float | None = None,
):
    """Per valid detection of image b (with score >= min_score when given), in slot order:
    dict(box xyxy original pixels, score, class, region bool[h, w] or None, top, left). Boxes
    of methods without them come from the pasted masks. paste: how box-relative masks are pasted
    and cut (builders.mask_paste of the model config)."""
    scores = np.asarray(detections["scores"][b])
    wanted = np.asarray(detections["valid"][b])
    if min_score is not None:
        wanted = wanted & (scores >= min_score)  # never paste what is thrown away
    keep = np.flatnonzero(wanted)
    payload = structures.mask_payload(detections)
    classes = np.asarray(detections["classes"][b])
    boxes = np.asarray(detections["boxes"][b]) if "boxes" in detections else None
    resampler = None
    if payload == "canvas_masks" and keep.size:
        resampler = CanvasResampler(geometry, np.shape(detections["canvas_masks"])[2:4])
    paste_box = PASTE_RULES[paste.rule]
    out = []
    for k in keep:
        region, top, left = None, 0, 0
        if payload == "masks":
            region, top, left = paste_box(
                np.asarray(detections["masks"][b, k]), boxes[k], geometry.orig_hw, paste.threshold
            )
        elif payload == "canvas_masks":
            region, top, left = resampler.region(np.asarray(detections["canvas_masks"][b, k]))
        elif payload == "polygons":
            region, top, left = polygon_region(detections["polygons"][b, k], geometry.orig_hw)
        if boxes is not None:
            box = [float(v) for v in boxes[k]]
        else:
            box = _tight_box(region, top, left)
        instance = {
            "box": box,
            "score": float(scores[k]),
            "class": int(classes[k]),
            "region": region,
            "top": top,
            "left": left,
        }
        if "keypoint_heatmaps" in detections:
            instance["keypoints"], instance["keypoint_scores"] = _instance_keypoints(
                detections, b, k, geometry
            )
        out.append(instance)
    return out


def _instance_keypoints(detections: dict, b: int, k: int, geometry: ImageGeometry):
    """(float32[Kp, 3] (x, y, 1) in original pixels, float32[Kp] scores) of slot k: its
    heatmaps decoded in its canvas box, mapped to the original image, shifted by the frame's
    output shift (Detections' keypoint payload, structures.py)."""
    heatmaps = np.asarray(detections["keypoint_heatmaps"][b, k : k + 1], np.float32)
    box = np.asarray(detections["keypoint_boxes"][b, k : k + 1], np.float32)
    rx, ry, shift = (float(v) for v in np.asarray(detections["keypoint_frame"][b]))
    points, scores = decode_keypoints(heatmaps, box)
    points = canvas_points_to_original(points[0], geometry, (rx, ry))
    points[:, :2] += shift
    return points, scores[0]


def _tight_box(region, top: int, left: int) -> list[float]:
    """xyxy box of a region's pixels (max side + 1, as COCO's mask boxes); zeros if empty."""
    box = None if region is None else mask_box(region)
    if box is None:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0, x1, y1 = box
    return [float(left + x0), float(top + y0), float(left + x1), float(top + y1)]


def batch_examples(batch: dict):
    """(b, image id, ImageGeometry) of every real example of a host Batch, in order: padding
    examples (image id < 0, example_valid False) are left out."""
    for b, image_id in enumerate(np.asarray(batch["image_id"])):
        if image_id < 0 or not bool(batch["example_valid"][b]):
            continue
        yield b, int(image_id), ImageGeometry.of_batch(batch, b)


def image_results(instances, image_id: int, orig_hw, category_ids) -> list[dict]:
    """COCO results of one image's `image_instances` (masks RLE-encoded at orig_hw)."""
    buffer = np.zeros(orig_hw, np.uint8, order="F")
    results = []
    for instance in instances:
        x0, y0, x1, y1 = instance["box"]
        result = {
            "image_id": image_id,
            "category_id": int(category_ids[instance["class"]]),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": instance["score"],
        }
        if instance["region"] is not None:
            result["segmentation"] = encode_region(
                instance["region"], instance["top"], instance["left"], buffer
            )
        if "keypoints" in instance:
            result["keypoints"] = [float(v) for v in instance["keypoints"].ravel()]
        results.append(result)
    return results


def detections_to_results(
    detections: dict,
    batch: dict,
    category_ids,
    paste: MaskPaste = MaskPaste(),
) -> list[dict]:
    """COCO results of one batch of host detections; padding examples and slots never reach
    them. batch: the host Batch the detections came from (image_id, example_valid, geometry)."""
    results = []
    for b, image_id, geometry in batch_examples(batch):
        instances = image_instances(detections, b, geometry, paste)
        results += image_results(instances, image_id, geometry.orig_hw, category_ids)
    return results
