"""YOLACT++ (Bolya et al., TPAMI 2020, "YOLACT++: Better Real-time Instance Segmentation"): the
method module (methods/__init__.py). YOLACT (methods/yolact.py, whose anchor matching, OHEM,
prototypes, losses and Fast NMS it reuses unchanged) with the three changes of the reference,
dbolya/yolact's `yolact_plus_resnet50_config` (data/config.py):

  deformable convolutions   modulated deformable 3x3 convolutions (DCNv2; ops/deform_conv.py,
                            nn/deform_conv.py) in the ResNet's blocks chosen by model.dcn_layers
                            and model.dcn_interval (backbone.py ResNetBackbone._make_layer;
                            backbones/resnet.py deformable_blocks): R-50 (0, 4, 6, 3) every
                            block of res3..res5, R-101 (0, 4, 23, 3) every third. Their offset
                            and modulation convolution and bias start at zero (offsets 0,
                            modulation 0.5), the 3x3 kernel from ImageNet (weights/resnet.py).
  anchors                   three scales per level, size x 2^(0, 1/3, 2/3) for the sizes 24 ..
                            384 (pred_scales), aspect ratios w/h (1, 1/2, 2) (pred_aspect_ratios,
                            use_square_anchors False): 9 anchors per location, scale-major
                            (yolact.py make_priors). Our ratios are h / w: (1, 2, 0.5).
  fast mask re-scoring      FastMaskIoUNet (yolact.py; config.py maskiou_net): on each trained
                            mask, sigmoid(prototypes x coefficients) cropped by its ground-truth
                            box, five 3x3 convolutions of stride 2 without padding (8, 16, 32,
                            64, 128 channels) and a 1x1 to C channels, each with ReLU, then the
                            global max: the predicted IoU per class, read at the ground truth's
                            class. Target: the IoU of the mask thresholded at 0.5 with the
                            ground-truth mask (multibox_loss.py lincomb_mask_loss, _mask_iou);
                            only masks whose ground truth covers more than discard_mask_area
                            (25) prototype cells train it; loss smooth L1 (beta 1) summed, x
                            maskiou_alpha (25), / the batch's positive anchors (mask_iou_loss and
                            MultiBoxLoss.forward's division by total_num_pos). As the reference,
                            the predicted masks enter the head without stop_gradient, so this
                            loss reaches the prototypes and coefficients too; the IoU targets
                            carry none. At test (output_utils.py postprocess, rescore_mask) the
                            head reads each detection's cropped mask, and the score becomes score
                            x its predicted IoU at the detected class.

The reference's published figure: 34.1 mask AP on COCO test-dev for YOLACT++ R-50 at 33.5 FPS
on a Titan Xp (dbolya/yolact README, yolact_plus_resnet50_54_800000.pth); experiments/
yolact_plus_r50_coco.py is its recipe, not run here.

Deviations, and why:
  - YOLACT's own terms and normalisers are mmdetection's (methods/yolact.py docstring), where
    dbolya/yolact divides the mask loss by the positives and scales an image's over-budget
    masks up; the COCO recipe takes dbolya's OHEM rule for images without positives
    (model.negatives_without_positives "none"), its schedule and its anchors.
  - The reference keeps two scores per detection with rescore_bbox False: the box score for
    box AP, score x mask IoU for mask AP. Detections hold one score, the rescored one
    (model.rescore_scores; the mask AP's), so box AP here ranks by it too.
  - The mask IoU head runs on all masks_per_image mask slots of every image (static shapes),
    and the loss keeps those that train: slot_valid and the area rule. The prototype grid is
    the canvas at stride 4 (160 x 160 on the 640 canvas; the reference's 138 x 138 for 550 px),
    so the head's feature maps are 4 x 4 where the reference's are 3 x 3 before the max.
  - A ResNet-18/34 basic block (the nuclei and test models) has no deformable form in the
    reference; here its strided 3x3 (conv1) is the deformable one (backbones/resnet.py).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from instseg_jax import config as config_lib
from instseg_jax import ops
from instseg_jax.methods import yolact
from instseg_jax.methods.yolact import PROTO_STRIDE, YOLACTConfig, crop_masks
from instseg_jax.nn.layers import Conv

INPUTS = yolact.INPUTS


@dataclasses.dataclass(frozen=True)
class YOLACTPlusConfig(YOLACTConfig):
    # pred_scales: each level's anchor_sizes[l] x these ([i * 2 ** (j / 3.0) for j in range(3)]).
    anchor_scales: tuple = (1.0, 2.0 ** (1.0 / 3.0), 2.0 ** (2.0 / 3.0))
    # h / w; the reference's w / h (1, 1/2, 2) in its order (yolact.py make_priors).
    aspect_ratios: tuple = (1.0, 2.0, 0.5)
    # Deformable 3x3 convolutions (backbones/resnet.py deformable_blocks): the last
    # dcn_layers[s] blocks of stage s, every dcn_interval-th (resnet50_dcnv2_backbone).
    dcn_layers: tuple = (0, 4, 6, 3)
    dcn_interval: int = 1
    # dbolya/yolact's OHEM: an image without positives trains no negatives (MultiBoxLoss).
    negatives_without_positives: str = "none"
    # FastMaskIoUNet: channels of its 3x3 stride-2 unpadded convolutions (maskiou_net), then
    # a 1x1 to num_classes; each with ReLU, then the global max.
    maskiou_channels: tuple = (8, 16, 32, 64, 128)
    maskiou_loss_weight: float = 25.0  # maskiou_alpha
    # Masks whose ground truth covers at most this many prototype cells (stride 4) do not
    # train the mask IoU head (discard_mask_area = 5 x 5).
    discard_mask_area: float = 25.0
    # Detection scores x the predicted mask IoU at test (rescore_mask).
    rescore_scores: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.anchor_scales or min(self.anchor_scales) <= 0:
            raise config_lib.ConfigValueError(
                f"model.anchor_scales must be positive numbers, got {self.anchor_scales}"
            )
        side = min(self.canvas_hw) // PROTO_STRIDE
        for _ in self.maskiou_channels:
            side = (side - 3) // 2 + 1
        if side < 1:
            raise config_lib.ConfigValueError(
                f"model.maskiou_channels {self.maskiou_channels}: {len(self.maskiou_channels)} "
                f"unpadded stride-2 3x3 convolutions leave nothing of the "
                f"{min(self.canvas_hw) // PROTO_STRIDE}-cell prototype grid; use fewer"
            )

    def level_anchor_sizes(self) -> tuple[tuple[float, ...], ...]:
        return tuple(
            tuple(size * scale for scale in self.anchor_scales) for size in self.anchor_sizes
        )

    def deformable_layers(self) -> tuple[tuple, int]:
        return tuple(self.dcn_layers), self.dcn_interval


class FastMaskIoUNet(nn.Module):
    """masks [M, h, w] in [0, 1] -> predicted IoU per class [M, C] (float32): unpadded 3x3
    convolutions of stride 2, then a 1x1 to C, each with ReLU, and the maximum over the map
    (dbolya/yolact yolact.py FastMaskIoUNet; Xavier kernels, zero biases: Yolact.init_weights)."""

    num_classes: int
    channels: tuple
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, masks):
        x = masks[..., None].astype(self.dtype)  # [M, h, w, 1]
        for i, width in enumerate(self.channels):
            conv = Conv(
                width,
                (3, 3),
                (2, 2),
                dtype=self.dtype,
                kernel_init=yolact._xavier(),
                name=f"conv{i}",
            )
            x = nn.relu(conv(x))  # [M, (h - 3) / 2 + 1, (w - 3) / 2 + 1, width]
        predict = Conv(
            self.num_classes, (1, 1), dtype=self.dtype, kernel_init=yolact._xavier(), name="predict"
        )
        x = nn.relu(predict(x))
        return x.max(axis=(1, 2)).astype(jnp.float32)


def mask_iou_targets(pred_masks, gt_masks):
    """IoU float32[...] of pred_masks[..., h, w] (probabilities) thresholded at 0.5 with the
    binary gt_masks[..., h, w], and the ground truth's area in cells float32[...]
    (multibox_loss.py _mask_iou; an empty union gives 0)."""
    pred = pred_masks > 0.5
    gt = gt_masks > 0
    intersection = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
    gt_area = jnp.sum(gt, axis=(-2, -1)).astype(jnp.float32)
    union = jnp.sum(pred, axis=(-2, -1)).astype(jnp.float32) + gt_area - intersection
    return intersection / jnp.maximum(union, 1.0), gt_area


def mask_iou_training(mask_logits, boxes, gt_masks, slot_valid, discard_mask_area: float):
    """The mask IoU head's training inputs and targets (multibox_loss.py lincomb_mask_loss).

    mask_logits float32[B, P, h, w] of the mask slots; boxes float32[B, P, 4] their ground-truth
    boxes (canvas xyxy); gt_masks [B, P, h, w] their ground-truth masks at stride 4;
    slot_valid bool[B, P]. Returns the head's input sigmoid(logits) cropped by the box
    (yolact.crop_masks, one cell of padding) [B, P, h, w], with its gradient; the IoU target
    float32[B, P] (mask_iou_targets, no gradient); and which slots train: valid ones whose
    ground truth covers more than discard_mask_area cells, bool[B, P].
    """
    inside = crop_masks(mask_logits, boxes, PROTO_STRIDE)
    pred_masks = jnp.where(inside, jax.nn.sigmoid(mask_logits), 0.0)
    iou, gt_area = jax.lax.stop_gradient(mask_iou_targets(pred_masks, gt_masks))
    return pred_masks, iou, slot_valid & (gt_area > discard_mask_area)


class YOLACTPlus(yolact.YOLACT):
    cfg: YOLACTPlusConfig

    def setup(self):
        super().setup()
        self.maskiou = FastMaskIoUNet(
            self.cfg.num_classes, self.cfg.maskiou_channels, self.cfg.dtype
        )

    def mask_ious(self, masks, classes):
        """masks [B, M, h, w], classes int32[B, M] -> the predicted IoU at each class [B, M]."""
        b, m, h, w = masks.shape
        ious = self.maskiou(masks.reshape(b * m, h, w)).reshape(b, m, -1)  # [B, M, C]
        return jnp.take_along_axis(ious, classes[..., None], axis=-1)[..., 0]

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        cfg = self.cfg
        outputs = super().__call__(batch, train, key)
        if not train:
            detections = outputs["detections"]
            if cfg.rescore_scores:
                ious = self.mask_ious(detections["canvas_masks"], detections["classes"])
                scores = jnp.where(detections["valid"], detections["scores"] * ious, 0.0)
                outputs["detections"] = {**detections, "scores": scores}
            return outputs
        targets = outputs["targets"]
        pred_masks, iou, trained = mask_iou_training(
            outputs["mask_logits"],
            outputs["mask_boxes"],
            outputs["mask_targets"],
            targets["slot_valid"],
            cfg.discard_mask_area,
        )
        slot_classes = jnp.take_along_axis(batch["gt_classes"], targets["slot_gt"], axis=1)
        outputs["mask_iou_pred"] = self.mask_ious(pred_masks, slot_classes)  # [B, P]
        outputs["mask_iou_targets"] = iou
        outputs["mask_iou_trained"] = trained
        return outputs


def mask_iou_loss(predicted, targets, trained, positives, weight: float):
    """weight x sum over the trained masks of smooth_l1(predicted - targets, beta 1) / the
    positive anchors of the batch (at least 1): predicted, targets float32[B, P], trained
    bool[B, P], positives int32[B] (multibox_loss.py mask_iou_loss, then forward's division of
    every anchor term by total_num_pos)."""
    normalizer = jnp.maximum(positives.sum().astype(jnp.float32), 1.0)
    return weight * ops.smooth_l1_loss(
        predicted, targets, beta=1.0, weights=trained, normalizer=normalizer
    )


def loss_fn(outputs: dict, batch: dict, cfg: YOLACTPlusConfig) -> tuple[jnp.ndarray, dict]:
    """YOLACT's four terms (methods/yolact.py loss_fn) and the mask IoU term: smooth L1 (beta 1)
    of the predicted against the measured IoU over the trained masks, x maskiou_loss_weight,
    / the batch's positive anchors (at least 1)."""
    loss, metrics = yolact.loss_fn(outputs, batch, cfg)
    trained = outputs["mask_iou_trained"]
    loss_mask_iou = mask_iou_loss(
        outputs["mask_iou_pred"],
        outputs["mask_iou_targets"],
        trained,
        outputs["targets"]["positives"],
        cfg.maskiou_loss_weight,
    )
    count = trained.sum().astype(jnp.float32)
    b = trained.shape[0]
    metrics = {
        **metrics,
        "loss_mask_iou": loss_mask_iou,
        "mask_iou_trained": count / b,
        "mask_iou_target_mean": jnp.sum(jnp.where(trained, outputs["mask_iou_targets"], 0.0))
        / jnp.maximum(count, 1.0),
    }
    return loss + loss_mask_iou, metrics


