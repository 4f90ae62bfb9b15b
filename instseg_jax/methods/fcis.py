"""FCIS: fully convolutional instance-aware semantic segmentation (Li, Qi, Dai, Ji, Wei, CVPR
2017), the method module (methods/__init__.py).

    outputs = Model(cfg).apply(variables, batch, train=True, key=key)
    loss, metrics = loss_fn(outputs, batch, cfg)

Reference: msracver/FCIS (MXNet). What is built, and where it comes from:

- Trunk (fcis/symbols/resnet_v1_101_fcis.py get_resnet_v1_conv4 / conv5): a ResNet whose res5
  keeps stride 16 with its 3x3 convolutions dilated by 2 (backbones/resnet.py res5_dilation),
  FrozenBN, conv1 and res2 frozen (FIXED_PARAMS).
- RPN on res4 (get_rpn): 3x3 conv of 512 + ReLU, 12 anchors per cell (sizes 64..512 = 16 x
  ANCHOR_SCALES, ratios 0.5, 1, 2), 256 sampled anchors half positive at IoU 0.7 / 0.3,
  anchors crossing the image border left out (RPN_ALLOWED_BORDER 0), smooth L1 of sigma 3
  (beta 1/9); proposals through rpn.proposals (top 6000, NMS 0.7, 300 kept).
- Score maps (get_symbol): a 1x1 conv of 1024 + ReLU on res5 (conv_new_1), then 1x1 convs to
  k^2 x 2 (C + 1) position-sensitive inside/outside score maps (fcis_cls_seg) and k^2 x 4 box
  maps (fcis_bbox), k = 7, initialised N(0, 0.01) with zero biases (init_weight).
- Assembling: ops.ps_roi_pool (MXNet's PSROIPooling rule, group 7, pooled 21, scale 1/16) of
  each RoI into 21 x 21 inside/outside logit pairs per class; the class logits are the mean over
  the RoI's 21 x 21 bins of max(inside, outside) per class (ChannelOperator Group_Max, then a
  global average pool), softmax over C + 1; the mask is the softmax over (outside, inside) of
  the RoI's class; class-agnostic box deltas are the mean of the pooled box maps.
- RoIs (operator_py/proposal_annotator.py with BATCH_ROIS -1): every proposal and every ground
  truth, foreground at IoU >= 0.5 (the class of the best-overlapping ground truth), background
  below; box targets encoded with weights 1 / BBOX_STDS = (5, 5, 2, 2); mask targets: the
  ground truth's mask inside the RoI at 21 x 21, thresholded at 0.4 (BINARY_THRESH), only for
  foreground RoIs (background RoIs' masks are ignored, label -1).
- OHEM (operator_py/box_annotator_ohem.py): per RoI, loss = cls CE + 10 x (mean over the 441
  cells of the mask CE, 0 for background) + 1 x (smooth L1 summed over the 4 deltas,
  foreground only); the top BATCH_ROIS_OHEM = 128 RoIs of each image by that loss train, the
  rest are ignored. The losses (the SoftmaxOutput / MakeLoss heads of get_symbol): class CE
  over the kept RoIs divided by their count (normalization 'valid'); mask CE summed over kept
  foreground RoIs of the per-RoI mean over cells (MXNet's multi_output 'null' normalisation
  divides by the 441 cells), times 10 / 128; box smooth L1 (sigma 1) times 1 / 128. Per image
  there, and the reference sums 8 GPUs' gradients of one image each: here the per-image
  normalisers become the batch's (128 x images), so the recipe's lr is 8 x the reference's.
- Test (fcis/core/tester.py im_detect, TEST.ITER 2): the 300 proposals are scored, their boxes
  regressed (class-agnostic, clipped) and the regressed boxes scored again; both sets of 300 are
  candidates, each with its own class probabilities and masks, and the boxes reported are the
  candidate boxes themselves (the reference never applies the second regression); boxes under
  2 px are dropped (MIN_DROP_SIZE); per class scores above 0.001, NMS at 0.3, K kept.
- Mask voting (TEST.USE_MASK_MERGE, true in the COCO recipe; model.test_mask_voting;
  lib/mask/mask_transform.py cpu_mask_voting / mask_aggregation and gpu_mask_voting with
  lib/mask/mv_kernel.cu, the one the recipe runs): for each kept detection of class c, every
  candidate (all 2 x P, whatever their score) at box IoU >= 0.5 with it (MASK_MERGE_THRESH)
  votes with weight its probability of c, the weights normalised to sum 1; each voter's mask,
  resampled into its box (bilinear, edge cells held), is binarised at 0.4 (BINARY_THRESH) and
  the weighted votes summed; the detection's box becomes the tight box of the sum >= 0.4, its
  mask the sum resampled into that box at S x S; its score stays. A detection whose sum
  reaches 0.4 nowhere is dropped (the GPU path drops the boxes it leaves degenerate).

Deviations (static shapes, the library's conventions, and what is not built):
- Mask voting sums the votes on a grid of test_mask_voting_grid^2 cells spanning the union of
  the voters' boxes, not on the image's pixels, so the voted box and mask are resolved to a cell
  (1/64 of that union at the default; below a pixel for boxes under 64 px); the voters' boxes
  are not rounded to pixels. Only the test_mask_voters heaviest voters vote (their weights
  normalised among themselves), the reference every candidate at IoU >= 0.5 however light.
  The voters' masks are of the kept detection's class (below). The merged mask's resampling
  follows the GPU kernel (mask_resize: bilinear on the whole map, reading the cells just
  beyond the tight box), where the CPU path's cv2.resize of the crop holds the crop's edge
  cells.
- The host-side paste cuts each box-relative mask at mask_paste_threshold 0.4, the reference's
  BINARY_THRESH (lib/utils/mask_voc2coco.py mask_voc2coco, line 51: pred_mask >=
  binary_thresh), so a voted pixel where 40-50% of the weight voted inside is kept as there; the
  mask is resampled bilinearly into the unrounded box at pixel centres (detections.py), where
  the reference cv2.resizes it to the rounded box's pixels, both ends included, holding its
  edge cells where ours fades out across the box border.
- The kept detection's mask is that of its class; the reference's test graph picks the mask of
  the RoI's highest-scoring class (Group_Pick Score_Pick) for every class's detection of it
  (and for every vote it casts).
- conv_new_1 learns at 3x the rate in the reference (CONVNEW3, lr_mult 3); here every
  parameter takes the optimizer's rate.
- The RPN predicts one objectness logit per anchor (BCE), the reference a 2-way softmax; both
  RPN losses are divided by 256 x images (the reference divides the class loss by the sampled
  anchors, the same unless an image has fewer than 256 to sample). Anchors are detectron2's
  (centred on cell corners, exact sizes), not the reference's rounded ones centred at 7.5.
- Mask targets pool the ground truth's box crop (input.mask_size) with RoIAlign inside the RoI
  (ops.mask_targets at threshold 0.4), where the reference resizes the full-resolution mask's
  crop with cv2 at rounded pixel boxes.
- Static shapes: every image has P + N RoIs (padding proposals and ground-truth slots invalid),
  OHEM takes the top ohem_rois valid ones (an image with fewer keeps them all).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from instseg_jax import config as config_lib
from instseg_jax import ops, structures
from instseg_jax.backbones.resnet import ResNet, normalize
from instseg_jax.methods import roi_heads, rpn
from instseg_jax.methods.detector import DetectorConfig, smoke_backbone
from instseg_jax.nn.layers import Conv, Dense

# Mask targets are RoIAligned from box crops of input.mask_size (never full-resolution masks).
INPUTS = structures.Inputs(box_masks=True)

STRIDE = 16  # res4 and the dilated res5


@dataclasses.dataclass(frozen=True)
class FCISConfig(DetectorConfig):
    canvas_hw: tuple[int, int] = (1008, 1008)
    # res5's 3x3 convolutions dilated by this, at stride 16 (get_resnet_v1_conv5: dilate 2).
    res5_dilation: int = 2
    # One anchor level at stride 16: 16 x ANCHOR_SCALES (4, 8, 16, 32), ANCHOR_RATIOS.
    anchor_sizes: tuple = (64.0, 128.0, 256.0, 512.0)
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    rpn_channels: int = 512
    rpn_pre_nms_topk_train: int = 6000
    rpn_post_nms_topk_train: int = 300
    rpn_pre_nms_topk_test: int = 6000
    rpn_post_nms_topk_test: int = 300
    rpn_nms_threshold: float = 0.7
    rpn_min_size: float = 2.0  # RPN_MIN_SIZE (the reference's is in original-image pixels)
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_smooth_l1_beta: float = 1.0 / 9.0  # smooth_l1 scalar (sigma) 3: beta = 1 / sigma^2
    rpn_straddle_threshold: float = 0.0  # RPN_ALLOWED_BORDER 0 (-1: keep every anchor)
    head_channels: int = 1024  # conv_new_1
    ps_group_size: int = 7  # k: position groups per RoI side
    mask_size: int = 21  # PSROIPooling pooled_size and MASK_SIZE
    roi_iou_threshold: float = 0.5  # FG_THRESH and BG_THRESH_HI
    mask_threshold: float = 0.4  # BINARY_THRESH of the mask targets
    # Samples per bin axis of the mask targets' RoIAlign of the box crop (ops.mask_targets).
    mask_target_sampling_ratio: int = 2
    ohem_rois: int = 128  # BATCH_ROIS_OHEM: RoIs per image that train, the hardest
    # TRAIN.LOSS_WEIGHT: class, mask, box.
    cls_loss_weight: float = 1.0
    mask_loss_weight: float = 10.0
    box_loss_weight: float = 1.0
    box_weights: tuple = (5.0, 5.0, 2.0, 2.0)  # 1 / BBOX_STDS (0.2, 0.2, 0.5, 0.5)
    box_smooth_l1_beta: float = 1.0  # smooth_l1 scalar 1
    # TEST.ITER 2: also score the regressed proposals (2 x P candidates).
    test_box_refinement: bool = True
    test_min_box_size: float = 2.0  # TEST.MIN_DROP_SIZE
    score_threshold: float = 1e-3  # pred_eval's thresh
    test_nms_threshold: float = 0.3  # TEST.NMS
    detections_per_image: int = 100
    # TEST.USE_MASK_MERGE (true in the COCO recipe): each kept detection's box and mask become
    # the vote of the candidates overlapping it (mask_voting); False: its own box and mask.
    test_mask_voting: bool = True
    test_mask_merge_threshold: float = 0.5  # TEST.MASK_MERGE_THRESH: a voter's box IoU, at least
    test_mask_binary_threshold: float = 0.4  # BINARY_THRESH: the voters' masks and the vote's cut
    test_mask_voters: int = 32  # the highest-weighted voters per detection (static shapes)
    # Cells per side of the grid the votes are summed on, spanning the voters' boxes (the
    # reference sums them on the image's pixels).
    test_mask_voting_grid: int = 64
    # Where the host-side paste cuts each pasted mask (builders.mask_paste; the library's
    # default is 0.5): BINARY_THRESH 0.4 (fcis/config/config.py line 27), applied as
    # pred_mask >= binary_thresh in lib/utils/mask_voc2coco.py mask_voc2coco (line 51).
    mask_paste_threshold: float = 0.4

    COARSEST_LEVEL = ("res5", STRIDE)

    def __post_init__(self):
        super().__post_init__()
        if self.mask_size < self.ps_group_size or self.ps_group_size < 1:
            raise config_lib.ConfigValueError(
                f"model.mask_size ({self.mask_size}) must be >= model.ps_group_size "
                f"({self.ps_group_size}) >= 1: each output bin reads one position group"
            )
        if self.res5_dilation != 2:
            raise config_lib.ConfigValueError(
                f"model.res5_dilation is {self.res5_dilation}: FCIS reads its score maps at "
                "stride 16, from res5 dilated by 2 (get_resnet_v1_conv5); use 2"
            )
        if self.ohem_rois < 1:
            raise config_lib.ConfigValueError(
                f"model.ohem_rois must be >= 1 (RoIs per image that train), got {self.ohem_rois}"
            )
        if self.test_mask_voters < 1 or self.test_mask_voting_grid < 2:
            raise config_lib.ConfigValueError(
                f"model.test_mask_voters ({self.test_mask_voters}) must be >= 1 and "
                f"model.test_mask_voting_grid ({self.test_mask_voting_grid}) >= 2 (mask voting)"
            )
        for name in (
            "test_mask_merge_threshold",
            "test_mask_binary_threshold",
            "mask_paste_threshold",
        ):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise config_lib.ConfigValueError(
                    f"model.{name} must be in (0, 1], got {getattr(self, name)}"
                )


class RPNHead(nn.Module):
    """get_rpn: 3x3 conv + ReLU on res4, per-anchor objectness and deltas (1x1 convolutions
    written as Dense layers over channels, as rpn.RPNHead does)."""

    num_anchors: int
    channels: int = 512
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x [B, h, w, D] -> objectness float32[B, h*w*A], deltas float32[B, h*w*A, 4]."""
        init = nn.initializers.normal(0.01)
        b = x.shape[0]
        x = Conv(
            self.channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            kernel_init=init,
            name="conv",
        )(x)
        x = nn.relu(x)
        logits = Dense(self.num_anchors, dtype=self.dtype, kernel_init=init, name="objectness")
        deltas = Dense(self.num_anchors * 4, dtype=self.dtype, kernel_init=init, name="deltas")
        return (
            logits(x).reshape(b, -1).astype(jnp.float32),  # (y, x, anchor) order
            deltas(x).reshape(b, -1, 4).astype(jnp.float32),
        )


