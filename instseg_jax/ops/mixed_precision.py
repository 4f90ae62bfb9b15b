"""Weight contractions in a narrow compute dtype whose parameter gradients stay float32.

Parameters are float32 and the accelerator recipes compute in bfloat16. Written the plain way,
`x @ kernel.astype(bfloat16)`, the weight gradient is the transposed contraction of bfloat16
operands with a bfloat16 result: each chip sums its own images in bfloat16, and the data-parallel
all-reduce that XLA places right after that contraction adds the chips' partial sums in
bfloat16 too (the v5e:2x2 compile of the Mask R-CNN recipe moved 97.5 MB of bfloat16 and no
float32: RESULTS.md). PyTorch's autocast, which every reference trains under, keeps
`param.grad` in float32 and DistributedDataParallel all-reduces that.

Here the cast of the float32 parameter happens inside a custom VJP: the forward pass is the
same bfloat16 contraction, the input gradient is the same bfloat16 transposed contraction, and
the weight (and bias) gradient is the transposed contraction of the same bfloat16 operands
accumulated and returned in float32 (`preferred_element_type`, which the MXU and tensor cores
accumulate in anyway), so the cross-chip sum is float32 as well. On GPU a convolution's filter
gradient is each image's bfloat16 result summed over the images in float32 (`_conv_bwd` says
why); the cross-chip sum is float32 there too. When the compute dtype is the
parameter's dtype (every float32 experiment) the plain contraction runs and nothing changes;
`add_bias` is wrapped at every dtype (its docstring says why).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _narrows(param, dtype) -> bool:
    """Whether computing in `dtype` rounds the float parameter `param` (bfloat16 of float32)."""
    wide, narrow = jnp.dtype(param.dtype), jnp.dtype(dtype)
    floats = jnp.issubdtype(wide, jnp.floating) and jnp.issubdtype(narrow, jnp.floating)
    return floats and narrow.itemsize < wide.itemsize


def dense(x, kernel, dtype):
    """x [..., in] @ kernel [in, out] computed in `dtype`; the kernel's gradient is float32
    when `dtype` is narrower."""
    if not _narrows(kernel, dtype):
        return x.astype(dtype) @ kernel.astype(dtype)
    lead = x.shape[:-1]
    y = contract("nc,co->no", x.reshape(-1, x.shape[-1]), kernel, dtype)
    return y.reshape(*lead, kernel.shape[-1])


def contract(spec: str, x, kernel, dtype):
    """jnp.einsum(spec, x, kernel) computed in `dtype`, for a two-operand spec "x,kernel->out"
    in which every kernel axis appears in x or out (a dense layer, a 1x1 convolution, a 2x2
    transposed convolution, the deformable convolution's column product), without "...". The
    kernel's gradient is float32 (its own dtype) when `dtype` is narrower."""
    if not _narrows(kernel, dtype):
        return jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype))
    inputs, out_axes = spec.split("->")
    x_axes, kernel_axes = inputs.split(",")
    kernel_gradient_spec = f"{x_axes},{out_axes}->{kernel_axes}"
    return _contract(spec, kernel_gradient_spec, dtype, x.astype(dtype), kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _contract(spec, kernel_gradient_spec, dtype, x, kernel):
    return jnp.einsum(spec, x, kernel.astype(dtype))


def _contract_fwd(spec, kernel_gradient_spec, dtype, x, kernel):
    narrow_kernel = kernel.astype(dtype)
    return jnp.einsum(spec, x, narrow_kernel), (x, narrow_kernel)


def _contract_bwd(spec, kernel_gradient_spec, dtype, residuals, g):
    x, narrow_kernel = residuals
    _, x_vjp = jax.vjp(lambda a: jnp.einsum(spec, a, narrow_kernel), x)
    (x_gradient,) = x_vjp(g)
    kernel_gradient = jnp.einsum(
        kernel_gradient_spec, x, g.astype(dtype), preferred_element_type=jnp.float32
    )
    return x_gradient, kernel_gradient


_contract.defvjp(_contract_fwd, _contract_bwd)


def conv(
    x,
    kernel,
    dtype,
    window_strides=(1, 1),
    padding=((0, 0), (0, 0)),
    lhs_dilation=(1, 1),
    rhs_dilation=(1, 1),
):
    """jax.lax.conv_general_dilated of NHWC x and an HWIO kernel computed in `dtype`, padding
    explicit ((lo, hi) per spatial axis); the kernel's gradient is float32 when `dtype` is
    narrower."""
    geometry = (
        tuple(window_strides),
        tuple(tuple(p) for p in padding),
        tuple(lhs_dilation),
        tuple(rhs_dilation),
    )
    if not _narrows(kernel, dtype):
        return _forward_conv(geometry, x.astype(dtype), kernel.astype(dtype))
    return _conv(geometry, dtype, x.astype(dtype), kernel)


def _forward_conv(geometry, x, kernel):
    strides, padding, lhs_dilation, rhs_dilation = geometry
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def conv_kernel_gradient(geometry, x, g, kernel_hw, result_dtype=jnp.float32):
    """dL/dkernel [kh, kw, in, out] of _forward_conv(geometry, x, kernel) for the output
    cotangent g, as one convolution of x with g accumulated in float32 and returned in
    `result_dtype` (float32 unless a caller asks for the operands' dtype):
    dK[a, b, c, o] = sum over n, i, j of x_pad[n, s i + d a, s j + d b, c] g[n, i, j, o]
    (s the stride, d the kernel dilation, x_pad x dilated and padded). JAX's own transpose
    rule converts x to g's dtype and the result to the kernel's, which rounds it."""
    strides, padding, lhs_dilation, rhs_dilation = geometry
    if lhs_dilation != (1, 1):  # a transposed convolution: dilate x, then an ordinary one
        x = jax.lax.pad(
            x,
            jnp.zeros((), x.dtype),
            [(0, 0, 0)] + [(0, 0, d - 1) for d in lhs_dilation] + [(0, 0, 0)],
        )
    pads = []
    for axis in range(2):
        size = x.shape[1 + axis] + padding[axis][0] + padding[axis][1]
        reach = (g.shape[1 + axis] - 1) * strides[axis] + 1
        # rows past the last window the forward pass read are cut from the high side
        extra = size - reach - (kernel_hw[axis] - 1) * rhs_dilation[axis]
        pads.append((padding[axis][0], padding[axis][1] - extra))
    # x as [in (batch), H, W, N (feature)], g as the kernel [N (in), Ho, Wo, out]
    gradient = jax.lax.conv_general_dilated(
        x,
        g,
        window_strides=rhs_dilation,
        padding=pads,
        rhs_dilation=strides,
        dimension_numbers=("CHWN", "IHWO", "NHWC"),
        preferred_element_type=result_dtype,
    )  # [in, kh, kw, out]
    return jnp.transpose(gradient, (1, 2, 0, 3))


def conv_kernel_gradient_per_image(geometry, x, g, kernel_hw):
    """conv_kernel_gradient as each image's result in x's (narrow) dtype, summed over the
    images in float32: one grouped convolution (vmap over the images) of narrow operands and
    result, then a float32 sum over the batch axis (the GPU's form: _conv_bwd says why)."""
    per_image = jax.vmap(
        lambda xi, gi: conv_kernel_gradient(
            geometry, xi[None], gi[None], kernel_hw, result_dtype=x.dtype
        )
    )(x, g)  # [B, kh, kw, in, out]
    return jnp.sum(per_image.astype(jnp.float32), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv(geometry, dtype, x, kernel):
    return _forward_conv(geometry, x, kernel.astype(dtype))


def _conv_fwd(geometry, dtype, x, kernel):
    narrow_kernel = kernel.astype(dtype)
    return _forward_conv(geometry, x, narrow_kernel), (x, narrow_kernel)


def _conv_bwd(geometry, dtype, residuals, g):
    x, narrow_kernel = residuals
    _, x_vjp = jax.vjp(lambda a: _forward_conv(geometry, a, narrow_kernel), x)
    (x_gradient,) = x_vjp(g)
    kernel_hw = narrow_kernel.shape[:2]

    def float32_result(x, g):
        return conv_kernel_gradient(geometry, x, g, kernel_hw)

    def per_image_narrow_results(x, g):
        return conv_kernel_gradient_per_image(geometry, x, g, kernel_hw)

    # Chosen when the program is lowered for its platform. XLA:GPU has no cuDNN filter
    # gradient of bfloat16 operands with a float32 result: it converts both operands to float32
    # first, a float32 copy of each activation and cotangent (FCOS's COCO step on 8 H100s held
    # 0.65 GiB more at its peak). A bfloat16 result over the whole batch would be summed across
    # chips in bfloat16 (the partitioner all-reduces right after the contraction over the
    # sharded batch). So on GPU each image's filter gradient is cuDNN's bfloat16 result (one
    # grouped convolution; accumulated in float32 inside the kernel) and the images are summed
    # in float32, which is where the cross-chip sum happens. TPU and CPU take the mixed form.
    kernel_gradient = jax.lax.platform_dependent(
        x, g.astype(dtype), cuda=per_image_narrow_results, default=float32_result
    )
    return x_gradient, kernel_gradient


_conv.defvjp(_conv_fwd, _conv_bwd)


def add_bias(y, bias):
    """y + bias (over y's last axis) in y's dtype; the bias gradient, the sum of y's cotangent
    over every other axis, is accumulated and returned in float32 when y's dtype is narrower.

    Wrapped at every dtype, float32 included, for the shape of that sum's all-reduce: where y's
    cotangent arrives through a reshape that folds part of y's channels into another axis (an
    anchor head's [B, H, W, A x C] viewed as [B, H x W x A, C]), XLA rewrites the sum over
    (B, H, W) of the reshape into a sum over B first, and the partitioner all-reduces that
    partial sum, an activation of H x W x A x C values, instead of the C sums (v5e:2x2: RDSNet's
    COCO step moved 397 MB for 178 MB of parameters). The optimisation barrier keeps the
    reduction whole, so each chip sums its own images over every axis and only C values cross.
    Only on TPU: XLA:CPU and XLA:GPU do not make that rewrite, and there the barrier holds each
    cotangent whole in memory before its sum (FCOS's COCO step on 8 H100s: 0.74 GiB more).
    """
    return _add_bias(y, bias)


@jax.custom_vjp
def _add_bias(y, bias):
    return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
    return _add_bias(y, bias), bias  # for its dtype: the parameter is live anyway


def _add_bias_bwd(bias, g):
    leading = tuple(range(g.ndim - 1))
    wide = jnp.promote_types(bias.dtype, jnp.float32)

    def bias_sum(cotangent):
        return jnp.sum(cotangent, axis=leading, dtype=wide).astype(bias.dtype)

    # Chosen when the program is lowered for its platform (add_bias's docstring says why).
    summed = jax.lax.platform_dependent(
        g,
        tpu=lambda cotangent: bias_sum(jax.lax.optimization_barrier(cotangent)),
        default=bias_sum,
    )
    return g, summed


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)
