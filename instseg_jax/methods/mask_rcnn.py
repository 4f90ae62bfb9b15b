"""Mask R-CNN (and Faster R-CNN with mask_on=False): the method module (methods/__init__.py).

    outputs = Model(cfg).apply(variables, batch, train=True, key=key)
    loss, metrics = loss_fn(outputs, batch, cfg)

The forward pass is static-shape end to end: per-level top-k and padded NMS for proposals,
sampled anchors and RoIs of fixed counts, RoIAlign by gathers; RoI sampling and target building
run inside the model under stop_gradient and their targets travel in ``outputs``.
Instances beyond input.max_instances arrive as ignore regions (structures.py): anchors and RoIs
mostly inside one are sampled neither as positives nor as negatives.
Defaults follow detectron2's mask_rcnn_R_50_FPN; every one is a config field. One default
does not: RoIAlign takes a fixed 2 x 2 samples per bin (sampling_ratio 2, torchvision's rule)
where detectron2 takes ceil(RoI side / pool size) per axis (POOLER_SAMPLING_RATIO 0); the COCO
recipes built from detectron2's files set sampling_ratio 0, under static shapes (a fixed number
of sample slots per bin axis, the unused ones masked: `ops.roi_align`), exact for RoI sides up
to adaptive_sampling_max_side cells of their level and capped beyond.
Mask targets deviate from detectron2's COCO recipes, which rasterise each ground truth's
polygons inside the RoI at 28 x 28 (INPUT.MASK_FORMAT "polygon", the default; structures/
masks.py rasterize_polygons_within_box): ours pool the ground truth's box crop of
input.mask_size, sampled from the mask rasterised at the original image's resolution, with
mask_target_sampling_ratio samples per bin (COCO recipes: 0, adaptive; default 2, the nuclei
figures'). On COCO-like scenes resized by 5/3 (experiments/parity/mask_target_rules.py) 1.8% of
the cells differ from the polygon rule (the bitmask rule's own difference from it: 1.2%) and
2.0% from the bitmask rule; for RoIs under 32 px 4.4% from the bitmask rule, 0.6% when the crop
is read from the resized image's raster instead: the input pipeline keeps masks, not polygons.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instseg_jax import compilation, ops, structures
from instseg_jax import config as config_lib
from instseg_jax.backbones.fpn import FPN
from instseg_jax.backbones.resnet import normalize
from instseg_jax.methods import roi_heads, rpn
from instseg_jax.methods.detector import DetectorConfig, build_backbone, smoke_backbone

# Mask targets are RoIAligned from box crops of input.mask_size (never full-resolution masks).
INPUTS = structures.Inputs(box_masks=True)


@dataclasses.dataclass(frozen=True)
class MaskRCNNConfig(DetectorConfig):
    canvas_hw: tuple[int, int] = (800, 800)
    mask_on: bool = True
    fpn_channels: int = 256
    anchor_sizes: tuple = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    rpn_pre_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_train: int = 1000
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_threshold: float = 0.7
    rpn_batch_per_image: int = 256
    # Smooth-L1 beta of the RPN and box-head regressions; 0 is L1 (detectron2's
    # MODEL.RPN.SMOOTH_L1_BETA and MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA defaults).
    rpn_smooth_l1_beta: float = 0.0
    box_smooth_l1_beta: float = 0.0
    # What the RPN losses are divided by: "batch" the sampling budget rpn_batch_per_image x
    # images (detectron2), "sampled" the anchors actually sampled (torchvision's preset).
    rpn_loss_normalizer: str = "batch"
    # >= 0: anchors reaching further outside the image take no part in RPN training
    # (Detectron's TRAIN.RPN_STRADDLE_THRESH); detectron2 keeps them all (-1).
    rpn_straddle_threshold: float = -1.0
    rpn_positive_fraction: float = 0.5
    roi_batch_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_iou_threshold: float = 0.5
    box_pool_size: int = 7
    box_fc_dim: int = 1024
    mask_pool_size: int = 14
    # Static mask-head slots per training image, set when training starts (`defaults_from_data`)
    # where not positive: 0 = every positive the RoI sampler can return (roi_batch_per_image x
    # roi_positive_fraction: detectron2 trains the mask head on all of them); -1 = about one
    # per instance, from the training data (`mask_budget_from_data`: a CPU budget). The first
    # slots take the sampled positives, which come in random order, so a budget below the
    # positives trains on a uniform random subset of them (counted in the metrics).
    mask_fg_per_image: int = 0
    mask_head_convs: int = 4
    # RoIAlign samples per bin axis of the box, mask and keypoint poolers; 0 is detectron2's
    # POOLER_SAMPLING_RATIO 0 (its defaults.py, all three heads), ceil(RoI side in cells of its
    # level / pool size) per RoI and axis, which the detectron2-derived COCO recipes use. The
    # default 2 is the cheaper fixed rule (torchvision's, and Detectron's).
    sampling_ratio: int = 2
    # Under sampling_ratio 0: the adaptive rule is exact for RoI sides up to this many cells of
    # their level; each pooler gets ceil(this / its pool size) static sample slots per bin axis
    # (box 7: 6, mask and keypoint 14: 3) and a longer side takes that many. 42 = 1344 / 32,
    # the longest side a P5 RoI can have on a 1344 canvas; an RoI on P2-P4 has sqrt(w h) < 28
    # cells there (the FPN level rule), so only sides of aspect ratio above 2.25 exceed it.
    adaptive_sampling_max_side: int = 42
    # Samples per bin axis with which the 28 x 28 mask targets pool each ground truth's box crop
    # (input.mask_size; ops.mask_targets); 0: adaptive, ceil(RoI side in crop cells / 28). The
    # references rasterise COCO's polygons inside the RoI at 28 x 28 (detectron2's default
    # INPUT.MASK_FORMAT "polygon": structures/masks.py rasterize_polygons_within_box; PANet's
    # lib/utils/segms.py polys_to_mask_wrt_box); from a crop no setting is that rule. 0 is the
    # closest to it and to detectron2's "bitmask" rule (adaptive RoIAlign of the full mask) for
    # RoIs of 32 px and more, as close below (experiments/parity/mask_target_rules.py: 1.84%
    # vs 1.91% of cells differ from the polygon rule, 0.50% vs 0.65% above 256 px): the COCO
    # recipes' value. 2: the rule the nuclei figures were trained with. PointRend's 7 x 7
    # coarse targets always take 0 (pointrend.py).
    mask_target_sampling_ratio: int = 2
    aligned: bool = True
    score_threshold: float = 0.05
    test_pre_nms_topk: int = 0  # 0: every (box, class) pair above the threshold (detectron2)
    test_nms_threshold: float = 0.5
    detections_per_image: int = 100
    # Inference runs the mask head on this many slots when the detections of every image of
    # the batch fit (else on all detections_per_image): two compiled sizes picked on the host.
    # 0 = always all slots.
    test_mask_slots_small: int = 16
    # Conventions that differ between detectron2 (the defaults) and torchvision; the torchvision
    # preset (instseg_jax.weights.torchvision.apply_preset) switches all of them.
    anchor_style: str = "detectron2"  # "torchvision": rounded cell anchors, strides canvas // grid
    level_mapper: str = "detectron2"  # "torchvision": eps 1e-6 added after the log2
    rpn_min_size: float = 0.0  # proposals need w, h > 0 and >= this (torchvision 1e-3)
    test_min_box_size: float = 0.0  # detections need w, h >= this (torchvision 1e-2)
    box_rescale: str = "scale"  # "per_axis": original / resized size per axis (torchvision)
    mask_paste: str = "detectron2"  # host-side paste: "detectron2" or "torchvision"

    COARSEST_LEVEL = ("P5", 32)

    def __post_init__(self):
        super().__post_init__()
        choices = {
            "anchor_style": ("detectron2", "torchvision"),
            "level_mapper": ("detectron2", "torchvision"),
            "box_rescale": ("scale", "per_axis"),
            "mask_paste": ("detectron2", "torchvision"),
            "rpn_loss_normalizer": ("batch", "sampled"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise config_lib.ConfigValueError(
                    f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.mask_target_sampling_ratio < 0:
            raise config_lib.ConfigValueError(
                "model.mask_target_sampling_ratio must be >= 0 (0: adaptive), got "
                f"{self.mask_target_sampling_ratio}"
            )
        if self.sampling_ratio < 0 or self.adaptive_sampling_max_side < 1:
            raise config_lib.ConfigValueError(
                "model.sampling_ratio must be >= 0 (0: adaptive) and "
                "model.adaptive_sampling_max_side >= 1 (feature cells), got "
                f"{self.sampling_ratio} and {self.adaptive_sampling_max_side}"
            )


class MaskRCNN(nn.Module):
    cfg: MaskRCNNConfig

    def setup(self):
        cfg = self.cfg
        self.backbone = build_backbone(cfg)
        self.fpn = FPN(cfg.fpn_channels, cfg.dtype)
        self.rpn_head = rpn.RPNHead(len(cfg.aspect_ratios) * len(cfg.anchor_sizes[0]), cfg.dtype)
        self.setup_box_head()
        if cfg.mask_on:
            self.setup_mask_head()

    def setup_box_head(self):
        """The box head (a subclass with another head replaces this and `pool`)."""
        cfg = self.cfg
        self.box_head = roi_heads.BoxHead(cfg.num_classes, cfg.box_fc_dim, cfg.dtype)

    def setup_mask_head(self):
        """The mask branch's modules (a subclass with another mask head replaces this,
        `mask_training` and `box_masks`)."""
        cfg = self.cfg
        self.mask_head = roi_heads.MaskHead(
            cfg.num_classes, cfg.fpn_channels, cfg.mask_head_convs, cfg.dtype
        )

    def anchors(self):
        cfg = self.cfg
        if cfg.anchor_style == "torchvision":
            return ops.torchvision_anchors(cfg.canvas_hw, cfg.anchor_sizes, cfg.aspect_ratios)
        return ops.multilevel_anchors(
            cfg.canvas_hw, (4, 8, 16, 32, 64), cfg.anchor_sizes, cfg.aspect_ratios
        )

    def pool(self, features, boxes, size: int):
        cfg = self.cfg
        return roi_heads.pool(
            features,
            boxes,
            size,
            cfg.sampling_ratio,
            cfg.aligned,
            cfg.level_mapper,
            roi_heads.adaptive_sampling_slots(cfg.adaptive_sampling_max_side, size),
        )

    def features(self, image):
        """FPN features {"p2".."p6"} of images [B, H, W, 3] in 0-255 RGB, uint8 or float
        (normalised here)."""
        return self.fpn(self.backbone(normalize(image, self.cfg.dtype)))

    def detect(self, features, outputs: dict, batch: dict) -> dict:
        """Detections with masks on all K slots (see `select_detections`)."""
        detections, canvas_boxes = self.select_detections(outputs, batch)
        detections.update(self.payloads(features, canvas_boxes, detections["classes"], batch))
        return detections

    def payloads(self, features, canvas_boxes, classes, batch: dict) -> dict:
        """What the detections carry besides boxes, scores and classes (the masks of the kept
        boxes when mask_on; a subclass adds its own)."""
        if not self.cfg.mask_on:
            return {}
        return {"masks": self.box_masks(features, canvas_boxes, classes, batch.get("flipped"))}

    def detect_boxes(self, batch: dict):
        """Inference up to the kept boxes: (Detections without masks, FPN features, the kept
        boxes on the canvas [B, K, 4]); `box_masks` completes them (make_inference)."""
        features, outputs = self.proposals_and_boxes(batch)
        detections, canvas_boxes = self.select_detections(outputs, batch)
        return detections, {k: features[k] for k in roi_heads.POOLED_LEVELS}, canvas_boxes

    def select_detections(self, outputs: dict, batch: dict):
        """Detections (DESIGN's structure) from the box head's outputs on the proposals.

        Per-class softmax scores above score_threshold, class-specific boxes clipped to the
        image, the top pre_nms_topk (box, class) pairs, class-aware NMS, K = detections_per_image
        kept (valid ones first); masks (added by `detect`) are the mask head's probabilities of
        the kept class in each kept box. Returns the Detections, boxes in original image pixels,
        and the kept boxes on the canvas.
        """
        cfg = self.cfg
        b, p, _ = outputs["class_logits"].shape
        c = cfg.num_classes
        probs = jax.nn.softmax(outputs["class_logits"])[..., :c]  # [B, P, C], no background
        boxes = ops.decode_boxes(
            outputs["box_deltas"], outputs["proposal_boxes"], roi_heads.BOX_WEIGHTS
        )  # [B, P, C, 4]
        hw = batch["image_hw"].astype(jnp.float32)[:, None, None, :]
        boxes = ops.clip_boxes(boxes, hw)
        usable = outputs["proposal_valid"][..., None] & (probs > cfg.score_threshold)
        if cfg.test_min_box_size > 0:
            wh = boxes[..., 2:] - boxes[..., :2]
            usable &= (wh >= cfg.test_min_box_size).all(axis=-1)
        scores = jnp.where(usable, probs, -1.0).reshape(b, p * c)
        boxes = boxes.reshape(b, p * c, 4)
        classes = jnp.tile(jnp.arange(c, dtype=jnp.int32), p)
        k_pre = min(cfg.test_pre_nms_topk or p * c, p * c)  # 0: every (box, class) pair
        k = cfg.detections_per_image

        def one_image(image_scores, image_boxes):
            top, index = ops.top_k(image_scores, k_pre)
            keep, count = ops.batched_nms(
                image_boxes[index], top, classes[index], cfg.test_nms_threshold, k, valid=top > 0
            )
            valid = jnp.arange(k) < count
            chosen = index[jnp.where(valid, keep, 0)]
            return (
                jnp.where(valid[:, None], image_boxes[chosen], 0.0),
                jnp.where(valid, image_scores[chosen], 0.0),
                jnp.where(valid, classes[chosen], 0),
                valid,
            )

        det_boxes, det_scores, det_classes, det_valid = jax.vmap(one_image)(scores, boxes)
        detections = {"scores": det_scores, "classes": det_classes, "valid": det_valid}
        detections["boxes"] = self.original_boxes(det_boxes, det_valid, batch)
        return detections, det_boxes

    def slot_payloads(self, features, canvas_boxes, classes, scores, flipped=None) -> dict:
        """The mask branch's outputs for the kept boxes canvas_boxes[B, S, 4] of classes[B, S]
        and scores[B, S], each [B, S, ...], which replace the detections' own (make_inference's
        second program): the masks here; Mask Scoring R-CNN also rescores."""
        del scores
        return {"masks": self.box_masks(features, canvas_boxes, classes, flipped)}

    def box_masks(self, features, canvas_boxes, classes, flipped=None):
        """[B, S, 28, 28] mask probabilities of classes[B, S] in canvas_boxes[B, S, 4]."""
        cfg = self.cfg
        pooled = self.pool(features, canvas_boxes, cfg.mask_pool_size)  # [B, S, 14, 14, D]
        logits = self.mask_head(pooled)  # [B, S, 28, 28, C]
        chosen = jnp.take_along_axis(logits, classes[:, :, None, None, None], axis=-1)
        masks = jax.nn.sigmoid(chosen[..., 0])
        if flipped is not None:  # a mirrored canvas: masks relative to the unmirrored boxes
            masks = ops.mirror_box_masks(masks, flipped)
        return masks

    def original_boxes(self, det_boxes, det_valid, batch):
        return ops.original_detection_boxes(
            det_boxes, det_valid, batch, per_axis=self.cfg.box_rescale == "per_axis"
        )

    def proposals_and_boxes(self, batch: dict):
        """Inference's features and outputs: proposals and the box head on them."""
        features, outputs = self.proposals(batch, train=False)
        pooled = self.pool(features, outputs["proposal_boxes"], self.cfg.box_pool_size)
        outputs["class_logits"], outputs["box_deltas"] = self.box_head(pooled)
        return features, outputs

    def proposals(self, batch: dict, train: bool):
        cfg = self.cfg
        features = self.features(batch["image"])
        logits, deltas = self.rpn_head(features)  # [B, T], [B, T, 4]
        outputs = rpn.proposal_outputs(
            logits, deltas, self.anchors(), batch["image_hw"], cfg, train
        )
        return features, outputs

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        cfg = self.cfg
        if not train:
            features, outputs = self.proposals_and_boxes(batch)
            outputs["detections"] = self.detect(features, outputs, batch)
            return outputs
        features, outputs = self.proposals(batch, train=True)
        proposal_boxes, proposal_valid = outputs["proposal_boxes"], outputs["proposal_valid"]
        if cfg.mask_on and cfg.mask_fg_per_image <= 0:
            raise config_lib.ConfigValueError(
                f"model.mask_fg_per_image is {cfg.mask_fg_per_image} (set when `instseg-jax "
                "train` starts); outside the trainer give it a positive number of mask RoIs"
            )
        if key is None:
            raise ValueError("training needs a key for anchor and RoI sampling")
        anchor_key, roi_key = jax.random.split(key)
        outputs.update(
            rpn.anchor_target_outputs(jnp.concatenate(self.anchors()), batch, cfg, anchor_key)
        )
        rois = roi_heads.sample_rois(
            proposal_boxes,
            proposal_valid,
            batch["gt_boxes"],
            batch["gt_classes"],
            batch["gt_valid"],
            roi_key,
            cfg.roi_batch_per_image,
            cfg.roi_positive_fraction,
            cfg.roi_iou_threshold,
            cfg.num_classes,
            ignore_boxes=batch.get("ignore_boxes"),
            ignore_valid=batch.get("ignore_valid"),
        )
        pooled = self.pool(features, rois["boxes"], cfg.box_pool_size)  # [B, R, 7, 7, D]
        outputs["class_logits"], outputs["box_deltas"] = self.box_head(pooled)
        outputs["rois"] = rois
        outputs.update(self.head_training(features, outputs, batch, key))
        return outputs

    def head_training(self, features, outputs: dict, batch: dict, key) -> dict:
        """The training outputs of the heads after the box head (the mask branch when
        mask_on; a subclass adds its own)."""
        return self.mask_training(features, outputs, batch, key) if self.cfg.mask_on else {}

    def mask_training(self, features, outputs: dict, batch: dict, key) -> dict:
        """The mask branch's training outputs on the first mask_fg_per_image sampled RoIs
        (their logits, targets and validity; `key` is the step's, for heads that sample)."""
        del key
        cfg = self.cfg
        fg = cfg.mask_fg_per_image
        rois = outputs["rois"]
        mask_pooled = self.pool(
            features, rois["boxes"][:, :fg], cfg.mask_pool_size
        )  # [B, F, 14, 14, D]
        targets, valid = self.mask_head_targets(batch, rois)
        return {
            "mask_logits": self.mask_head(mask_pooled),  # [B, F, 28, 28, C]
            "mask_targets": targets,
            "mask_valid": valid,
        }

    def mask_head_targets(self, batch: dict, rois: dict):
        """(float32[B, F, 28, 28] targets, bool[B, F] valid) of the first F =
        mask_fg_per_image `rois` (ops.mask_targets at the mask head's output size)."""
        cfg = self.cfg
        return ops.mask_targets(
            batch["gt_masks"],
            batch["gt_boxes"],
            rois,
            cfg.mask_fg_per_image,
            2 * cfg.mask_pool_size,
            cfg.mask_target_sampling_ratio,
        )


