"""ops.top_k: the results of jax.lax.top_k, as a sort the SPMD partitioner splits over the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.ops import top_k

SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 0.5, 2.0], np.float32)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int32])
def test_top_k_equals_lax_top_k_with_ties_signed_zeros_and_nans(dtype):
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 40))
        k = int(rng.integers(0, n + 1))
        if dtype == np.int32:
            x = rng.integers(-3, 3, size=(3, n)).astype(np.int32)
        elif trial % 2:  # mostly ties, signed zeros, infinities and NaNs
            x = rng.choice(SPECIAL, size=(3, n)).astype(dtype)
        else:
            x = rng.normal(size=(3, n)).astype(dtype)
        want_values, want_index = jax.lax.top_k(x, k)
        values, index = jax.jit(top_k, static_argnums=1)(x, k)
        np.testing.assert_array_equal(np.asarray(index), np.asarray(want_index))
        assert index.dtype == jnp.int32 and values.dtype == want_values.dtype
        # Bitwise, so that +0.0 / -0.0 and NaN count.
        np.testing.assert_array_equal(
            np.asarray(values).view(np.uint8), np.asarray(want_values).view(np.uint8)
        )


def test_top_k_gradient_and_vmap_equal_lax_top_k():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 20)), jnp.float32)
    weights = jnp.arange(5.0)
    ours = jax.grad(lambda v: (jax.vmap(lambda r: top_k(r, 5)[0])(v) * weights).sum())(x)
    theirs = jax.grad(lambda v: (jax.lax.top_k(v, 5)[0] * weights).sum())(x)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_top_k_refuses_k_beyond_the_axis():
    with pytest.raises(ValueError, match="top_k: k=4"):
        top_k(jnp.zeros(3), 4)