class ScoreMaps(nn.Module):
    """conv_new_1 (1x1, 1024, ReLU), then the position-sensitive inside/outside score maps
    [B, h, w, k^2 (C+1) 2] and box maps [B, h, w, k^2 4] (position-major channels:
    ops.ps_roi_pool; within a group, class c's (outside, inside) at 2c, 2c + 1, background
    c = C)."""

    num_classes: int
    group_size: int = 7
    channels: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.01)
        k2 = self.group_size**2
        x = nn.relu(Dense(self.channels, dtype=self.dtype, kernel_init=init, name="conv_new_1")(x))
        cls_seg = Dense(
            k2 * (self.num_classes + 1) * 2, dtype=self.dtype, kernel_init=init, name="cls_seg"
        )(x)
        box = Dense(k2 * 4, dtype=self.dtype, kernel_init=init, name="bbox")(x)
        return cls_seg, box


class FCIS(nn.Module):
    cfg: FCISConfig

    def setup(self):
        cfg = self.cfg
        self.backbone = ResNet(
            cfg.depth,
            cfg.width,
            cfg.norm,
            cfg.freeze_at,
            cfg.dtype,
            tuple(cfg.stage_blocks),
            res5_dilation=cfg.res5_dilation,
        )
        self.rpn_head = RPNHead(
            len(cfg.anchor_sizes) * len(cfg.aspect_ratios), cfg.rpn_channels, cfg.dtype
        )
        self.score_maps = ScoreMaps(
            cfg.num_classes, cfg.ps_group_size, cfg.head_channels, cfg.dtype
        )

    def anchors(self):
        cfg = self.cfg
        return ops.multilevel_anchors(
            cfg.canvas_hw, (STRIDE,), (tuple(cfg.anchor_sizes),), tuple(cfg.aspect_ratios)
        )

    def assemble(self, maps, boxes):
        """The RoIs' heads from the score maps (cls_seg, box) at boxes[B, R, 4]: class logits
        float32[B, R, C+1], mask logit pairs float32[B, R, S, S, C+1, 2] (outside, inside),
        class-agnostic box deltas float32[B, R, 4]."""
        cfg = self.cfg
        cls_seg, box = maps
        k, s = cfg.ps_group_size, cfg.mask_size
        b, r = boxes.shape[:2]
        pairs = ops.ps_roi_pool(cls_seg, boxes, k, s, 1.0 / STRIDE)
        pairs = pairs.reshape(b, r, s, s, cfg.num_classes + 1, 2)
        # Group_Max then the global average pool. An elementwise maximum of the two maps: the
        # gradient of a max reduction divides by the count of entries equal to the maximum,
        # which came out 0 (NaN gradients) on XLA:CPU at --xla_backend_optimization_level=0.
        class_logits = jnp.mean(jnp.maximum(pairs[..., 0], pairs[..., 1]), axis=(2, 3))
        deltas = jnp.mean(ops.ps_roi_pool(box, boxes, k, s, 1.0 / STRIDE), axis=(2, 3))
        return class_logits, pairs, deltas

    def trunk(self, batch: dict, train: bool):
        """Score maps, RPN outputs and proposals of a batch."""
        cfg = self.cfg
        features = self.backbone(normalize(batch["image"], cfg.dtype))
        logits, deltas = self.rpn_head(features["res4"])  # [B, T], [B, T, 4]
        maps = self.score_maps(features["res5"])
        outputs = rpn.proposal_outputs(
            logits, deltas, self.anchors(), batch["image_hw"], cfg, train
        )
        return maps, outputs

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        maps, outputs = self.trunk(batch, train)
        if not train:
            outputs["detections"] = self.detect(maps, outputs, batch)
            return outputs
        if key is None:
            raise ValueError("training needs a key for anchor sampling")
        cfg = self.cfg
        anchor_key, roi_key = jax.random.split(key)
        outputs.update(
            rpn.anchor_target_outputs(jnp.concatenate(self.anchors()), batch, cfg, anchor_key)
        )
        rois = training_rois(outputs, batch, cfg, roi_key)
        class_logits, pairs, deltas = self.assemble(maps, rois["boxes"])
        fg_class = jnp.clip(rois["classes"], 0, cfg.num_classes - 1)
        mask_logits = jnp.take_along_axis(pairs, fg_class[:, :, None, None, None, None], axis=4)[
            :, :, :, :, 0
        ]  # [B, R, S, S, 2]
        outputs.update(
            rois=rois, class_logits=class_logits, box_deltas=deltas, mask_logits=mask_logits
        )
        outputs["ohem"] = ohem_selection(outputs, cfg)
        return outputs

    def detect(self, maps, outputs: dict, batch: dict) -> dict:
        """Detections (DESIGN's structure) with box-relative masks [B, K, S, S] of the inside
        probability of each detection's class (module docstring, "Test")."""
        cfg = self.cfg
        c = cfg.num_classes
        boxes, valid = outputs["proposal_boxes"], outputs["proposal_valid"]
        class_logits, pairs, deltas = self.assemble(maps, boxes)
        hw = batch["image_hw"].astype(jnp.float32)[:, None, :]
        if cfg.test_box_refinement:
            refined = ops.clip_boxes(ops.decode_boxes(deltas, boxes, tuple(cfg.box_weights)), hw)
            refined_logits, refined_pairs, _ = self.assemble(maps, refined)
            boxes = jnp.concatenate([boxes, refined], axis=1)  # [B, 2P, 4]
            valid = jnp.concatenate([valid, valid], axis=1)
            class_logits = jnp.concatenate([class_logits, refined_logits], axis=1)
            pairs = jnp.concatenate([pairs, refined_pairs], axis=1)
        wh = boxes[..., 2:] - boxes[..., :2]
        valid &= (wh >= cfg.test_min_box_size).all(axis=-1)
        probs = jax.nn.softmax(class_logits)[..., :c]  # [B, Q, C], no background
        usable = valid[..., None] & (probs > cfg.score_threshold)
        b, q = probs.shape[:2]
        scores = jnp.where(usable, probs, -1.0).reshape(b, q * c)
        candidate = jnp.repeat(jnp.arange(q, dtype=jnp.int32), c)  # [Q*C]
        classes = jnp.tile(jnp.arange(c, dtype=jnp.int32), q)
        k = cfg.detections_per_image

        def one_image(image_scores, image_boxes):
            keep, count = ops.batched_nms(
                image_boxes[candidate],
                image_scores,
                classes,
                cfg.test_nms_threshold,
                k,
                valid=image_scores > 0,
            )
            kept = jnp.arange(k) < count
            pair = jnp.where(kept, keep, 0)
            return (
                jnp.where(kept, candidate[pair], 0),
                jnp.where(kept, image_scores[pair], 0.0),
                jnp.where(kept, classes[pair], 0),
                kept,
            )

        chosen, det_scores, det_classes, det_valid = jax.vmap(one_image)(scores, boxes)
        det_boxes = jnp.take_along_axis(boxes, chosen[..., None], axis=1)  # [B, K, 4]
        if cfg.test_mask_voting:  # per image, so that nothing crosses chips
            vote = lambda *image: mask_voting(*image, cfg=cfg)
            det_boxes, masks, det_valid = jax.vmap(vote)(
                det_boxes, det_classes, det_valid, boxes, valid, probs, pairs
            )
            det_scores = jnp.where(det_valid, det_scores, 0.0)
        else:
            det_pairs = jnp.take_along_axis(pairs, chosen[:, :, None, None, None, None], axis=1)
            det_pairs = jnp.take_along_axis(
                det_pairs, det_classes[:, :, None, None, None, None], axis=4
            )[:, :, :, :, 0]  # [B, K, S, S, 2]
            masks = jax.nn.softmax(det_pairs, axis=-1)[..., 1]
        det_boxes = jnp.where(det_valid[..., None], det_boxes, 0.0)
        masks = jnp.where(det_valid[..., None, None], masks, 0.0)
        if batch.get("flipped") is not None:  # masks relative to the unmirrored boxes
            masks = ops.mirror_box_masks(masks, batch["flipped"])
        return {
            "boxes": ops.original_detection_boxes(det_boxes, det_valid, batch),
            "scores": det_scores,
            "classes": det_classes,
            "valid": det_valid,
            "masks": masks,
        }


