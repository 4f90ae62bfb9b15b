"""ops/mixed_precision.py: bfloat16 contractions whose parameter gradients are float32.

The reference is a float64 NumPy product of the same bfloat16-rounded operands (the forward
input and the cotangent the bfloat16 output receives): what PyTorch's autocast accumulates into
a float32 `param.grad` before DistributedDataParallel all-reduces it. The plain bfloat16 path
misses it by bfloat16's rounding (about 1e-3 relative), so each check can fail.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.ops import mixed_precision

BF16 = jnp.bfloat16


def _bf16_as_f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(BF16).astype(jnp.float32), np.float64)


def _relative(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def _gradients(fn, x, kernel, cotangent):
    """(output, x gradient, kernel gradient) of sum(fn(x, kernel) * cotangent), op by op: under
    jit XLA:CPU may keep the plain path's product in float32 (excess precision), which would
    hide the rounding the accelerators do."""

    def loss(x_, k_):
        return jnp.sum(fn(x_, k_).astype(jnp.float32) * cotangent)

    out = fn(x, kernel)
    gx, gk = jax.grad(loss, argnums=(0, 1))(x, kernel)
    return out, gx, gk


def test_dense_kernel_gradient_is_float32_accumulated():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 40, 24)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(24, 8)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(3, 40, 8)), jnp.float32)
    out, gx, gk = _gradients(lambda a, k: mixed_precision.dense(a, k, BF16), x, kernel, cot)
    assert out.dtype == BF16 and gk.dtype == jnp.float32
    xb, gb = _bf16_as_f64(x).reshape(-1, 24), _bf16_as_f64(cot).reshape(-1, 8)
    assert _relative(gk, xb.T @ gb) < 1e-6
    # The plain bfloat16 path: same forward and input gradient, a bfloat16-rounded kernel one.
    p_out, p_gx, p_gk = _gradients(lambda a, k: a.astype(BF16) @ k.astype(BF16), x, kernel, cot)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(p_out, np.float32))
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(p_gx))
    assert _relative(p_gk, xb.T @ gb) > 1e-4


@pytest.mark.parametrize(
    "size, k, stride, pad, dilation, lhs_dilation",
    [
        (9, 3, 2, 1, 1, 1),  # a ResNet stride-2 3x3
        (10, 3, 2, 1, 1, 1),  # the stride leaves a row unread
        (9, 3, 1, 2, 2, 1),  # FCIS's dilated res5
        (5, 4, 1, 2, 1, 2),  # Keypoint R-CNN's 4x4 transposed convolution
    ],
)
def test_conv_kernel_gradient_is_float32_accumulated(size, k, stride, pad, dilation, lhs_dilation):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, size, size, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, 5, 4)), jnp.float32)
    kwargs = dict(
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        lhs_dilation=(lhs_dilation, lhs_dilation),
        rhs_dilation=(dilation, dilation),
    )
    plain = jax.eval_shape(
        lambda a, w: jax.lax.conv_general_dilated(
            a, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs
        ),
        x,
        kernel,
    )
    cot = jnp.asarray(rng.normal(size=plain.shape), jnp.float32)
    out, gx, gk = _gradients(
        lambda a, w: mixed_precision.conv(a, w, BF16, **kwargs), x, kernel, cot
    )
    assert out.dtype == BF16 and gk.dtype == jnp.float32
    # float64 loop: x dilated, then padded; output (i, j) reads rows s i + d a, cols s j + d b.
    xd = np.zeros((2, (size - 1) * lhs_dilation + 1, (size - 1) * lhs_dilation + 1, 5))
    xd[:, ::lhs_dilation, ::lhs_dilation] = _bf16_as_f64(x)
    xp = np.pad(xd, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    gb = _bf16_as_f64(cot)
    ho = gb.shape[1]
    want = np.zeros((k, k, 5, 4))
    for a in range(k):
        for b in range(k):
            rows = slice(a * dilation, a * dilation + (ho - 1) * stride + 1, stride)
            cols = slice(b * dilation, b * dilation + (ho - 1) * stride + 1, stride)
            want[a, b] = np.einsum("nijc,nijo->co", xp[:, rows, cols, :], gb)
    assert _relative(gk, want) < 1e-6
    p_out, p_gx, p_gk = _gradients(
        lambda a, w: jax.lax.conv_general_dilated(
            a.astype(BF16), w.astype(BF16), dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs
        ),
        x,
        kernel,
        cot,
    )
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(p_out, np.float32))
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(p_gx))
    assert _relative(p_gk, want) > 1e-4


def test_bias_gradient_is_float32_sum():
    rng = np.random.default_rng(2)
    y = jnp.asarray(rng.normal(size=(64, 32, 6)), jnp.float32).astype(BF16)
    bias = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(64, 32, 6)), jnp.float32)
    gb = jax.grad(lambda b: jnp.sum(mixed_precision.add_bias(y, b).astype(jnp.float32) * cot))(bias)
    assert gb.dtype == jnp.float32
    assert _relative(gb, _bf16_as_f64(cot).sum(axis=(0, 1))) < 1e-6
    # float32 compute: the plain sum, in float32
    y32 = y.astype(jnp.float32)
    gb = jax.grad(lambda b: jnp.sum(mixed_precision.add_bias(y32, b) * cot))(bias)
    assert gb.dtype == jnp.float32
    assert _relative(gb, np.asarray(cot, np.float64).sum(axis=(0, 1))) < 1e-6


def test_bias_gradient_keeps_no_barrier_off_tpu():
    """The optimisation barrier is for XLA:TPU's rewrite only (add_bias's docstring); lowered for
    this CPU (as for a GPU) the backward has none, since there it only held the cotangent whole
    in memory (FCOS's COCO step on 8 H100s: 4.25 GiB with it, 3.51 without)."""
    y = jnp.ones((4, 8, 8, 6), BF16)
    step = jax.jit(jax.grad(lambda b: jnp.sum(mixed_precision.add_bias(y, b).astype(jnp.float32))))
    lowered = step.lower(jnp.ones((6,), jnp.float32)).as_text()
    assert "reduce" in lowered and "optimization_barrier" not in lowered


def test_conv_kernel_gradient_on_gpu_is_per_image_bfloat16_summed_in_float32():
    """Lowered for CUDA, the filter gradient is one grouped convolution with a bfloat16 result
    per image (cuDNN's bfloat16 filter gradient) summed over the images in float32, so the
    cross-chip sum that follows stays float32: with a float32 result XLA:GPU converted both
    operands to float32 first (FCOS's COCO step on 8 H100s: 0.65 GiB more at its peak), and a
    bfloat16 result over the whole batch was all-reduced in bfloat16 (28 MB of FCOS's 128 MB).
    Lowered for TPU or this CPU it stays the float32-result form checked above."""

    def kernel_gradient(x, kernel):
        def loss(k):
            y = mixed_precision.conv(x, k, BF16, padding=((1, 1), (1, 1)))
            return jnp.sum(y.astype(jnp.float32))

        return jax.grad(loss)(kernel)

    x, kernel = jnp.ones((2, 8, 8, 4), jnp.float32), jnp.ones((3, 3, 4, 5), jnp.float32)
    traced = jax.jit(kernel_gradient).trace(x, kernel)
    convolutions = {}
    for platform in ("cuda", "tpu", "cpu"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        # The forward convolution is dead code for this loss: what is left is the gradient's.
        convolutions[platform] = re.findall(
            r"stablehlo\.convolution.*?feature_group_count = (\d+).*?-> (tensor<[^>]*>)", text
        )
        assert re.search(r"-> tensor<3x3x4x5xf32>", text), platform  # the gradient is float32
    assert convolutions == {
        "cuda": [("2", "tensor<4x3x3x10xbf16>")],  # 2 images: 2 groups, each its 5 outputs
        "tpu": [("1", "tensor<4x3x3x5xf32>")],
        "cpu": [("1", "tensor<4x3x3x5xf32>")],
    }


def test_per_image_kernel_gradient_is_each_images_bfloat16_sum_in_float32():
    """The GPU form's value, run here: sum over images of each image's float64 filter gradient
    rounded to bfloat16 (what cuDNN returns per image), from the same bfloat16 operands."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 9, 9, 4)), BF16)
    g = jnp.asarray(rng.normal(size=(3, 9, 9, 6)), BF16)
    geometry = ((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1))
    got = mixed_precision.conv_kernel_gradient_per_image(geometry, x, g, (3, 3))
    assert got.dtype == jnp.float32
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    g64 = np.asarray(g, np.float64)
    images = np.zeros((3, 3, 3, 4, 6))  # [image, kh, kw, in, out]
    for n in range(3):
        for a in range(3):
            for b in range(3):
                patch = xp[n, a : a + 9, b : b + 9].reshape(-1, 4)
                images[n, a, b] = patch.T @ g64[n].reshape(-1, 6)
    # Each image's result rounds to bfloat16 once (float32 accumulation may move an ulp).
    assert _relative(got, sum(_bf16_as_f64(image) for image in images)) < 2e-3
    assert _relative(got, images.sum(axis=0)) < 1e-2  # and it is the filter gradient


@pytest.mark.parametrize("name", ["dense", "conv", "contract"])
def test_float32_compute_is_the_plain_operation(name):
    """At the parameters' own dtype nothing is wrapped: the float32 experiments' programs."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    if name == "dense":
        k = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
        got, want = mixed_precision.dense(x, k, jnp.float32), x @ k
    elif name == "conv":
        k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
        got = mixed_precision.conv(x, k, jnp.float32, padding=((1, 1), (1, 1)))
        want = jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    else:
        k = jnp.asarray(rng.normal(size=(2, 2, 3, 4)), jnp.float32)
        got = mixed_precision.contract("nhwc,abco->nhwabo", x, k, jnp.float32)
        want = jnp.einsum("nhwc,abco->nhwabo", x, k)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    op = {"dense": mixed_precision.dense, "conv": mixed_precision.conv}.get(name)
    if op is not None:
        kwargs = {"padding": ((1, 1), (1, 1))} if name == "conv" else {}
        jaxpr = str(jax.make_jaxpr(lambda a, b: op(a, b, jnp.float32, **kwargs))(x, k))
        assert "custom_vjp" not in jaxpr


def test_every_weight_layer_goes_through_mixed_precision():
    """A flax nn.Dense / nn.Conv or a bare lax convolution casts its float32 kernel outside the
    gradient and all-reduces bfloat16 partial sums: the package's layers are nn/layers.py's."""
    import pathlib

    import instseg_jax

    root = pathlib.Path(instseg_jax.__file__).parent
    found = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "mixed_precision.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(call in line for call in ("nn.Dense(", "nn.Conv(", "conv_general_dilated("))
    ]
    assert not found, f"use nn/layers.py's Dense / Conv (ops/mixed_precision.py) at {found}"


@pytest.mark.slow
@pytest.mark.tpu
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None,
    reason="needs libtpu: make tpu-env, then make test-tpu",
)
def test_bias_gradient_all_reduces_only_the_bias_on_tpu():
    """An anchor head's bias (RetinaNet-style: [B, H, W, A x C] viewed as [B, H x W x A, C],
    levels concatenated) trained data-parallel on v5e:2x2: the plain `y + bias` has XLA:TPU
    all-reduce the batch-summed cotangent, H x W x A x C values per level; add_bias moves only
    the bias's C values (XLA:CPU does not make that rewrite, hence a TPU test)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from instseg_jax import aot, hlo_collectives

    aot.prepare_host("v5e:2x2")
    mesh = Mesh(np.array(aot.target_devices("v5e:2x2").devices), ("data",))
    data, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    levels = [jax.ShapeDtypeStruct((8, s, s, 3 * 5), BF16, sharding=data) for s in (32, 16)]
    bias = jax.ShapeDtypeStruct((15,), jnp.float32, sharding=whole)

    def all_reduced_bytes(add):
        def loss(b, maps):
            flat = jnp.concatenate([add(m, b).reshape(8, -1, 5) for m in maps], axis=1)
            return jnp.mean(jax.nn.sigmoid(flat.astype(jnp.float32)) * flat)

        step = jax.jit(jax.grad(loss), out_shardings=whole)
        found = hlo_collectives.collectives(step.lower(bias, levels).compile().as_text())
        return hlo_collectives.summary(found)["all-reduce"]["bytes"]

    plain = all_reduced_bytes(lambda m, b: m + b.astype(m.dtype))
    wrapped = all_reduced_bytes(mixed_precision.add_bias)
    assert wrapped <= 2 * 15 * 4  # the bias's sums (once per level at most)
    assert plain > 100 * wrapped  # the rewrite this guards against, still in this XLA
