"""Panoptic FPN (Kirillov et al. 2019) on Mask R-CNN: the method module (methods/__init__.py).

Mask R-CNN (boxes and masks of the "thing" classes) plus detectron2's SemSegFPNHead on the same
pyramid for the "stuff" classes:

- semantic head: from each of P2..P5, conv3x3-128 + GroupNorm + ReLU layers with a 2x bilinear
  upsampling after each until stride 4 (P2: 1 conv, P3: 1, P4: 2, P5: 3), summed, a 1x1
  predictor to stuff classes + 1 (class 0 is "things"); logits at stride 4;
- loss: softmax cross-entropy over the labelled cells of the stride-4 semantic target
  (gt_semantic: 0 things, 1 + k stuff k, 255 ignored), weight 0.5 (detectron2 computes it on
  the logits upsampled to the input size; here on the target's stride-4 cells);
- inference: the semantic classes (argmax) at stride 4 travel to the host beside the instance
  detections, where `instseg_jax.panoptic.predicted_map` pastes the instances and reads the
  classes at the original pixels and `combine` merges them into one panoptic map (instance
  score >= 0.5, overlap 0.5, stuff area >= 4096 original pixels; experiments on smaller images
  scale the area). Evaluation reports PQ, SQ and RQ (instseg_jax.evaluate). detectron2
  upsamples the logits to the image bilinearly and then takes the argmax; here the argmax of
  the stride-4 logits is read at each pixel's cell (one byte per cell to the host, not 54
  floats per pixel), so stuff edges can be up to 2 px blockier.

Mask targets are Mask R-CNN's (its docstring declares how they differ from detectron2's
rasterised polygons; mask_target_sampling_ratio 0 in the COCO recipe), read from the panoptic
PNG's visible segments where detectron2's "separated" panoptic dataset trains on the instances
json's polygons.

Config: the stuff classes are the data's (a source's stuff_category_ids and stuff_names;
model.num_stuff_classes must match); thing classes are the dataset's categories as for
Mask R-CNN.
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
from instseg_jax.methods import mask_rcnn
from instseg_jax.nn.layers import ConvNorm, Dense
from instseg_jax.ops.dense import resize_bilinear

INPUTS = structures.Inputs(box_masks=True, semantic_stride=4)
IGNORE = 255


@dataclasses.dataclass(frozen=True)
class PanopticFPNConfig(mask_rcnn.MaskRCNNConfig):
    """Mask R-CNN's fields and the semantic head's, with detectron2's COCO-PanopticSegmentation
    defaults (panoptic_fpn_R_50_1x.yaml)."""

    num_stuff_classes: int = 53  # COCO panoptic's stuff categories
    semantic_channels: int = 128
    semantic_norm: str = "group_norm"
    semantic_loss_weight: float = 0.5
    # The combination's thresholds (detectron2's PANOPTIC_FPN.COMBINE).
    combine_overlap: float = 0.5
    combine_score: float = 0.5
    combine_stuff_area: float = 4096.0  # px of the original image, where the reference combines


class SemanticFPNHead(nn.Module):
    """{"p2".."p5"} -> [B, H/4, W/4, num_classes] logits (module docstring)."""

    num_classes: int
    channels: int = 128
    norm: str = "group_norm"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict):
        total = None
        for level in (2, 3, 4, 5):
            x = features[f"p{level}"]
            for k in range(max(1, level - 2)):
                x = ConvNorm(
                    self.channels, 3, 1, self.norm, dtype=self.dtype, name=f"p{level}_conv{k + 1}"
                )(x)
                if level > 2:
                    x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
            total = x if total is None else total + x
        logits = Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            name="predictor",
        )(total)
        return logits.astype(jnp.float32)


class PanopticFPN(mask_rcnn.MaskRCNN):
    cfg: PanopticFPNConfig

    def setup(self):
        super().setup()
        cfg = self.cfg
        self.semantic_head = SemanticFPNHead(
            cfg.num_stuff_classes + 1, cfg.semantic_channels, cfg.semantic_norm, cfg.dtype
        )

    def head_training(self, features, outputs: dict, batch: dict, key) -> dict:
        out = super().head_training(features, outputs, batch, key)
        out["semantic_logits"] = self.semantic_head(features)
        return out

    def payloads(self, features, canvas_boxes, classes, batch: dict) -> dict:
        out = super().payloads(features, canvas_boxes, classes, batch)
        logits = self.semantic_head(features)
        out["semantic_classes"] = jnp.argmax(logits, axis=-1).astype(jnp.uint8)
        return out


def semantic_loss(logits, targets):
    """Mean softmax cross-entropy over the cells whose target is not IGNORE (0 if none)."""
    labelled = targets != IGNORE
    classes = jnp.where(labelled, targets, 0).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, classes[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(labelled, nll, 0.0)) / jnp.maximum(labelled.sum(), 1)


def loss_fn(outputs: dict, batch: dict, cfg: PanopticFPNConfig):
    """Mask R-CNN's losses (and metrics) plus loss_sem_seg (weighted)."""
    total, metrics = mask_rcnn.loss_fn(outputs, batch, cfg)
    loss = cfg.semantic_loss_weight * semantic_loss(
        outputs["semantic_logits"], batch["gt_semantic"]
    )
    metrics["loss_sem_seg"] = loss
    return total + loss, metrics


# ----------------------------------------------------------------------------- method interface

Config = PanopticFPNConfig
Model = PanopticFPN
defaults_from_data = mask_rcnn.defaults_from_data
object_sizes_covered = mask_rcnn.object_sizes_covered


def base_config() -> ml_collections.ConfigDict:
    """detectron2's COCO-PanopticSegmentation panoptic_fpn_R_50_1x defaults; experiments start
    from here."""
    c = config_lib.base()
    c.method = "panoptic_fpn"
    c.model = config_lib.model_section(PanopticFPNConfig)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Mask R-CNN's smoke shrink on synthetic scenes with their 2 stuff bands."""
    c = mask_rcnn.smoke(c)
    c.input.synthetic_stuff = True
    m = c.model
    m.num_stuff_classes = 2
    m.semantic_channels = 32
    return c
