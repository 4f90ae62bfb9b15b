"""BlendMask (Chen et al. 2020, "BlendMask: Top-Down Meets Bottom-Up for Instance
Segmentation"): the method module (methods/__init__.py). FCOS (methods/fcos.py) detects; a
bottom module predicts `num_bases` (4) bases at stride 4 over the whole image; every location
also predicts, through a top layer (a conv3x3 on the regression tower), attentions of
num_bases x `attention_size`^2 (4 x 14 x 14). The blender pools the bases with RoIAlign to
`bottom_resolution`^2 (56 x 56) inside a box (the matched ground-truth box in training, the
detected box at test), upsamples the attentions bilinearly to the same size, softmaxes them over
the bases and sums bases x attentions: box-relative 56 x 56 mask logits (Detections' `masks`
payload). Defaults follow AdelaiDet's configs/BlendMask/R_50_1x.yaml (Base-BlendMask.yaml: no
level scales, candidates thresholded on class score x centerness); every one is a config field.

Static shapes:
  mask slots   training: at most `mask_instances_per_image` positive locations per image (a
               uniform random subset when there are more; counted in the metrics); the
               reference trains every positive.
  blender      one RoIAlign of [B, P] boxes over the bases and one pair of bilinear matrices for
               the attentions: no per-instance loop.
  test         FCOS's detections (K slots), then the masks of the K kept locations.

Losses: FCOS's; the blender's BCE averaged over each slot's 56 x 56 pixels, weighted by the
slot's centerness target and divided by the sum of those targets (the reference divides by the
sum over all positives; the two agree when nothing is over the budget); the auxiliary semantic
loss (the bottom module's `semantic_convs` convs on P3 to C + 1 logits, softmax cross-entropy at
stride 8 against each cell's instance class, background 0, a cell two instances cover taking
the later one, averaged over each image's extent padded to 32 pixels as the reference pads its
batch: `semantic_loss`) x `semantic_loss_weight` (0.3).

Attention layout: channel base x A^2 + row x A + column, as the reference's view(N, 4, 14, 14).
Known differences from the reference: GroupNorm in the bottom module and the semantic head (the
reference uses BatchNorm); mask targets are each instance's box crop (input.mask_size) pooled
with aligned RoIAlign to 56 x 56 and thresholded at 0.5 (ops.mask_targets), detectron2's
crop_and_resize of the polygon or bitmap; the semantic targets are the instance masks sampled at
the centres of the stride-8 cells (the reference takes every 8th pixel of its full map); the
semantic loss pads each image to 32 pixels as if it were alone, where the reference pads each
GPU's batch to its largest image, so there an image's share of easy background cells (and the
loss's denominator) depends on the other image it was batched with (a 4:3 beside a 3:4 image
gains about a third more cells): a per-image rule is the one a static canvas can state, and its
COCO AP cost is not measured.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from instseg_jax import config as config_lib
from instseg_jax import ops, structures
from instseg_jax.methods import condinst, fcos
from instseg_jax.nn.layers import Conv, GroupNorm, torch_default_bias, torch_default_kernel
from instseg_jax.ops import dense

BASES_STRIDE = 4
SEMANTIC_STRIDE = 8

INPUTS = structures.Inputs(box_masks=True, full_mask_stride=SEMANTIC_STRIDE)


@dataclasses.dataclass(frozen=True)
class BlendMaskConfig(fcos.FCOSConfig):
    level_scales: bool = False  # Base-BlendMask.yaml: FCOS.USE_SCALE False
    score_threshold_on: str = "product"  # FCOS.THRESH_WITH_CTR True
    num_bases: int = 4
    bases_channels: int = 128
    bases_convs: int = 3  # at stride 8, then an upsampling and one more conv at stride 4
    attention_size: int = 14
    bottom_resolution: int = 56
    pooler_sampling_ratio: int = 1
    semantic_convs: int = 2
    semantic_loss_weight: float = 0.3
    mask_instances_per_image: int = 250
    mask_loss_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_bases", "attention_size", "bottom_resolution", "pooler_sampling_ratio"):
            if getattr(self, name) < 1:
                raise config_lib.ConfigValueError(
                    f"model.{name} must be >= 1, got {getattr(self, name)}"
                )

    @property
    def attention_length(self) -> int:
        """784 for the defaults: 4 bases x 14 x 14."""
        return self.num_bases * self.attention_size**2


def blend(bases, boxes, attentions, cfg: BlendMaskConfig):
    """Mask logits float32[B, P, R, R] (R = bottom_resolution) of P boxes per image.

    bases [B, H/4, W/4, num_bases]; boxes [B, P, 4] canvas xyxy; attentions [B, P,
    attention_length] (module docstring: layout). The bases are pooled with aligned RoIAlign
    (`pooler_sampling_ratio` samples per bin), the attentions upsampled bilinearly (half-pixel
    centres) and softmaxed over the bases; the logit of a pixel is sum_k base_k x attention_k.
    """
    b, p = boxes.shape[:2]
    r, a, k = cfg.bottom_resolution, cfg.attention_size, cfg.num_bases
    pooled = ops.roi_align(
        bases, boxes, r, 1.0 / BASES_STRIDE, cfg.pooler_sampling_ratio, True
    )  # [B, P, R, R, k]
    maps = attentions.reshape(b * p, k, a, a).transpose(0, 2, 3, 1)  # [BP, a, a, k]
    weights = jax.nn.softmax(dense.resize_bilinear(maps, (r, r)), axis=-1)
    return (pooled.reshape(b * p, r, r, k) * weights).sum(-1).reshape(b, p, r, r)


def semantic_labels(full_masks, classes, valid):
    """int32[B, h, w]: 1 + the class of the last valid instance slot covering each cell, 0 for
    background. full_masks [B, N, h, w]; classes int32[B, N]; valid bool[B, N]."""
    n = full_masks.shape[1]
    covering = (full_masks > 0) & valid[:, :, None, None]
    ranked = jnp.where(covering, jnp.arange(1, n + 1)[None, :, None, None], 0)
    last = ranked.argmax(axis=1)  # [B, h, w]
    b, h, w = last.shape
    cls = jnp.take_along_axis(classes, last.reshape(b, h * w), axis=1).reshape(b, h, w)
    return jnp.where(covering.any(axis=1), cls + 1, 0).astype(jnp.int32)


def semantic_loss(logits, labels, image_hw, stride: int, size_divisibility: int = 32):
    """Softmax cross-entropy of logits [B, h, w, C + 1] against labels int32[B, h, w] averaged
    over the cells of each image's padded extent: its valid region rounded up to
    size_divisibility pixels, where the reference's padded batch holds background (AdelaiDet
    blendmask.py pads basis_sem with 0 through ImageList.from_tensors(..., size_divisibility,
    0), and basis_module.py averages F.cross_entropy over all of it). The canvas beyond that
    extent, which the reference never sees, is left out. The reference's batch is also padded
    to its largest image, so the padding an image gets there depends on its GPU's other image:
    here each image is padded as if alone."""
    _, h, w, _ = logits.shape
    extent = -(-image_hw.astype(jnp.int32) // size_divisibility) * size_divisibility // stride
    rows = jnp.arange(h)[None, :, None] < extent[:, 0, None, None]
    cols = jnp.arange(w)[None, None, :] < extent[:, 1, None, None]
    inside = (rows & cols).astype(jnp.float32)  # [B, h, w]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)
    return jnp.sum(nll[..., 0] * inside) / jnp.maximum(inside.sum(), 1.0)


class SemanticHead(nn.Module):
    """`convs` x (conv3x3 + GroupNorm + ReLU) and a 1x1 conv to C + 1 logits (background 0);
    plain nn.Conv2d layers in the reference (basis_module.py seg_head): torch's default init."""

    channels: int
    convs: int
    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.convs):
            x = Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                     dtype=self.dtype, kernel_init=torch_default_kernel(),
                     name=f"conv{i}")(x)  # fmt: skip
            x = nn.relu(GroupNorm(32, self.dtype, name=f"norm{i}")(x))
        return Conv(
            self.num_classes + 1,
            (1, 1),
            dtype=self.dtype,
            kernel_init=torch_default_kernel(),
            bias_init=torch_default_bias(x.shape[-1]),
            name="logits",
        )(x)


