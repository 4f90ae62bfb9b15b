"""Keypoint R-CNN (He et al. 2017) on Mask R-CNN: the method module (methods/__init__.py).

Mask R-CNN's backbone, RPN, box head, sampling and detection selection (and its mask head when
mask_on) plus a keypoint head, as detectron2's KRCNNConvDeconvUpsampleHead and torchvision's
keypointrcnn_resnet50_fpn:

- head: RoIAlign 14x14 from each box's level, 8 x conv3x3-512 + ReLU, a 4x4 stride-2
  transposed convolution (padding 1) to one 28x28 map per keypoint, then 2x bilinear
  upsampling: 56x56 logits per keypoint;
- targets: keypoint (x, y) in a foreground RoI (x0, y0, x1, y1) falls in heatmap cell
  floor((x - x0) * 56 / (x1 - x0)) (x = x1 in the last cell); a keypoint outside the RoI or
  with visibility 0 has none;
- loss: softmax cross-entropy over the 56 x 56 cells of each keypoint that has a target,
  averaged over those keypoints in the batch (detectron2's NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS,
  torchvision's mean), times keypoint_loss_weight;
- inference: the head's heatmaps of the kept boxes travel to the host in the Detections
  ("keypoint_heatmaps", with the canvas boxes they belong to); the host
  (detections.decode_keypoints) resizes each to its box's ceil(w) x ceil(h) pixels with
  bicubic interpolation, takes the first maximum and its cell centre.

Keypoint coordinates follow the input pipeline's convention (continuous canvas pixels, the
COCO annotation's integer pixel index + 0.5, see input/coco.py); `keypoint_output_shift`
(-0.5, detectron2's) maps the decoded positions back to COCO's, and the torchvision preset sets
it to 0 (torchvision trains and predicts on the unshifted numbers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from instseg_jax import config as config_lib
from instseg_jax import structures
from instseg_jax.input.keypoints import COCO_PERSON, SYNTHETIC_SHAPES
from instseg_jax.methods import mask_rcnn
from instseg_jax.methods.roi_heads import conv_relu_stack
from instseg_jax.ops import mixed_precision
from instseg_jax.ops.sampling import upsample2x


class KeypointHead(nn.Module):
    """[B, F, 14, 14, D] pooled -> [B, F, K, 56, 56] heatmap logits."""

    num_keypoints: int
    channels: int = 512
    num_convs: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled):
        b, f, h, w, d = pooled.shape
        x = pooled.reshape(b * f, h, w, d).astype(self.dtype)
        x = conv_relu_stack(x, self.channels, self.num_convs, self.dtype)
        x = TransposedConv4x4(self.num_keypoints, self.dtype, name="score_lowres")(x)
        k = self.num_keypoints
        maps = x.transpose(0, 3, 1, 2).reshape(b * f * k, 2 * h, 2 * w).astype(jnp.float32)
        return upsample2x(maps).reshape(b, f, k, 4 * h, 4 * w)


class TransposedConv4x4(nn.Module):
    """torch's ConvTranspose2d(kernel 4, stride 2, padding 1): [n, H, W, C] -> [n, 2H, 2W, out].

    Written as the equivalent convolution of the stride-dilated input (2 zeros-padded cells per
    side, kernel mirrored); the kernel is stored as [4, 4, in, out] in the transposed
    convolution's own orientation (torch's weight[in, out, kh, kw] transposed to kh, kw, in,
    out), so imported weights need no flip.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        # torch's kaiming_normal_(mode="fan_out") on a transposed convolution's weight[in, out,
        # kh, kw] counts in x kh x kw as the fan-out: here the kernel's fan-in axes.
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
            (4, 4, x.shape[-1], self.features),
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = mixed_precision.conv(
            x,
            kernel[::-1, ::-1],
            self.dtype,
            padding=((2, 2), (2, 2)),
            lhs_dilation=(2, 2),
        )
        return mixed_precision.add_bias(y, bias)


