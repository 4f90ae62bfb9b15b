"""Feature pyramids. FPN: P2..P5 from res2..res5 (lateral 1x1, top-down sum, output 3x3), P6 by
stride-2 subsampling of P5 (detectron2's LastLevelMaxPool: a 1x1 max-pool of stride 2)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from instseg_jax.nn.layers import Conv
from instseg_jax.ops.dense import resize_bilinear


class FPN(nn.Module):
    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict) -> dict:
        names = ["res2", "res3", "res4", "res5"]
        init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # c2_xavier_fill
        laterals = [
            Conv(self.channels, (1, 1), dtype=self.dtype, kernel_init=init, name=f"lateral{i + 2}")(
                features[n]
            )
            for i, n in enumerate(names)
        ]
        merged = [None] * 4
        merged[3] = laterals[3]
        for i in (2, 1, 0):
            h, w = laterals[i].shape[1:3]
            upsampled = merged[i + 1].repeat(2, axis=1).repeat(2, axis=2)[:, :h, :w]  # 2x nearest
            merged[i] = laterals[i] + upsampled
        outputs = {}
        for i in range(4):
            outputs[f"p{i + 2}"] = Conv(
                self.channels,
                (3, 3),
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                kernel_init=init,
                name=f"output{i + 2}",
            )(merged[i])
        outputs["p6"] = outputs["p5"][:, ::2, ::2, :]  # [B, H/64, W/64, D]
        return outputs


class FPNP3P7(nn.Module):
    """Feature pyramid P3..P7: P3..P5 from res3..res5 (lateral 1x1, top-down sum with 2x
    upsampling, output 3x3), P6 a stride-2 3x3 convolution, P7 one on P6.

    The defaults are YOLACT's (mmdetection's add_extra_convs="on_input" with dbolya/yolact's
    bilinear upsampling): P6 from res5, no ReLU before P7, Xavier init. FCOS (AdelaiDet and
    torchvision alike) takes P6 from P5 (`extra_input="p5"`), applies a ReLU before P7,
    upsamples by nearest neighbour and initialises with fan_in (detectron2's c2_xavier_fill).
    """

    channels: int = 256
    dtype: Any = jnp.float32
    extra_input: str = "res5"  # "res5" or "p5": what P6 is computed from
    relu_before_p7: bool = False
    upsample: str = "bilinear"  # or "nearest"
    init_fan: str = "fan_avg"  # "fan_avg" (xavier_uniform) or "fan_in" (kaiming_uniform a=1)

    @nn.compact
    def __call__(self, features: dict) -> dict:
        if self.extra_input not in ("res5", "p5") or self.upsample not in ("bilinear", "nearest"):
            raise ValueError(
                f"FPNP3P7: extra_input must be 'res5' or 'p5' (got {self.extra_input!r}) and "
                f"upsample 'bilinear' or 'nearest' (got {self.upsample!r})"
            )
        names = ["res3", "res4", "res5"]
        init = nn.initializers.variance_scaling(1.0, self.init_fan, "uniform")
        laterals = [
            Conv(self.channels, (1, 1), dtype=self.dtype, kernel_init=init, name=f"lateral{i + 3}")(
                features[n]
            )
            for i, n in enumerate(names)
        ]
        merged = [None] * 3
        merged[2] = laterals[2]
        for i in (1, 0):
            if self.upsample == "nearest":
                h, w = laterals[i].shape[1:3]
                upsampled = merged[i + 1].repeat(2, axis=1).repeat(2, axis=2)[:, :h, :w]
            else:
                upsampled = resize_bilinear(merged[i + 1], laterals[i].shape[1:3])
            merged[i] = laterals[i] + upsampled
        outputs = {}
        for i in range(3):
            outputs[f"p{i + 3}"] = Conv(
                self.channels,
                (3, 3),
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                kernel_init=init,
                name=f"output{i + 3}",
            )(merged[i])
        previous = features["res5"] if self.extra_input == "res5" else outputs["p5"]
        for level in (6, 7):
            if level == 7 and self.relu_before_p7:
                previous = nn.relu(previous)
            previous = Conv(
                self.channels,
                (3, 3),
                (2, 2),
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                kernel_init=init,
                name=f"extra{level}",
            )(previous)
            outputs[f"p{level}"] = previous  # before the ReLU that feeds P7
        return outputs