def mask_voting(kept_boxes, kept_classes, kept_valid, boxes, valid, probs, pairs, cfg):
    """TEST.USE_MASK_MERGE for one image (module docstring, "Test" and "Deviations"): the voted
    boxes float32[K, 4], masks float32[K, S, S] and validity bool[K] of the kept detections
    (kept_boxes [K, 4], kept_classes int32[K], kept_valid bool[K]), from the Q candidates'
    boxes [Q, 4], validity bool[Q], class probabilities [Q, C] and mask logit pairs
    [Q, S, S, C + 1, 2] (outside, inside)."""
    s, m = cfg.mask_size, cfg.test_mask_voting_grid
    k, q = kept_boxes.shape[0], boxes.shape[0]
    v = min(cfg.test_mask_voters, q)
    # The voters: every candidate at box IoU >= the merge threshold, weighted by its
    # probability of the kept detection's class; the v heaviest vote.
    overlap = ops.box_iou(kept_boxes, boxes)  # [K, Q]
    eligible = valid[None, :] & kept_valid[:, None] & (overlap >= cfg.test_mask_merge_threshold)
    weight = jnp.where(eligible, jnp.take(probs, kept_classes, axis=1).T, 0.0)
    weight, voter = ops.top_k(weight, v)  # [K, V]
    votes = weight > 0
    weight = weight / jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1e-12)
    voter_boxes = boxes[voter]  # [K, V, 4]
    voter_pairs = pairs[voter, :, :, kept_classes[:, None], :]  # [K, V, S, S, 2]
    voter_masks = jax.nn.softmax(voter_pairs, axis=-1)[..., 1]
    # The frame: the union of the voters' boxes (the kept box alone where none votes).
    lo = jnp.where(votes[..., None], voter_boxes[..., :2], jnp.inf).min(axis=1)
    hi = jnp.where(votes[..., None], voter_boxes[..., 2:], -jnp.inf).max(axis=1)
    any_vote = votes.any(axis=1)[:, None]
    lo = jnp.where(any_vote, lo, kept_boxes[:, :2])
    hi = jnp.where(any_vote, hi, kept_boxes[:, 2:])
    cell = jnp.maximum(hi - lo, 1e-6) / m  # [K, 2] pixels per cell (x, y)
    # Each voter's mask sampled at the frame's cell centres (cv2.resize's rule in the
    # reference: bilinear, the mask's edge cells held up to the box's edge), zero outside its
    # box, binarised.
    side = jnp.maximum(voter_boxes[..., 2:] - voter_boxes[..., :2], 1e-6)  # [K, V, 2]
    frame = jnp.concatenate([lo, hi], axis=-1)[:, None, :]  # [K, 1, 4]
    origin = jnp.concatenate([voter_boxes[..., :2]] * 2, axis=-1)
    in_mask = (frame - origin) * jnp.concatenate([s / side] * 2, axis=-1)  # [K, V, 4]
    sampled = ops.roi_align(
        voter_masks.reshape(k * v, s, s, 1),
        in_mask.reshape(k * v, 1, 4),
        m,
        1.0,
        sampling_ratio=1,
        aligned=True,
        method="einsum",
    ).reshape(k, v, m, m)
    centres = lo[:, None, :] + (jnp.arange(m, dtype=jnp.float32)[:, None] + 0.5) * cell[:, None]
    inside = (centres[:, None] >= voter_boxes[:, :, None, :2]) & (
        centres[:, None] < voter_boxes[:, :, None, 2:]
    )  # [K, V, M, 2]: cell centre i within the voter's box along x, along y
    binary = (sampled >= cfg.test_mask_binary_threshold) & (
        inside[:, :, :, None, 1] & inside[:, :, None, :, 0]
    )
    merged = jnp.einsum("kv,kvyx->kyx", weight, binary.astype(jnp.float32))
    # The vote's tight box (cells), and the merged map resampled into it at S x S (the
    # reference's GPU kernel, mv_kernel.cu mask_resize: bilinear on the whole map, so the
    # samples near the box's edge read the cells beyond it; zero beyond the frame).
    above = merged >= cfg.test_mask_binary_threshold
    tight = ops.masks_to_boxes(above)  # [K, 4] cells
    padded = jnp.pad(merged, ((0, 0), (1, 1), (1, 1)))[..., None]
    masks = ops.roi_align(
        padded, tight[:, None, :] + 1.0, s, 1.0, sampling_ratio=1, aligned=True, method="einsum"
    )[:, 0, :, :, 0]
    voted_boxes = jnp.concatenate([lo, lo], axis=-1) + tight * jnp.concatenate([cell] * 2, -1)
    return voted_boxes, masks, kept_valid & above.any(axis=(1, 2))


