"""Mask R-CNN's RoI heads: RoI sampling, box head, mask head and their losses (the mask
targets are ops.mask_targets).

Shapes: B batch, P proposals, N ground-truth slots, R sampled RoIs per image, F foreground RoIs
for the mask loss (the first F sampled, which sample_balanced puts first), C classes (class C is
background in the box classifier), Mc ground-truth box-crop side, M = 28 mask side.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instseg_jax import ops
from instseg_jax.nn.layers import Conv, Deconv2x2, Dense, depth_to_space_2x2
from instseg_jax.ops.assign import ignore_mask

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
POOLED_LEVELS = ("p2", "p3", "p4", "p5")


def sample_rois(
    proposal_boxes,
    proposal_valid,
    gt_boxes,
    gt_classes,
    gt_valid,
    key,
    num_rois: int,
    positive_fraction: float,
    iou_threshold: float,
    num_classes: int,
    ignore_boxes=None,
    ignore_valid=None,
):
    """Training RoIs: ground truth appended to the proposals, matched at iou_threshold, then
    num_rois sampled per image (positives first). A candidate below iou_threshold that lies in
    an ignore region (optional ignore_boxes float32[B, I, 4], ignore_valid bool[B, I]; see
    ops.assign.ignore_mask) is not sampled as background.

    Returns a dict of [B, R] arrays: boxes [.., 4], classes (C for background), matched gt
    index, target deltas [.., 4] (box-head weights), foreground and valid flags.
    """

    def one_image(props, props_valid, boxes, classes, valid, image_key, ignore, ignore_ok):
        candidates = jnp.concatenate([props, boxes])  # [P + N, 4]
        candidate_valid = jnp.concatenate([props_valid, valid])
        iou = ops.box_iou(boxes, candidates)  # [N, P + N]
        matched, labels = ops.match(iou, (iou_threshold,), (0, 1), False, gt_valid=valid)
        if ignore is not None:
            covered = ignore_mask(candidates, ignore, ignore_ok)
            labels = jnp.where((labels == 0) & covered, -1, labels)
        labels = jnp.where(candidate_valid, labels, -1)
        chosen, chosen_valid = ops.sample_balanced(labels, num_rois, positive_fraction, image_key)
        roi_boxes = candidates[chosen]
        roi_gt = matched[chosen]
        foreground = chosen_valid & (labels[chosen] == 1)
        roi_classes = jnp.where(foreground, classes[roi_gt], num_classes)
        deltas = ops.encode_boxes(boxes[roi_gt], roi_boxes, BOX_WEIGHTS)
        return {
            "boxes": roi_boxes,
            "classes": roi_classes,
            "gt_index": roi_gt,
            "target_deltas": jnp.where(foreground[:, None], deltas, 0.0),
            "foreground": foreground,
            "valid": chosen_valid,
        }

    keys = jax.random.split(key, gt_boxes.shape[0])
    rois = jax.vmap(one_image)(
        proposal_boxes,
        proposal_valid,
        gt_boxes,
        gt_classes,
        gt_valid,
        keys,
        ignore_boxes,
        ignore_valid,
    )
    return jax.tree.map(jax.lax.stop_gradient, rois)


def pool(
    features: dict,
    boxes,
    size: int,
    sampling_ratio: int,
    aligned: bool,
    level_mapper: str = "detectron2",
    sampling_ratio_max: int = 0,
):
    """[B, R, size, size, D] RoIAlign of boxes[B, R, 4] from P2..P5, each box on its level
    (level_mapper: the `ops.fpn_level` rule, "detectron2" or "torchvision"; sampling_ratio 0:
    the adaptive rule with sampling_ratio_max slots per bin axis)."""
    levels = ops.fpn_level(boxes, 2, 5, rule=level_mapper)
    return ops.multilevel_roi_align(
        [features[k] for k in POOLED_LEVELS],
        boxes,
        size,
        min_level=2,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        levels=levels,
        sampling_ratio_max=sampling_ratio_max,
    )


def adaptive_sampling_slots(max_side: int, size: int) -> int:
    """Static sample slots per bin axis that make the adaptive RoIAlign rule (ceil(side /
    size)) exact for RoI sides up to max_side cells of their level."""
    return -(-int(max_side) // int(size))


class BoxHead(nn.Module):
    """2 x FC-1024 on 7x7 pooled features, then class logits [.., C+1] and class-specific
    deltas [.., C, 4]."""

    num_classes: int
    fc_dim: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled):  # [B, R, 7, 7, D]
        b, r = pooled.shape[:2]
        x = pooled.reshape(b, r, -1).astype(self.dtype)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
        x = nn.relu(Dense(self.fc_dim, dtype=self.dtype, kernel_init=init, name="fc1")(x))
        x = nn.relu(Dense(self.fc_dim, dtype=self.dtype, kernel_init=init, name="fc2")(x))
        return box_predictions(x, self.num_classes, self.dtype)


def box_predictions(x, num_classes: int, dtype):
    """The box head's predictors on features x[..., D] (inside a compact module, which owns
    their parameters "cls_score" and "bbox_pred"): class logits [..., C+1] and class-specific
    deltas [..., C, 4], float32."""
    logits = Dense(
        num_classes + 1, dtype=dtype, kernel_init=nn.initializers.normal(0.01), name="cls_score"
    )(x)
    deltas = Dense(
        num_classes * 4, dtype=dtype, kernel_init=nn.initializers.normal(0.001), name="bbox_pred"
    )(x)
    return (
        logits.astype(jnp.float32),
        deltas.reshape(x.shape[:-1] + (num_classes, 4)).astype(jnp.float32),
    )


def conv_relu_stack(x, channels: int, num_convs: int, dtype, prefix: str = "conv"):
    """num_convs x (conv3x3 + ReLU) on NHWC x, MSRA-initialised, named prefix1, prefix2, ...
    (inside a compact module): Mask R-CNN's mask head and the keypoint head."""
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    for i in range(num_convs):
        x = Conv(
            channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=dtype,
            kernel_init=init,
            name=f"{prefix}{i + 1}",
        )(x)
        x = nn.relu(x)
    return x


