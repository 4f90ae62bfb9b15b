"""Dense-prediction machinery shared by the box-free and prototype methods (SOLOv2, YOLACT,
CondInst): budgeted selection of positives, per-instance masks as one einsum of gathered kernels
(or coefficients) against a shared feature map, and bilinear resizing as two small matmuls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.ops.topk import top_k


def budgeted_select(
    valid: jnp.ndarray, budget: int, key: jax.Array | None = None
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """A fixed number of slots chosen from the True entries of valid[P].

    With a key, a uniform random subset of the valid entries when more than ``budget`` are
    valid (in random order); without one, the first ``budget`` valid entries in index order.

    Returns:
      indices int32[budget] into valid (0 on empty slots), slot_valid bool[budget],
      overflow int32: the valid entries no slot took.
    """
    num = valid.shape[0]
    if key is None:
        priority = jnp.where(valid, jnp.arange(num, dtype=jnp.float32) / max(num, 1), 2.0)
    else:
        priority = jnp.where(valid, jax.random.uniform(key, (num,)), 2.0)
    take = min(budget, num)
    _, chosen = top_k(-priority, take)
    chosen = chosen.astype(jnp.int32)
    slot_valid = priority[chosen] < 2.0
    if take < budget:
        chosen = jnp.pad(chosen, (0, budget - take))
        slot_valid = jnp.pad(slot_valid, (0, budget - take))
    count = valid.sum().astype(jnp.int32)
    return jnp.where(slot_valid, chosen, 0), slot_valid, jnp.maximum(count - budget, 0)


def dynamic_masks(features: jnp.ndarray, kernels: jnp.ndarray) -> jnp.ndarray:
    """Mask logits float[B, K, h, w] of per-instance 1x1 kernels (or prototype coefficients)
    kernels[B, K, E] applied to a shared map features[B, h, w, E]: one einsum."""
    return jnp.einsum("bhwe,bke->bkhw", features, kernels.astype(features.dtype))


@functools.cache
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32[out, in] that resamples one axis bilinearly with half-pixel centres: output
    pixel i samples input coordinate (i + 0.5) in / out - 0.5, clamped at 0 and in - 1 (torch's
    interpolate with align_corners=False, no antialiasing: a 2x shrink averages pixel pairs)."""
    source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    source = np.clip(source, 0.0, in_size - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low
    matrix = np.zeros((out_size, in_size), np.float64)
    matrix[np.arange(out_size), low] += 1.0 - frac
    matrix[np.arange(out_size), high] += frac
    return matrix.astype(np.float32)


def bilinear_matrices(in_size, out_size, out_len: int, in_len: int) -> jnp.ndarray:
    """float32[B, out_len, in_len]: `bilinear_matrix` for per-image sizes known only at run time.

    Image b resamples the first in_size[b] entries of an axis of length in_len to out_size[b]
    entries (in_size, out_size: float[B], whole numbers) with torch's align_corners=False rule:
    output i samples (i + 0.5) in_size / out_size - 0.5, clamped to [0, in_size - 1]. Rows from
    out_size[b] on are left as the rule gives them (they sample the last entry); a caller that
    resamples again reads only the first out_size[b] rows."""
    in_size = jnp.asarray(in_size, jnp.float32)[:, None]
    out_size = jnp.asarray(out_size, jnp.float32)[:, None]
    source = (jnp.arange(out_len, dtype=jnp.float32)[None] + 0.5) * (in_size / out_size) - 0.5
    source = jnp.clip(source, 0.0, in_size - 1.0)  # [B, out_len]
    low = jnp.floor(source)
    high = jnp.minimum(low + 1.0, in_size - 1.0)
    frac = (source - low)[..., None]
    column = jnp.arange(in_len, dtype=jnp.float32)[None, None]
    return (column == low[..., None]) * (1.0 - frac) + (column == high[..., None]) * frac


def resize_bilinear(x: jnp.ndarray, out_hw) -> jnp.ndarray:
    """x[B, H, W, C] -> [B, oh, ow, C] by `bilinear_matrix` on each axis (two matmuls: on a CPU
    much cheaper than a gather-based resize, and exact torch align_corners=False numbers)."""
    _, h, w, _ = x.shape
    oh, ow = out_hw
    if (oh, ow) == (h, w):
        return x
    rows = jnp.asarray(bilinear_matrix(h, oh), x.dtype)
    cols = jnp.asarray(bilinear_matrix(w, ow), x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", rows, x, cols)
