"""Mask R-CNN's training targets and losses as plain float64 NumPy loops, written from
detectron2's rules (RPN.label_and_sample_anchors, ROIHeads.label_and_sample_proposals,
subsample_labels, BitMasks.crop_and_resize, FastRCNNOutputLayers.losses, mask_rcnn_loss):
the independent side of tests/methods/test_mask_rcnn_targets.py.

IoU, the Matcher, the box coding and RoIAlign come from tests/ops/reference.py, itself written
from the published definitions; nothing here imports instseg_jax.
"""

from __future__ import annotations

import math

import numpy as np

from tests.ops import reference as ops_ref

RPN_THRESHOLDS = (0.3, 0.7)  # MODEL.RPN.IOU_THRESHOLDS, labels (0, -1, 1)
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # MODEL.RPN.BBOX_REG_WEIGHTS
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS


def _iou_matrix(gt_boxes, boxes) -> np.ndarray:
    """float32[G, P] IoU: the Matcher compares a float32 matrix with its thresholds, as the
    library and detectron2 both do (an IoU of exactly 0.7 is float32(0.7) on both sides)."""
    return ops_ref.pairwise(ops_ref.iou, gt_boxes, boxes).astype(np.float32)


def rpn_anchor_targets(anchors, gt_boxes, gt_valid):
    """One image's anchor labels before sampling and their regression targets.

    Matcher(thresholds (0.3, 0.7), labels (0, -1, 1), allow_low_quality_matches=True) over the
    valid ground truth only; an image without any labels every anchor 0 (background).
    Targets: the matched box encoded against the anchor with weights (1, 1, 1, 1), zero where
    the label is not 1.

    Returns labels int64[T] and targets float64[T, 4].
    """
    anchors = np.asarray(anchors, np.float64)
    keep = np.flatnonzero(np.asarray(gt_valid, bool))
    boxes = np.asarray(gt_boxes, np.float64)[keep]
    targets = np.zeros((len(anchors), 4))
    if len(boxes) == 0:
        return np.zeros(len(anchors), np.int64), targets
    matched, labels = ops_ref.match(
        _iou_matrix(boxes, anchors), RPN_THRESHOLDS, (0, -1, 1), allow_low_quality=True
    )
    for t in np.flatnonzero(labels == 1):
        targets[t] = ops_ref.encode(boxes[matched[t]], anchors[t], RPN_BOX_WEIGHTS)
    return labels, targets


def rpn_anchor_labels_inside(anchors, gt_boxes, gt_valid, image_hw, straddle_thresh: float):
    """One image's anchor labels under Detectron's RPN_STRADDLE_THRESH (PANet
    lib/roi_data/rpn.py _get_rpn_blobs): only anchors with x1 >= -t, y1 >= -t, x2 < W + t and
    y2 < H + t in Detectron's inclusive coordinates (x2 = x1 + w - 1, so ours minus 1) are
    matched, as if the others did not exist; the others are labelled -1 (never sampled)."""
    anchors = np.asarray(anchors, np.float64)
    height, width = image_hw
    t = straddle_thresh
    inside = np.flatnonzero(
        (anchors[:, 0] >= -t)
        & (anchors[:, 1] >= -t)
        & (anchors[:, 2] - 1 < width + t)
        & (anchors[:, 3] - 1 < height + t)
    )
    labels = np.full(len(anchors), -1, np.int64)
    labels[inside] = rpn_anchor_targets(anchors[inside], gt_boxes, gt_valid)[0]
    return labels


def subsample_counts(labels, num_samples: int, positive_fraction: float) -> tuple[int, int]:
    """detectron2's subsample_labels: how many positives and negatives a sample holds.

    num_pos = min(#positives, int(num_samples * positive_fraction));
    num_neg = min(#negatives, num_samples - num_pos).
    """
    labels = np.asarray(labels)
    num_pos = min(int((labels == 1).sum()), int(num_samples * positive_fraction))
    num_neg = min(int((labels == 0).sum()), num_samples - num_pos)
    return num_pos, num_neg


def roi_candidates(proposals, proposal_valid, gt_boxes, gt_valid) -> np.ndarray:
    """float64[K, 4]: the valid proposals followed by the valid ground-truth boxes
    (add_ground_truth_to_proposals: every ground truth is also a candidate RoI)."""
    proposals = np.asarray(proposals, np.float64)[np.asarray(proposal_valid, bool)]
    boxes = np.asarray(gt_boxes, np.float64)[np.asarray(gt_valid, bool)]
    return np.concatenate([proposals, boxes]).reshape(-1, 4)


def roi_targets(rois, gt_boxes, gt_classes, gt_valid, iou_threshold: float, num_classes: int):
    """Labels of candidate RoIs[K, 4] for the box head.

    Matcher(thresholds (iou_threshold,), labels (0, 1), allow_low_quality_matches=False) over
    the valid ground truth; a foreground RoI takes its matched box's class and the box encoded
    against it with weights (10, 10, 5, 5); background takes class num_classes and no target.

    Returns foreground bool[K], classes int64[K], matched ground-truth slot int64[K] (-1 on
    background) and targets float64[K, 4] (zero on background).
    """
    rois = np.asarray(rois, np.float64).reshape(-1, 4)
    slots = np.flatnonzero(np.asarray(gt_valid, bool))
    foreground = np.zeros(len(rois), bool)
    classes = np.full(len(rois), num_classes, np.int64)
    matched_slot = np.full(len(rois), -1, np.int64)
    targets = np.zeros((len(rois), 4))
    if len(slots) == 0 or len(rois) == 0:
        return foreground, classes, matched_slot, targets
    boxes = np.asarray(gt_boxes, np.float64)[slots]
    matched, labels = ops_ref.match(
        _iou_matrix(boxes, rois), (iou_threshold,), (0, 1), allow_low_quality=False
    )
    for k in np.flatnonzero(labels == 1):
        foreground[k] = True
        matched_slot[k] = slots[matched[k]]
        classes[k] = int(gt_classes[matched_slot[k]])
        targets[k] = ops_ref.encode(boxes[matched[k]], rois[k], ROI_BOX_WEIGHTS)
    return foreground, classes, matched_slot, targets


