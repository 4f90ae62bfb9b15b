"""Non-maximum suppression with static shapes: greedy (exact), Matrix NMS and Fast NMS.

Greedy NMS here is a `lax.while_loop` that jumps from one kept box to the next best unsuppressed
one, so it runs (number of kept boxes) steps of O(N) vector work, never syncs with the host, and
gives exactly the boxes of the textbook loop: candidates in descending score order with equal
scores in ascending index order, a box suppressed only when its IoU with a kept box is strictly
greater than the threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instseg_jax.ops import topk
from instseg_jax.ops.boxes import box_iou, paired_box_iou
from instseg_jax.ops.masks import mask_iou


def _descending_order(scores: jnp.ndarray) -> jnp.ndarray:
    """int32[N] indices by descending score; a stable sort keeps ties in ascending index order."""
    return jnp.argsort(-scores, stable=True).astype(jnp.int32)


def _greedy_nms(boxes, scores, classes, valid, iou_threshold, max_output):
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)
    classes = None if classes is None else jnp.asarray(classes)
    valid = None if valid is None else jnp.asarray(valid)
    num_boxes = boxes.shape[0]
    if num_boxes == 0 or max_output == 0:
        return jnp.full((max_output,), -1, jnp.int32), jnp.zeros((), jnp.int32)
    order = _descending_order(scores)
    sorted_boxes = boxes[order]
    sorted_classes = None if classes is None else classes[order]
    candidates = jnp.ones((num_boxes,), bool) if valid is None else valid[order]

    def cond(state):
        count, candidates, _ = state
        return (count < max_output) & jnp.any(candidates)

    def body(state):
        count, candidates, kept = state
        best = jnp.argmax(candidates)  # first remaining candidate in sorted order
        overlaps = paired_box_iou(sorted_boxes[best], sorted_boxes)  # [N]
        suppress = overlaps > iou_threshold
        if sorted_classes is not None:
            suppress = suppress & (sorted_classes == sorted_classes[best])
        candidates = candidates & ~suppress
        candidates = candidates.at[best].set(False)
        kept = kept.at[count].set(order[best])
        return count + 1, candidates, kept

    init = (jnp.zeros((), jnp.int32), candidates, jnp.full((max_output,), -1, jnp.int32))
    count, _, kept = jax.lax.while_loop(cond, body, init)
    return kept, count


def nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    iou_threshold: float,
    max_output: int,
    valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy NMS of boxes[N, 4] with scores[N].

    Args:
      iou_threshold: a box is dropped when its IoU with a kept box is > this (strictly).
      max_output: static number of output slots.
      valid: optional bool[N]; invalid boxes (padding) are never kept and suppress nothing.

    Returns:
      (indices int32[max_output], count int32): indices into the input of the kept boxes in
      descending score order (ties: lower index first), padded with -1 after ``count``.
    """
    return _greedy_nms(boxes, scores, None, valid, iou_threshold, max_output)


