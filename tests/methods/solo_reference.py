"""SOLOv2's training targets and test-time selection as plain float64 NumPy loops, written from
the paper and the reference's rules (mmdetection's SOLOV2Head, WXinlong/SOLO), with dynamic
shapes: the independent side of tests/methods/test_solov2.py."""

from __future__ import annotations

import numpy as np


def grid_targets(boxes, classes, centers, nonempty, padded_hw, grids, ranges, center_scale, c):
    """(cell labels int[S] (c = background), list of positive (cell, instance) pairs in the
    reference's loop order: level by level, instances in order, cells row-major).

    padded_hw: the (H, W) cell positions are divided by, WXinlong/SOLO solov2_head.py
    solov2_target_single's upsampled_size (the mask feature map x 4: the padded input image)."""
    height, width = padded_hw
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

    def cell_masks(cells):
        return 1.0 / (1.0 + np.exp(-np.einsum("hwe,ne->nhw", features, kernels[cells])))

    return detect_from_masks(probs, cell_masks, cell_strides, cfg)


def detect_from_masks(probs, cell_masks, cell_strides, cfg):
    """detect from the peak-filtered probs on, for any mask branch: cell_masks(cells int[n]) ->
    float64[n, h, w] mask probabilities at stride 4 (SOLO's get_seg_single and SOLOv2's share
    everything after their masks are made)."""
    cells, classes = np.nonzero(probs > cfg.score_threshold)
    scores = probs[cells, classes]
    masks = cell_masks(cells)
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
    # solov2_head.py get_seg_single: "sort and keep top nms_pre" after the maskness rescoring.
    order = np.argsort(-scores, kind="stable")[: cfg.nms_pre]
    binary, scores, classes = binary[order], scores[order], classes[order]
    decayed = matrix_nms(binary, classes, scores, cfg.matrix_nms_sigma)
    kept = np.flatnonzero(decayed >= cfg.keep_score_threshold)
    kept = kept[np.argsort(-decayed[kept], kind="stable")][: cfg.detections_per_image]
    return [(decayed[i], classes[i], binary[i]) for i in kept]


def padded_size(size: int, divisor: int = 32) -> int:
    """The reference pipelines' Pad(size_divisor=32) (WXinlong/SOLO configs/solov2/
    solov2_r50_fpn_8gpu_1x.py train and test pipelines): size rounded up to the divisor."""
    return int(np.ceil(size / divisor) * divisor)


def interpolate(x, out_hw):
    """torch.nn.functional.interpolate(x, size=out_hw, mode="bilinear", align_corners=False) of
    x[h, w, C] in float64, written pixel by pixel from torch's rule: output i reads source
    (i + 0.5) in / out - 0.5, raised to 0 when negative; i0 = floor, i1 = i0 + 1 unless i0 is
    the last entry; weights 1 - l and l, l = source - i0."""

    def taps(in_size, out_size):
        out = []
        for i in range(out_size):
            source = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
            i0 = int(np.floor(source))
            i1 = i0 + 1 if i0 < in_size - 1 else i0
            out.append((i0, i1, source - i0))
        return out

    h, w, channels = x.shape
    rows, cols = taps(h, out_hw[0]), taps(w, out_hw[1])
    out = np.zeros((out_hw[0], out_hw[1], channels))
    for i, (r0, r1, ly) in enumerate(rows):
        for j, (c0, c1, lx) in enumerate(cols):
            top = (1 - lx) * x[r0, c0] + lx * x[r0, c1]
            bottom = (1 - lx) * x[r1, c0] + lx * x[r1, c1]
            out[i, j] = (1 - ly) * top + ly * bottom
    return out


def grid_inputs(native_map, padded_hw, native_stride, level_stride, grid):
    """One image's input to the category and kernel towers on one level, float64[g, g, C + 2],
    as WXinlong/SOLO solov2_head.py builds it on its padded input padded_hw: the FPN map over
    that input (here the first ceil(H / native_stride) rows and columns of a larger one),
    split_feats' resize to the level's size (P2 halved, P6 to P5's size), forward_single's
    CoordConv channels (torch.linspace(-1, 1) over that map, x then y) and its resize to
    num_grid x num_grid (F.interpolate, bilinear, align_corners False)."""
    rows = int(np.ceil(padded_hw[0] / native_stride))
    cols = int(np.ceil(padded_hw[1] / native_stride))
    level_hw = (padded_hw[0] // level_stride, padded_hw[1] // level_stride)
    level = interpolate(native_map[:rows, :cols].astype(np.float64), level_hw)
    y, x = np.meshgrid(
        np.linspace(-1, 1, level_hw[0]), np.linspace(-1, 1, level_hw[1]), indexing="ij"
    )
    with_coords = np.concatenate([level, x[..., None], y[..., None]], -1)
    return interpolate(with_coords, (grid, grid))


def dice_loss(probs, targets):
    """WXinlong/SOLO solov2_head.py dice_loss, per mask: 1 - 2 sum(p t) / ((sum(p^2) + 0.001) +
    (sum(t^2) + 0.001)) (lines 33-41 of that file), in float64."""
    p = probs.reshape(len(probs), -1).astype(np.float64)
    t = targets.reshape(len(targets), -1).astype(np.float64)
    a = (p * t).sum(1)
    b = (p * p).sum(1) + 0.001
    c = (t * t).sum(1) + 0.001
    return 1 - 2 * a / (b + c)
