"""Mask Scoring R-CNN (Huang et al., CVPR 2019) on Mask R-CNN: the method module
(methods/__init__.py).

Mask R-CNN's backbone, RPN, box head, sampling, mask head and detection selection, with
mmdetection 3.3's MaskIoU head added (mmdet/models/roi_heads/mask_scoring_roi_head.py
MaskScoringRoIHead, mask_heads/maskiou_head.py MaskIoUHead; configs/ms_rcnn/
ms-rcnn_r50-caffe_fpn_1x_coco.py); the paper's code is zjhuang22/maskscoring_rcnn
(maskrcnn_benchmark/modeling/roi_heads/maskiou_head/, mask_head/loss.py):

- head: the mask branch's 14x14 RoI features concatenated with the 2x2 max-pool of the
  sigmoid of the mask logits of the RoI's class (28x28 -> 14x14, one channel), 4 conv3x3-256
  + ReLU (the last with stride 2, 14 -> 7), 2 FC-1024 + ReLU and one FC to a predicted mask
  IoU per class (MaskIoUHead.forward; inits Kaiming fan-out normal on the convs, Caffe2
  Xavier on the FCs, normal 0.01 on the last). The mask logits are not detached (as both
  references): the IoU loss also reaches the mask head.
- targets (MaskIoUHead.get_targets, _get_area_ratio) on every foreground RoI of the mask
  branch: the predicted mask is its class's 28x28 logits above mask_thr_binary 0.5 (mmdetection
  compares the logits, not the probabilities, with it: probability 0.62; zjhuang22 takes logit
  > 0: `maskiou_logit_threshold`), the ground truth's full area is its 28x28 target's area
  divided by the share of the ground-truth mask that lies inside the RoI (the RoI cast to
  integers, clipped, at least 1 px a side), and the target is overlap / (predicted area + full
  area - overlap). RoIs with target 0 take no part (mmdetection's `mask_iou_targets > 0`).
- loss: 0.5 x the mean squared error over the trained RoIs (mmdetection's MSELoss, loss_weight
  0.5; zjhuang22's MASKIOU_LOSS_WEIGHT is 1 on 0.5 x squared error: the same number).
- test: each detection's score times the predicted IoU of its class (MaskIoUHead
  .predict_by_feat; zjhuang22 MaskIoUPostProcessor), masks as Mask R-CNN's. The K slots keep
  NMS's order; COCO evaluation sorts by the new scores.

Loss parity with mmdetection 3.3 (experiments/parity/ms_rcnn_loss.py, `make parity`): with its
seeded MaskIoUHead converted (weights/mmdet_ms_rcnn_loss.py) and on its mask targets and area
ratios, the head's output, the IoU targets, the RoIs trained, the loss and its gradient with
respect to every parameter, the RoI features and the mask logits agree to float32 noise
(1.3e-6); on our own targets (box crops of 112 cells) the area ratios differ by up to 0.013,
the IoU targets by 0.007 and the loss by 1.1%.

Deviations, and why: the share of the ground truth inside the RoI is measured on its box crop
(input.mask_size cells; full-resolution masks never reach the device), counting the crop cells
whose centres fall in the RoI's integer pixels; it is mmdetection's pixel count exactly when
the crop's cells are the mask's pixels (a box of integer corners Mc pixels a side) and the
crop's resolution otherwise; mmdetection clips the RoI to its padded mask, ours to the canvas.
mmdetection's mean runs over a GPU's images; ours divides by the trained RoIs of the global
batch (DESIGN's normalisers). The first mask_fg_per_image foreground RoIs per image train the
heads (Mask R-CNN's static budget; the COCO recipe takes every positive).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from instseg_jax import config as config_lib
from instseg_jax import ops
from instseg_jax.methods import mask_rcnn
from instseg_jax.nn.layers import Conv, Dense

INPUTS = mask_rcnn.INPUTS

# mmdetection's +1e-7 in _get_area_ratio and get_targets (areas in pixels or 28x28 cells).
AREA_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class MSRCNNConfig(mask_rcnn.MaskRCNNConfig):
    """Mask R-CNN's fields and the MaskIoU head's, with mmdetection's defaults."""

    maskiou_num_convs: int = 4  # the last has stride 2
    maskiou_conv_dim: int = 256
    maskiou_num_fcs: int = 2
    maskiou_fc_dim: int = 1024
    # The predicted mask of an IoU target: class logits above this (mmdetection's
    # train_cfg.rcnn.mask_thr_binary 0.5, compared with the logits; zjhuang22: 0).
    maskiou_logit_threshold: float = 0.5
    maskiou_loss_weight: float = 0.5  # MaskIoUHead's MSELoss loss_weight

    def __post_init__(self):
        super().__post_init__()
        if not self.mask_on or self.maskiou_num_convs < 1 or self.maskiou_num_fcs < 0:
            raise config_lib.ConfigValueError(
                "Mask Scoring R-CNN scores masks: model.mask_on must be True, "
                "model.maskiou_num_convs >= 1 and model.maskiou_num_fcs >= 0, got "
                f"{self.mask_on}, {self.maskiou_num_convs} and {self.maskiou_num_fcs}"
            )