def batched_nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    classes: jnp.ndarray,
    iou_threshold: float,
    max_output: int,
    valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Class-aware greedy NMS: as `nms`, but boxes only suppress boxes of their own class.

    classes int32[N]. The result equals running `nms` per class and merging by score (ties by
    index). Suppression is masked by class equality instead of offsetting boxes per class, so
    IoUs are computed on the original coordinates and no float32 precision is lost to offsets.
    """
    return _greedy_nms(boxes, scores, classes, valid, iou_threshold, max_output)


def matrix_nms(
    masks: jnp.ndarray,
    classes: jnp.ndarray,
    scores: jnp.ndarray,
    kernel: str = "gaussian",
    sigma: float = 2.0,
) -> jnp.ndarray:
    """SOLOv2's Matrix NMS: float32[N] decayed scores, in the input order.

    masks [N, H, W] (bool or {0, 1} float), classes int32[N], scores float32[N]. Each mask j is
    decayed by every higher-scoring mask i of its class through f(iou_ij) / f(comp_i), where
    comp_i is the largest IoU of mask i with a mask above it:
    gaussian f(x) = exp(-sigma x^2); linear f(x) = 1 - x (denominator kept >= 1e-6).
    Empty masks have IoU 0 with everything (padding decays nothing).
    """
    masks, classes, scores = jnp.asarray(masks), jnp.asarray(classes), jnp.asarray(scores)
    num = masks.shape[0]
    order = _descending_order(scores)
    ious = mask_iou(masks[order], masks[order])  # [N, N]
    sorted_classes = classes[order]
    above = jnp.triu(jnp.ones((num, num), bool), k=1)  # i ranks above j
    same_class = sorted_classes[:, None] == sorted_classes[None, :]
    decay_iou = jnp.where(above & same_class, ious, 0.0)
    compensate = decay_iou.max(axis=0)[:, None]  # [N, 1], comp_i for row i
    if kernel == "gaussian":
        decay = jnp.exp(-sigma * (decay_iou**2 - compensate**2))
    elif kernel == "linear":
        decay = (1.0 - decay_iou) / jnp.maximum(1.0 - compensate, 1e-6)
    else:
        raise ValueError(f"matrix_nms kernel must be 'gaussian' or 'linear', got {kernel!r}")
    coefficient = decay.min(axis=0)  # [N]
    decayed_sorted = scores[order] * coefficient
    return jnp.zeros_like(scores).at[order].set(decayed_sorted)


def fast_nms(
    boxes_or_masks: jnp.ndarray,
    scores: jnp.ndarray,
    iou_threshold: float,
    max_output: int,
    classes: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """YOLACT's Fast NMS over boxes[N, 4] or masks[N, H, W].

    A candidate is dropped when its IoU with any higher-scoring candidate (of its class, when
    classes int32[N] is given) is > iou_threshold, whether or not that one was itself dropped:
    one matrix operation instead of a sequential loop, slightly more aggressive than greedy.

    Returns (indices int32[max_output], count int32) as `nms` does.
    """
    boxes_or_masks, scores = jnp.asarray(boxes_or_masks), jnp.asarray(scores)
    num = scores.shape[0]
    order = _descending_order(scores)
    items = boxes_or_masks[order]
    if boxes_or_masks.ndim == 2 and boxes_or_masks.shape[-1] == 4:
        ious = box_iou(items, items)
    elif boxes_or_masks.ndim == 3:
        ious = mask_iou(items, items)
    else:
        raise ValueError(f"fast_nms takes boxes[N,4] or masks[N,H,W], got {boxes_or_masks.shape}")
    above = jnp.triu(jnp.ones((num, num), bool), k=1)
    if classes is not None:
        sorted_classes = jnp.asarray(classes)[order]
        above = above & (sorted_classes[:, None] == sorted_classes[None, :])
    max_iou = jnp.where(above, ious, 0.0).max(axis=0)  # [N]
    keep = max_iou <= iou_threshold
    # Kept boxes first, still in score order; the rest fall behind and are cut by the count.
    rank = jnp.where(keep, jnp.arange(num), num + jnp.arange(num))
    slots = order[jnp.argsort(rank)]
    count = jnp.minimum(keep.sum(), max_output).astype(jnp.int32)
    if num < max_output:
        slots = jnp.concatenate([slots, jnp.full((max_output - num,), -1, jnp.int32)])
    slots = slots[:max_output]
    return jnp.where(jnp.arange(max_output) < count, slots, -1), count


def per_class_fast_nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    top_k: int,
    iou_threshold: float,
    score_threshold: float,
    max_output: int,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """YOLACT's test-time selection: Fast NMS in each class, then the best over all classes.

    boxes float32[M, 4] candidates shared by every class, scores float32[M, C]. Per class, the
    top_k candidates by score (ties: lower index first); one is dropped when its IoU with a
    higher-scoring one of the top_k is > iou_threshold (whether or not that one was dropped)
    or when its score is <= score_threshold (after the suppression, as mmdetection's
    fast_nms); the kept (candidate, class) pairs of all classes, best first, fill max_output.

    Returns (candidate indices int32[max_output], classes int32[max_output],
    scores float32[max_output], valid bool[max_output]); invalid slots hold index 0, class 0,
    score 0.
    """
    m, c = scores.shape
    k = min(top_k, m)
    top, index = topk.top_k(scores.T, k)  # [C, k], each class's best candidates
    candidates = boxes[index]  # [C, k, 4]
    ious = jax.vmap(box_iou)(candidates, candidates)  # [C, k, k]
    above = jnp.triu(jnp.ones((k, k), bool), k=1)  # row i ranks above column j
    max_iou = jnp.where(above[None], ious, 0.0).max(axis=1)  # [C, k]
    keep = (max_iou <= iou_threshold) & (top > score_threshold)
    flat = jnp.where(keep, top, -1.0).reshape(c * k)
    n = min(max_output, c * k)
    best, slot = topk.top_k(flat, n)
    valid = best >= 0
    pad = max_output - n
    return (
        jnp.pad(jnp.where(valid, index.reshape(-1)[slot], 0), (0, pad)).astype(jnp.int32),
        jnp.pad(jnp.where(valid, slot // k, 0), (0, pad)).astype(jnp.int32),
        jnp.pad(jnp.where(valid, best, 0.0), (0, pad)),
        jnp.pad(valid, (0, pad)),
    )