def training_rois(outputs: dict, batch: dict, cfg: FCISConfig, key) -> dict:
    """Every proposal and ground truth as an RoI (proposal_annotator with BATCH_ROIS -1): the
    dict of roi_heads.sample_rois over R = P + N slots (foreground first; padding not valid),
    its box targets re-encoded with FCIS's weights, plus mask targets float32[B, R, S, S] in
    {0, 1} (valid on foreground RoIs only)."""
    p = outputs["proposal_boxes"].shape[1]
    n = batch["gt_boxes"].shape[1]
    rois = roi_heads.sample_rois(
        outputs["proposal_boxes"],
        outputs["proposal_valid"],
        batch["gt_boxes"],
        batch["gt_classes"],
        batch["gt_valid"],
        key,
        p + n,
        1.0,  # every foreground and every background candidate
        cfg.roi_iou_threshold,
        cfg.num_classes,
        ignore_boxes=batch.get("ignore_boxes"),
        ignore_valid=batch.get("ignore_valid"),
    )
    matched = jnp.take_along_axis(batch["gt_boxes"], rois["gt_index"][..., None], axis=1)
    deltas = ops.encode_boxes(matched, rois["boxes"], tuple(cfg.box_weights))
    rois["target_deltas"] = jnp.where(rois["foreground"][..., None], deltas, 0.0)
    rois["mask_targets"] = mask_targets(batch, rois, cfg)
    return jax.tree.map(jax.lax.stop_gradient, rois)


