"""Mask2Former (Cheng et al. 2022, "Masked-attention Mask Transformer for Universal Image
Segmentation") and MaskFormer (Cheng et al. 2021) as its config variant: the method module
(methods/__init__.py). Set prediction: `num_queries` queries each predict a class (or "no
object") and a mask; training matches queries to ground truths one-to-one (Hungarian matching,
ops/matching.py); test time takes the best query-class scores. No anchors, no boxes, no NMS.

Defaults follow facebookresearch/Mask2Former's
configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml; every one is a config field.

Model:
  backbone     ResNet (frozen BN, every stage trained: FREEZE_AT 0), res2..res5.
  pixel        "msdeform" (Mask2Former): res3-res5 each projected (1x1 conv + GroupNorm 32) to
  decoder      conv_dim, plus sine positions and a learned level embedding, through
               `encoder_layers` multi-scale deformable attention layers (ops/sampling.py:
               `encoder_heads` heads, `encoder_points` points per level, FFN 1024, post-norm);
               res2 joins FPN-style (lateral 1x1 + bilinear upsampling, 3x3 conv); a 1x1 conv
               gives the stride-4 mask features. "fpn" (MaskFormer's per-pixel decoder): a plain
               top-down FPN (nearest upsampling) with a 3x3 conv to the mask features.
  transformer  "masked" (Mask2Former): `decoder_layers` layers of masked cross-attention ->
  decoder      self-attention -> FFN (post-norm), cross-attending round-robin to the pixel
               decoder's strides 32, 16, 8; each query attends only where its previous mask
               prediction (resized to that scale) has probability >= 0.5, everywhere when that
               region is empty; predictions before the first layer and after every layer.
               "detr" (MaskFormer): DETR's decoder (self-attention -> full cross-attention to the
               projected res5 -> FFN) from zero queries, predictions after every layer.
  heads        LayerNorm, then a linear class head (C + 1, the last "no object") and a 3-layer
               MLP mask embedding dotted with the mask features: [Q, H/4, W/4] mask logits.

Training (inside the model, under stop_gradient; each prediction layer matched on its own, deep
supervision): the cost of query q for ground truth g is class_weight x (-p_q(class_g)) +
mask_weight x BCE + dice_weight x dice, BCE and dice over `match_points` points drawn uniformly
(the same points for every query and ground truth of an image; 0: over every cell of the
stride-4 maps, for small canvases where that is cheaper than sampling); padded ground truths are
never matched. Losses: cross-entropy over all queries (unmatched ones to "no object", weighted
no_object_weight) x class_weight; BCE and dice of each matched pair over `train_points` points
sampled by uncertainty (oversample_ratio, importance_sample_ratio: PointRend's rule), summed
over pairs / ground truths in the global batch, x mask_weight and x dice_weight.

Test: scores softmax(class)[:, :C], the best `detections_per_image` (query, class) pairs of the
Q x C, each scored class probability x the mean mask probability inside its mask (mask logit >
0); canvas masks at stride 4 (`canvas_masks` payload, boxes derived by the host).

Initialisation is the reference's, layer for layer (tests/methods/test_head_init.py): Xavier
on the transformer weights with nn.MultiheadAttention's packed q/k/v rule, torch's nn.Linear
defaults on the class and mask-embedding heads and on the FFN biases, c2_xavier_fill on the
pixel decoders' convolutions (until 2026-12-07 those four were Xavier on each [D, D]
projection, Flax defaults and zero biases, and He-uniform: the nuclei figures predate it).

Known differences from the reference:
  - Ground-truth masks are sampled at the points (bilinearly) from the pipeline's stride-4
    masks (structures.py gt_full_masks: each mask sampled at the stride-4 cell centres and
    thresholded at 0.5), where the reference point-samples the full-resolution masks
    (matcher.py and criterion.py: point_sample of the targets' bitmasks); an object a few
    pixels wide is coarser here. Measured in transformers on three 64 x 64 scenes: up to
    1.3% on a layer's dice term, 0.14% on the total, 10 of 96 query assignments moved, 8 of
    them among 3-5 px discs (experiments/parity/mask2former_loss.py; with the stride-4 masks
    on both sides the losses, matching and gradients agree to float32 noise).
  - Test images are capped at a long side of 1024 (the canvas; input.test_max_long_side), the
    reference's at 1333 (detectron2's MAX_SIZE_TEST): the training canvas serves both.
  - Mask scores average over the stride-4 mask, not over the mask upsampled to the image.
  - The canvas is fixed (input.canvas_hw); the reference's positional encodings and attention
    ignore padding the same way (it passes no padding masks).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instseg_jax import config as config_lib
from instseg_jax import structures
from instseg_jax.backbones.resnet import normalize
from instseg_jax.methods.detector import DetectorConfig, build_backbone, smoke_backbone
from instseg_jax.nn.layers import (
    Conv,
    GroupNorm,
    kaiming_uniform_a1,
    torch_default_bias,
    torch_default_kernel,
)
from instseg_jax.nn.transformer import (
    Attention,
    FeedForward,
    MultiScaleDeformableAttention,
    attend_everywhere_if_empty,
    dense_layer,
    layer_norm,
    sine_positions,
    xavier,
)
from instseg_jax.ops import dense
from instseg_jax.ops.matching import min_cost_matching
from instseg_jax.ops.sampling import point_sample, uncertain_points
from instseg_jax.ops.topk import top_k

MASK_STRIDE = 4

INPUTS = structures.Inputs(full_mask_stride=MASK_STRIDE)

PIXEL_DECODERS = ("msdeform", "fpn")
TRANSFORMER_DECODERS = ("masked", "detr")


@dataclasses.dataclass(frozen=True)
class Mask2FormerConfig(DetectorConfig):
    canvas_hw: tuple[int, int] = (1024, 1024)
    freeze_at: int = 0
    pixel_decoder: str = "msdeform"
    conv_dim: int = 256
    mask_dim: int = 256
    encoder_layers: int = 6
    encoder_heads: int = 8
    encoder_points: int = 4
    encoder_feedforward: int = 1024
    transformer_decoder: str = "masked"
    hidden_dim: int = 256
    num_queries: int = 100
    heads: int = 8
    decoder_layers: int = 9
    decoder_feedforward: int = 2048
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_points: int = 12544  # loss points per matched mask (importance-sampled)
    match_points: int = 12544  # uniform points per image for the matching cost; 0: every cell
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    # Ground-truth slots per image the mask losses run over (valid ones first; 0: all of
    # input.max_instances); matched pairs past them are counted, not trained.
    mask_pairs_per_image: int = 0
    detections_per_image: int = 100

    COARSEST_LEVEL = ("res5", 32)

    def __post_init__(self):
        super().__post_init__()
        if self.pixel_decoder not in PIXEL_DECODERS:
            raise config_lib.ConfigValueError(
                f"model.pixel_decoder must be one of {PIXEL_DECODERS}, got {self.pixel_decoder!r}"
            )
        if self.transformer_decoder not in TRANSFORMER_DECODERS:
            raise config_lib.ConfigValueError(
                f"model.transformer_decoder must be one of {TRANSFORMER_DECODERS}, got "
                f"{self.transformer_decoder!r}"
            )
        for name in ("conv_dim", "hidden_dim"):
            if getattr(self, name) % 32:
                raise config_lib.ConfigValueError(
                    f"model.{name} must be a multiple of 32 (GroupNorm 32 and sine positions), "
                    f"got {getattr(self, name)}"
                )
        if self.hidden_dim % self.heads or self.conv_dim % self.encoder_heads:
            raise config_lib.ConfigValueError(
                "model.hidden_dim must divide by model.heads and model.conv_dim by "
                "model.encoder_heads"
            )
        if self.transformer_decoder == "masked" and self.conv_dim != self.hidden_dim:
            raise config_lib.ConfigValueError(
                "the masked decoder attends to the pixel decoder's features as they are: "
                f"model.conv_dim ({self.conv_dim}) must equal model.hidden_dim ({self.hidden_dim})"
            )
        if self.match_points < 0:
            raise config_lib.ConfigValueError(
                f"model.match_points must be >= 0 (0: every cell), got {self.match_points}"
            )
        if self.decoder_layers < 1 or self.num_queries < 1 or self.train_points < 1:
            raise config_lib.ConfigValueError(
                "model.decoder_layers, model.num_queries and model.train_points must be >= 1"
            )
        if self.mask_pairs_per_image < 0:
            raise config_lib.ConfigValueError(
                f"model.mask_pairs_per_image must be >= 0 (0: all), got {self.mask_pairs_per_image}"
            )
        if not 0.0 <= self.importance_sample_ratio <= 1.0 or self.oversample_ratio < 1.0:
            raise config_lib.ConfigValueError(
                "model.importance_sample_ratio must be in [0, 1] and model.oversample_ratio >= 1"
            )


# ----------------------------------------------------------------------------- building blocks
# (the generic transformer blocks are nn/transformer.py's)

EMBED_INIT = nn.initializers.normal(1.0)  # torch's nn.Embedding


def norm32(name, dtype):
    """GroupNorm 32 (torch's epsilon, nn/layers.py GN_EPSILON: the reference's numbers)."""
    return GroupNorm(32, dtype, name=name)


def _conv(features, kernel, name, use_bias, dtype):
    pad = kernel // 2
    return Conv(
        features,
        (kernel, kernel),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=kaiming_uniform_a1(),  # detectron2's c2_xavier_fill, both pixel decoders
        name=name,
    )


def _conv_gn(x, features, kernel, name, dtype, relu):
    """A bias-free conv `name` then GroupNorm 32 `name`_norm (the reference's Conv2d with norm),
    ReLU when `relu`: the FPN steps of both pixel decoders."""
    x = norm32(f"{name}_norm", dtype)(_conv(features, kernel, name, False, dtype)(x))
    return nn.relu(x) if relu else x


class DeformablePixelDecoder(nn.Module):
    """MSDeformAttnPixelDecoder: (mask features [B, H/4, W/4, mask_dim], multi-scale features
    at strides 32, 16, 8 [B, h, w, conv_dim])."""

    cfg: Mask2FormerConfig

    @nn.compact
    def __call__(self, features: dict):
        cfg = self.cfg
        dtype = cfg.dtype
        names = ("res5", "res4", "res3")
        maps = []
        for i, name in enumerate(names):
            x = Conv(
                cfg.conv_dim, (1, 1), dtype=dtype, kernel_init=xavier(), name=f"input_proj{i}"
            )(features[name])
            maps.append(norm32(f"input_norm{i}", dtype)(x))
        shapes = tuple((m.shape[1], m.shape[2]) for m in maps)
        batch = maps[0].shape[0]
        level_embed = nn.Embed(
            len(names), cfg.conv_dim, embedding_init=EMBED_INIT, name="level_embed"
        ).embedding
        src = jnp.concatenate([m.reshape(batch, -1, cfg.conv_dim) for m in maps], 1)
        # The level embeddings go to each image before they spread over its cells: their
        # gradient then sums an image's cells on its own device, and only [levels, conv_dim]
        # crosses devices (spread first, a [cells, conv_dim] sum was all-reduced per layer).
        image_levels = jnp.broadcast_to(level_embed[None], (batch,) + level_embed.shape)
        pos = jnp.concatenate(
            [
                jnp.asarray(sine_positions(h, w, cfg.conv_dim)).reshape(1, h * w, -1)
                + image_levels[:, i : i + 1]
                for i, (h, w) in enumerate(shapes)
            ],
            1,
        ).astype(dtype)
        reference = np.concatenate(
            [
                np.stack(
                    np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h), -1
                ).reshape(-1, 2)
                for h, w in shapes
            ]
        ).astype(np.float32)
        reference = jnp.broadcast_to(jnp.asarray(reference)[None], (batch,) + reference.shape)
        for i in range(cfg.encoder_layers):
            attended = MultiScaleDeformableAttention(
                cfg.conv_dim,
                cfg.encoder_heads,
                cfg.encoder_points,
                shapes,
                dtype,
                name=f"encoder{i}_attn",
            )(src + pos, reference, src)
            src = layer_norm(f"encoder{i}_norm", dtype)(src + attended)
            src = FeedForward(cfg.conv_dim, cfg.encoder_feedforward, dtype, name=f"encoder{i}_ffn")(
                src
            )
        outs, start = [], 0
        for h, w in shapes:
            outs.append(src[:, start : start + h * w].reshape(batch, h, w, cfg.conv_dim))
            start += h * w
        lateral = _conv_gn(features["res2"], cfg.conv_dim, 1, "adapter1", dtype, relu=False)
        y = lateral + dense.resize_bilinear(outs[-1], lateral.shape[1:3]).astype(lateral.dtype)
        y = _conv_gn(y, cfg.conv_dim, 3, "layer1", dtype, relu=True)
        mask_features = _conv(cfg.mask_dim, 1, "mask_features", True, dtype)(y)
        return mask_features, outs


class FPNPixelDecoder(nn.Module):
    """MaskFormer's BasePixelDecoder: res5 -> 3x3 conv; then res4, res3, res2 each a lateral 1x1
    conv + the nearest-upsampled coarser output -> 3x3 conv (GroupNorm 32, ReLU); a 3x3 conv to
    the mask features. Returns (mask features, outputs at strides 32, 16, 8)."""

    cfg: Mask2FormerConfig

    @nn.compact
    def __call__(self, features: dict):
        cfg = self.cfg
        dtype = cfg.dtype
        y = _conv_gn(features["res5"], cfg.conv_dim, 3, "layer4", dtype, relu=True)
        outs = [y]
        for level in (4, 3, 2):
            lateral = _conv_gn(
                features[f"res{level}"], cfg.conv_dim, 1, f"adapter{level - 1}", dtype, relu=False
            )
            up = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)
            y = _conv_gn(lateral + up, cfg.conv_dim, 3, f"layer{level - 1}", dtype, relu=True)
            outs.append(y)
        mask_features = _conv(cfg.mask_dim, 3, "mask_features", True, dtype)(y)
        return mask_features, outs[:3]


class PredictionHeads(nn.Module):
    """(class logits [B, Q, C+1], mask logits [B, Q, H/4, W/4]) of query states [B, Q, D]."""

    cfg: Mask2FormerConfig

    @nn.compact
    def __call__(self, queries, mask_features):
        cfg = self.cfg
        x = layer_norm("decoder_norm", cfg.dtype)(queries)

        # torch's nn.Linear defaults: the references leave class_embed and the mask MLP as built.
        def linear(features, name, fan_in):
            return dense_layer(
                features, name, torch_default_kernel(), torch_default_bias(fan_in), cfg.dtype
            )

        class_logits = linear(cfg.num_classes + 1, "class_embed", x.shape[-1])(x)
        e = x
        for i in range(3):
            e = linear(cfg.hidden_dim if i < 2 else cfg.mask_dim, f"mask_embed{i}", e.shape[-1])(e)
            e = nn.relu(e) if i < 2 else e
        mask_logits = jnp.einsum("bqc,bhwc->bqhw", e, mask_features.astype(e.dtype))
        return class_logits.astype(jnp.float32), mask_logits.astype(jnp.float32)


class MaskedDecoder(nn.Module):
    """MultiScaleMaskedTransformerDecoder: lists (one entry per prediction) of class and mask
    logits."""

    cfg: Mask2FormerConfig

    @nn.compact
    def __call__(self, multi_scale, mask_features):
        cfg = self.cfg
        dtype = cfg.dtype
        batch = mask_features.shape[0]
        levels = len(multi_scale)
        level_embed = nn.Embed(
            levels, cfg.hidden_dim, embedding_init=EMBED_INIT, name="level_embed"
        ).embedding
        memory, positions, shapes = [], [], []
        for i, x in enumerate(multi_scale):
            h, w = x.shape[1:3]
            shapes.append((h, w))
            memory.append(x.reshape(batch, h * w, -1) + level_embed[i].astype(x.dtype))
            positions.append(
                jnp.asarray(sine_positions(h, w, cfg.hidden_dim))
                .reshape(1, h * w, -1)
                .astype(dtype)
            )
        query_feat = nn.Embed(
            cfg.num_queries, cfg.hidden_dim, embedding_init=EMBED_INIT, name="query_feat"
        ).embedding
        query_pos = nn.Embed(
            cfg.num_queries, cfg.hidden_dim, embedding_init=EMBED_INIT, name="query_embed"
        ).embedding
        query_pos = jnp.broadcast_to(query_pos[None].astype(dtype), (batch,) + query_pos.shape)
        output = jnp.broadcast_to(query_feat[None].astype(dtype), query_pos.shape)
        heads = PredictionHeads(cfg, name="heads")

        def predict(output, target_shape):
            class_logits, mask_logits = heads(output, mask_features)
            resized = dense.resize_bilinear(mask_logits.transpose(0, 2, 3, 1), target_shape)
            blocked = jax.lax.stop_gradient(resized.reshape(batch, -1, cfg.num_queries) < 0.0)
            # The barrier keeps XLA from fusing the mask's whole producer chain into each
            # attention's softmax (that fusion took XLA:CPU minutes to compile).
            blocked = jax.lax.optimization_barrier(blocked.transpose(0, 2, 1))  # [B, Q, hw]
            return class_logits, mask_logits, blocked

        class_logits, mask_logits, blocked = predict(output, shapes[0])
        all_classes, all_masks = [class_logits], [mask_logits]
        for i in range(cfg.decoder_layers):
            level = i % levels
            blocked = attend_everywhere_if_empty(blocked)
            output = Attention(cfg.hidden_dim, cfg.heads, dtype, name=f"cross{i}")(
                output, query_pos, memory[level], positions[level], blocked
            )
            output = Attention(cfg.hidden_dim, cfg.heads, dtype, name=f"self{i}")(
                output, query_pos, output, query_pos
            )
            output = FeedForward(cfg.hidden_dim, cfg.decoder_feedforward, dtype, name=f"ffn{i}")(
                output
            )
            class_logits, mask_logits, blocked = predict(output, shapes[(i + 1) % levels])
            all_classes.append(class_logits)
            all_masks.append(mask_logits)
        return all_classes, all_masks


class DETRDecoder(nn.Module):
    """MaskFormer's decoder: DETR layers (self-attention -> cross-attention to the projected res5
    with sine positions -> FFN, post-norm) from zero query states; predictions after each."""

    cfg: Mask2FormerConfig

    @nn.compact
    def __call__(self, res5, mask_features):
        cfg = self.cfg
        dtype = cfg.dtype
        batch, h, w, _ = res5.shape
        # maskformer_transformer_decoder.py: c2_xavier_fill on the 1x1 input projection.
        memory = Conv(
            cfg.hidden_dim, (1, 1), dtype=dtype, kernel_init=kaiming_uniform_a1(), name="input_proj"
        )(res5)
        memory = memory.reshape(batch, h * w, cfg.hidden_dim)
        positions = jnp.asarray(sine_positions(h, w, cfg.hidden_dim)).reshape(1, h * w, -1)
        query_pos = nn.Embed(
            cfg.num_queries, cfg.hidden_dim, embedding_init=EMBED_INIT, name="query_embed"
        ).embedding
        query_pos = jnp.broadcast_to(query_pos[None].astype(dtype), (batch,) + query_pos.shape)
        output = jnp.zeros_like(query_pos)
        heads = PredictionHeads(cfg, name="heads")
        all_classes, all_masks = [], []
        for i in range(cfg.decoder_layers):
            output = Attention(cfg.hidden_dim, cfg.heads, dtype, name=f"self{i}")(
                output, query_pos, output, query_pos
            )
            output = Attention(cfg.hidden_dim, cfg.heads, dtype, name=f"cross{i}")(
                output, query_pos, memory, positions.astype(dtype)
            )
            output = FeedForward(cfg.hidden_dim, cfg.decoder_feedforward, dtype, name=f"ffn{i}")(
                output
            )
            class_logits, mask_logits = heads(output, mask_features)
            all_classes.append(class_logits)
            all_masks.append(mask_logits)
        return all_classes, all_masks


# ----------------------------------------------------------------------------- model


class Mask2Former(nn.Module):
    cfg: Mask2FormerConfig

    def setup(self):
        cfg = self.cfg
        self.backbone = build_backbone(cfg)
        if cfg.pixel_decoder == "msdeform":
            self.pixel_decoder = DeformablePixelDecoder(cfg)
        else:
            self.pixel_decoder = FPNPixelDecoder(cfg)
        if cfg.transformer_decoder == "masked":
            self.transformer_decoder = MaskedDecoder(cfg)
        else:
            self.transformer_decoder = DETRDecoder(cfg)

    def predict(self, image):
        """(class logits [P, B, Q, C+1], mask logits [P, B, Q, H/4, W/4]) of every prediction
        layer P (the last is the model's answer) for images [B, H, W, 3] in 0-255 RGB."""
        cfg = self.cfg
        features = self.backbone(normalize(image, cfg.dtype))
        mask_features, multi_scale = self.pixel_decoder(features)
        if cfg.transformer_decoder == "masked":
            classes, masks = self.transformer_decoder(multi_scale, mask_features)
        else:
            classes, masks = self.transformer_decoder(features["res5"], mask_features)
        return jnp.stack(classes), jnp.stack(masks)

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        cfg = self.cfg
        class_logits, mask_logits = self.predict(batch["image"])
        if not train:
            return {"detections": detect(class_logits[-1], mask_logits[-1], cfg)}
        if key is None:
            raise ValueError("training needs a key for the matching and loss points")
        if not cfg.deep_supervision:
            class_logits, mask_logits = class_logits[-1:], mask_logits[-1:]
        return {
            "class_logits": class_logits,
            "targets": set_targets(class_logits, mask_logits, batch, cfg, key),
        }


# ----------------------------------------------------------------------------- matching, losses


def match_cost(class_logits, point_logits, point_labels, gt_classes, cfg):
    """Cost [Q, G] of one image's queries for its ground truths: class_weight x (-p(class)) +
    mask_weight x mean BCE + dice_weight x dice over the shared points. point_logits [Q, N],
    point_labels [G, N]."""
    probs = jax.nn.softmax(class_logits, -1)  # [Q, C+1]
    class_cost = -probs[:, gt_classes]  # [Q, G]
    num_points = point_logits.shape[-1]
    positive = jax.nn.softplus(-point_logits)  # BCE against 1
    negative = jax.nn.softplus(point_logits)  # BCE against 0
    bce = (positive @ point_labels.T + negative @ (1.0 - point_labels).T) / num_points
    p = jax.nn.sigmoid(point_logits)
    dice = 1.0 - (2.0 * p @ point_labels.T + 1.0) / (
        p.sum(-1)[:, None] + point_labels.sum(-1)[None, :] + 1.0
    )
    return cfg.class_weight * class_cost + cfg.mask_weight * bce + cfg.dice_weight * dice


def set_targets(
    class_logits, mask_logits, batch, cfg: Mask2FormerConfig, key, draws: dict | None = None
) -> dict:
    """Per prediction layer: the matching and the point samples the losses need.

    Returns query_classes int32[P, B, Q] (C: no object), query_to_gt int32[P, B, Q] (the matched
    ground-truth slot, -1: none); over K = mask_pairs_per_image slots (valid ground truths
    first): pair_valid bool[P, B, K] (the slot's ground truth is matched), point_logits
    [P, B, K, N] (the matched query's mask logits at the uncertainty-sampled points: they carry
    the gradient) and point_labels [P, B, K, N]; pairs_over_budget int32[P].

    draws: the uniform draws in [0, 1) given instead of drawn from `key` (experiments/parity/
    mask2former_loss.py feeds transformers the same ones): "match" [P, B, match_points, 2],
    "candidates" [P, B, K, train_points x oversample_ratio, 2] and "fill" [P, B, K,
    train_points - int(importance_sample_ratio x train_points), 2], per ground-truth slot.
    """
    num_layers, b, q = class_logits.shape[:3]
    gt_valid = batch["gt_valid"]
    gt_classes = batch["gt_classes"]
    gt_masks = batch["gt_full_masks"]  # [B, G, H/4, W/4] bool
    g = gt_valid.shape[1]
    match_key, loss_key = jax.random.split(key)

    if cfg.match_points:
        if draws is None:
            match_points = jax.random.uniform(match_key, (num_layers, b, cfg.match_points, 2))
        else:
            match_points = jnp.asarray(draws["match"], class_logits.dtype)

        def layer_cost(classes_l, masks_l, points_l):
            def image_cost(classes_i, masks_i, points_i, gt_classes_i, gt_masks_i):
                logits = point_sample(masks_i, jnp.broadcast_to(points_i, (q,) + points_i.shape))
                labels = point_sample(gt_masks_i, jnp.broadcast_to(points_i, (g,) + points_i.shape))
                return match_cost(classes_i, logits, labels, gt_classes_i, cfg)

            return jax.vmap(image_cost)(classes_l, masks_l, points_l, gt_classes, gt_masks)

        cost = jax.lax.map(lambda a: layer_cost(*a), (class_logits, mask_logits, match_points))
    else:
        # Every cell of the stride-4 maps: the quantity the random points estimate, as matmuls.
        flat_gt = gt_masks.reshape(b, g, -1).astype(mask_logits.dtype)
        cost = jax.vmap(
            lambda classes_l, masks_l: jax.vmap(match_cost, (0, 0, 0, 0, None))(
                classes_l, masks_l.reshape(b, q, -1), flat_gt, gt_classes, cfg
            )
        )(class_logits, mask_logits)
    cost = jax.lax.stop_gradient(cost)  # [P, B, Q, G]
    query_to_gt, gt_to_query = min_cost_matching(
        cost, None, jnp.broadcast_to(gt_valid, (num_layers, b, g))
    )
    matched_class = jnp.take_along_axis(
        jnp.broadcast_to(gt_classes, (num_layers, b, g)), jnp.maximum(query_to_gt, 0), axis=2
    )
    query_classes = jnp.where(query_to_gt >= 0, matched_class, cfg.num_classes)
    # The mask losses run over `mask_pairs_per_image` ground-truth slots, valid ones first
    # (padding is most of the slots on crowded-image budgets); pairs past them are counted.
    k = min(cfg.mask_pairs_per_image or g, g)
    slots = jnp.argsort(~gt_valid, axis=1, stable=True)[:, :k]  # [B, K]
    slot_query = jnp.take_along_axis(gt_to_query, jnp.broadcast_to(slots, (num_layers, b, k)), 2)
    pair_valid = slot_query >= 0
    over_budget = (gt_to_query >= 0).sum((1, 2)) - pair_valid.sum((1, 2))  # [P]
    matched_masks = jnp.take_along_axis(
        mask_logits, jnp.maximum(slot_query, 0)[..., None, None], axis=2
    )  # [P, B, K, h, w]
    slot_masks = jnp.take_along_axis(gt_masks, slots[..., None, None], axis=1)  # [B, K, h, w]
    cells = matched_masks.shape[3:]
    flat_slot_masks = slot_masks.reshape((b * k,) + cells)

    # One prediction layer at a time: the oversampled candidate points of all layers at once
    # are the largest buffers of a COCO-sized step (2,000 masks x 37,632 points).
    def layer_points(args):
        masks_l, key_l, draws_l = args
        return uncertain_points(
            key_l,
            masks_l.reshape((b * k,) + cells),
            cfg.train_points,
            cfg.oversample_ratio,
            cfg.importance_sample_ratio,
            draws_l,
        )

    if draws is None:
        layer_draws = None
    else:
        layer_draws = tuple(
            jnp.asarray(draws[name], class_logits.dtype).reshape((num_layers, b * k, -1, 2))
            for name in ("candidates", "fill")
        )
    points = jax.lax.map(
        layer_points,
        (
            jax.lax.stop_gradient(matched_masks),
            jax.random.split(loss_key, num_layers),
            layer_draws,
        ),
    )  # [P, B * K, N, 2]
    # Layer by layer (vmap), not over one [P * B * K] axis: merging the layer axis in front of
    # the batch would make the partitioner gather a batch split over devices.
    point_logits = jax.vmap(point_sample)(
        matched_masks.reshape((num_layers, b * k) + cells), points
    ).reshape(num_layers, b, k, -1)
    labels = jax.lax.map(lambda p: point_sample(flat_slot_masks, p), points)
    labels = labels.reshape(num_layers, b, k, -1)
    return {
        "query_classes": jax.lax.stop_gradient(query_classes),
        "query_to_gt": jax.lax.stop_gradient(query_to_gt),
        "pair_valid": jax.lax.stop_gradient(pair_valid),
        "pairs_over_budget": jax.lax.stop_gradient(over_budget),
        "point_logits": point_logits,
        "point_labels": jax.lax.stop_gradient(labels),
    }


def layer_losses(outputs: dict, batch: dict, cfg: Mask2FormerConfig) -> dict:
    """Per prediction layer [P], unweighted: "ce" (cross-entropy over all queries, no-object
    ones weighted no_object_weight, / the weights' sum), "mask" (mean BCE over the points) and
    "dice", each summed over matched pairs / ground truths in the batch."""
    targets = outputs["targets"]
    class_logits = outputs["class_logits"]  # [P, B, Q, C+1]
    labels = targets["query_classes"]
    log_probs = jax.nn.log_softmax(class_logits, -1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], -1)[..., 0]  # [P, B, Q]
    weight = jnp.where(labels == cfg.num_classes, cfg.no_object_weight, 1.0)
    loss_ce = (nll * weight).sum((1, 2)) / weight.sum((1, 2))  # [P]
    num_masks = jnp.maximum(batch["gt_valid"].sum().astype(jnp.float32), 1.0)
    x = targets["point_logits"]
    t = targets["point_labels"]
    valid = targets["pair_valid"].astype(x.dtype)  # [P, B, G]
    bce = (jax.nn.softplus(x) - x * t).mean(-1)
    p = jax.nn.sigmoid(x)
    dice = 1.0 - (2.0 * (p * t).sum(-1) + 1.0) / (p.sum(-1) + t.sum(-1) + 1.0)
    return {
        "ce": loss_ce,
        "mask": (bce * valid).sum((1, 2)) / num_masks,
        "dice": (dice * valid).sum((1, 2)) / num_masks,
    }