class BlendMask(fcos.FCOS):
    """FCOS plus the top layer (attentions, a conv3x3 on each level's regression tower), the
    bottom module (bases) and the semantic head (training only)."""

    cfg: BlendMaskConfig

    def setup(self):
        super().setup()
        cfg = self.cfg
        self.top_layer = Conv(
            cfg.attention_length,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=cfg.dtype,
            kernel_init=nn.initializers.normal(0.01),
        )
        self.bottom = condinst.MaskBranch(
            cfg.bases_channels, cfg.bases_convs, cfg.num_bases, cfg.dtype, upsampled_convs=1
        )
        self.semantic_head = SemanticHead(
            cfg.bases_channels, cfg.semantic_convs, cfg.num_classes, cfg.dtype
        )

    def predict(self, image) -> dict:
        """FCOS's predictions plus "attentions" [B, T, attention_length] per location and the
        "bases" [B, H/4, W/4, num_bases]."""
        cfg = self.cfg
        predictions = super().predict(image)
        b = image.shape[0]
        attentions = jnp.concatenate(
            [self.top_layer(t).reshape(b, -1, cfg.attention_length) for t in predictions["towers"]],
            axis=1,
        ).astype(jnp.float32)
        bases = self.bottom(predictions["features"]).astype(jnp.float32)
        return {**predictions, "attentions": attentions, "bases": bases}

    def prediction_outputs(self, predictions: dict) -> dict:
        return {name: predictions[name] for name in fcos.LOCATION_OUTPUTS}

    def payloads(self, predictions: dict, kept: dict, batch: dict) -> dict:
        """The blender's 56 x 56 masks of the kept locations in their detected boxes."""
        chosen = jnp.take_along_axis(predictions["attentions"], kept["location"][..., None], axis=1)
        masks = jax.nn.sigmoid(blend(predictions["bases"], kept["boxes"], chosen, self.cfg))
        return {"masks": jnp.where(kept["valid"][..., None, None], masks, 0.0)}

    def head_training(self, predictions: dict, targets: dict, batch: dict, key) -> dict:
        """The blender's logits of the trained slots in their matched ground-truth boxes, their
        box-crop targets, and the semantic head's logits."""
        cfg = self.cfg
        slots = fcos.positive_slots(targets, cfg.mask_instances_per_image, key)
        gt_boxes = jnp.take_along_axis(batch["gt_boxes"], slots["gt"][..., None], axis=1)
        chosen = jnp.take_along_axis(
            predictions["attentions"], slots["location"][..., None], axis=1
        )
        mask_logits = blend(predictions["bases"], gt_boxes, chosen, cfg)  # [B, P, R, R]
        mask_targets, _ = ops.mask_targets(
            batch["gt_masks"],
            batch["gt_boxes"],
            {"gt_index": slots["gt"], "boxes": gt_boxes, "foreground": slots["valid"]},
            slots["gt"].shape[1],
            cfg.bottom_resolution,
        )
        return {
            "mask_logits": mask_logits,
            "mask_targets": mask_targets,
            "targets": {
                **targets,
                "slot_valid": slots["valid"],
                "slot_centerness": jnp.take_along_axis(
                    targets["centerness"], slots["location"], axis=1
                ),
                "overflow": slots["overflow"],
            },
            "semantic_logits": self.semantic_head(predictions["features"]["p3"]).astype(
                jnp.float32
            ),
        }