def mask_targets(batch: dict, rois: dict, cfg: FCISConfig):
    """float32[B, R, S, S] {0, 1}: each RoI's ground-truth mask inside the RoI at S x S,
    thresholded at mask_threshold (proposal_annotator: intersect_box_mask, cv2.resize, >=
    BINARY_THRESH), pooled from the box crop by ops.mask_targets; meaningful on foreground RoIs
    (the others are ignored by the losses)."""
    r = rois["boxes"].shape[1]
    targets, _ = ops.mask_targets(
        batch["gt_masks"],
        batch["gt_boxes"],
        rois,
        r,
        cfg.mask_size,
        cfg.mask_target_sampling_ratio,
        threshold=cfg.mask_threshold,
    )
    return targets


def ohem_selection(outputs: dict, cfg: FCISConfig):
    """bool[B, R]: the ohem_rois valid RoIs of each image with the largest loss (box_annotator
    _ohem: cls CE + 10 mask CE mean + 1 box smooth L1 sum), under stop_gradient."""
    rois = outputs["rois"]
    per_roi = jax.lax.stop_gradient(per_roi_losses(outputs, cfg))
    total = (
        cfg.cls_loss_weight * per_roi["cls"]
        + cfg.mask_loss_weight * per_roi["mask"]
        + cfg.box_loss_weight * per_roi["box"]
    )
    total = jnp.where(rois["valid"], total, -jnp.inf)
    take = min(cfg.ohem_rois, total.shape[1])

    def one_image(image_total):  # per image, so that nothing crosses chips
        _, index = ops.top_k(image_total, take)  # [take]
        return jnp.zeros(image_total.shape, bool).at[index].set(True)

    return jax.vmap(one_image)(total) & rois["valid"]


