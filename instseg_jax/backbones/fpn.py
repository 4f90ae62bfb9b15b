"""Feature pyramid: P2..P5 from res2..res5 (lateral 1x1, top-down sum, output 3x3), P6 by
stride-2 subsampling of P5 (detectron2's LastLevelMaxPool: a 1x1 max-pool of stride 2)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from instseg_jax.nn.layers import Conv


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
