"""YOLACT's training targets and test-time selection as plain float64 NumPy loops, written from
the paper and mmdetection's rules (MaxIoUAssigner, loss_single_OHEM, fast_nms): the
independent side of tests/methods/test_yolact.py."""

from __future__ import annotations

import numpy as np


def iou_matrix(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = min(p[2], q[2]) - max(p[0], q[0])
            ih = min(p[3], q[3]) - max(p[1], q[1])
            inter = max(iw, 0.0) * max(ih, 0.0)
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def assign(anchors, boxes, pos=0.5, neg=0.4, min_size=4.0, scale=1.0):
    """MaxIoUAssigner(pos, neg, min_pos_iou=0, gt_max_assign_all=False) over the ground truth
    that FilterAnnotations(min_gt_bbox_wh=(min_size, min_size)) keeps (mmdetection
    mmdet/datasets/transforms/loading.py: widths > min and heights > min, on the original image,
    i.e. canvas sizes / scale): (labels 1/0/-1 per anchor, matched ground truth index)."""
    boxes = np.asarray(boxes, np.float64)
    keep = [
        i
        for i, b in enumerate(boxes)
        if (b[2] - b[0]) / scale > min_size and (b[3] - b[1]) / scale > min_size
    ]
    labels = np.zeros(len(anchors), np.int64)
    matched = np.zeros(len(anchors), np.int64)
    if not keep:
        return labels, matched
    iou = iou_matrix(boxes[keep], anchors)  # [G, T]
    best = iou.max(axis=0)
    labels[:] = -1
    labels[best < neg] = 0
    labels[best >= pos] = 1
    matched[:] = np.array(keep)[iou.argmax(axis=0)]
    for g, index in enumerate(keep):  # in order: a later ground truth takes a shared anchor
        a = int(np.argmax(iou[g]))
        labels[a] = 1
        matched[a] = index
    return labels, matched


def ohem_loss(logits, classes, labels, ratio=3, without_positives="all"):
    """Summed cross-entropy of the positives and the ratio x positives hardest negatives
    (capped at the negatives there are). Without positives, mmdetection's YOLACTHead
    loss_by_feat takes every negative (num_neg_samples = neg_inds.size(0)): "all";
    dbolya/yolact's MultiBoxLoss clamps 3 x 0 negatives: "none"."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ce = -log_probs[np.arange(len(classes)), classes]
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    quota = ratio * len(positives)
    if not len(positives) and without_positives == "all":
        quota = len(negatives)
    hardest = negatives[np.argsort(-ce[negatives], kind="stable")][:quota]
    return ce[positives].sum() + ce[hardest].sum()


def fast_nms(boxes, scores, top_k, iou_threshold, score_threshold, max_output):
    """Per class: the top_k by score, each dropped when any higher one of them overlaps it by
    more than iou_threshold, then score > score_threshold; all classes merged, best first.
    Returns [(candidate, class, score)]."""
    kept = []
    for c in range(scores.shape[1]):
        order = np.argsort(-scores[:, c], kind="stable")[:top_k]
        iou = iou_matrix(boxes[order], boxes[order])
        for j, candidate in enumerate(order):
            suppressed = any(iou[i, j] > iou_threshold for i in range(j))
            if not suppressed and scores[candidate, c] > score_threshold:
                kept.append((int(candidate), c, float(scores[candidate, c])))
    kept.sort(key=lambda item: -item[2])
    return kept[:max_output]
