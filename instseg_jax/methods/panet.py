"""PANet (Liu et al. 2018) on Mask R-CNN: the method module (methods/__init__.py).

Mask R-CNN's backbone, FPN, RPN, sampling, losses and detection selection, with the three parts
of the authors' code (ShuLiu1993/PANet, lib/modeling/FPN.py, fast_rcnn_heads.py,
mask_rcnn_heads.py), each a config switch:

- bottom-up path augmentation (`bottom_up`): N2 = P2, N{l+1} = conv3x3(conv3x3_s2(N{l}) +
  P{l+1}), every conv followed by GroupNorm and ReLU; N6 subsamples N5. The RPN and the RoI
  heads read N2..N6 where Mask R-CNN reads P2..P6.
- adaptive feature pooling (`adaptive_pooling`): every RoI is pooled from all four levels; the
  first layer of each head runs once per level with its own weights and the levels are fused
  by element-wise max (without it each RoI is pooled from its own level, as Mask R-CNN).
- fully-connected fusion in the mask head (`fc_fusion`): a branch off the conv trunk before its
  last conv (two convs, the second at half width, then one FC to 28 x 28) adds one
  class-agnostic logit map to every class's FCN logits. The authors' code applies a ReLU to the
  FC output (the paper does not say); kept.
- GroupNorm in the heads (`head_norm`): the box head's "4conv1fc" (4 x conv3x3-256 + GN, one
  FC-1024) or the "2fc" variant (FC + GN twice), the mask head's convs.

Their training rules kept in the COCO config (base_config): smooth L1 with beta 1/9 on the RPN
(lib/modeling/FPN.py) and 1/3 on the box head (fast_rcnn_heads.py), and anchors reaching
outside the image left out of RPN training (TRAIN.RPN_STRADDLE_THRESH 0, lib/roi_data/rpn.py).

Their initialisation (lib/nn/init.py's XavierFill: uniform, std 1 / sqrt(fan_in); MSRAFill:
normal, std sqrt(2 / fan_out)): XavierFill on the bottom-up path's convs (FPN.py
fpn._init_weights) and the box head's FCs, MSRAFill on the box and mask heads' convs
(fast_rcnn_heads.py roi_Xconv1fc_gn_head_panet, mask_rcnn_heads.py
mask_rcnn_fcn_head_v1upXconvs_gn_adp_ff with the recipe's MRCNN.CONV_INIT MSRAFill), normal 0.01
on the FC-fusion layer; the mask predictor (mask_rcnn_outputs) MSRAFill over its 1 + C output
maps (`mask_predictor_init` "msra_fill"; "normal" is detectron2's std 0.001, which the nuclei
experiment keeps).

The COCO recipe trains the convolutions' and FCs' biases at twice the learning rate without
weight decay (SOLVER.BIAS_DOUBLE_LR, BIAS_WEIGHT_DECAY False; optim.bias_lr_multiplier and
bias_weight_decay_multiplier). Not carried over from the authors' code: the GroupNorms' biases
at twice the learning rate too (tools/train_net_step.py puts every parameter named "bias" in
that group, GroupNorm's included; ours keeps every norm parameter at the base rate, as mmcv's
bias_lr_mult does; neither decays them); GroupNorm inside the FPN itself (this package keeps
detectron2's FPN); proposals
inside crowd regions left out of RoI sampling (TRAIN.CROWD_FILTER_THRESH 0.7: crowd regions are
ignore regions for the RPN only); the bias (initialised 0) of the reference's convolutions
and FCs followed by GroupNorm in the bottom-up path and the "2fc" box head, which the norm's
shift makes redundant; the mask targets' rule (lib/utils/segms.py polys_to_mask_wrt_box
rasterises the polygons of the ground truth whose box overlaps the RoI most inside the RoI at
28 x 28): ours are Mask R-CNN's, the matched ground truth's box crop pooled with
mask_target_sampling_ratio samples per bin (the COCO recipe's 0 is the closest setting: 1.8% of
the cells differ on COCO-like scenes, experiments/parity/mask_target_rules.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from instseg_jax import config as config_lib
from instseg_jax import ops
from instseg_jax.methods import mask_rcnn, roi_heads
from instseg_jax.nn.layers import (
    ConvNorm,
    Deconv2x2,
    Dense,
    GroupNorm,
    depth_to_space_2x2,
    kaiming_uniform_a1,
)

INPUTS = mask_rcnn.INPUTS


@dataclasses.dataclass(frozen=True)
class PANetConfig(mask_rcnn.MaskRCNNConfig):
    """Mask R-CNN's fields and PANet's, with the authors' COCO defaults."""

    bottom_up: bool = True
    adaptive_pooling: bool = True
    fc_fusion: bool = True
    head_norm: str = "group_norm"  # or "none"
    neck_norm: str = "group_norm"  # the bottom-up path's convs
    box_head: str = "4conv1fc"  # or "2fc" (box_fc_dim wide, the first FC per level)
    box_conv_dim: int = 256
    box_num_convs: int = 4
    # The mask predictor's init: "msra_fill", the authors' (mask_rcnn_heads.py
    # mask_rcnn_outputs under MRCNN.CONV_INIT MSRAFill: normal, std sqrt(2 / (1 + C)) with C
    # classes, their predictor's 1 + C output maps counted as its fan-out), or "normal"
    # (std 0.001, detectron2's and their GaussianFill default).
    mask_predictor_init: str = "msra_fill"

    def __post_init__(self):
        super().__post_init__()
        config_lib.check_choice(
            "model.mask_predictor_init", self.mask_predictor_init, ("msra_fill", "normal")
        )
        config_lib.check_choice("model.box_head", self.box_head, ("4conv1fc", "2fc"))
        for name in ("head_norm", "neck_norm"):
            config_lib.check_choice(f"model.{name}", getattr(self, name), ("group_norm", "none"))
        if self.mask_on and self.mask_head_convs < 2:
            raise config_lib.ConfigValueError(
                f"model.mask_head_convs is {self.mask_head_convs}; PANet's mask head needs at "
                "least 2 (the first is fused over levels, the FC branch leaves before the last)"
            )


