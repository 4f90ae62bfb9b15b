"""ResNet-18/34/50/101 (NHWC, stride in the 3x3 conv) returning res2..res5 feature maps."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instseg_jax.nn.deform_conv import DeformConvNorm
from instseg_jax.nn.layers import ConvNorm, max_pool_3x3_s2

STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# RGB pixel statistics of ImageNet (0-255), those of torchvision's and detectron2's models.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def normalize(image, dtype, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Images [B, H, W, 3] in 0-255 RGB (uint8 or float) -> (image - mean) / std in dtype, the
    input every method's ResNet expects."""
    x = (image.astype(jnp.float32) - jnp.asarray(mean)) / jnp.asarray(std)
    return x.astype(dtype)


def deformable_blocks(stage_blocks, dcn_layers=(), dcn_interval: int = 1) -> tuple:
    """Per stage (res2..res5), per block, whether its 3x3 is a modulated deformable convolution
    (DCNv2): dbolya/yolact backbone.py ResNetBackbone._make_layer's rule. In a stage of n
    blocks with d = dcn_layers[stage], block 0 is deformable when d >= n and block i > 0 when
    i + d >= n and i % dcn_interval == 0 (the last d blocks, every dcn_interval-th of them).
    dcn_layers () = none (every method but YOLACT++). YOLACT++ R-50: (0, 4, 6, 3), interval 1,
    every block of res3..res5; R-101: (0, 4, 23, 3), interval 3."""
    if not dcn_layers:
        return tuple((False,) * n for n in stage_blocks)
    if len(dcn_layers) != len(stage_blocks) or dcn_interval < 1:
        raise ValueError(
            f"model.dcn_layers needs one count per stage ({len(stage_blocks)}) and "
            f"model.dcn_interval >= 1, got {tuple(dcn_layers)} and {dcn_interval}"
        )
    return tuple(
        tuple((d >= n) if i == 0 else (i + d >= n and i % dcn_interval == 0) for i in range(n))
        for n, d in zip(stage_blocks, dcn_layers, strict=True)
    )


def deformable_conv_name(bottleneck: bool) -> str:
    """The block's 3x3 that deformable_blocks makes deformable: the strided 3x3 of either block
    kind (a bottleneck's conv2, the reference's; a basic block's conv1, which no reference
    defines: for the small test and nuclei models)."""
    return "conv2" if bottleneck else "conv1"


def _conv3x3(deformable: bool, features, stride, norm, relu, dtype, name, dilation: int = 1):
    if deformable:
        if dilation != 1:
            raise ValueError("a deformable 3x3 convolution here is not dilated (res5_dilation 1)")
        return DeformConvNorm(features, stride, norm, relu, dtype, name=name)
    return ConvNorm(features, 3, stride, norm, relu, dtype, name=name, dilation=dilation)


class BasicBlock(nn.Module):
    features: int
    stride: int
    norm: str
    dtype: Any
    deformable: bool = False  # conv1 a modulated deformable convolution (deformable_blocks)
    dilation: int = 1  # of both 3x3 convolutions (ResNet.res5_dilation)

    @nn.compact
    def __call__(self, x):
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = ConvNorm(
                self.features, 1, self.stride, self.norm, False, self.dtype, name="shortcut"
            )(x)
        d = self.dilation
        y = _conv3x3(
            self.deformable, self.features, self.stride, self.norm, True, self.dtype, "conv1", d
        )(x)
        y = ConvNorm(self.features, 3, 1, self.norm, False, self.dtype, name="conv2", dilation=d)(y)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    features: int  # output channels (4x the bottleneck width)
    stride: int
    norm: str
    dtype: Any
    deformable: bool = False  # conv2 a modulated deformable convolution (deformable_blocks)
    dilation: int = 1  # of the 3x3 convolution (ResNet.res5_dilation)

    @nn.compact
    def __call__(self, x):
        width = self.features // 4
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = ConvNorm(
                self.features, 1, self.stride, self.norm, False, self.dtype, name="shortcut"
            )(x)
        y = ConvNorm(width, 1, 1, self.norm, True, self.dtype, name="conv1")(x)
        y = _conv3x3(
            self.deformable, width, self.stride, self.norm, True, self.dtype, "conv2", self.dilation
        )(y)
        y = ConvNorm(self.features, 1, 1, self.norm, False, self.dtype, name="conv3")(y)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """Returns {"res2": [B, H/4, W/4, C2], ..., "res5": [B, H/32, W/32, C5]}.

    depth: 18, 34, 50 or 101. width: channels of res2 before expansion (64 as published;
    narrower for tests). freeze_at: 0 trains everything, 1 freezes the stem, 2 the stem and
    res2 (detectron2's default): their outputs pass through stop_gradient. stage_blocks:
    blocks per stage when not those of `depth` (depth then only picks the block kind).
    dcn_layers, dcn_interval: which blocks' 3x3 convolutions are modulated deformable ones
    (deformable_blocks; () = none). res5_dilation: 1 as published; 2 keeps res5 at stride
    16 with its 3x3 convolutions dilated by 2 (FCIS's trunk: msracver/FCIS
    resnet_v1_101_fcis.py get_resnet_v1_conv5), the same parameters.
    """

    depth: int = 50
    width: int = 64
    norm: str = "frozen_bn"
    freeze_at: int = 2
    dtype: Any = jnp.float32
    stage_blocks: tuple = ()
    dcn_layers: tuple = ()
    dcn_interval: int = 1
    res5_dilation: int = 1

    @nn.compact
    def __call__(self, x):
        if self.stage_blocks and len(self.stage_blocks) != 4:
            raise ValueError(f"model.stage_blocks needs 4 counts, got {self.stage_blocks}")
        if self.depth not in STAGES:
            raise ValueError(
                f"model.backbone.depth must be one of {sorted(STAGES)}, got {self.depth}"
            )
        bottleneck = self.depth >= 50
        block = Bottleneck if bottleneck else BasicBlock
        x = ConvNorm(self.width, 7, 2, self.norm, True, self.dtype, name="stem")(x)
        x = max_pool_3x3_s2(x)  # [B, H/4, W/4, w]
        if self.freeze_at >= 1:
            x = jax.lax.stop_gradient(x)
        outputs = {}
        stage_blocks = self.stage_blocks or STAGES[self.depth]
        deformable = deformable_blocks(stage_blocks, self.dcn_layers, self.dcn_interval)
        for stage, blocks in enumerate(stage_blocks):
            features = self.width * 2**stage * (4 if bottleneck else 1)
            dilation = self.res5_dilation if stage == 3 else 1
            for i in range(blocks):
                stride = 2 if (i == 0 and stage > 0 and dilation == 1) else 1
                name = f"res{stage + 2}_{i}"
                x = block(
                    features,
                    stride,
                    self.norm,
                    self.dtype,
                    deformable[stage][i],
                    dilation=dilation,
                    name=name,
                )(x)
            if self.freeze_at >= stage + 2:
                x = jax.lax.stop_gradient(x)
            outputs[f"res{stage + 2}"] = x  # [B, H/2^(stage+2), W/2^(stage+2), features]
            # (res5 at H/16 when dilated)
        return outputs


def frozen_prefixes(freeze_at: int) -> tuple[str, ...]:
    """Parameter name prefixes of the frozen stages (for the optimizer's mask)."""
    names = []
    if freeze_at >= 1:
        names.append("stem")
    if freeze_at >= 2:
        names.append("res2_")
    return tuple(names)