# ----------------------------------------------------------------------------- method interface

Config = YOLACTPlusConfig
Model = YOLACTPlus


def base_config() -> ml_collections.ConfigDict:
    """dbolya/yolact's yolact_plus_resnet50_config: YOLACT's COCO settings (yolact.base_config)
    with the YOLACT++ model fields, and its schedule: batch 8, SGD lr 1e-3 (momentum 0.9,
    weight decay 5e-4), 500 warmup iterations from 1e-4, 800k iterations with x 0.1 at 280k,
    600k, 700k and 750k (data/config.py yolact_base_config, coco_base_config)."""
    c = yolact.base_config()
    c.method = "yolact_plus"
    c.model = config_lib.model_section(YOLACTPlusConfig)
    c.schedule.total_steps = 800_000
    c.schedule.steps = (280_000, 600_000, 700_000, 750_000)
    return c


def object_sizes_covered(model: ml_collections.ConfigDict) -> tuple[str, float, float]:
    """(the field, smallest and largest object side, sqrt of box area in canvas pixels, that a
    square anchor matches at model.positive_iou) (method interface, optional)."""
    ratio = math.sqrt(float(model.positive_iou))
    sides = [float(s) * float(k) for s in model.anchor_sizes for k in model.anchor_scales]
    return "model.anchor_sizes", min(sides) * ratio, max(sides) / ratio


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """YOLACT's smoke shrink (ResNet-18 of width 16 on a 128 x 128 canvas), deformable 3x3s in
    the last block of res4 and res5 only (compile time), and a mask IoU head of three
    convolutions (the 32-cell prototype grid) trained on masks over 4 cells (the synthetic
    scenes' objects cover a few dozen at most)."""
    c = yolact.smoke(c)
    c.model.dcn_layers = (0, 0, 1, 1)
    c.model.maskiou_channels = (8, 16, 32)
    c.model.discard_mask_area = 4.0
    return c
