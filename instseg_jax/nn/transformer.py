"""Transformer building blocks (Flax), with torch's parameter layout and initialisers so that
imported weights (DETR, Deformable DETR, Mask2Former) load as they are: DETR's sine positions,
multi-head attention and the feed-forward block (both post-norm), and multi-scale deformable
attention (ops/sampling.py's `deformable_attention`).

Shapes: B batch, Q queries, K keys, S values (levels laid out one after another), D channels.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.nn.layers import Dense, torch_default_bias
from instseg_jax.ops.sampling import deformable_attention


def sine_positions(height: int, width: int, channels: int) -> np.ndarray:
    """float32[H, W, channels] DETR's normalised sine positions (temperature 10000, scale 2 pi):
    the first half encodes y, the second x, each as interleaved (sin, cos) pairs."""
    feats = channels // 2
    scale = 2 * math.pi
    y = np.arange(1, height + 1, dtype=np.float64) / (height + 1e-6) * scale
    x = np.arange(1, width + 1, dtype=np.float64) / (width + 1e-6) * scale
    dim_t = 10000.0 ** (2 * (np.arange(feats) // 2) / feats)

    def encode(values):  # [n] -> [n, feats]
        angles = values[:, None] / dim_t
        return np.stack([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], -1).reshape(
            len(values), feats
        )

    pos_y = np.broadcast_to(encode(y)[:, None, :], (height, width, feats))
    pos_x = np.broadcast_to(encode(x)[None, :, :], (height, width, feats))
    return np.concatenate([pos_y, pos_x], -1).astype(np.float32)


def xavier():
    """Xavier-uniform: the initialiser of the reference transformers' weights."""
    return nn.initializers.xavier_uniform()


def dense_layer(features, name, kernel_init=None, bias_init=nn.initializers.zeros, dtype=None):
    """A linear layer, Xavier-uniform kernel and zero bias unless told otherwise."""
    return Dense(
        features,
        kernel_init=kernel_init or xavier(),
        bias_init=bias_init,
        dtype=dtype,
        name=name,
    )


def packed_projection_xavier():
    """Xavier-uniform of torch's nn.MultiheadAttention, whose q, k and v projections are one
    packed in_proj_weight [3 D, D] (fan_out 3 D): on each [D, D] third, std sqrt(1 / (2 D)),
    not the sqrt(1 / D) of Xavier on a [D, D] matrix of its own."""
    return nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


def layer_norm(name, dtype=None):
    """LayerNorm with torch's epsilon."""
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name)


def _offset_bias(heads: int, levels: int, points: int):
    """Deformable DETR's initial sampling offsets: head h looks along angle 2 pi h / heads, point
    k at k + 1 cells (the direction scaled so that its larger component is 1)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        angles = np.arange(heads) * (2.0 * math.pi / heads)
        grid = np.stack([np.cos(angles), np.sin(angles)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        grid = np.tile(grid[:, None, None, :], (1, levels, points, 1))
        grid = grid * (np.arange(points) + 1)[None, None, :, None]
        return jnp.asarray(grid.reshape(shape), dtype)

    return init


class MultiScaleDeformableAttention(nn.Module):
    """MSDeformAttn: queries [B, Q, D] sample `points` points per head and level around their
    reference points [B, Q, 2] ((x, y) in [0, 1]; offsets in cells of each level) from
    `value_in` [B, S, D] laid out level after level as `level_shapes`."""

    dim: int
    heads: int
    points: int
    level_shapes: tuple
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query, reference, value_in):
        batch, queries, _ = query.shape
        levels = len(self.level_shapes)
        per_head = self.dim // self.heads
        value = dense_layer(self.dim, "value_proj", dtype=self.dtype)(value_in)
        value = value.reshape(batch, -1, self.heads, per_head)
        offsets = dense_layer(
            self.heads * levels * self.points * 2,
            "sampling_offsets",
            kernel_init=nn.initializers.zeros,
            bias_init=_offset_bias(self.heads, levels, self.points),
            dtype=self.dtype,
        )(query).reshape(batch, queries, self.heads, levels, self.points, 2)
        logits = dense_layer(
            self.heads * levels * self.points,
            "attention_weights",
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
        )(query).reshape(batch, queries, self.heads, levels * self.points)
        weights = jax.nn.softmax(logits.astype(jnp.float32), -1).reshape(
            batch, queries, self.heads, levels, self.points
        )
        cells = jnp.asarray([[w, h] for h, w in self.level_shapes], jnp.float32)  # [L, 2]
        locations = (
            reference[:, :, None, None, None, :].astype(jnp.float32)
            + offsets.astype(jnp.float32) / cells[None, None, None, :, None, :]
        )
        sampled = deformable_attention(
            value.astype(jnp.float32), self.level_shapes, locations, weights
        )
        sampled = sampled.reshape(batch, queries, self.dim).astype(self.dtype)
        return dense_layer(self.dim, "output_proj", dtype=self.dtype)(sampled)


class FeedForward(nn.Module):
    """x + linear2(relu(linear1(x))), then LayerNorm (post-norm). Biases as torch's nn.Linear
    leaves them (the references' _reset_parameters re-draw only the weights, p.dim() > 1)."""

    dim: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        linear1 = dense_layer(
            self.hidden, "linear1", bias_init=torch_default_bias(self.dim), dtype=self.dtype
        )
        y = nn.relu(linear1(x))
        linear2 = dense_layer(
            self.dim, "linear2", bias_init=torch_default_bias(self.hidden), dtype=self.dtype
        )
        y = linear2(y)
        return layer_norm("norm", self.dtype)(x + y)


class Attention(nn.Module):
    """torch's nn.MultiheadAttention (q, k, v and output projections) + residual + LayerNorm:
    norm(query_in + attn(query_in + query_pos, key_in + key_pos, key_in)). `blocked` bool
    [B, Q, K], True where a query may not look (rows never all True: the caller clears them)."""

    dim: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_in, query_pos, key_in, key_pos, blocked=None):
        per_head = self.dim // self.heads
        batch, queries, _ = query_in.shape

        def split(x):
            return x.reshape(x.shape[0], x.shape[1], self.heads, per_head)

        def projection(name):
            return dense_layer(
                self.dim, name, kernel_init=packed_projection_xavier(), dtype=self.dtype
            )

        q = split(projection("q_proj")(query_in + query_pos))
        k = split(projection("k_proj")(key_in + key_pos))
        v = split(projection("v_proj")(key_in))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(per_head)
        if blocked is not None:
            logits = jnp.where(blocked[:, None], -1e9, logits)
        weights = jax.nn.softmax(logits, -1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, queries, self.dim)
        out = dense_layer(self.dim, "out_proj", dtype=self.dtype)(out)
        return layer_norm("norm", self.dtype)(query_in + out)


def attend_everywhere_if_empty(blocked):
    """A query whose mask leaves it nothing to attend to (every key blocked) attends to every
    key instead, as the reference does; blocked bool[B, Q, K]."""
    return blocked & ~blocked.all(-1, keepdims=True)