class BottomUpPath(nn.Module):
    """{"p2".."p6"} -> the same keys holding N2..N6 (module docstring)."""

    channels: int
    norm: str = "group_norm"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict) -> dict:
        # XavierFill, as the authors' FPN._init_weights gives every conv of their pyramid.
        conv = lambda stride, name: ConvNorm(
            self.channels,
            3,
            stride,
            self.norm,
            dtype=self.dtype,
            kernel_init=kaiming_uniform_a1(),
            name=name,
        )
        levels = [features["p2"]]
        for level in (3, 4, 5):
            down = conv(2, f"down{level}")(levels[-1])
            levels.append(conv(1, f"out{level}")(down + features[f"p{level}"]))
        out = {f"p{i + 2}": x for i, x in enumerate(levels)}
        out["p6"] = out["p5"][:, ::2, ::2, :]
        return out


def adaptive_pool(
    features: dict, boxes, size: int, sampling_ratio: int, aligned: bool, sampling_ratio_max=0
):
    """[B, R, L, size, size, D]: every box RoIAligned from each of P2..P5 (L = 4) at that
    level's scale (sampling_ratio 0: the adaptive rule on each level's cells)."""
    return jnp.stack(
        [
            ops.roi_align(
                features[name],
                boxes,
                size,
                2.0 ** -(i + 2),
                sampling_ratio,
                aligned,
                sampling_ratio_max=sampling_ratio_max,
            )
            for i, name in enumerate(roi_heads.POOLED_LEVELS)
        ],
        axis=2,
    )