def per_roi_losses(outputs: dict, cfg: FCISConfig) -> dict:
    """float32[B, R] per-RoI class CE, mask CE (mean over the S x S cells, 0 off the
    foreground) and box smooth L1 (summed over the 4 deltas, 0 off the foreground)."""
    rois = outputs["rois"]
    log_probs = jax.nn.log_softmax(outputs["class_logits"])
    cls = -jnp.take_along_axis(log_probs, rois["classes"][..., None], axis=-1)[..., 0]
    mask_log = jax.nn.log_softmax(outputs["mask_logits"], axis=-1)  # [B, R, S, S, 2]
    target = rois["mask_targets"]
    mask_ce = -(target * mask_log[..., 1] + (1.0 - target) * mask_log[..., 0])
    mask = jnp.where(rois["foreground"], jnp.mean(mask_ce, axis=(2, 3)), 0.0)
    box = _smooth_l1(outputs["box_deltas"] - rois["target_deltas"], cfg.box_smooth_l1_beta)
    box = jnp.where(rois["foreground"], jnp.sum(box, axis=-1), 0.0)
    return {"cls": cls, "mask": mask, "box": box}


def _smooth_l1(diff, beta: float):
    """Elementwise smooth L1 of diff (beta 0: L1)."""
    a = jnp.abs(diff)
    if beta <= 0:
        return a
    return jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def loss_fn(outputs: dict, batch: dict, cfg: FCISConfig) -> tuple[jnp.ndarray, dict]:
    """Total loss and metrics (module docstring, "OHEM"): RPN terms, then the class, mask and
    box terms over each image's OHEM-kept RoIs."""
    del batch  # every target was built inside the model
    losses = rpn.output_losses(outputs, cfg)
    rois = outputs["rois"]
    kept = outputs["ohem"]
    per_roi = per_roi_losses(outputs, cfg)
    images = kept.shape[0]
    budget = float(cfg.ohem_rois * images)
    kept_f = kept.astype(jnp.float32)
    losses["loss_cls"] = (
        cfg.cls_loss_weight * jnp.sum(per_roi["cls"] * kept_f) / jnp.maximum(jnp.sum(kept_f), 1.0)
    )
    losses["loss_mask"] = cfg.mask_loss_weight * jnp.sum(per_roi["mask"] * kept_f) / budget
    losses["loss_box_reg"] = cfg.box_loss_weight * jnp.sum(per_roi["box"] * kept_f) / budget
    total = sum(losses.values())
    metrics = dict(losses)
    correct = jnp.argmax(outputs["class_logits"], -1) == rois["classes"]
    metrics["cls_accuracy"] = jnp.sum(correct * kept_f) / jnp.maximum(jnp.sum(kept_f), 1.0)
    fg = rois["foreground"]
    metrics["num_fg_rois"] = jnp.mean(jnp.sum(fg, axis=1).astype(jnp.float32))
    metrics["ohem_fg_rois"] = jnp.mean(jnp.sum(fg & kept, axis=1).astype(jnp.float32))
    return total, metrics