class MaskIoUHead(nn.Module):
    """pooled[B, F, S, S, D] RoI features and the mask logits[B, F, 2S, 2S] of each RoI's class
    -> predicted mask IoU [B, F, C] of every class (mmdetection's MaskIoUHead.forward)."""

    num_classes: int
    conv_dim: int = 256
    num_convs: int = 4
    fc_dim: int = 1024
    num_fcs: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled, mask_logits):
        b, f, s, _, d = pooled.shape
        probs = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
        probs = probs.reshape(b, f, s, 2, s, 2).max(axis=(3, 5))  # [B, F, S, S]
        x = jnp.concatenate([pooled.astype(self.dtype), probs[..., None].astype(self.dtype)], -1)
        x = x.reshape(b * f, s, s, d + 1)
        conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        for i in range(self.num_convs):
            stride = 2 if i == self.num_convs - 1 else 1
            x = Conv(
                self.conv_dim,
                (3, 3),
                (stride, stride),
                ((1, 1), (1, 1)),
                dtype=self.dtype,
                kernel_init=conv_init,
                name=f"conv{i + 1}",
            )(x)
            x = nn.relu(x)  # [B*F, S/2, S/2, conv_dim] after the last
        x = x.reshape(b * f, -1)
        fc_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # Caffe2Xavier
        for i in range(self.num_fcs):
            x = nn.relu(
                Dense(self.fc_dim, dtype=self.dtype, kernel_init=fc_init, name=f"fc{i + 1}")(x)
            )
        iou = Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.01),
            name="fc_mask_iou",
        )(x)
        return iou.reshape(b, f, self.num_classes).astype(jnp.float32)


def of_class(values, classes):
    """values[B, F, ..., C] at each RoI's class[B, F] (clipped into [0, C)) -> [B, F, ...]."""
    classes = jnp.clip(classes, 0, values.shape[-1] - 1)
    index = classes.reshape(classes.shape + (1,) * (values.ndim - classes.ndim))
    return jnp.take_along_axis(values, index, axis=-1)[..., 0]


