"""Losses with an explicit weight (or validity) mask and an explicit normaliser.

Every loss computes an element-wise (or per-instance) loss, multiplies it by ``weights`` (bool
or float, broadcast against it; None means all ones) and returns sum / ``normalizer``. The
caller chooses the normaliser (number of sampled anchors, of foreground RoIs, ...), because
that choice is part of a method's definition and padding must never enter it implicitly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.ops.boxes import paired_generalized_box_iou


def probability_logit(p: float) -> float:
    """The logit log(p / (1 - p)) of a probability, as a Python float (-inf at 0, inf at 1).

    Two uses share it: a probability cut compared on logits (a float32 sigmoid is exactly 1.0
    past a logit of about 17, so cutting or ranking on probabilities ties sure predictions),
    and a classifier bias that starts every prediction at a prior probability (mmcv's
    bias_init_with_prob(p) is -log((1 - p) / p), the same number).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability_logit: {p} is not a probability in [0, 1]")
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def _reduce(loss: jnp.ndarray, weights, normalizer) -> jnp.ndarray:
    if weights is not None:
        loss = loss * jnp.asarray(weights, loss.dtype)
    return loss.sum() / normalizer


def binary_cross_entropy_with_logits(
    logits: jnp.ndarray, targets: jnp.ndarray, weights=None, normalizer=1.0
) -> jnp.ndarray:
    """Sum of -[t log s(x) + (1 - t) log(1 - s(x))] (numerically stable form) / normalizer."""
    targets = targets.astype(logits.dtype)
    loss = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return _reduce(loss, weights, normalizer)


def sigmoid_focal_loss(
    logits: jnp.ndarray,
    targets: jnp.ndarray,
    alpha: float = 0.25,
    gamma: float = 2.0,
    weights=None,
    normalizer=1.0,
) -> jnp.ndarray:
    """Focal loss (Lin et al. 2017) on logits and {0, 1} targets; alpha < 0 disables alpha."""
    targets = targets.astype(logits.dtype)
    probs = jax.nn.sigmoid(logits)
    ce = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = probs * targets + (1.0 - probs) * (1.0 - targets)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    return _reduce(loss, weights, normalizer)


def smooth_l1_loss(
    predictions: jnp.ndarray,
    targets: jnp.ndarray,
    beta: float = 1.0,
    weights=None,
    normalizer=1.0,
) -> jnp.ndarray:
    """Huber-style smooth L1: 0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta; beta 0 is L1."""
    diff = jnp.abs(predictions - targets)
    if beta < 1e-5:
        loss = diff
    else:
        loss = jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta)
    return _reduce(loss, weights, normalizer)


def giou_loss(
    predicted_boxes: jnp.ndarray,
    target_boxes: jnp.ndarray,
    weights=None,
    normalizer=1.0,
    smooth: float = 0.0,
) -> jnp.ndarray:
    """Sum of 1 - GIoU over paired boxes [..., 4] (xyxy) / normalizer; weights are per box;
    smooth: added to the IoU term's intersection and union (paired_generalized_box_iou)."""
    loss = 1.0 - paired_generalized_box_iou(predicted_boxes, target_boxes, smooth)
    return _reduce(loss, weights, normalizer)


def dice_loss(
    logits: jnp.ndarray,
    targets: jnp.ndarray,
    weights=None,
    normalizer=1.0,
    smooth: float = 1.0,
    squared: bool = False,
    eps: float = 0.0,
    activate: bool = True,
) -> jnp.ndarray:
    """Per-instance dice loss of mask logits[N, ...] against {0, 1} targets[N, ...].

    loss_n = 1 - (2 sum(p t) + smooth) / (sum(p^k) + sum(t^k) + smooth + eps) with
    p = sigmoid(logits) over all but the first axis; k = 2 when ``squared`` (SOLO, CondInst),
    else 1 (MaskFormer). SOLO's reference has smooth 0 and eps 2e-3 (1e-3 on each sum).
    ``weights`` are per instance [N]. ``activate`` False: `logits` are probabilities already
    (Decoupled SOLO's product of two sigmoids; mmdetection's DiceLoss activate=False).
    """
    probs = (jax.nn.sigmoid(logits) if activate else logits).reshape(logits.shape[0], -1)
    targets = targets.reshape(targets.shape[0], -1).astype(probs.dtype)
    power = 2 if squared else 1
    numerator = 2.0 * (probs * targets).sum(axis=1) + smooth
    denominator = (probs**power).sum(axis=1) + (targets**power).sum(axis=1) + smooth + eps
    return _reduce(1.0 - numerator / denominator, weights, normalizer)


def group_normalizer_scale(counts: jnp.ndarray, images_per_group: int, offset: float = 0.0):
    """float32[B]: the factor each image's summed loss takes so that the total is the mean, over
    groups of `images_per_group` consecutive images of the batch, of (the group's summed loss /
    max(the group's count + offset, 1)). counts [B] per image (positives, trained masks...).

    A reference that normalises by its own GPU's count under DDP's gradient average trains each
    GPU's images by that GPU's count: images_per_group = its images per GPU reproduces it on the
    global batch. 0 takes the whole batch as one group (the count summed over the batch).
    """
    b = counts.shape[0]
    k = b if images_per_group == 0 else images_per_group
    if b % k:
        raise ValueError(
            f"a normaliser group of {images_per_group} images does not divide the batch of {b}"
        )
    groups = b // k
    # Image-to-group membership [B, G] (a constant): the group sums are a reduction over the
    # batch axis, one all-reduce of G numbers when the batch is sharded (on an 8-device CPU
    # mesh with a group spanning two devices: all-reduces only), whatever the partitioner
    # makes of a reshape of the sharded axis.
    membership = jnp.asarray(np.arange(b)[:, None] // k == np.arange(groups)[None], jnp.float32)
    per_group = counts.astype(jnp.float32) @ membership  # [G]
    scale = 1.0 / (groups * jnp.maximum(per_group + offset, 1.0))
    return membership @ scale  # [B]
