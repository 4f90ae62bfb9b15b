"""Pure, parameter-free, static-shape ops: boxes, anchors, RoIAlign, NMS, masks, matching, losses.

Every op is plain ``jnp``, traceable under ``jit``, ``vmap`` and ``grad``, float32, with shapes
given in its docstring as ``dtype[dims] meaning``.
"""

from instseg_jax.ops.anchors import (
    cell_anchors,
    grid_anchors,
    level_shapes,
    multilevel_anchors,
    torchvision_anchors,
)
from instseg_jax.ops.assign import match, sample_balanced
from instseg_jax.ops.boxes import (
    box_area,
    box_ioa,
    box_iou,
    canvas_to_original_boxes,
    clip_boxes,
    cxcywh_to_xyxy,
    decode_boxes,
    encode_boxes,
    generalized_box_iou,
    original_detection_boxes,
    paired_box_iou,
    paired_generalized_box_iou,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)
from instseg_jax.ops.losses import (
    binary_cross_entropy_with_logits,
    dice_loss,
    giou_loss,
    group_normalizer_scale,
    probability_logit,
    sigmoid_focal_loss,
    smooth_l1_loss,
)
from instseg_jax.ops.masks import (
    crop_and_resize_masks,
    mask_iou,
    mask_targets,
    masks_to_boxes,
    mirror_box_masks,
    paste_mask_probabilities,
    paste_masks,
)
from instseg_jax.ops.nms import batched_nms, fast_nms, matrix_nms, nms, per_class_fast_nms
from instseg_jax.ops.ps_roi_pool import ps_roi_pool
from instseg_jax.ops.roi_align import fpn_level, multilevel_roi_align, roi_align
from instseg_jax.ops.topk import top_k

__all__ = [
    "batched_nms",
    "binary_cross_entropy_with_logits",
    "box_area",
    "box_ioa",
    "box_iou",
    "canvas_to_original_boxes",
    "cell_anchors",
    "clip_boxes",
    "crop_and_resize_masks",
    "cxcywh_to_xyxy",
    "decode_boxes",
    "dice_loss",
    "encode_boxes",
    "fast_nms",
    "fpn_level",
    "generalized_box_iou",
    "giou_loss",
    "grid_anchors",
    "group_normalizer_scale",
    "level_shapes",
    "mask_iou",
    "mask_targets",
    "masks_to_boxes",
    "match",
    "matrix_nms",
    "mirror_box_masks",
    "multilevel_anchors",
    "multilevel_roi_align",
    "nms",
    "original_detection_boxes",
    "paired_box_iou",
    "paired_generalized_box_iou",
    "paste_mask_probabilities",
    "paste_masks",
    "per_class_fast_nms",
    "probability_logit",
    "ps_roi_pool",
    "roi_align",
    "sample_balanced",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "top_k",
    "torchvision_anchors",
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh",
]
