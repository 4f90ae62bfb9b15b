"""The modulated deformable convolution layer (DCNv2) of dbolya/yolact's backbone (its
external DCNv2 package's `DCN`, built in backbone.py's Bottleneck for YOLACT++)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instseg_jax.nn.layers import Conv, make_norm
from instseg_jax.ops import mixed_precision
from instseg_jax.ops.deform_conv import deform_conv2d


class ModulatedDeformConv(nn.Module):
    """A kh x kw modulated deformable convolution, NHWC (ops/deform_conv.py).

    A plain convolution of the same geometry ("offset": kernel [kh, kw, in, 3 kh kw], bias)
    reads the input and gives per output position 2 kh kw offsets, (dy, dx) per tap, then kh kw
    modulation logits through a sigmoid: DCN's conv_offset_mask, whose chunks o1, o2, mask are
    concatenated as offset = (o1, o2), the layout here. It starts at zero as the reference's
    (offsets 0, modulation 0.5). "kernel" [kh, kw, in, features] is the deformed convolution's
    (a plain convolution's pretrained weights load there), "bias" [features] its bias (zero
    at start, as backbone.py's conv2.bias.data.zero_()).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        taps = kh * kw
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
        offset_mask = Conv(
            3 * taps,
            self.kernel_size,
            self.strides,
            self.padding,
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros,
            name="offset",
        )(x).astype(jnp.float32)  # [B, Ho, Wo, 3 kh kw]: positions in float32
        offset = offset_mask[..., : 2 * taps]
        mask = jax.nn.sigmoid(offset_mask[..., 2 * taps :])
        y = deform_conv2d(
            x.astype(self.dtype),
            offset,
            mask,
            kernel,
            self.strides,
            self.padding,
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            y = mixed_precision.add_bias(y, bias)
        return y


class DeformConvNorm(nn.Module):
    """ModulatedDeformConv (named "conv", with its bias as the reference's DCN has one) ->
    norm -> optional ReLU: a ResNet block's deformable 3x3 in place of its ConvNorm."""

    features: int
    stride: int = 1
    norm: str = "group_norm"
    relu: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ModulatedDeformConv(
            self.features, strides=(self.stride, self.stride), dtype=self.dtype, name="conv"
        )(x)
        x = make_norm(self.norm, self.dtype)(name="norm")(x)
        return nn.relu(x) if self.relu else x