def mask_target(mask, roi, size: int = 28) -> np.ndarray:
    """float64[size, size] soft target of a full-image mask[H, W] in roi (xyxy pixels).

    BitMasks.crop_and_resize: ROIAlign((size, size), spatial_scale 1, sampling_ratio 0,
    aligned=True) on the whole mask, then the target is the value >= 0.5 (the caller
    thresholds, to keep the margin to 0.5 visible). sampling_ratio 0 is adaptive:
    ceil(roi side / size) samples per bin along each axis; the reference takes RoIs whose two
    sides give the same count.
    """
    x0, y0, x1, y1 = (float(v) for v in roi)
    per_axis = {math.ceil((y1 - y0) / size), math.ceil((x1 - x0) / size)}
    if len(per_axis) != 1:
        raise ValueError(f"roi {roi}: different adaptive sampling counts per axis {per_axis}")
    mask = np.asarray(mask, np.float64)
    matrix = ops_ref.roi_align_matrix(mask.shape, roi, (size, size), 1.0, per_axis.pop(), True)
    return (matrix @ mask.reshape(-1)).reshape(size, size)


# ----------------------------------------------------------------------------- losses


def bce(logit: float, target: float) -> float:
    """-[t log s(x) + (1 - t) log(1 - s(x))], s the logistic function, in float64."""
    logit = float(logit)
    log_p = -math.log1p(math.exp(-logit)) if logit >= 0 else logit - math.log1p(math.exp(logit))
    log_not_p = log_p - logit  # log(1 - s(x)) = log s(x) - x
    return -(target * log_p + (1.0 - target) * log_not_p)


def smooth_l1(x, beta: float) -> float:
    """fvcore/nn/smooth_l1_loss.py smooth_l1_loss, summed: |x| when beta < 1e-5, else
    0.5 x^2 / beta below beta and |x| - 0.5 beta above."""
    n = np.abs(np.asarray(x, np.float64))
    if beta < 1e-5:
        return float(n.sum())
    return float(np.where(n < beta, 0.5 * n**2 / beta, n - 0.5 * beta).sum())


def rpn_losses(logits, deltas, labels, target_deltas, batch_per_image: int, beta=0.0) -> dict:
    """detectron2's RPN losses on a batch: BCE summed over sampled anchors (label >= 0) and
    smooth L1 (MODEL.RPN.SMOOTH_L1_BETA, default 0: L1) summed over positive ones, both divided
    by batch_per_image x images, however many anchors were actually sampled."""
    logits = np.asarray(logits, np.float64)
    deltas = np.asarray(deltas, np.float64)
    labels = np.asarray(labels)
    target_deltas = np.asarray(target_deltas, np.float64)
    normalizer = batch_per_image * logits.shape[0]
    objectness = sum(
        bce(logits[i], float(labels[i] == 1)) for i in np.ndindex(labels.shape) if labels[i] >= 0
    )
    localization = sum(
        smooth_l1(deltas[i] - target_deltas[i], beta)
        for i in np.ndindex(labels.shape)
        if labels[i] == 1
    )
    return {"loss_rpn_cls": objectness / normalizer, "loss_rpn_loc": localization / normalizer}


def box_losses(logits, deltas, classes, target_deltas, valid, foreground, beta=0.0) -> dict:
    """FastRCNNOutputLayers.losses on the sampled RoIs of the whole batch.

    loss_cls: softmax cross-entropy averaged over the sampled RoIs; loss_box_reg: smooth L1
    (MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA, default 0: L1) of the
    ground-truth class's deltas over foreground RoIs, summed, divided by the number of sampled
    RoIs (not of foreground ones). Classes index logits[..., C + 1]; C is background.
    """
    logits = np.asarray(logits, np.float64)
    deltas = np.asarray(deltas, np.float64)
    classes = np.asarray(classes)
    foreground = np.asarray(foreground, bool)
    valid = np.asarray(valid, bool)
    rows = [i for i in np.ndindex(valid.shape) if valid[i]]
    cross_entropy = 0.0
    regression = 0.0
    for i in rows:
        row = logits[i]
        log_sum = row.max() + math.log(np.exp(row - row.max()).sum())
        cross_entropy += log_sum - row[classes[i]]
        if foreground[i]:
            regression += smooth_l1(deltas[i][classes[i]] - np.asarray(target_deltas[i]), beta)
    count = max(len(rows), 1)
    return {"loss_cls": cross_entropy / count, "loss_box_reg": regression / count}


def mask_loss(mask_logits, classes, targets, valid) -> float:
    """mask_rcnn_loss: per-pixel BCE of the ground-truth class's logit map, averaged over every
    pixel of every foreground RoI (0 when there is none). mask_logits[..., M, M, C]."""
    mask_logits = np.asarray(mask_logits, np.float64)
    targets = np.asarray(targets, np.float64)
    classes = np.asarray(classes)
    valid = np.asarray(valid, bool)
    total, pixels = 0.0, 0
    for i in np.ndindex(valid.shape):
        if not valid[i]:
            continue
        logit_map = mask_logits[i][..., classes[i]]
        total += sum(bce(x, t) for x, t in zip(logit_map.flat, targets[i].flat, strict=True))
        pixels += targets[i].size
    return total / pixels if pixels else 0.0