def loss_fn(outputs: dict, batch: dict, cfg: Mask2FormerConfig) -> tuple[jnp.ndarray, dict]:
    """Sum over prediction layers of class_weight x weighted cross-entropy + mask_weight x BCE +
    dice_weight x dice, the mask terms summed over matched pairs / ground truths in the batch."""
    targets = outputs["targets"]
    layers = layer_losses(outputs, batch, cfg)
    loss_ce, loss_mask, loss_dice = layers["ce"], layers["mask"], layers["dice"]
    valid = targets["pair_valid"]
    total = (
        cfg.class_weight * loss_ce.sum()
        + cfg.mask_weight * loss_mask.sum()
        + cfg.dice_weight * loss_dice.sum()
    )
    metrics = {
        "loss_ce": cfg.class_weight * loss_ce[-1],
        "loss_mask": cfg.mask_weight * loss_mask[-1],
        "loss_dice": cfg.dice_weight * loss_dice[-1],
        "loss_deep_supervision": total
        - cfg.class_weight * loss_ce[-1]
        - cfg.mask_weight * loss_mask[-1]
        - cfg.dice_weight * loss_dice[-1],
        "matched_per_image": (targets["query_classes"][-1] != cfg.num_classes).sum()
        / valid.shape[1],
        "mask_pairs_over_budget": targets["pairs_over_budget"][-1] / valid.shape[1],
    }
    return total, metrics


