"""Float64 NumPy encodings of RDSNet's rules, written from wangsr126/RDSNet (never from
instseg_jax/methods/rdsnet.py), for tests/methods/test_rdsnet.py. Each function cites the
reference file and function it encodes; coordinates are continuous (the module docstring's
declared difference from mmdetection v1's "+1" boxes), everything else is the reference's."""

from __future__ import annotations

import numpy as np


def iou_matrix(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """float64[N, T] IoU of xyxy boxes with anchors."""
    out = np.zeros((len(boxes), len(anchors)))
    for i, (bx0, by0, bx1, by1) in enumerate(np.asarray(boxes, np.float64)):
        for j, (ax0, ay0, ax1, ay1) in enumerate(np.asarray(anchors, np.float64)):
            iw = max(min(bx1, ax1) - max(bx0, ax0), 0.0)
            ih = max(min(by1, ay1) - max(by0, ay0), 0.0)
            inter = iw * ih
            union = (bx1 - bx0) * (by1 - by0) + (ax1 - ax0) * (ay1 - ay0) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def assign(anchors, boxes, pos_iou=0.5, neg_iou=0.4):
    """mmdet/core/bbox/assigners/max_iou_assigner.py (mmdetection v1, which RDSNet vendors)
    assign_wrt_overlaps with min_pos_iou=0 and gt_max_assign_all=True, as a loop: labels
    (1 positive, 0 negative, -1 ignored) and the matched ground truth of every anchor."""
    iou = iou_matrix(boxes, anchors)
    num_anchors = len(anchors)
    assigned = np.full(num_anchors, -1)  # -1 ignored, 0 negative, i + 1 ground truth i
    matched = np.zeros(num_anchors, np.int64)
    for j in range(num_anchors):
        best = iou[:, j].max()
        if 0 <= best < neg_iou:
            assigned[j] = 0
        if best >= pos_iou:
            assigned[j] = int(np.argmax(iou[:, j])) + 1
    for i in range(len(boxes)):
        best = iou[i].max()
        if best >= 0:  # min_pos_iou = 0 (the scenes here give every box some overlap)
            for j in range(num_anchors):
                if iou[i, j] == best:
                    assigned[j] = i + 1
    labels = np.where(assigned > 0, 1, np.where(assigned == 0, 0, -1))
    matched = np.where(assigned > 0, assigned - 1, 0)
    return labels, matched


def crop(box, h, w, padding):
    """bool[h, w]: mmdet/core/bbox/transforms.py sanitize_coordinates(cast=True) on both axes,
    then mmdet/models/mask_heads/rdsnet_mask_head.py RdsMaskHead.crop, one box (in cells)."""

    def sanitize(a, b, size):
        low, high = min(a, b), max(a, b)
        if padding != 0:
            grow = max(padding * (high - low + 1), 1) if 0 < padding < 1 else padding
            low, high = max(low - grow, 0), min(high + grow, size)
        return int(low), int(high)  # torch .long(): truncation, >= 0 here

    x0, x1 = sanitize(box[0], box[2], w)
    y0, y1 = sanitize(box[1], box[3], h)
    out = np.zeros((h, w), bool)
    for r in range(h):
        for c in range(w):
            out[r, c] = x0 <= c < x1 and y0 <= r < y1
    return out


def mask_loss(logits, targets, boxes_cells, padding=0.25, pos_neg_ratio=1.0):
    """RdsMaskHead.loss / mask_loss / mask_ohem_loss for one image's masks: (the image's summed
    per-mask losses, per-mask float64[P], the number of masks). logits [P, 2, h, w]
    (background, foreground), targets [P, h, w] in {0, 1}, boxes_cells [P, 4] (the ground-truth
    boxes already scaled to mask cells). The caller divides by (masks + 1)."""
    logits = np.asarray(logits, np.float64)
    p, _, h, w = logits.shape
    per_mask = np.zeros(p)
    for k in range(p):
        gt = np.asarray(targets[k], np.int64).copy()
        inside = crop(boxes_cells[k], h, w, padding)
        gt[~inside] = -1  # ignore_index
        z = logits[k] - logits[k].max(axis=0, keepdims=True)
        log_prob = z - np.log(np.exp(z).sum(axis=0, keepdims=True))
        pre = np.zeros((h, w))
        for r in range(h):
            for c in range(w):
                if gt[r, c] >= 0:
                    pre[r, c] = -log_prob[gt[r, c], r, c]
        pre, gt_flat, kept = pre.reshape(-1), gt.reshape(-1), inside.reshape(-1).copy()
        # OHEM: rank the background pixels by loss; beyond num_neg = ratio x foreground pixels
        # (at most h w - 1) their loss and their place in the normaliser are dropped.
        loss_c = np.where(gt_flat != 0, 0.0, pre)
        order = sorted(range(h * w), key=lambda i: -loss_c[i])
        rank = np.empty(h * w, np.int64)
        rank[order] = np.arange(h * w)
        num_neg = min(pos_neg_ratio * (gt_flat == 1).sum(), h * w - 1)
        filtered = (rank >= num_neg) & (gt_flat == 0)
        pre[filtered] = 0.0
        kept[filtered] = False
        per_mask[k] = pre.sum() / (kept.sum() + 1)
    return per_mask.sum(), per_mask, p


def correlate(pixels, kernels):
    """RdsMaskHead.forward's correlation: pixels [h, w, E], kernels [K, 2 E] (background
    kernel, foreground kernel) -> logits [K, 2, h, w], as explicit sums."""
    pixels = np.asarray(pixels, np.float64)
    kernels = np.asarray(kernels, np.float64)
    h, w, e = pixels.shape
    out = np.zeros((len(kernels), 2, h, w))
    for k in range(len(kernels)):
        for ch in range(2):
            kernel = kernels[k, ch * e : (ch + 1) * e]
            for r in range(h):
                for c in range(w):
                    out[k, ch, r, c] = sum(pixels[r, c, i] * kernel[i] for i in range(e))
    return out


MBRM_WEIGHT = (-0.2968, -0.2892, -0.2635, -3.2545, -0.1874, 2.5041, 0.0196, 0.0651, 0.0917)
MBRM_BIAS = -1.9536


def mbrm(masks, boxes, gamma=0.05):
    """mmdet/models/detectors/rdsnet.py MBRM.forward + get_boxes: masks [K, H, W] foreground
    probabilities at pixel resolution, boxes [K, 4] xyxy pixels -> refined [K, 4] (the argmax
    pixel of each edge's distribution). The 9 weights and the bias are MBRM.__init__'s."""
    masks = np.asarray(masks, np.float64)
    k = masks.shape[0]
    p = (len(MBRM_WEIGHT) - 1) // 2

    def conv1d(x, weight):  # torch conv1d: cross-correlation, zero padding p
        out = np.zeros(len(x))
        for i in range(len(x)):
            total = MBRM_BIAS
            for j, wt in enumerate(weight):
                src = i + j - p
                if 0 <= src < len(x):
                    total += wt * x[src]
            out[i] = total
        return out

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    refined = np.zeros((k, 4))
    for n in range(k):
        horizon = masks[n].max(axis=0)  # over rows: [W]
        vertical = masks[n].max(axis=1)  # [H]
        x0, y0, x1, y1 = np.asarray(boxes[n], np.float64)
        sigma_h = 2 * max((x1 - x0) * gamma, 1.0) ** 2
        sigma_v = 2 * max((y1 - y0) * gamma, 1.0) ** 2
        results = []
        for profile, edge, sigma, weight in (
            (horizon, x0, sigma_h, MBRM_WEIGHT),
            (vertical, y0, sigma_v, MBRM_WEIGHT),
            (horizon, x1, sigma_h, MBRM_WEIGHT[::-1]),
            (vertical, y1, sigma_v, MBRM_WEIGHT[::-1]),
        ):
            grid = np.arange(len(profile), dtype=np.float64)
            window = np.exp(-((grid - edge) ** 2) / sigma)
            window = np.where(window > 0.0044, window, 0.0)
            dist = sigmoid(conv1d(profile, weight)) * window
            dist = dist / dist.sum()
            results.append(float(np.argmax(dist)))
        refined[n] = results  # (l, t, r, b)
    return refined