def mask_head_losses(outputs: dict, cfg: MaskRCNNConfig) -> dict:
    """Mask R-CNN's mask loss: per-pixel BCE of the 28x28 logits of the ground-truth class."""
    fg = cfg.mask_fg_per_image
    return {
        "loss_mask": roi_heads.mask_loss(
            outputs["mask_logits"],
            outputs["rois"]["classes"][:, :fg],
            outputs["mask_targets"],
            outputs["mask_valid"],
        )
    }


def loss_fn(
    outputs: dict, batch: dict, cfg: MaskRCNNConfig, mask_losses=mask_head_losses
) -> tuple[jnp.ndarray, dict]:
    """Total loss and metrics (each loss term, RoI classification accuracy); `mask_losses`
    (outputs, cfg) -> {name: loss} is the mask branch's part (a method with another mask head
    passes its own)."""
    del batch  # every target was built inside the model
    losses = rpn.output_losses(outputs, cfg, cfg.rpn_loss_normalizer)
    box, metrics = roi_heads.box_losses(
        outputs["class_logits"], outputs["box_deltas"], outputs["rois"], beta=cfg.box_smooth_l1_beta
    )
    losses.update(box)
    if cfg.mask_on:
        losses.update(mask_losses(outputs, cfg))
    total = sum(losses.values())
    metrics.update(losses)
    num_fg = jnp.sum(outputs["rois"]["foreground"], axis=1).astype(jnp.float32)  # [B]
    metrics["num_fg_rois"] = jnp.mean(num_fg)
    if cfg.mask_on:  # foreground RoIs the mask head's static budget of slots left out
        over = jnp.maximum(num_fg - cfg.mask_fg_per_image, 0.0)
        metrics["mask_rois_over_budget"] = jnp.mean(over)
        metrics["mask_rois_over_budget_fraction"] = jnp.sum(over) / jnp.maximum(jnp.sum(num_fg), 1)
    return total, metrics