def area_ratios(gt_crops, gt_boxes, gt_index, roi_boxes, canvas_hw):
    """float32[B, F]: the share of each RoI's ground-truth mask that lies inside the RoI
    (mmdetection's MaskIoUHead._get_area_ratio: the RoI cast to int32, clipped to the mask,
    at least 1 px a side, the mask's pixels in it over all its pixels, + 1e-7), measured on
    the box crop: a crop cell counts when its centre's pixel lies in the RoI.

    gt_crops uint8[B, N, Mc, Mc] each mask inside its box gt_boxes float32[B, N, 4];
    gt_index int32[B, F] each RoI's ground truth; roi_boxes float32[B, F, 4] canvas xyxy;
    canvas_hw (H, W) the clip bounds."""
    crop = gt_crops.shape[-1]
    gt = jnp.take_along_axis(gt_boxes, gt_index[..., None], axis=1)  # [B, F, 4]
    crops = jnp.take_along_axis(gt_crops, gt_index[..., None, None], axis=1)
    crops = crops.astype(jnp.float32)  # [B, F, Mc, Mc]
    bounds = jnp.asarray(tuple(canvas_hw[::-1]) * 2, jnp.float32)  # (W, H, W, H)
    corners = jnp.clip(jnp.trunc(roi_boxes), 0.0, bounds)  # int32 cast, then clip
    low = corners[..., :2]
    high = low + jnp.maximum(corners[..., 2:] - low, 1.0)  # [B, F, 2] (x, y)
    cell = (jnp.arange(crop, dtype=jnp.float32) + 0.5) / crop  # cell centres, crop-relative
    size = gt[..., 2:] - gt[..., :2]
    centres = gt[..., None, :2] + cell[:, None] * size[..., None, :]  # [B, F, Mc, 2]
    pixel = jnp.floor(centres)
    inside = (pixel >= low[..., None, :]) & (pixel < high[..., None, :])  # [B, F, Mc, 2]
    inside = inside[..., :, None, 1] & inside[..., None, :, 0]  # [B, F, Mc (y), Mc (x)]
    total = crops.sum((-1, -2))
    return jax.lax.stop_gradient(jnp.sum(crops * inside, (-1, -2)) / (total + AREA_EPS))


def maskiou_targets(mask_logits, mask_targets, ratios, valid, threshold: float):
    """(float32[B, F] IoU targets, bool[B, F] the RoIs trained): mmdetection's
    MaskIoUHead.get_targets on the class logits[B, F, M, M] of each RoI, its {0, 1}
    targets[B, F, M, M], the ground truth's share inside the RoI ratios[B, F] (`area_ratios`)
    and the RoI's validity[B, F]; a valid RoI trains when its target is above 0
    (loss_and_target's `mask_iou_targets > 0`; a zero union, NaN there, trains neither)."""
    predicted = (mask_logits > threshold).astype(jnp.float32)
    mask_targets = mask_targets.astype(jnp.float32)
    predicted_area = predicted.sum((-1, -2))
    overlap = (predicted * mask_targets).sum((-1, -2))
    full_area = mask_targets.sum((-1, -2)) / (ratios + AREA_EPS)
    union = predicted_area + full_area - overlap
    iou = jnp.where(union > 0, overlap / jnp.where(union > 0, union, 1.0), 0.0)
    trained = valid & (iou > 0)
    return jax.lax.stop_gradient(jnp.where(trained, iou, 0.0)), trained


