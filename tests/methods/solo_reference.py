"""SOLOv2's training targets and test-time selection as plain float64 NumPy loops, written from
the paper and the reference's rules (mmdetection's SOLOV2Head, WXinlong/SOLO), with dynamic
shapes: the independent side of tests/methods/test_solov2.py."""

from __future__ import annotations

import numpy as np


def grid_targets(boxes, classes, centers, nonempty, canvas_hw, grids, ranges, center_scale, c):
    """(cell labels int[S] (c = background), list of positive (cell, instance) pairs in the
    reference's loop order: level by level, instances in order, cells row-major)."""
    height, width = canvas_hw
    labels = []
    pairs = []
    offset = 0
    for grid, (lo, hi) in zip(grids, ranges, strict=True):
        level_labels = np.full((grid, grid), c, np.int64)
        for n, box in enumerate(boxes):
            x0, y0, x1, y1 = (float(v) for v in box)
            area = np.sqrt((x1 - x0) * (y1 - y0))
            if not (lo <= area <= hi) or not nonempty[n]:
                continue
            cx, cy = float(centers[n][0]), float(centers[n][1])
            half_w = 0.5 * (x1 - x0) * center_scale
            half_h = 0.5 * (y1 - y0) * center_scale
            cell_w = int(np.floor(cx / width * grid))
            cell_h = int(np.floor(cy / height * grid))
            top = max(0, int(np.floor((cy - half_h) / height * grid)))
            down = min(grid - 1, int(np.floor((cy + half_h) / height * grid)))
            left = max(0, int(np.floor((cx - half_w) / width * grid)))
            right = min(grid - 1, int(np.floor((cx + half_w) / width * grid)))
            top, down = max(top, cell_h - 1), min(down, cell_h + 1)
            left, right = max(left, cell_w - 1), min(right, cell_w + 1)
            level_labels[top : down + 1, left : right + 1] = classes[n]
            for i in range(top, down + 1):
                for j in range(left, right + 1):
                    pairs.append((offset + i * grid + j, n))
        labels.append(level_labels.reshape(-1))
        offset += grid * grid
    return np.concatenate(labels), pairs


def points_nms(scores):
    """scores [g, g, C]: zero where a cell above, left or above-left scores higher."""
    g = scores.shape[0]
    out = scores.copy()
    for i in range(g):
        for j in range(g):
            window = scores[max(i - 1, 0) : i + 1, max(j - 1, 0) : j + 1]
            peak = window.reshape(-1, scores.shape[-1]).max(axis=0)
            out[i, j] = np.where(peak == scores[i, j], scores[i, j], 0.0)
    return out


def matrix_nms(masks, classes, scores, sigma):
    """Gaussian Matrix NMS of masks already sorted by descending score."""
    n = len(scores)
    flat = masks.reshape(n, -1).astype(np.float64)
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    decay = np.ones(n)
    for j in range(n):
        for i in range(j):
            if classes[i] != classes[j]:
                continue
            comp = max([iou[m, i] for m in range(i) if classes[m] == classes[i]], default=0.0)
            decay[j] = min(decay[j], np.exp(-sigma * (iou[i, j] ** 2 - comp**2)))
    return scores * decay


def detect(probs, kernels, features, cell_strides, cfg):
    """The reference's test for one image, dynamic shapes: probs float64[S, C] after the peak
    filter, kernels [S, E], features [h, w, E]. Returns [(score, class, binary mask)], best
    first."""
    cells, classes = np.nonzero(probs > cfg.score_threshold)
    scores = probs[cells, classes]
    logits = np.einsum("hwe,ne->nhw", features, kernels[cells])
    masks = 1.0 / (1.0 + np.exp(-logits))
    binary = masks > cfg.mask_threshold
    area = binary.sum(axis=(1, 2)).astype(np.float64)
    keep = area > cell_strides[cells]
    masks, binary, area, scores, classes = (
        masks[keep],
        binary[keep],
        area[keep],
        scores[keep],
        classes[keep],
    )
    scores = scores * (masks * binary).sum(axis=(1, 2)) / area
    order = np.argsort(-scores, kind="stable")[: cfg.test_candidates]
    binary, scores, classes = binary[order], scores[order], classes[order]
    decayed = matrix_nms(binary, classes, scores, cfg.matrix_nms_sigma)
    kept = np.flatnonzero(decayed >= cfg.keep_score_threshold)
    kept = kept[np.argsort(-decayed[kept], kind="stable")][: cfg.detections_per_image]
    return [(decayed[i], classes[i], binary[i]) for i in kept]