# ----------------------------------------------------------------------------- method interface

Config = MaskRCNNConfig
Model = MaskRCNN


MASK_BUDGET_QUANTILE = 0.95


def mask_budget_from_data(instances_per_image, roi_batch_per_image: int, positive_fraction: float):
    """The training mask budget's documented rule: the 95th percentile of instances per
    training image (after input.max_instances), rounded up to a multiple of 8, at least 8 and
    at most the positives a sampled RoI batch can hold (roi_batch_per_image x
    positive_fraction). About one mask RoI per instance in 95% of images; the positives
    beyond it are counted in the metrics (mask_rois_over_budget, ..._fraction)."""
    cap = max(int(roi_batch_per_image * positive_fraction), 1)
    counts = np.asarray(instances_per_image, np.float64)
    quantile = float(np.quantile(counts, MASK_BUDGET_QUANTILE)) if counts.size else cap
    return int(min(max(8 * math.ceil(quantile / 8), 8), cap))


def head_budget(model: ml_collections.ConfigDict, field: str, instances_per_image) -> list[str]:
    """Set model.<field> (a head's training slots per image) where it is not positive: 0 = every
    positive the RoI sampler can return, -1 = mask_budget_from_data's rule; returns the log
    line (or nothing when the config set a number)."""
    chosen = model[field]
    if chosen > 0:
        return []
    if chosen not in (0, -1):
        raise config_lib.ConfigValueError(
            f"model.{field} = {chosen}: give a number of RoIs, 0 (every sampled positive) or -1 "
            "(from the training data's instances per image)"
        )
    every_positive = max(int(model.roi_batch_per_image * model.roi_positive_fraction), 1)
    if chosen == 0:
        model[field] = every_positive
        return [
            f"model.{field} = {every_positive} RoIs per image: every positive the sampler can "
            f"return (roi_batch_per_image x roi_positive_fraction); -1 sizes it from the data"
        ]
    model[field] = mask_budget_from_data(
        instances_per_image, model.roi_batch_per_image, model.roi_positive_fraction
    )
    counts = np.asarray(instances_per_image)
    return [
        f"model.{field} = {model[field]} RoIs per image, from the data: 95th percentile of "
        f"instances per training image "
        f"{np.quantile(counts, MASK_BUDGET_QUANTILE) if counts.size else 0:.0f} (median "
        f"{np.median(counts) if counts.size else 0:.0f}, max {counts.max() if counts.size else 0},"
        f" {counts.size} images); positives beyond it are a random subset left out (counted in "
        f"the metrics, {every_positive} would take them all)"
    ]


