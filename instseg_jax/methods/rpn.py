"""Region proposal network: head, static-shape proposals and the anchor targets and losses.

Shapes: B batch, L levels (P2..P6), A anchors per location, T = sum_l h_l * w_l * A anchors of
the canvas, N ground-truth slots, P proposals per image.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instseg_jax import ops
from instseg_jax.nn.layers import Conv, Dense
from instseg_jax.ops.assign import ignore_mask

LEVELS = ("p2", "p3", "p4", "p5", "p6")


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then per-anchor objectness and deltas on every level."""

    num_anchors: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Returns objectness float32[B, T] and deltas float32[B, T, 4] in anchor order."""
        init = nn.initializers.normal(0.01)
        channels = features[LEVELS[0]].shape[-1]
        shared = Conv(
            channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            kernel_init=init,
            name="conv",
        )
        # 1x1 convolutions as Dense layers over channels (same numbers; XLA's CPU gradient of a
        # convolution with few output maps is far slower than the matmul's).
        objectness = Dense(self.num_anchors, dtype=self.dtype, kernel_init=init, name="objectness")
        deltas = Dense(self.num_anchors * 4, dtype=self.dtype, kernel_init=init, name="deltas")
        logits, boxes = [], []
        for level in LEVELS:
            x = nn.relu(shared(features[level]))  # [B, h, w, D]
            b = x.shape[0]
            logits.append(objectness(x).reshape(b, -1))  # [B, h*w*A], (y, x, a) order
            boxes.append(deltas(x).reshape(b, -1, 4))  # [B, h*w*A, 4]
        return (
            jnp.concatenate(logits, 1).astype(jnp.float32),
            jnp.concatenate(boxes, 1).astype(jnp.float32),
        )


def level_sizes(anchors_by_level) -> list[int]:
    return [int(a.shape[0]) for a in anchors_by_level]


def proposals(
    logits,
    deltas,
    anchors_by_level,
    image_hw,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_threshold: float,
    min_size: float = 0.0,
):
    """Proposals of one batch, no gradient.

    Per level keep the top pre_nms_topk anchors by objectness, decode, clip to the image's
    valid region, drop boxes with a side of 0 or below min_size, then NMS across all of them
    with levels kept apart (batched NMS over level ids), keeping post_nms_topk per image.

    Returns boxes float32[B, P, 4], scores float32[B, P] (logits), valid bool[B, P].
    """
    logits = jax.lax.stop_gradient(logits)
    deltas = jax.lax.stop_gradient(deltas)
    sizes = level_sizes(anchors_by_level)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def one_image(logit, delta, hw):
        boxes, scores, level_ids = [], [], []
        for level, (start, size) in enumerate(zip(starts, sizes, strict=True)):
            k = min(pre_nms_topk, size)
            top, index = ops.top_k(logit[start : start + size], k)  # [k]
            decoded = ops.decode_boxes(
                delta[start : start + size][index], anchors_by_level[level][index]
            )
            boxes.append(ops.clip_boxes(decoded, hw))
            scores.append(top)
            level_ids.append(jnp.full((k,), level, jnp.int32))
        boxes = jnp.concatenate(boxes)
        scores = jnp.concatenate(scores)
        level_ids = jnp.concatenate(level_ids)
        wh = boxes[:, 2:] - boxes[:, :2]
        usable = ((wh > 0) & (wh >= min_size)).all(axis=1) & jnp.isfinite(scores)
        keep, count = ops.batched_nms(
            boxes, scores, level_ids, nms_threshold, post_nms_topk, valid=usable
        )
        valid = jnp.arange(post_nms_topk) < count
        safe = jnp.where(valid, keep, 0)
        return (
            jnp.where(valid[:, None], boxes[safe], 0.0),
            jnp.where(valid, scores[safe], -jnp.inf),
            valid,
        )

    return jax.vmap(one_image)(logits, deltas, image_hw.astype(jnp.float32))


def proposal_outputs(logits, deltas, anchors_by_level, image_hw, cfg, train: bool) -> dict:
    """`proposals` of the RPN's logits float32[B, T] and deltas float32[B, T, 4] under a
    config's rpn_* fields (the train or test top-k), with the RPN's own outputs: the model
    outputs proposal_boxes / proposal_scores / proposal_valid, rpn_logits, rpn_deltas (Mask
    R-CNN's and FCIS's)."""
    boxes, scores, valid = proposals(
        logits,
        deltas,
        anchors_by_level,
        image_hw,
        cfg.rpn_pre_nms_topk_train if train else cfg.rpn_pre_nms_topk_test,
        cfg.rpn_post_nms_topk_train if train else cfg.rpn_post_nms_topk_test,
        cfg.rpn_nms_threshold,
        cfg.rpn_min_size,
    )
    return {
        "proposal_boxes": boxes,
        "proposal_scores": scores,
        "proposal_valid": valid,
        "rpn_logits": logits,
        "rpn_deltas": deltas,
    }


def anchor_targets(
    anchors,
    gt_boxes,
    gt_valid,
    key,
    batch_per_image: int,
    positive_fraction: float,
    thresholds=(0.3, 0.7),
    ignore_boxes=None,
    ignore_valid=None,
    image_hw=None,
    straddle_threshold: float = -1.0,
):
    """Sampled anchor labels and regression targets.

    anchors [T, 4]; gt_boxes [B, N, 4]; gt_valid bool[B, N]; optional ignore_boxes
    float32[B, I, 4] and ignore_valid bool[B, I] (Batch's ignore regions): an anchor that would
    be a negative but lies in one (ops.assign.ignore_mask) is never sampled.
    straddle_threshold >= 0 (with image_hw int[B, 2], each image's valid region): anchors
    reaching more than that many pixels outside the image take no part in matching or sampling
    (Detectron's TRAIN.RPN_STRADDLE_THRESH, 0 in PANet; detectron2 keeps every anchor: -1).
    Returns labels int32[B, T] (1 positive, 0 negative, -1 not sampled) and
    target deltas float32[B, T, 4] (meaningful where labels == 1).
    """

    def one_image(boxes, valid, image_key, ignore, ignore_ok, hw):
        iou = ops.box_iou(boxes, anchors)  # [N, T]
        if straddle_threshold >= 0:
            # Detectron's rule in its inclusive coordinates (x2 = ours - 1): x1, y1 >= -t and
            # x2 < W + t; an outside anchor can be no ground truth's best match either.
            t = straddle_threshold
            height, width = hw[0].astype(jnp.float32), hw[1].astype(jnp.float32)
            inside = (
                (anchors[:, 0] >= -t)
                & (anchors[:, 1] >= -t)
                & (anchors[:, 2] - 1 < width + t)
                & (anchors[:, 3] - 1 < height + t)
            )
            iou = jnp.where(inside[None, :], iou, -1.0)
        matched, labels = ops.match(iou, thresholds, (0, -1, 1), True, gt_valid=valid)
        if straddle_threshold >= 0:
            labels = jnp.where(inside, labels, -1)
        if ignore is not None:
            labels = jnp.where((labels == 0) & ignore_mask(anchors, ignore, ignore_ok), -1, labels)
        chosen, chosen_valid = ops.sample_balanced(
            labels, batch_per_image, positive_fraction, image_key
        )
        # A max-scatter: padding slots (index 0, not valid) never unmark a real sample.
        picked = jnp.zeros(labels.shape, jnp.int32).at[chosen].max(chosen_valid.astype(jnp.int32))
        sampled = jnp.where(picked > 0, labels, -1)
        targets = ops.encode_boxes(boxes[matched], anchors)
        return sampled, jnp.where((sampled == 1)[:, None], targets, 0.0)

    keys = jax.random.split(key, gt_boxes.shape[0])
    if straddle_threshold >= 0 and image_hw is None:
        raise ValueError("anchor_targets: a straddle_threshold needs each image's image_hw")
    return jax.vmap(one_image)(gt_boxes, gt_valid, keys, ignore_boxes, ignore_valid, image_hw)


def anchor_target_outputs(anchors, batch: dict, cfg, key) -> dict:
    """`anchor_targets` of anchors float32[T, 4] for the batch's ground truth and ignore
    regions under a config's rpn_* fields, as the model outputs rpn_labels and
    rpn_target_deltas (Mask R-CNN's and FCIS's)."""
    labels, target_deltas = anchor_targets(
        anchors,
        batch["gt_boxes"],
        batch["gt_valid"],
        key,
        cfg.rpn_batch_per_image,
        cfg.rpn_positive_fraction,
        ignore_boxes=batch.get("ignore_boxes"),
        ignore_valid=batch.get("ignore_valid"),
        image_hw=batch["image_hw"],
        straddle_threshold=cfg.rpn_straddle_threshold,
    )
    return {"rpn_labels": labels, "rpn_target_deltas": target_deltas}


def rpn_losses(
    logits,
    deltas,
    labels,
    target_deltas,
    batch_per_image: int,
    beta: float = 0.0,
    normalizer_rule: str = "batch",
):
    """detectron2's RPN losses: BCE over sampled anchors and smooth L1 (beta 0: L1) over
    positive ones, both divided by the batch's sampling budget (batch_per_image * B,
    normalizer_rule "batch": detectron2's rpn.py losses) or by the anchors actually sampled
    ("sampled": torchvision's rpn.py compute_loss, sampled_inds.numel(); the same unless an
    image has fewer than batch_per_image anchors to sample)."""
    sampled = labels >= 0
    if normalizer_rule == "sampled":
        normalizer = jnp.maximum(jnp.sum(sampled), 1).astype(jnp.float32)
    else:
        normalizer = batch_per_image * logits.shape[0]
    objectness = ops.binary_cross_entropy_with_logits(
        logits, labels == 1, weights=sampled, normalizer=normalizer
    )
    regression = ops.smooth_l1_loss(
        deltas, target_deltas, beta=beta, weights=(labels == 1)[..., None], normalizer=normalizer
    )
    return {"loss_rpn_cls": objectness, "loss_rpn_loc": regression}


def output_losses(outputs: dict, cfg, normalizer_rule: str = "batch") -> dict:
    """rpn_losses of the model outputs (proposal_outputs' and anchor_target_outputs') under a
    config's rpn_batch_per_image and rpn_smooth_l1_beta (Mask R-CNN's and FCIS's)."""
    return rpn_losses(
        outputs["rpn_logits"],
        outputs["rpn_deltas"],
        outputs["rpn_labels"],
        outputs["rpn_target_deltas"],
        cfg.rpn_batch_per_image,
        beta=cfg.rpn_smooth_l1_beta,
        normalizer_rule=normalizer_rule,
    )