def fuse_levels(make_layer, pooled):
    """max over levels of make_layer(level)(pooled[:, level]): the first layer of a head with
    its own weights per level (pooled [n, L, ...])."""
    return jnp.max(
        jnp.stack([make_layer(level)(pooled[:, level]) for level in range(pooled.shape[1])]),
        axis=0,
    )


def dense_norm_relu(features, norm, dtype, name):
    """FC -> GroupNorm (when norm is "group_norm") -> ReLU on [n, D] rows."""

    def layer(x):
        x = Dense(
            features,
            dtype=dtype,
            use_bias=norm == "none",
            kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
            name=f"{name}",
        )(x)
        if norm == "group_norm":
            x = GroupNorm(32, dtype, name=f"{name}_norm")(x)
        return nn.relu(x)

    return layer


class FusedBoxHead(nn.Module):
    """[B, R, L, 7, 7, D] pooled from L levels -> class logits [B, R, C+1] and deltas
    [B, R, C, 4]. "4conv1fc": conv1 per level, max, convs 2..n, one FC; "2fc": FC1 per level,
    max, FC2 (module docstring)."""

    num_classes: int
    kind: str = "4conv1fc"
    conv_dim: int = 256
    num_convs: int = 4
    fc_dim: int = 1024
    norm: str = "group_norm"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled):
        b, r, levels, h, w, d = pooled.shape
        x = pooled.reshape(b * r, levels, h, w, d).astype(self.dtype)
        if self.kind == "4conv1fc":
            conv = lambda name: ConvNorm(
                self.conv_dim, 3, 1, self.norm, dtype=self.dtype, name=name
            )
            x = fuse_levels(lambda level: conv(f"conv1_level{level}"), x)
            for i in range(1, self.num_convs):
                x = conv(f"conv{i + 1}")(x)
            x = dense_norm_relu(self.fc_dim, "none", self.dtype, "fc")(x.reshape(b * r, -1))
        else:
            x = x.reshape(b * r, levels, -1)
            x = fuse_levels(
                lambda level: dense_norm_relu(
                    self.fc_dim, self.norm, self.dtype, f"fc1_level{level}"
                ),
                x,
            )
            x = dense_norm_relu(self.fc_dim, self.norm, self.dtype, "fc2")(x)
        logits, deltas = roi_heads.box_predictions(
            x.reshape(b, r, -1), self.num_classes, self.dtype
        )
        return logits, deltas


