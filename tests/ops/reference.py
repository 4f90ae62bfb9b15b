"""Float64 NumPy references for the ops, written as plain loops from the published definitions.

They share no code with instseg_jax: each follows the paper or the reference kernel's
arithmetic (detectron2 / torchvision ROIAlign, greedy NMS, SOLOv2 Matrix NMS, YOLACT Fast NMS,
detectron2's Matcher) so that a test compares two independent implementations.
"""

from __future__ import annotations

import math

import numpy as np


def area(box) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def iou(a, b) -> float:
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def pairwise(fn, a, b) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.array([[fn(x, y) for y in b] for x in a], dtype=np.float64).reshape(len(a), len(b))


def ioa(a, b) -> float:
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    return iw * ih / area(b) if area(b) > 0 else 0.0


def giou(a, b) -> float:
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    value = inter / union if union > 0 else 0.0
    cw = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0)
    ch = max(max(a[3], b[3]) - min(a[1], b[1]), 0.0)
    enclosing = cw * ch
    return value - ((enclosing - union) / enclosing if enclosing > 0 else 0.0)


def encode(target, source, weights) -> list[float]:
    sw, sh = source[2] - source[0], source[3] - source[1]
    sx, sy = source[0] + sw / 2, source[1] + sh / 2
    tw, th = target[2] - target[0], target[3] - target[1]
    tx, ty = target[0] + tw / 2, target[1] + th / 2
    wx, wy, ww, wh = weights
    return [
        wx * (tx - sx) / sw,
        wy * (ty - sy) / sh,
        ww * math.log(tw / sw),
        wh * math.log(th / sh),
    ]


def decode(delta, source, weights, clamp) -> list[float]:
    sw, sh = source[2] - source[0], source[3] - source[1]
    sx, sy = source[0] + sw / 2, source[1] + sh / 2
    wx, wy, ww, wh = weights
    dx, dy = delta[0] / wx, delta[1] / wy
    dw, dh = min(delta[2] / ww, clamp), min(delta[3] / wh, clamp)
    cx, cy = dx * sw + sx, dy * sh + sy
    w, h = math.exp(dw) * sw, math.exp(dh) * sh
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


# ----------------------------------------------------------------------------- RoIAlign


