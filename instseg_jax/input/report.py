"""Counts of bad or trimmed input, gathered per example and summarised per epoch.

Every example carries an int32 vector of these counts through the workers; the pipeline sums
them on the host, so nothing is dropped without being counted and reported.
"""

from __future__ import annotations

import numpy as np

ISSUE_KINDS = (
    "unreadable_image",  # decode failed or file truncated: the example was replaced (skipped)
    "zero_area_annotation",  # bbox or segmentation of zero area: annotation dropped
    "clipped_annotation",  # bbox reaching outside the image: clipped to it
    "empty_mask",  # segmentation with no pixel inside the image (e.g. polygon outside): dropped
    "crowd_dropped",  # crowd instances left out of training targets
    "crowd_only_image",  # training image whose only instances are crowd: no targets left
    "degenerate_box",  # box under 1 px after resize / crop: dropped
    "image_over_instance_limit",  # images with more than N instances (N largest kept)
    "instances_over_limit",  # instances dropped by that limit: their boxes become ignore regions
    # Kinds added later go last: saved iterator states keep their meaning (see resized).
    "image_size_mismatch",  # image size differs from the annotation file's: example skipped
    "bad_segmentation",  # RLE of another size, counts not covering the image: example skipped
    # annotation without bbox, or whose bbox has zero or negative width or height: its box is
    # its mask's (kept)
    "bbox_from_mask",
    # instances dropped by input.max_instances beyond the input.max_ignore_regions slots (the
    # smallest): no ignore region, so they count as background
    "ignore_regions_over_limit",
    # panoptic PNG segment ids that its segments_info does not list: read as void
    "unlisted_panoptic_segment",
    # instances that copy-paste's pasted objects covered, whole or but for fewer than
    # input.copy_paste_min_area pixels: dropped (input/copy_paste.py)
    "copy_paste_occluded",
    # copy-paste partners that could not be read: that example was not pasted on
    "copy_paste_partner_unusable",
    # instances (crowd regions included) whose box centre fell outside the min-IoU random
    # crop's window (input.min_iou_crop, input/ssd_augment.py): dropped
    "min_iou_crop_dropped",
    # instances that input.instance_filter drops (PolarMask's coco_seg.py rule: mask of 15
    # pixels or fewer, or box under 10 px on both sides), training only
    "small_instance_dropped",
    # contours of more points than the method's fixed maximum: kept on a coarser grid
    # (input/contours.py grid_subsample)
    "contour_subsampled",
)
_INDEX = {kind: i for i, kind in enumerate(ISSUE_KINDS)}


def new_counts() -> np.ndarray:
    return np.zeros(len(ISSUE_KINDS), np.int32)


def resized(counts) -> np.ndarray:
    """Counts saved when ISSUE_KINDS was shorter (an older checkpoint), padded with zeros."""
    counts = np.asarray(counts, np.int32)
    return np.concatenate([counts, new_counts()[len(counts) :]])


def count(counts: np.ndarray, kind: str, amount: int = 1) -> None:
    counts[_INDEX[kind]] += amount


def summary(counts: np.ndarray) -> str:
    """One line naming every non-zero count, or 'no data issues'."""
    parts = [f"{kind}={int(n)}" for kind, n in zip(ISSUE_KINDS, counts, strict=True) if n]
    return ", ".join(parts) if parts else "no data issues"


def as_dict(counts: np.ndarray) -> dict[str, int]:
    return {kind: int(n) for kind, n in zip(ISSUE_KINDS, counts, strict=True)}