# ----------------------------------------------------------------------------- inference


def detect(class_logits, mask_logits, cfg: Mask2FormerConfig) -> dict:
    """Detections of the last prediction layer: the best K (query, class) pairs of softmax
    scores, each x the mean mask probability inside its mask; canvas masks at stride 4."""
    b, q, _ = class_logits.shape
    c = cfg.num_classes
    k = min(cfg.detections_per_image, q * c)
    scores = jax.nn.softmax(class_logits, -1)[..., :c].reshape(b, q * c)
    top, index = top_k(scores, k)
    query = index // c
    classes = (index % c).astype(jnp.int32)
    masks = jnp.take_along_axis(mask_logits, query[..., None, None], axis=1)  # [B, K, h, w]
    inside = masks > 0.0
    probs = jax.nn.sigmoid(masks)
    area = inside.sum((2, 3)).astype(jnp.float32)
    mask_score = (probs * inside).sum((2, 3)) / (area + 1e-6)
    det_scores = top * mask_score
    valid = area > 0
    pad = cfg.detections_per_image - k
    return {
        "scores": jnp.pad(jnp.where(valid, det_scores, 0.0), ((0, 0), (0, pad))),
        "classes": jnp.pad(classes, ((0, 0), (0, pad))),
        "valid": jnp.pad(valid, ((0, 0), (0, pad))),
        "canvas_masks": jnp.pad(
            jnp.where(valid[..., None, None], probs, 0.0), ((0, 0), (0, pad), (0, 0), (0, 0))
        ),
    }


