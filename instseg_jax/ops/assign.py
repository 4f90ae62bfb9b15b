"""Matching predictions to ground truth, ignore regions and balanced sampling, with static
shapes."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from instseg_jax.ops.boxes import box_area, box_ioa
from instseg_jax.ops.dense import budgeted_select

# A candidate more than half inside an ignore region takes no label (mmdetection's
# ignore_iof_thr = 0.5): it is then mostly made of the unlabelled instance, so calling it
# background would be wrong, while a larger box that merely contains a small ignored instance
# is still mostly background and stays a negative.
IGNORE_OVERLAP = 0.5


def match(
    iou: jnp.ndarray,
    thresholds: Sequence[float] = (0.3, 0.7),
    labels: Sequence[int] = (0, -1, 1),
    allow_low_quality_matches: bool = True,
    gt_valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Match each of P predictions to its best ground truth, detectron2's Matcher semantics.

    Args:
      iou: float32[G, P] quality of ground truth g for prediction p.
      thresholds: increasing T1 < T2 < ...; they cut [-inf, T1), [T1, T2), ..., [Tk, inf)
        (half-open intervals), and a prediction's best IoU falls into one of them.
      labels: one label per interval (len(thresholds) + 1): 1 positive, 0 negative, -1 ignore.
      allow_low_quality_matches: also label 1 every prediction that is the best one (ties
        included) for some ground truth, if that best IoU is > 0 (a ground truth that overlaps
        nothing does not make every non-overlapping prediction positive).
      gt_valid: optional bool[G]; padded ground truth (False) is never matched.

    Returns:
      matched_gt int32[P]: index of the best valid ground truth (lowest index on ties; 0 where
        there is none: read it only where match_labels says so).
      match_labels int32[P].
    """
    thresholds = list(thresholds)
    labels = list(labels)
    if len(labels) != len(thresholds) + 1:
        raise ValueError(f"need len(thresholds) + 1 labels, got {labels} for {thresholds}")
    if any(b <= a for a, b in zip(thresholds, thresholds[1:], strict=False)):
        raise ValueError(f"thresholds must increase, got {thresholds}")
    num_gt, num_pred = iou.shape
    if num_gt == 0:
        return jnp.zeros((num_pred,), jnp.int32), jnp.full((num_pred,), labels[0], jnp.int32)
    if gt_valid is not None:
        # Below every real IoU (>= 0): padded rows never win the max and never reach a threshold.
        iou = jnp.where(gt_valid[:, None], iou, -1.0)
    best_iou = iou.max(axis=0)  # [P]
    matched_gt = jnp.argmax(iou, axis=0).astype(jnp.int32)
    interval = jnp.searchsorted(jnp.asarray(thresholds, iou.dtype), best_iou, side="right")
    match_labels = jnp.asarray(labels, jnp.int32)[interval]
    if allow_low_quality_matches:
        best_for_gt = iou.max(axis=1, keepdims=True)  # [G, 1]
        is_best = (iou == best_for_gt) & (best_for_gt > 0)
        match_labels = jnp.where(is_best.any(axis=0), 1, match_labels)
    return matched_gt, match_labels


def sample_balanced(
    labels: jnp.ndarray,
    num_samples: int,
    positive_fraction: float,
    key: jax.Array,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pick exactly num_samples entries of labels[P] (1 positive, 0 negative, -1 ignored).

    Up to int(num_samples * positive_fraction) positives drawn at random, then negatives drawn at
    random to fill the rest, as detectron2's subsample_labels does; slots left over when there
    are too few of both are padding.

    Returns:
      indices int32[num_samples]: positives first, then negatives, then padding (index 0).
      valid bool[num_samples]: False on padding.
    Deterministic for a given key.
    """
    num = labels.shape[0]
    if num == 0:
        return jnp.zeros((num_samples,), jnp.int32), jnp.zeros((num_samples,), bool)
    positive = labels == 1
    negative = labels == 0
    pos_key, neg_key = jax.random.split(key)
    take = min(num_samples, num)

    # A uniform random draw of each kind, in random order (the tail past its members is unused).
    positives, _, _ = budgeted_select(positive, take, pos_key)
    negatives, _, _ = budgeted_select(negative, take, neg_key)
    num_pos = jnp.minimum(positive.sum(), int(num_samples * positive_fraction))
    num_neg = jnp.minimum(negative.sum(), num_samples - num_pos)
    slot = jnp.arange(num_samples)
    from_pos = jnp.clip(slot, 0, take - 1)
    from_neg = jnp.clip(slot - num_pos, 0, take - 1)
    indices = jnp.where(slot < num_pos, positives[from_pos], negatives[from_neg])
    valid = slot < num_pos + num_neg
    return jnp.where(valid, indices, 0).astype(jnp.int32), valid


def ignore_mask(
    boxes: jnp.ndarray,
    ignore_boxes: jnp.ndarray,
    ignore_valid: jnp.ndarray,
    threshold: float = IGNORE_OVERLAP,
) -> jnp.ndarray:
    """Which candidates lie in an ignore region: bool[T].

    The one rule for instances the input left out of the targets (Batch's ignore_boxes: those
    beyond input.max_instances): a candidate it covers must be neither a positive for them nor a
    negative. Callers apply it to candidates that are not positive for a kept ground truth
    (positives stay positive) and give those no label (-1) or zero weight.

    Args:
      boxes: float32[T, 4] candidates, xyxy canvas pixels: anchors, sampled RoIs, or points
        (grid cells, locations) written as zero-area boxes (x, y, x, y).
      ignore_boxes: float32[I, 4] ignore regions, xyxy canvas pixels.
      ignore_valid: bool[I]; padding slots (False) ignore nothing.
      threshold: a candidate of positive area is covered when its intersection with some
        ignore region over its own area (IoA) is > threshold; a zero-area candidate when its
        centre lies in the region, x0 <= x < x1 and y0 <= y < y1 (the limit of IoA for a point,
        half-open as pixels are).

    Returns bool[T]: True where some valid ignore region covers the candidate.
    """
    if ignore_boxes.shape[0] == 0:
        return jnp.zeros(boxes.shape[:1], bool)
    covered = box_ioa(ignore_boxes, boxes) > threshold  # [I, T]
    centre = 0.5 * (boxes[:, :2] + boxes[:, 2:])  # [T, 2]
    inside = (
        (centre[None] >= ignore_boxes[:, None, :2]) & (centre[None] < ignore_boxes[:, None, 2:])
    ).all(axis=-1)  # [I, T]
    point = box_area(boxes) <= 0  # [T]
    covered = jnp.where(point[None, :], inside, covered)
    return (covered & ignore_valid[:, None]).any(axis=0)