class MaskHead(nn.Module):
    """4 x conv3x3-256 + ReLU, 2x2 stride-2 deconv + ReLU, 1x1 conv to one logit map per class:
    [B, F, 14, 14, D] -> [B, F, 28, 28, C]."""

    num_classes: int
    channels: int = 256
    num_convs: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled):
        b, f, h, w, d = pooled.shape
        x = pooled.reshape(b * f, h, w, d).astype(self.dtype)
        x = conv_relu_stack(x, self.channels, self.num_convs, self.dtype)
        init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        # The deconvolution stays in its matmul layout [B*F, 14, 14, 2, 2, D] through the ReLU
        # and the per-pixel predictor; only the C-channel logits are rearranged to 28x28 (the
        # D-channel rearrangement and its gradient were a tenth of the nuclei training step).
        x = nn.relu(Deconv2x2(self.channels, self.dtype, init, blocked=True, name="deconv")(x))
        # A 1x1 convolution written as a Dense layer over channels: the same numbers, but XLA's
        # CPU convolution gradient for a few output maps took seconds where a matmul takes ms.
        x = Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.001),
            name="predictor",
        )(x)
        x = depth_to_space_2x2(x)  # [B*F, 28, 28, C]
        return x.reshape(b, f, 2 * h, 2 * w, self.num_classes).astype(jnp.float32)


def box_losses(logits, deltas, rois: dict, beta: float = 0.0):
    """Softmax cross-entropy over sampled RoIs and smooth L1 (beta 0: L1) on the ground-truth
    class's deltas of the foreground ones, both divided by the number of sampled RoIs
    (detectron2's normalisation)."""
    valid = rois["valid"]
    normalizer = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, rois["classes"][..., None], axis=-1)[..., 0]
    loss_cls = jnp.sum(nll * valid) / normalizer
    num_classes = deltas.shape[2]
    cls = jnp.clip(rois["classes"], 0, num_classes - 1)
    chosen = jnp.take_along_axis(deltas, cls[..., None, None], axis=2)[:, :, 0]  # [B, R, 4]
    loss_box = ops.smooth_l1_loss(
        chosen,
        rois["target_deltas"],
        beta=beta,
        weights=rois["foreground"][..., None],
        normalizer=normalizer,
    )
    accuracy = jnp.sum((jnp.argmax(logits, -1) == rois["classes"]) * valid) / normalizer
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box}, {"cls_accuracy": accuracy}


def mask_loss(mask_logits, classes, targets, valid):
    """Mean per-pixel BCE of the ground-truth class's mask logits over foreground RoIs."""
    num_classes = mask_logits.shape[-1]
    cls = jnp.clip(classes, 0, num_classes - 1)
    logits = jnp.take_along_axis(mask_logits, cls[:, :, None, None, None], axis=-1)[..., 0]
    pixels = targets.shape[-1] * targets.shape[-2]
    normalizer = jnp.maximum(valid.sum(), 1).astype(jnp.float32) * pixels
    return ops.binary_cross_entropy_with_logits(
        logits, targets, weights=valid[:, :, None, None], normalizer=normalizer
    )