def heatmap_targets(keypoints, rois, size: int):
    """(int32[..., K] target cell y * size + x, bool[..., K] has a target) of keypoints[..., K, 3]
    ((x, y, visibility), canvas pixels) in rois[..., 4]: torchvision's and detectron2's
    keypoints_to_heatmap."""
    x0, y0, x1, y1 = (rois[..., None, i] for i in range(4))
    x, y, v = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
    scale_x = size / jnp.maximum(x1 - x0, 1e-6)
    scale_y = size / jnp.maximum(y1 - y0, 1e-6)
    cell_x = jnp.floor((x - x0) * scale_x).astype(jnp.int32)
    cell_y = jnp.floor((y - y0) * scale_y).astype(jnp.int32)
    cell_x = jnp.where(x == x1, size - 1, cell_x)
    cell_y = jnp.where(y == y1, size - 1, cell_y)
    valid = (cell_x >= 0) & (cell_x < size) & (cell_y >= 0) & (cell_y < size) & (v > 0)
    index = jnp.where(valid, cell_y * size + cell_x, 0)
    return jax.lax.stop_gradient(index), valid


def keypoint_loss(heatmaps, targets, valid):
    """Softmax cross-entropy over the cells of heatmaps[..., K, S, S] at each keypoint's target
    cell, averaged over the keypoints that have one (0 when none has)."""
    flat = heatmaps.reshape(heatmaps.shape[:-2] + (-1,))
    log_probs = jax.nn.log_softmax(flat, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / count


@dataclasses.dataclass(frozen=True)
class KeypointRCNNConfig(mask_rcnn.MaskRCNNConfig):
    """Mask R-CNN's fields (mask_on off: detectron2's and torchvision's keypoint models have no
    mask head) and the keypoint head's, with detectron2's COCO-Keypoints defaults."""

    mask_on: bool = False
    num_keypoints: int = 17
    keypoint_pool_size: int = 14
    keypoint_head_convs: int = 8
    keypoint_head_dim: int = 512
    keypoint_loss_weight: float = 1.0
    # Static keypoint-head slots per training image (the first sampled RoIs, positives first);
    # 0 (every positive) and -1 (from the data) as mask_fg_per_image.
    keypoint_fg_per_image: int = 0
    # The mirror of each keypoint (input/keypoints.py): a flipped canvas's heatmaps swap slots.
    keypoint_flip: tuple = COCO_PERSON.flip
    # Added to decoded positions in original pixels: -0.5 returns the pipeline's continuous
    # positions to COCO's pixel indices (detectron2); torchvision's preset: 0.
    keypoint_output_shift: float = -0.5

    def __post_init__(self):
        super().__post_init__()
        if self.keypoint_flip and sorted(self.keypoint_flip) != list(range(self.num_keypoints)):
            raise config_lib.ConfigValueError(
                f"model.keypoint_flip {self.keypoint_flip} is not a permutation of the "
                f"{self.num_keypoints} keypoints (model.num_keypoints); take it from the "
                "keypoint set of input.keypoints"
            )


class KeypointRCNN(mask_rcnn.MaskRCNN):
    cfg: KeypointRCNNConfig

    def setup(self):
        super().setup()
        cfg = self.cfg
        self.keypoint_head = KeypointHead(
            cfg.num_keypoints, cfg.keypoint_head_dim, cfg.keypoint_head_convs, cfg.dtype
        )

    def heatmaps(self, features, boxes):
        """[B, R, K, S, S] heatmap logits of boxes[B, R, 4] (S = 4 x keypoint_pool_size)."""
        return self.keypoint_head(self.pool(features, boxes, self.cfg.keypoint_pool_size))

    def head_training(self, features, outputs: dict, batch: dict, key) -> dict:
        cfg = self.cfg
        out = super().head_training(features, outputs, batch, key)
        if cfg.keypoint_fg_per_image <= 0:
            raise config_lib.ConfigValueError(
                f"model.keypoint_fg_per_image is {cfg.keypoint_fg_per_image} (set when "
                "`instseg-jax train` starts); outside the trainer give it a positive number"
            )
        fg = cfg.keypoint_fg_per_image
        rois = outputs["rois"]
        boxes = rois["boxes"][:, :fg]
        logits = self.heatmaps(features, boxes)
        index = rois["gt_index"][:, :fg, None, None]
        keypoints = jnp.take_along_axis(batch["gt_keypoints"], index, axis=1)  # [B, F, K, 3]
        targets, valid = heatmap_targets(keypoints, boxes, logits.shape[-1])
        out.update(
            keypoint_logits=logits,
            keypoint_targets=targets,
            keypoint_valid=valid & rois["foreground"][:, :fg, None],
        )
        return out

    def payloads(self, features, canvas_boxes, classes, batch: dict) -> dict:
        cfg = self.cfg
        out = super().payloads(features, canvas_boxes, classes, batch)
        heatmaps = self.heatmaps(features, canvas_boxes)  # [B, K, Kp, S, S]
        flipped = batch.get("flipped")
        if flipped is not None and cfg.keypoint_flip:
            swapped = heatmaps[:, :, jnp.asarray(cfg.keypoint_flip)]
            heatmaps = jnp.where(flipped[:, None, None, None, None], swapped, heatmaps)
        if cfg.box_rescale == "per_axis":
            ratio = batch["orig_hw"].astype(jnp.float32) / batch["image_hw"].astype(jnp.float32)
            rescale = ratio[:, ::-1]  # (rx, ry)
        else:
            rescale = jnp.repeat((1.0 / batch["scale"].astype(jnp.float32))[:, None], 2, axis=1)
        shift = jnp.full((rescale.shape[0], 1), cfg.keypoint_output_shift, jnp.float32)
        out.update(
            keypoint_heatmaps=heatmaps,
            keypoint_boxes=canvas_boxes,
            keypoint_frame=jnp.concatenate([rescale, shift], axis=1),
        )
        return out


def loss_fn(outputs: dict, batch: dict, cfg: KeypointRCNNConfig):
    """Mask R-CNN's losses (and metrics) plus loss_keypoint."""
    total, metrics = mask_rcnn.loss_fn(outputs, batch, cfg)
    loss = cfg.keypoint_loss_weight * keypoint_loss(
        outputs["keypoint_logits"], outputs["keypoint_targets"], outputs["keypoint_valid"]
    )
    metrics["loss_keypoint"] = loss
    metrics["num_keypoint_targets"] = jnp.sum(outputs["keypoint_valid"]).astype(jnp.float32)
    return total + loss, metrics


# ----------------------------------------------------------------------------- method interface

Config = KeypointRCNNConfig
Model = KeypointRCNN
INPUTS = structures.Inputs(box_masks=True, keypoints=True)


object_sizes_covered = mask_rcnn.object_sizes_covered


def defaults_from_data(config: ml_collections.ConfigDict, instances_per_image) -> list[str]:
    """Mask R-CNN's mask budget when mask_on, and the keypoint head's by the same rule."""
    lines = mask_rcnn.defaults_from_data(config, instances_per_image)
    m = config.model
    return lines + mask_rcnn.head_budget(m, "keypoint_fg_per_image", instances_per_image)


def base_config() -> ml_collections.ConfigDict:
    """detectron2's COCO-Keypoints R50-FPN 1x defaults (keypoint_rcnn_R_50_FPN_1x.yaml over
    Base-Keypoint-RCNN-FPN.yaml); experiments start from here."""
    c = config_lib.base()
    c.method = "keypoint_rcnn"
    c.input.keypoints = "coco_person"
    c.model = config_lib.model_section(KeypointRCNNConfig)
    c.model.rpn_post_nms_topk_train = 1500
    # Base-Keypoint-RCNN-FPN.yaml: smooth L1 on the box head, plain L1 costing keypoint AP.
    c.model.box_smooth_l1_beta = 0.5
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Mask R-CNN's smoke shrink, the synthetic scenes' 5 keypoints, a small keypoint head."""
    c = mask_rcnn.smoke(c)
    c.input.keypoints = "synthetic_shapes"
    m = c.model
    m.num_keypoints = SYNTHETIC_SHAPES.count
    m.keypoint_flip = SYNTHETIC_SHAPES.flip
    m.keypoint_head_convs = 2
    m.keypoint_head_dim = 32
    m.keypoint_fg_per_image = 8
    return c