def _bilinear_taps(height, width, y, x):
    """(row, col, weight) taps of one sample, as the ROIAlign CUDA/CPU kernels compute them."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [
        (y_low, x_low, hy * hx),
        (y_low, x_high, hy * lx),
        (y_high, x_low, ly * hx),
        (y_high, x_high, ly * lx),
    ]


def roi_align_matrix(map_hw, box, output_size, spatial_scale, sampling_ratio, aligned):
    """float64[oh*ow, H*W]: the linear map from one feature map to the bins of one box.

    sampling_ratio 0 is the adaptive rule of torchvision's
    torchvision/csrc/ops/cpu/roi_align_kernel.cpp, roi_align_forward_kernel_impl (the op
    detectron2's layers/roi_align.py calls): roi_bin_grid_h = ceil(roi_height / pooled_height)
    (likewise w), count = max(grid_h * grid_w, 1), a side of zero or less takes no sample.
    """
    height, width = map_hw
    oh, ow = output_size
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (float(v) * spatial_scale - offset for v in box)
    roi_w, roi_h = x1 - x0, y1 - y0
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / oh, roi_w / ow
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / oh)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / ow)
    matrix = np.zeros((oh * ow, height * width), np.float64)
    count = max(grid_h * grid_w, 1)
    for i in range(oh):
        for j in range(ow):
            for iy in range(grid_h):
                y = y0 + i * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = x0 + j * bin_w + (ix + 0.5) * bin_w / grid_w
                    for row, col, weight in _bilinear_taps(height, width, y, x):
                        matrix[i * ow + j, row * width + col] += weight / count
    return matrix


def roi_align(features, boxes, output_size, spatial_scale, sampling_ratio=2, aligned=True):
    """float64[B, R, oh, ow, D] of features[B, H, W, D] and boxes[B, R, 4]."""
    features = np.asarray(features, np.float64)
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    batch, height, width, depth = features.shape
    out = np.zeros((batch, boxes.shape[1], oh, ow, depth))
    for b in range(batch):
        flat = features[b].reshape(height * width, depth)
        for r in range(boxes.shape[1]):
            m = roi_align_matrix(
                (height, width), boxes[b, r], (oh, ow), spatial_scale, sampling_ratio, aligned
            )
            out[b, r] = (m @ flat).reshape(oh, ow, depth)
    return out


def roi_align_adjoint(
    cotangent, features_shape, boxes, output_size, spatial_scale, sampling_ratio=2, aligned=True
):
    """float64[B, H, W, D]: the transpose of `roi_align` applied to cotangent[B, R, oh, ow, D]."""
    batch, height, width, depth = features_shape
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    grad = np.zeros((batch, height * width, depth))
    for b in range(batch):
        for r in range(boxes.shape[1]):
            m = roi_align_matrix(
                (height, width), boxes[b, r], (oh, ow), spatial_scale, sampling_ratio, aligned
            )
            grad[b] += m.T @ np.asarray(cotangent[b, r], np.float64).reshape(oh * ow, depth)
    return grad.reshape(features_shape)


def fpn_level(box, min_level, max_level, canonical_size, canonical_level) -> int:
    level = math.floor(canonical_level + math.log2(math.sqrt(area(box)) / canonical_size + 1e-8))
    return min(max(level, min_level), max_level)


# ----------------------------------------------------------------------------- NMS


def greedy_nms(boxes, scores, threshold, classes=None, valid=None) -> list[int]:
    """Textbook greedy NMS: visit by descending score (ties by index), keep if not suppressed."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept: list[int] = []
    for i in order:
        if valid is not None and not valid[i]:
            continue
        if all(
            iou(boxes[i], boxes[k]) <= threshold
            for k in kept
            if classes is None or classes[k] == classes[i]
        ):
            kept.append(i)
    return kept


def mask_iou_matrix(masks) -> np.ndarray:
    flat = np.asarray(masks, np.float64).reshape(len(masks), -1)
    n = len(flat)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            inter = np.minimum(flat[i], flat[j]).sum()
            union = np.maximum(flat[i], flat[j]).sum()
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def matrix_nms(masks, classes, scores, kernel, sigma) -> np.ndarray:
    """SOLOv2 Matrix NMS written from the paper's pseudo-code, looping over pairs."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    ious = mask_iou_matrix(np.asarray(masks)[order])
    cls = [classes[i] for i in order]

    def decay_iou(i, j):  # IoU of mask j with higher-ranked mask i of its class, else 0
        return ious[i, j] if i < j and cls[i] == cls[j] else 0.0

    compensate = [max([decay_iou(k, i) for k in range(n)] + [0.0]) for i in range(n)]
    out = np.zeros(n)
    for j in range(n):
        factors = []
        for i in range(n):
            d, c = decay_iou(i, j), compensate[i]
            if kernel == "gaussian":
                factors.append(math.exp(-sigma * d * d) / math.exp(-sigma * c * c))
            else:
                factors.append((1.0 - d) / max(1.0 - c, 1e-6))
        out[order[j]] = float(scores[order[j]]) * min(factors)
    return out


def fast_nms(items, scores, threshold, classes=None) -> list[int]:
    """YOLACT Fast NMS: drop j if IoU with any higher-scoring i (same class) > threshold."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    items = np.asarray(items, np.float64)
    if items.ndim == 2:
        ious = pairwise(iou, items, items)
    else:
        ious = mask_iou_matrix(items)
    kept = []
    for rank, j in enumerate(order):
        higher = order[:rank]
        if all(
            ious[i, j] <= threshold for i in higher if classes is None or classes[i] == classes[j]
        ):
            kept.append(j)
    return kept


# ----------------------------------------------------------------------------- masks


def paste_mask(mask, box, image_hw) -> np.ndarray:
    """float64[H, W]: bilinear sample of mask[M, M] at pixel centres, zero padding outside."""
    height, width = image_hw
    side_y, side_x = mask.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    out = np.zeros((height, width))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return out
    for py in range(height):
        v = (py + 0.5 - y0) / (y1 - y0) * side_y - 0.5
        for px in range(width):
            u = (px + 0.5 - x0) / (x1 - x0) * side_x - 0.5
            r0, c0 = math.floor(v), math.floor(u)
            fy, fx = v - r0, u - c0
            total = 0.0
            for r, wr in ((r0, 1 - fy), (r0 + 1, fy)):
                for c, wc in ((c0, 1 - fx), (c0 + 1, fx)):
                    if 0 <= r < side_y and 0 <= c < side_x:
                        total += wr * wc * float(mask[r, c])
            out[py, px] = total
    return out


# ----------------------------------------------------------------------------- matching


def match(iou_matrix, thresholds, labels, allow_low_quality, gt_valid=None):
    """detectron2 Matcher, one prediction at a time.

    Thresholds are compared at the IoU matrix's precision, as torch compares a float32 tensor
    with a Python float (0.7 becomes float32(0.7)).
    """
    thresholds = [float(np.asarray(t, np.asarray(iou_matrix).dtype)) for t in thresholds]
    iou_matrix = np.asarray(iou_matrix, np.float64)
    num_gt, num_pred = iou_matrix.shape
    valid_rows = [g for g in range(num_gt) if gt_valid is None or gt_valid[g]]
    bounds = [-math.inf, *thresholds, math.inf]
    matched = np.zeros(num_pred, np.int64)
    out_labels = np.zeros(num_pred, np.int64)
    for p in range(num_pred):
        if not valid_rows:
            out_labels[p] = labels[0]
            continue
        best_g = max(valid_rows, key=lambda g: (iou_matrix[g, p], -g))
        best = iou_matrix[best_g, p]
        matched[p] = best_g
        for k in range(len(labels)):
            if bounds[k] <= best < bounds[k + 1]:
                out_labels[p] = labels[k]
    if allow_low_quality:
        for g in valid_rows:
            best = max(iou_matrix[g, p] for p in range(num_pred))
            if best <= 0:
                continue
            for p in range(num_pred):
                if iou_matrix[g, p] == best:
                    out_labels[p] = 1
    return matched, out_labels


# ----------------------------------------------------------------------------- mask targets


def _roi_align_axis(start, length, bins, size, sampling_ratio) -> np.ndarray:
    """float64[bins, size]: one axis of torchvision's roi_align_forward_kernel_impl (aligned),
    whose bilinear weights, out-of-range rule and sample count each factor per axis: the
    samples of bin b at start + b * length / bins + (i + 0.5) * length / bins / grid, grid =
    sampling_ratio or, for 0, ceil(length / bins); each sample's two taps (`_bilinear_taps`'
    rule on one axis) divided by grid."""
    grid = sampling_ratio if sampling_ratio > 0 else math.ceil(length / bins)
    weights = np.zeros((bins, size))
    bin_size = length / bins
    for b in range(bins):
        for i in range(grid):
            y = start + b * bin_size + (i + 0.5) * bin_size / grid
            if y < -1.0 or y > size:
                continue
            y = max(y, 0.0)
            low = int(y)
            if low >= size - 1:
                high = low = size - 1
                y = float(low)
            else:
                high = low + 1
            weights[b, low] += (1.0 - (y - low)) / grid
            weights[b, high] += (y - low) / grid
    return weights


def bitmask_roi_align(mask, box, mask_size: int, sampling_ratio: int = 0) -> np.ndarray:
    """float64[M, M]: ROIAlign((M, M), 1.0, sampling_ratio, aligned=True) (detectron2/layers/
    roi_align.py: torchvision's roi_align) of one full-resolution mask[H, W] in one box (xyxy,
    mask pixels). Separable: rows and columns pooled by `_roi_align_axis`."""
    height, width = mask.shape
    x0, y0, x1, y1 = (float(v) - 0.5 for v in box)  # aligned: the half-pixel shift
    rows = _roi_align_axis(y0, y1 - y0, mask_size, height, sampling_ratio)
    cols = _roi_align_axis(x0, x1 - x0, mask_size, width, sampling_ratio)
    return rows @ np.asarray(mask, np.float64) @ cols.T


def bitmask_crop_and_resize(mask, box, mask_size: int, sampling_ratio: int = 0) -> np.ndarray:
    """bool[M, M]: detectron2/structures/masks.py BitMasks.crop_and_resize of one full-
    resolution mask for one box: `bitmask_roi_align` at sampling ratio 0, then >= 0.5."""
    return bitmask_roi_align(mask, box, mask_size, sampling_ratio) >= 0.5


def polygons_to_bitmask(polygons, height: int, width: int) -> np.ndarray:
    """bool[H, W]: detectron2/structures/masks.py polygons_to_bitmask (pycocotools
    frPyObjects, merge, decode): how COCO's polygons become masks (and annToMask's rule)."""
    from pycocotools import mask as mask_util

    rles = mask_util.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def polygon_crop_and_resize(polygons, box, mask_size: int, min_side: float = 0.1) -> np.ndarray:
    """bool[M, M]: detectron2/structures/masks.py rasterize_polygons_within_box (PolygonMasks.
    crop_and_resize, the targets under INPUT.MASK_FORMAT "polygon", defaults.py's default): the
    polygons shifted to the box, scaled by M / max(side, min_side) per axis and rasterised at
    M x M by `polygons_to_bitmask`. ShuLiu1993/PANet lib/utils/segms.py polys_to_mask_wrt_box is
    the same rule with min_side 1 (sides np.maximum(w, 1)) and the union of the polygons."""
    x0, y0, x1, y1 = (float(v) for v in box)
    ratio_w = mask_size / max(x1 - x0, min_side)
    ratio_h = mask_size / max(y1 - y0, min_side)
    moved = []
    for polygon in polygons:
        p = np.array(polygon, np.float64)
        p[0::2] = (p[0::2] - x0) * ratio_w
        p[1::2] = (p[1::2] - y0) * ratio_h
        moved.append(p)
    return polygons_to_bitmask(moved, mask_size, mask_size)