# ----------------------------------------------------------------------------- method interface

Config = FCISConfig
Model = FCIS


def base_config() -> ml_collections.ConfigDict:
    """msracver/FCIS's COCO defaults (experiments/fcis/cfgs/resnet_v1_101_coco_fcis_end2end_ohem
    .yaml) in the model section; experiments start from here."""
    c = config_lib.base()
    c.method = "fcis"
    c.model = config_lib.model_section(FCISConfig)
    c.input.canvas_hw = (1008, 1008)
    c.input.short_side = (600,)
    c.input.max_long_side = 1000
    c.input.test_short_side = 600
    c.input.test_max_long_side = 1000
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink an FCIS config to seconds on a CPU: synthetic scenes, ResNet-18 of width 16,
    a 128x128 canvas (8 x 8 score maps), k = 3, 7 x 7 masks, few proposals."""
    c = config_lib.smoke_common(c)
    m = c.model
    smoke_backbone(m)
    m.anchor_sizes = (16.0, 32.0, 64.0)
    m.rpn_channels = 32
    # Of the 8 x 8 x 9 = 576 anchors: a larger canvas needs more, or the top anchors all sit
    # on the largest objects and smaller ones get no proposal (test_overfits_four_scenes).
    m.rpn_pre_nms_topk_train = 200
    m.rpn_pre_nms_topk_test = 100
    m.rpn_post_nms_topk_train = 32
    m.rpn_post_nms_topk_test = 32
    m.rpn_batch_per_image = 64
    m.head_channels = 32
    m.ps_group_size = 3
    m.mask_size = 9
    m.ohem_rois = 16
    m.detections_per_image = 50
    return c