def defaults_from_data(config: ml_collections.ConfigDict, instances_per_image) -> list[str]:
    """Fill the config fields left to the training data (method interface, optional); returns
    what was chosen, for the log."""
    m = config.model
    if not m.get("mask_on", True):
        return []
    return head_budget(m, "mask_fg_per_image", instances_per_image)


# An anchor is a positive for an object from IoU 0.7 (rpn.py's thresholds): a square object
# within sqrt(0.7) of a square anchor's side reaches it.
_POSITIVE_SIDE_RATIO = math.sqrt(0.7)


def object_sizes_covered(model: ml_collections.ConfigDict) -> tuple[str, float, float]:
    """(the field, smallest and largest object side, sqrt of box area in canvas pixels, that
    the anchors match at the RPN's positive IoU) (method interface, optional)."""
    sides = [float(s) for level in model.anchor_sizes for s in np.atleast_1d(level)]
    ratio = _POSITIVE_SIDE_RATIO
    return "model.anchor_sizes", min(sides) * ratio, max(sides) / ratio


def with_slot_payloads(slot_payloads, detections: dict, canvas_boxes, flipped) -> dict:
    """detections updated with slot_payloads(canvas_boxes, classes, scores, flipped) of their
    own classes and scores (a model's `slot_payloads`, bound to its features; make_inference's
    and Mask Scoring R-CNN's detect)."""
    detections.update(
        slot_payloads(canvas_boxes, detections["classes"], detections["scores"], flipped)
    )
    return detections


