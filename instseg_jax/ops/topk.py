"""The k largest entries along the last axis, as a sort that the SPMD partitioner splits over the
batch.

`jax.lax.top_k` compiles on CPU (and GPU) to XLA's "TopK" custom call, which the SPMD partitioner
cannot split: with the batch sharded over devices it all-gathers the whole operand onto every
device and selects there (DESIGN "Only gradients cross chips"). A sort along the last axis is
partitioned along the others, so `top_k` here is a two-key sort: by value, then by index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k(operand: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(values [..., k], indices int32[..., k]) of the k largest entries of operand[..., N]
    along its last axis, largest first, equal values in ascending index order: the results of
    `jax.lax.top_k` (NaN ranks above every number, +0.0 above -0.0)."""
    operand = jnp.asarray(operand)
    size = operand.shape[-1]
    if not 0 <= k <= size:
        raise ValueError(
            f"top_k: k={k} outside [0, {size}] for an operand of shape {operand.shape}"
        )
    axis = operand.ndim - 1
    position = jax.lax.broadcasted_iota(jnp.int32, operand.shape, axis)
    # Ascending by key and then by descending index; the last k, reversed, are the k largest
    # with ties in ascending index order.
    _, negated, values = jax.lax.sort(
        (_total_order_key(operand), -position, operand), dimension=axis, num_keys=2
    )
    last = lambda x: jax.lax.rev(x[..., size - k :], (axis,))
    return last(values), -last(negated)


def _total_order_key(operand: jnp.ndarray) -> jnp.ndarray:
    """Integers that order floats as `jax.lax.top_k` does (IEEE total order: -0.0 below
    +0.0, NaN above +inf), which `jax.lax.sort` of floats does not (it ties the zeros); other
    dtypes are their own key."""
    if not jnp.issubdtype(operand.dtype, jnp.floating):
        return operand
    signed = jnp.dtype(f"int{operand.dtype.itemsize * 8}")
    bits = jax.lax.bitcast_convert_type(operand, signed)
    # A negative float's bits read as a negative integer that grows with the magnitude: flipping
    # every bit but the sign reverses that, and puts -0.0 just below +0.0.
    magnitude = jnp.asarray(jnp.iinfo(signed).max, signed)
    return jnp.where(bits < 0, bits ^ magnitude, bits)