class FusedMaskHead(nn.Module):
    """[B, F, L, 14, 14, D] -> [B, F, 28, 28, C] logits: conv1 per level and max, convs up to
    num_convs, the 2x2 deconvolution and a per-class 1x1 predictor; with fc_fusion, a branch
    off the trunk before its last conv (conv, conv at half width, FC to 28 x 28 + ReLU) added to
    every class's logits."""

    num_classes: int
    channels: int = 256
    num_convs: int = 4
    fc_fusion: bool = True
    norm: str = "group_norm"
    predictor_init: str = "msra_fill"  # PANetConfig.mask_predictor_init
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled):
        b, f, levels, h, w, d = pooled.shape
        x = pooled.reshape(b * f, levels, h, w, d).astype(self.dtype)
        conv = lambda features, name: ConvNorm(
            features, 3, 1, self.norm, dtype=self.dtype, name=name
        )
        x = fuse_levels(lambda level: conv(self.channels, f"conv1_level{level}"), x)
        for i in range(1, self.num_convs - 1):
            x = conv(self.channels, f"conv{i + 1}")(x)
        branch = x
        x = conv(self.channels, f"conv{self.num_convs}")(x)
        init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        x = nn.relu(Deconv2x2(self.channels, self.dtype, init, blocked=True, name="deconv")(x))
        # The authors' predictor has a background map too: 1 + C outputs make its fan-out.
        std = (2.0 / (1 + self.num_classes)) ** 0.5 if self.predictor_init == "msra_fill" else 1e-3
        x = Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(std),
            name="predictor",
        )(x)
        logits = depth_to_space_2x2(x)  # [n, 28, 28, C]
        if self.fc_fusion:
            y = conv(self.channels, "fc_branch_conv1")(branch)
            y = conv(self.channels // 2, "fc_branch_conv2")(y)
            y = Dense(
                4 * h * w,
                dtype=self.dtype,
                kernel_init=nn.initializers.normal(0.01),
                name="fc_branch_fc",
            )(y.reshape(b * f, -1))
            logits = logits + nn.relu(y).reshape(b * f, 2 * h, 2 * w, 1)
        return logits.reshape(b, f, 2 * h, 2 * w, self.num_classes).astype(jnp.float32)


class PANet(mask_rcnn.MaskRCNN):
    cfg: PANetConfig

    def setup(self):
        super().setup()
        cfg = self.cfg
        if cfg.bottom_up:
            self.bottom_up = BottomUpPath(cfg.fpn_channels, cfg.neck_norm, cfg.dtype)

    def setup_box_head(self):
        cfg = self.cfg
        self.box_head = FusedBoxHead(
            cfg.num_classes,
            cfg.box_head,
            cfg.box_conv_dim,
            cfg.box_num_convs,
            cfg.box_fc_dim,
            cfg.head_norm,
            cfg.dtype,
        )

    def setup_mask_head(self):
        cfg = self.cfg
        self.mask_head = FusedMaskHead(
            cfg.num_classes,
            cfg.fpn_channels,
            cfg.mask_head_convs,
            cfg.fc_fusion,
            cfg.head_norm,
            cfg.mask_predictor_init,
            cfg.dtype,
        )

    def features(self, image):
        features = super().features(image)
        return self.bottom_up(features) if self.cfg.bottom_up else features

    def pool(self, features, boxes, size: int):
        """[B, R, L, size, size, D]: all four levels (adaptive pooling) or each box's own
        level (L = 1)."""
        cfg = self.cfg
        if cfg.adaptive_pooling:
            slots = roi_heads.adaptive_sampling_slots(cfg.adaptive_sampling_max_side, size)
            return adaptive_pool(features, boxes, size, cfg.sampling_ratio, cfg.aligned, slots)
        return super().pool(features, boxes, size)[:, :, None]


# ----------------------------------------------------------------------------- method interface

Config = PANetConfig
Model = PANet
loss_fn = mask_rcnn.loss_fn
defaults_from_data = mask_rcnn.defaults_from_data
object_sizes_covered = mask_rcnn.object_sizes_covered
make_inference = mask_rcnn.make_inference


def base_config() -> ml_collections.ConfigDict:
    """The authors' PANet R-50-FPN COCO heads (e2e_panet_R-50-FPN_2x_mask.yaml) on this
    package's Mask R-CNN defaults; experiments start from here."""
    c = config_lib.base()
    c.method = "panet"
    c.model = config_lib.model_section(PANetConfig)
    c.model.rpn_smooth_l1_beta = 1.0 / 9  # lib/modeling/FPN.py fpn_rpn_losses
    c.model.box_smooth_l1_beta = 1.0 / 3  # lib/modeling/fast_rcnn_heads.py fast_rcnn_losses
    c.model.rpn_straddle_threshold = 0.0  # lib/core/config.py TRAIN.RPN_STRADDLE_THRESH
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Mask R-CNN's smoke shrink with PANet's heads at smoke width."""
    c = mask_rcnn.smoke(c)
    m = c.model
    # GroupNorm's 32 groups need room: at Mask R-CNN's smoke FC width of 64 each group of the
    # "2fc" head holds 2 values, which normalisation turns into +-1 (measured: segm AP 0.04
    # after the 300 over-fitting steps).
    m.box_fc_dim = 256
    m.box_conv_dim = 32
    m.box_num_convs = 2
    m.mask_head_convs = 2
    return c
