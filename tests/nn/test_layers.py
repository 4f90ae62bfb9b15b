import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.nn import layers
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


def reference_max_pool(x, cotangent):
    """float64 NumPy max pool 3x3 / stride 2 / padding 1 and its gradient, which goes to the
    first maximum of each window in row-major order (torch's rule)."""
    n, h, w, c = x.shape
    oh, ow = (h + 1) // 2, (w + 1) // 2
    padded = np.full((n, h + 2, w + 2, c), -np.inf)
    padded[:, 1:-1, 1:-1] = x
    out = np.zeros((n, oh, ow, c))
    grad = np.zeros_like(padded)
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                for k in range(c):
                    window = padded[b, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, k]
                    dy, dx = np.unravel_index(np.argmax(window), (3, 3))  # first maximum
                    out[b, i, j, k] = window[dy, dx]
                    grad[b, 2 * i + dy, 2 * j + dx, k] += cotangent[b, i, j, k]
    return out, grad[:, 1:-1, 1:-1]


@pytest.mark.parametrize("shape", [(2, 9, 8, 3), (1, 6, 7, 2)])
def test_stem_max_pool_matches_a_float64_reference_with_ties(shape):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, shape).astype(np.float32)  # many ties inside windows
    oh, ow = (shape[1] + 1) // 2, (shape[2] + 1) // 2
    cotangent = rng.normal(size=(shape[0], oh, ow, shape[3])).astype(np.float32)
    expected_out, expected_grad = reference_max_pool(x.astype(np.float64), cotangent)
    out, vjp = jax.vjp(layers.max_pool_3x3_s2, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out), expected_out)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(cotangent))[0]), expected_grad, atol=1e-6)
    flax_out = nn.max_pool(jnp.asarray(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(flax_out))


@pytest.mark.parametrize("shape, strides", [((2, 8, 6, 3), (2, 2)), ((1, 7, 5, 2), (2, 3))])
def test_subsample_takes_what_a_strided_slice_takes(shape, strides):
    """The reshape form of a strided 1x1 convolution's input (layers.subsample, there for XLA's
    GPU compiler) takes the same elements as x[:, ::sy, ::sx], odd sizes included, and sends
    the gradient back to the same places."""
    x = jax.random.normal(jax.random.key(5), shape)
    sy, sx = strides
    np.testing.assert_array_equal(layers.subsample(x, strides), x[:, ::sy, ::sx])
    weights = jax.random.normal(jax.random.key(6), x[:, ::sy, ::sx].shape)
    got = jax.grad(lambda v: jnp.sum(layers.subsample(v, strides) * weights))(x)
    want = jax.grad(lambda v: jnp.sum(v[:, ::sy, ::sx] * weights))(x)
    np.testing.assert_array_equal(got, want)


def reference_group_norm(x, groups, scale, bias, eps):
    """float64 NumPy torch.nn.GroupNorm (its documented rule): per image and group of
    consecutive channels, (x - mean) / sqrt(biased variance + eps), then the per-channel affine
    terms; x is NHWC here, torch's NCHW grouping of channels C // groups at a time."""
    n, h, w, c = x.shape
    grouped = x.astype(np.float64).reshape(n, h, w, groups, c // groups)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = grouped.var(axis=(1, 2, 4), keepdims=True)
    normalised = ((grouped - mean) / np.sqrt(var + eps)).reshape(n, h, w, c)
    return normalised * scale + bias


def test_group_norm_is_torchs_with_its_default_epsilon():
    """GroupNorm, as built directly and through make_norm (the backbones' ConvNorm), is
    torch.nn.GroupNorm with its default eps 1e-5 (the references' GroupNorms: detectron2,
    mmcv's build_norm_layer, AdelaiDet, PANet's GROUP_NORM.EPSILON). The input's variance (9e-6)
    is of the epsilon's order: flax's 1e-6 gives outputs 1.38x as large."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 5, 6, 8)) * 3e-3).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    want = reference_group_norm(x, 4, scale, bias, 1e-5)
    for layer in (layers.GroupNorm(4), layers.make_norm("group_norm", jnp.float32, groups=4)()):
        got = layer.apply({"params": {"gn": {"scale": scale, "bias": bias}}}, x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
