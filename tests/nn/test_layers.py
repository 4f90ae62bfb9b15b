import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.nn.layers import Deconv2x2, FrozenBatchNorm


def test_deconv_equals_flax_transposed_convolution():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    ours = Deconv2x2(6)
    params = ours.init(jax.random.key(1), x)
    reference = nn.ConvTranspose(6, (2, 2), (2, 2))
    # flax's ConvTranspose applies its kernel flipped: tap (a, b) is kernel[1 - a, 1 - b].
    flipped = {
        "params": {
            "kernel": params["params"]["kernel"][::-1, ::-1],
            "bias": params["params"]["bias"] + 0.5,
        }
    }
    got = ours.apply({"params": {**params["params"], "bias": params["params"]["bias"] + 0.5}}, x)
    want = reference.apply(flipped, x)
    assert got.shape == (2, 6, 8, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_frozen_batch_norm_uses_fixed_statistics():
    x = jax.random.normal(jax.random.key(2), (4, 3))
    layer = FrozenBatchNorm()
    variables = {
        "frozen": {
            "scale": jnp.array([1.0, 2.0, 3.0]),
            "bias": jnp.array([0.0, 1.0, -1.0]),
            "mean": jnp.array([0.5, 0.0, 1.0]),
            "var": jnp.array([4.0, 1.0, 0.25]),
        }
    }
    got = layer.apply(variables, x)
    f = variables["frozen"]
    want = (x - f["mean"]) / jnp.sqrt(f["var"] + 1e-5) * f["scale"] + f["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert "params" not in layer.init(jax.random.key(0), x)