# ----------------------------------------------------------------------------- method interface

Config = Mask2FormerConfig
Model = Mask2Former


def base_config() -> ml_collections.ConfigDict:
    """Mask2Former R50 COCO 50 epochs (maskformer2_R50_bs16_50ep): 1024 x 1024 large-scale
    jitter crops, batch 16, AdamW lr 1e-4, weight decay 0.05 (none on norms and embeddings),
    backbone lr x 0.1, 10 warmup steps at full lr, 368,750 steps with decays at 327,778 and
    355,092, the full model's gradient clipped at norm 0.01."""
    c = config_lib.base()
    c.method = "mask2former"
    c.model = config_lib.model_section(Mask2FormerConfig)
    c.input.canvas_hw = (1024, 1024)
    c.input.resize = "lsj"  # the image fit to 1024 x 1024, scaled by 0.1-2.0, cropped
    c.input.lsj_scale = (0.1, 2.0)
    c.input.short_side = (1024,)
    c.input.max_long_side = 1024
    # The reference tests at short side 800, long side at most 1333; the canvas holds 1024.
    c.input.test_short_side = 800
    c.input.test_max_long_side = 1024
    c.optim.name = "adamw"
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.05
    c.optim.backbone_lr_multiplier = 0.1
    c.optim.clip_norm = 0.01
    c.schedule.warmup_steps = 10
    c.schedule.warmup_factor = 1.0
    c.schedule.total_steps = 368_750
    c.schedule.steps = (327_778, 355_092)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a Mask2Former config to seconds on a CPU: synthetic scenes, ResNet-18 of width 16,
    a 128 x 128 canvas, 32 channels, 2 encoder and 3 decoder layers, 16 queries, 256 points."""
    c = config_lib.smoke_common(c)
    m = c.model
    smoke_backbone(m, freeze_at=None)
    m.conv_dim = 32
    m.mask_dim = 32
    m.hidden_dim = 32
    m.heads = 4
    m.encoder_heads = 4
    m.encoder_points = 2
    m.encoder_layers = 2
    m.encoder_feedforward = 64
    m.decoder_layers = 3
    m.decoder_feedforward = 64
    m.num_queries = 16
    m.train_points = 256
    m.match_points = 256
    m.detections_per_image = 16
    return c


def maskformer(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The MaskFormer variant of a config: the FPN per-pixel decoder and 6 DETR decoder layers
    with full cross-attention to the projected res5 (MaskFormer R50's layout); losses and
    matching stay Mask2Former's point-sampled ones."""
    m = c.model
    m.pixel_decoder = "fpn"
    m.transformer_decoder = "detr"
    m.decoder_layers = 6
    return c
