"""Modulated deformable convolution against a float64 NumPy loop written from DCNv2's definition
(Zhu et al. 2019, eq. 3; the bilinear read of DCNv2's dmcn_im2col_bilinear: the four
neighbours of a position, those off the map counting 0) and, where stored, torchvision's
deform_conv2d on the same inputs."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.ops.deform_conv import deform_conv2d

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "torchvision_deform_conv_tiny.npz"


def bilinear(image, y, x):
    """float64 value of image[H, W, C] at pixel position (y, x), zeros off the map."""
    height, width = image.shape[:2]
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    total = np.zeros(image.shape[2], np.float64)
    for yi in (y0, y0 + 1):
        for xi in (x0, x0 + 1):
            if 0 <= yi < height and 0 <= xi < width:
                total += (1 - abs(y - yi)) * (1 - abs(x - xi)) * image[yi, xi]
    return total


def reference_deform_conv(x, offset, mask, kernel, stride, padding, dilation):
    """y[b, i, j] = sum_k kernel[k] . x(p_in + p_k + dp_k) * m_k, in float64 loops."""
    x, offset, mask, kernel = (np.asarray(a, np.float64) for a in (x, offset, mask, kernel))
    batch = x.shape[0]
    kh, kw, _, out_channels = kernel.shape
    _, ho, wo, _ = mask.shape
    out = np.zeros((batch, ho, wo, out_channels))
    for b in range(batch):
        for i in range(ho):
            for j in range(wo):
                for ki in range(kh):
                    for kj in range(kw):
                        k = ki * kw + kj
                        y = i * stride[0] - padding[0] + ki * dilation[0] + offset[b, i, j, 2 * k]
                        xx = j * stride[1] - padding[1] + kj * dilation[1]
                        xx += offset[b, i, j, 2 * k + 1]
                        value = bilinear(x[b], y, xx) * mask[b, i, j, k]
                        out[b, i, j] += value @ kernel[ki, kj]
    return out


def random_inputs(seed, batch, hw, cin, cout, out_hw, scale=1.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *hw, cin)).astype(np.float32)
    offset = rng.normal(0, scale, (batch, *out_hw, 18)).astype(np.float32)
    mask = rng.uniform(0, 1, (batch, *out_hw, 9)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, cin, cout)).astype(np.float32)
    return x, offset, mask, kernel


@pytest.mark.parametrize(
    "stride, padding, dilation, out_hw",
    [
        ((1, 1), (1, 1), (1, 1), (6, 5)),
        ((2, 2), (1, 1), (1, 1), (3, 3)),
        ((1, 1), (2, 2), (2, 2), (6, 5)),
    ],
)
def test_deform_conv_matches_the_definition(stride, padding, dilation, out_hw):
    # Offsets of std 1.5 px send many taps off the 6 x 5 map and across cell borders.
    x, offset, mask, kernel = random_inputs(0, 2, (6, 5), 3, 4, out_hw)
    pad = ((padding[0],) * 2, (padding[1],) * 2)
    got = deform_conv2d(x, offset, mask, kernel, stride, pad, dilation)
    want = reference_deform_conv(x, offset, mask, kernel, stride, padding, dilation)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_zero_offsets_and_unit_masks_give_the_plain_convolution():
    x, offset, mask, kernel = random_inputs(1, 1, (8, 8), 4, 3, (4, 4))
    got = deform_conv2d(x, 0 * offset, 0 * mask + 1, kernel, (2, 2), ((1, 1), (1, 1)))
    plain = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_gradients_match_finite_differences_of_the_definition():
    """d(sum(y * g)) by every input, against central differences of the float64 loop at a few
    entries each (offsets drawn away from integers: the bilinear read has kinks there)."""
    x, offset, mask, kernel = random_inputs(2, 1, (4, 4), 2, 2, (4, 4), scale=0.7)
    offset = np.floor(offset) + np.random.default_rng(3).uniform(0.2, 0.8, offset.shape)
    offset = offset.astype(np.float32)
    cotangent = np.random.default_rng(4).normal(size=(1, 4, 4, 2))
    strides, pad = (1, 1), ((1, 1), (1, 1))

    def objective(*args):
        return (deform_conv2d(*args, strides, pad) * cotangent).sum()

    grads = jax.grad(objective, argnums=(0, 1, 2, 3))(x, offset, mask, kernel)
    inputs = [x, offset, mask, kernel]
    rng = np.random.default_rng(5)
    for which, grad in enumerate(grads):
        for _ in range(4):
            where = tuple(rng.integers(0, s) for s in inputs[which].shape)
            step = 1e-4
            moved = []
            for sign in (1, -1):
                args = [np.asarray(a, np.float64).copy() for a in inputs]
                args[which][where] += sign * step
                out = reference_deform_conv(*args, strides, (1, 1), (1, 1))
                moved.append((out * cotangent).sum())
            numeric = (moved[0] - moved[1]) / (2 * step)
            assert float(grad[where]) == pytest.approx(numeric, rel=1e-3, abs=1e-3), (which, where)


def test_no_cross_image_reads_under_vmap_sharding():
    """An image's output depends on its own map only (vmap over the batch): changing image 1
    leaves image 0's output unchanged."""
    x, offset, mask, kernel = random_inputs(6, 2, (5, 5), 2, 2, (5, 5), scale=3.0)
    first = deform_conv2d(x, offset, mask, kernel)
    x2 = x.copy()
    x2[1] += 10.0
    second = deform_conv2d(x2, offset, mask, kernel)
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(second[0]))


@pytest.mark.skipif(not FIXTURE.exists(), reason="fixture not stored")
def test_deform_conv_matches_torchvision():
    """tests/fixtures/torchvision_deform_conv_tiny.npz: torchvision.ops.deform_conv2d (NCHW,
    offsets [B, 2 kh kw, Ho, Wo] in (dy, dx) pairs, mask [B, kh kw, Ho, Wo]) on random inputs,
    written by experiments/parity/deform_conv_fixture.py in the peer environment."""
    stored = np.load(FIXTURE)
    got = deform_conv2d(
        jnp.asarray(stored["x"].transpose(0, 2, 3, 1)),
        jnp.asarray(stored["offset"].transpose(0, 2, 3, 1)),
        jnp.asarray(stored["mask"].transpose(0, 2, 3, 1)),
        jnp.asarray(stored["weight"].transpose(2, 3, 1, 0)),
        tuple(stored["stride"]),
        tuple((int(p), int(p)) for p in stored["padding"]),
        tuple(stored["dilation"]),
    )
    np.testing.assert_allclose(
        np.asarray(got), stored["out"].transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4
    )