class MSRCNN(mask_rcnn.MaskRCNN):
    cfg: MSRCNNConfig

    def setup_mask_head(self):
        super().setup_mask_head()
        cfg = self.cfg
        self.maskiou_head = MaskIoUHead(
            cfg.num_classes,
            cfg.maskiou_conv_dim,
            cfg.maskiou_num_convs,
            cfg.maskiou_fc_dim,
            cfg.maskiou_num_fcs,
            cfg.dtype,
        )

    def mask_training(self, features, outputs: dict, batch: dict, key) -> dict:
        """Mask R-CNN's mask branch on the first mask_fg_per_image sampled RoIs, and the
        MaskIoU head's predictions of their class with its targets."""
        del key
        cfg = self.cfg
        fg = cfg.mask_fg_per_image
        rois = {k: v[:, :fg] for k, v in outputs["rois"].items()}
        pooled = self.pool(features, rois["boxes"], cfg.mask_pool_size)  # [B, F, 14, 14, D]
        logits = self.mask_head(pooled)  # [B, F, 28, 28, C]
        targets, valid = self.mask_head_targets(batch, rois)
        class_logits = of_class(logits, rois["classes"])  # [B, F, 28, 28]
        ratios = area_ratios(
            batch["gt_masks"], batch["gt_boxes"], rois["gt_index"], rois["boxes"], cfg.canvas_hw
        )
        iou_targets, trained = maskiou_targets(
            jax.lax.stop_gradient(class_logits),
            targets,
            ratios,
            valid,
            cfg.maskiou_logit_threshold,
        )
        predicted_iou = of_class(self.maskiou_head(pooled, class_logits), rois["classes"])
        return {
            "mask_logits": logits,
            "mask_targets": targets,
            "mask_valid": valid,
            "mask_iou": predicted_iou,  # [B, F]
            "mask_iou_targets": iou_targets,
            "mask_iou_trained": trained,
        }

    def slot_payloads(self, features, canvas_boxes, classes, scores, flipped=None) -> dict:
        """Masks of classes[B, S] in canvas_boxes[B, S, 4], and scores[B, S] times the
        predicted mask IoU of that class (MaskScoringRoIHead.predict_mask)."""
        cfg = self.cfg
        pooled = self.pool(features, canvas_boxes, cfg.mask_pool_size)  # [B, S, 14, 14, D]
        logits = of_class(self.mask_head(pooled), classes)  # [B, S, 28, 28]
        predicted_iou = of_class(self.maskiou_head(pooled, logits), classes)  # [B, S]
        masks = jax.nn.sigmoid(logits)
        if flipped is not None:  # a mirrored canvas: masks relative to the unmirrored boxes
            masks = ops.mirror_box_masks(masks, flipped)
        return {"masks": masks, "scores": scores * predicted_iou}

    def detect(self, features, outputs: dict, batch: dict) -> dict:
        """Detections with masks and mask-scored scores on all K slots."""
        detections, canvas_boxes = self.select_detections(outputs, batch)
        return mask_rcnn.with_slot_payloads(
            functools.partial(self.slot_payloads, features),
            detections,
            canvas_boxes,
            batch.get("flipped"),
        )


def mask_scoring_losses(outputs: dict, cfg: MSRCNNConfig) -> dict:
    """Mask R-CNN's mask loss and the MaskIoU head's: loss weight x mean squared error of the
    predicted IoU over the trained RoIs of the batch (MaskIoUHead.loss_and_target)."""
    losses = mask_rcnn.mask_head_losses(outputs, cfg)
    trained = outputs["mask_iou_trained"]
    normalizer = jnp.maximum(trained.sum(), 1).astype(jnp.float32)
    error = (outputs["mask_iou"] - outputs["mask_iou_targets"]) ** 2
    losses["loss_mask_iou"] = (
        cfg.maskiou_loss_weight * jnp.sum(jnp.where(trained, error, 0.0)) / normalizer
    )
    return losses


# ----------------------------------------------------------------------------- method interface

Config = MSRCNNConfig
Model = MSRCNN
loss_fn = functools.partial(mask_rcnn.loss_fn, mask_losses=mask_scoring_losses)
defaults_from_data = mask_rcnn.defaults_from_data
object_sizes_covered = mask_rcnn.object_sizes_covered
make_inference = mask_rcnn.make_inference


def base_config() -> ml_collections.ConfigDict:
    """Mask R-CNN R50-FPN 1x's defaults with mmdetection's MaskIoU head
    (configs/ms_rcnn/ms-rcnn_r50-caffe_fpn_1x_coco.py); experiments start from here."""
    c = config_lib.base()
    c.method = "ms_rcnn"
    c.model = config_lib.model_section(MSRCNNConfig)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Mask R-CNN's smoke shrink with a small MaskIoU head."""
    c = mask_rcnn.smoke(c)
    m = c.model
    m.maskiou_num_convs = 2
    m.maskiou_conv_dim = 32
    m.maskiou_fc_dim = 64
    return c
