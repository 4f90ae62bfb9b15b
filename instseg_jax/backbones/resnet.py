"""ResNet-18/34/50/101 (NHWC, stride in the 3x3 conv) returning res2..res5 feature maps."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class BasicBlock(nn.Module):
    features: int
    stride: int
    norm: str
    dtype: Any

    @nn.compact
    def __call__(self, x):
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = ConvNorm(
                self.features, 1, self.stride, self.norm, False, self.dtype, name="shortcut"
            )(x)
        y = ConvNorm(self.features, 3, self.stride, self.norm, True, self.dtype, name="conv1")(x)
        y = ConvNorm(self.features, 3, 1, self.norm, False, self.dtype, name="conv2")(y)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    features: int  # output channels (4x the bottleneck width)
    stride: int
    norm: str
    dtype: Any

    @nn.compact
    def __call__(self, x):
        width = self.features // 4
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = ConvNorm(
                self.features, 1, self.stride, self.norm, False, self.dtype, name="shortcut"
            )(x)
        y = ConvNorm(width, 1, 1, self.norm, True, self.dtype, name="conv1")(x)
        y = ConvNorm(width, 3, self.stride, self.norm, True, self.dtype, name="conv2")(y)
        y = ConvNorm(self.features, 1, 1, self.norm, False, self.dtype, name="conv3")(y)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """Returns {"res2": [B, H/4, W/4, C2], ..., "res5": [B, H/32, W/32, C5]}.

    depth: 18, 34, 50 or 101. width: channels of res2 before expansion (64 as published;
    narrower for tests). freeze_at: 0 trains everything, 1 freezes the stem, 2 the stem and
    res2 (detectron2's default): their outputs pass through stop_gradient. stage_blocks:
    blocks per stage when not those of `depth` (depth then only picks the block kind).
    """

    depth: int = 50
    width: int = 64
    norm: str = "frozen_bn"
    freeze_at: int = 2
    dtype: Any = jnp.float32
    stage_blocks: tuple = ()

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
        for stage, blocks in enumerate(self.stage_blocks or STAGES[self.depth]):
            features = self.width * 2**stage * (4 if bottleneck else 1)
            for i in range(blocks):
                stride = 2 if (i == 0 and stage > 0) else 1
                x = block(features, stride, self.norm, self.dtype, name=f"res{stage + 2}_{i}")(x)
            if self.freeze_at >= stage + 2:
                x = jax.lax.stop_gradient(x)
            outputs[f"res{stage + 2}"] = x  # [B, H/2^(stage+2), W/2^(stage+2), features]
        return outputs


def frozen_prefixes(freeze_at: int) -> tuple[str, ...]:
    """Parameter name prefixes of the frozen stages (for the optimizer's mask)."""
    names = []
    if freeze_at >= 1:
        names.append("stem")
    if freeze_at >= 2:
        names.append("res2_")
    return tuple(names)