def loss_fn(outputs: dict, batch: dict, cfg: BlendMaskConfig) -> tuple[jnp.ndarray, dict]:
    """FCOS's losses, the blender's centerness-weighted BCE and the semantic cross-entropy x 0.3
    (module docstring)."""
    total, metrics = fcos.loss_fn(outputs, batch, cfg)
    targets = outputs["targets"]
    weights = targets["slot_centerness"] * targets["slot_valid"]  # [B, P]
    pixels = cfg.bottom_resolution**2  # each slot's BCE is its mean over its pixels
    loss_mask = cfg.mask_loss_weight * ops.binary_cross_entropy_with_logits(
        outputs["mask_logits"],
        outputs["mask_targets"],
        weights=weights[..., None, None] / pixels,
        normalizer=jnp.maximum(weights.sum(), 1e-6),
    )
    semantic = outputs["semantic_logits"]  # [B, H/8, W/8, C + 1]
    labels = semantic_labels(batch["gt_full_masks"], batch["gt_classes"], batch["gt_valid"])
    stride = batch["image"].shape[1] // semantic.shape[1]
    loss_semantic = cfg.semantic_loss_weight * semantic_loss(
        semantic, labels, batch["image_hw"], stride
    )
    metrics = {
        **metrics,
        "loss_mask": loss_mask,
        "loss_semantic": loss_semantic,
        **fcos.slot_budget_metrics(targets),
    }
    return total + loss_mask + loss_semantic, metrics


# ----------------------------------------------------------------------------- method interface

Config = BlendMaskConfig
Model = BlendMask


def base_config() -> ml_collections.ConfigDict:
    """AdelaiDet's BlendMask R_50_1x COCO settings (FCOS's schedule and input: multi-scale
    short side 640..800, 800 x 1333 at test, batch 16, lr 0.01, 90k steps)."""
    c = fcos.base_config()
    c.method = "blendmask"
    c.model = config_lib.model_section(BlendMaskConfig)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a BlendMask config to seconds on a CPU: FCOS's smoke shrink plus a narrow bottom
    module, 7 x 7 attentions, 28 x 28 masks and 16 mask slots."""
    c = fcos.smoke(c)
    m = c.model
    m.bases_channels = 32
    m.bases_convs = 2
    m.attention_size = 7
    m.bottom_resolution = 28
    m.mask_instances_per_image = 16
    c.input.mask_size = 28
    return c
