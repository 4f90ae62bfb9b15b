"""FCOS's rules as float64 NumPy loops, written from the papers and the references' docs (not
from instseg_jax/methods/fcos.py): one location and one ground truth at a time."""

from __future__ import annotations

import math

import numpy as np


def locations(level_shapes, strides, offset):
    """[(x, y, stride, level)] in the order level, row, column."""
    out = []
    for level, ((h, w), stride) in enumerate(zip(level_shapes, strides, strict=True)):
        for row in range(h):
            for col in range(w):
                out.append(((col + offset) * stride, (row + offset) * stride, stride, level))
    return out


def assign(points, boxes, valid, sizes_of_interest, radius, centres=None):
    """(matched int[T] or -1, ltrb float64[T, 4] in pixels) by FCOS's rule: strictly inside the
    box and within radius x stride of its centre on both axes, max(l, t, r, b) within the
    level's closed range, the smallest box among claimants (the first of equal areas).
    centres [N, 2] (x, y): the centre region is about them instead of the box centres
    (AdelaiDet fcos_outputs.py get_sample_region given bitmasks: their mass centres)."""
    bounds = [0.0, *sizes_of_interest, math.inf]
    matched = np.full(len(points), -1)
    ltrb = np.zeros((len(points), 4))
    for t, (x, y, stride, level) in enumerate(points):
        best_area = math.inf
        for n, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, np.float64)):
            if not valid[n]:
                continue
            dist = (x - x0, y - y0, x1 - x, y1 - y)
            if min(dist) <= 0:
                continue
            if radius > 0:
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                if centres is not None:
                    cx, cy = centres[n]
                if abs(x - cx) >= radius * stride or abs(y - cy) >= radius * stride:
                    continue
            if not bounds[level] <= max(dist) <= bounds[level + 1]:
                continue
            area = (x1 - x0) * (y1 - y0)
            if area < best_area:
                best_area, matched[t], ltrb[t] = area, n, dist
    return matched, ltrb


def centerness(ltrb):
    left, top, right, bottom = ltrb
    return math.sqrt(min(left, right) / max(left, right) * min(top, bottom) / max(top, bottom))


def giou_ltrb(pred, target, smooth=1.0):
    """GIoU of two boxes given as distances (l, t, r, b) from one location, as AdelaiDet's
    adet/utils/comm.py compute_ious: IoU term (I + smooth) / (U + smooth) (smooth 1 there),
    penalty (C - U) / C unsmoothed; smooth 0 is the plain GIoU."""
    pl, pt, pr, pb = (float(v) for v in pred)
    tl, tt, tr, tb = (float(v) for v in target)
    target_area = (tl + tr) * (tt + tb)
    pred_area = (pl + pr) * (pt + pb)
    intersection = (min(pl, tl) + min(pr, tr)) * (min(pb, tb) + min(pt, tt))
    enclosing = (max(pl, tl) + max(pr, tr)) * (max(pb, tb) + max(pt, tt))
    union = target_area + pred_area - intersection
    return (intersection + smooth) / (union + smooth) - (enclosing - union) / enclosing


def focal(logit, target, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit))
    if target:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def detect(probs, ctr, distances, points, level_sizes, image_hw, cfg):
    """[(box, score, class)] of one image by the test procedure: per level the best
    candidates_per_level (location, class) pairs above the threshold on the class score, on
    class x centerness (AdelaiDet's THRESH_WITH_CTR, fcos_outputs.py
    forward_for_single_feature_map) or on its square root (torchvision), per-class greedy NMS
    (IoU > threshold suppresses) on the boxes as decoded (AdelaiDet: select_over_all_levels,
    the clip comes in detector_postprocess) or clipped first (torchvision's
    postprocess_detections: cfg.clip_before_nms), the best K, clipped."""

    def clip(box):
        return [
            min(max(box[0], 0), image_hw[1]),
            min(max(box[1], 0), image_hw[0]),
            min(max(box[2], 0), image_hw[1]),
            min(max(box[3], 0), image_hw[0]),
        ]

    c = probs.shape[1]
    candidates, start = [], 0
    for size in level_sizes:
        pairs = []
        for t in range(start, start + size):
            for k in range(c):
                combined = probs[t, k] * ctr[t]
                passes = {
                    "class": probs[t, k] > cfg.score_threshold,
                    "product": combined > cfg.score_threshold,
                    "combined": math.sqrt(combined) > cfg.score_threshold,
                }[cfg.score_threshold_on]
                if passes:
                    pairs.append((combined, t, k))
        pairs.sort(key=lambda p: (-p[0], p[1] * c + p[2]))
        for combined, t, k in pairs[: cfg.candidates_per_level]:
            x, y, stride, _ = points[t]
            left, top, right, bottom = np.asarray(distances[t], np.float64) * stride
            box = [x - left, y - top, x + right, y + bottom]
            candidates.append((clip(box) if cfg.clip_before_nms else box, math.sqrt(combined), k))
        start += size
    candidates.sort(key=lambda d: -d[1])
    kept = []
    for box, score, k in candidates:
        if all(kk != k or iou(box, kb) <= cfg.nms_threshold for kb, _, kk in kept):
            kept.append((box, score, k))
    return [(clip(box), score, k) for box, score, k in kept[: cfg.detections_per_image]]