def make_inference(model: MaskRCNN):
    """(variables, device batch) -> Detections, with the mask head on a budget that fits.

    Two jitted programs: boxes (backbone to NMS), then the mask branch (the model's
    `slot_payloads`: masks, and Mask Scoring R-CNN's rescored scores) on the first S slots,
    S = test_mask_slots_small when every image's detections fit in it (read on the host:
    valid detections are a prefix of the K slots), else all K. The masks of the valid slots
    are those of the one-program forward; slots beyond S hold zeros (they are not valid).
    """
    cfg = model.cfg
    k = cfg.detections_per_image

    model_class = type(model)  # a subclass's own box_masks (PointRend) or slot_payloads

    def boxes_fn(variables, batch):
        return model.apply(variables, batch, method=model_class.detect_boxes)

    boxes = compilation.jit(boxes_fn)

    @functools.cache
    def masks(slots: int):
        def masks_fn(variables, features, canvas_boxes, classes, scores, flipped):
            out = model.apply(
                variables,
                features,
                canvas_boxes[:, :slots],
                classes[:, :slots],
                scores[:, :slots],
                flipped,
                method=model_class.slot_payloads,
            )
            return {
                name: jnp.pad(value, ((0, 0), (0, k - slots)) + ((0, 0),) * (value.ndim - 2))
                for name, value in out.items()
            }

        return compilation.jit(masks_fn)

    budgets = sorted({s for s in (cfg.test_mask_slots_small, k) if 0 < s <= k})

    def infer(variables, batch):
        detections, features, canvas_boxes = boxes(variables, batch)
        if not cfg.mask_on:
            return detections
        count = int(np.max(np.sum(np.asarray(detections["valid"]), axis=1), initial=0))
        slots = next(s for s in budgets if s >= count)
        return with_slot_payloads(
            functools.partial(masks(slots), variables, features),
            detections,
            canvas_boxes,
            batch.get("flipped"),
        )

    return infer


def base_config() -> ml_collections.ConfigDict:
    """detectron2's Mask R-CNN R50-FPN 1x defaults; experiments start from here."""
    c = config_lib.base()
    c.method = "mask_rcnn"
    c.model = config_lib.model_section(MaskRCNNConfig)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a Mask R-CNN config to seconds on a CPU: synthetic scenes, ResNet-18 of width 16,
    a 128x128 canvas, few anchors and RoIs."""
    c = config_lib.smoke_common(c)
    m = c.model
    smoke_backbone(m)
    m.fpn_channels = 32
    m.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
    m.rpn_pre_nms_topk_train = 200
    m.rpn_pre_nms_topk_test = 100
    m.rpn_post_nms_topk_train = 64
    m.rpn_post_nms_topk_test = 50
    m.rpn_batch_per_image = 64
    m.roi_batch_per_image = 32
    m.box_fc_dim = 64
    m.mask_fg_per_image = 8
    m.mask_head_convs = 1
    m.detections_per_image = 100
    return c
