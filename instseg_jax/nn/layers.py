"""Flax building blocks: frozen batch norm, group norm, conv-norm-act.

FrozenBatchNorm keeps its statistics and affine terms in the "frozen" collection, not in
"params": imported weights stay fixed and no optimizer ever sees them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instseg_jax.ops import mixed_precision

Dtype = Any


def kaiming_uniform_a1():
    """Caffe2's XavierFill as PyTorch writes it, kaiming_uniform_(a=1): uniform, std
    1 / sqrt(fan_in) (detectron2's c2_xavier_fill, AdelaiDet's conv_with_kaiming_uniform)."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def torch_default_kernel():
    """torch.nn.Conv2d's and Linear's own weight init, kaiming_uniform_(a=sqrt(5)): uniform,
    std 1 / sqrt(3 fan_in)."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
    """torch.nn.Conv2d's and Linear's own bias init: uniform in +-1 / sqrt(fan_in), fan_in the
    layer's inputs per output (in channels x kernel area)."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class FrozenBatchNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias, all four fixed (collection "frozen")."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        depth = x.shape[-1]
        scale = self.variable("frozen", "scale", lambda: jnp.ones((depth,), jnp.float32))
        bias = self.variable("frozen", "bias", lambda: jnp.zeros((depth,), jnp.float32))
        mean = self.variable("frozen", "mean", lambda: jnp.zeros((depth,), jnp.float32))
        var = self.variable("frozen", "var", lambda: jnp.ones((depth,), jnp.float32))
        multiplier = scale.value * (1.0 / jnp.sqrt(var.value + self.epsilon))
        shift = bias.value - mean.value * multiplier
        return (x * multiplier.astype(self.dtype) + shift.astype(self.dtype)).astype(self.dtype)


# GroupNorm's epsilon, every GroupNorm of the package: torch.nn.GroupNorm's default, which every
# reference followed here builds its GroupNorms with (detectron2's get_norm("GN") and AdelaiDet:
# nn.GroupNorm(32, C); mmcv's build_norm_layer, cfg.setdefault('eps', 1e-5), for mmdetection,
# WXinlong/SOLO and PolarMask; PANet's Detectron.pytorch, GROUP_NORM.EPSILON = 1e-5; Mask2Former's
# pixel decoder; torchvision's FCOS head). flax.linen.GroupNorm's own default is 1e-6, which
# moved the SOLOv2 head's outputs by 2e-5 to 4e-5 against mmdetection's
# (experiments/parity/solov2_loss.py).
GN_EPSILON = 1e-5


class GroupNorm(nn.Module):
    """GroupNorm with up to ``groups`` groups (fewer for narrow test models: min(groups, C))."""

    groups: int = 32
    dtype: Dtype = jnp.float32
    epsilon: float = GN_EPSILON

    @nn.compact
    def __call__(self, x):
        groups = min(self.groups, x.shape[-1])
        if x.shape[-1] % groups:
            raise ValueError(
                f"{x.shape[-1]} channels do not split into {groups} groups; "
                "use a width divisible by 32"
            )
        return nn.GroupNorm(num_groups=groups, epsilon=self.epsilon, dtype=self.dtype, name="gn")(x)


def make_norm(kind: str, dtype: Dtype, groups: int = 32):
    """A norm layer constructor by config name: "frozen_bn", "group_norm" or "none"."""
    if kind == "frozen_bn":
        return lambda name=None: FrozenBatchNorm(dtype=dtype, name=name)
    if kind == "group_norm":
        return lambda name=None: GroupNorm(groups, dtype, name=name)
    if kind == "none":
        return lambda name=None: lambda x: x
    raise ValueError(f"model.norm must be 'frozen_bn', 'group_norm' or 'none', got {kind!r}")


class Conv(nn.Module):
    """A 2-D convolution, NHWC, with flax.linen.Conv's parameters ("kernel" [kh, kw, in, out],
    "bias" [out]) and numbers, used by every layer of the package.

    A 1x1 kernel runs as a matmul over channels (after a strided slice for stride > 1): on
    XLA:CPU its forward and backward ran 2.7-6x faster than the convolution op, and on GPU and
    TPU a matmul is what the convolution becomes anyway. Larger kernels use the convolution op.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    dilation: int = 1  # kernel dilation (atrous convolution; FCIS's res5)

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
        x = x.astype(self.dtype)
        padding = tuple(tuple(p) for p in self.padding)
        if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
            # [B, H/s, W/s, features]
            y = mixed_precision.dense(subsample(x, self.strides), kernel[0, 0], self.dtype)
        else:
            y = mixed_precision.conv(
                x,
                kernel,
                self.dtype,
                window_strides=self.strides,
                padding=padding,
                rhs_dilation=(self.dilation, self.dilation),
            )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,))
            y = mixed_precision.add_bias(y, bias)
        return y


class Dense(nn.Module):
    """flax.linen.Dense's parameters ("kernel" [in, features], "bias" [features]) and numbers
    over x's last axis, computed in `dtype` with float32 parameter gradients
    (ops/mixed_precision.py): every fully connected layer of the package."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = mixed_precision.dense(x, kernel, self.dtype)
        if self.use_bias:
            y = mixed_precision.add_bias(y, self.param("bias", self.bias_init, (self.features,)))
        return y


def subsample(x, strides):
    """x[:, ::sy, ::sx] of [B, H, W, C], written as a reshape to [B, H/sy, sy, W/sx, sx, C]
    (H and W padded up to a multiple of the stride; the padding is never taken) and the first
    of each block. The same numbers as the strided slice: XLA's GPU compiler (jax 0.10.2)
    aborted on a strided slice of a strided slice (the stem's max pool, then a stride-2 1x1
    shortcut) fused into a Triton matmul; experiments/repro/xla_gpu_triton_tiling_abort.py."""
    sy, sx = strides
    if (sy, sx) == (1, 1):
        return x
    _, h, w, _ = x.shape
    hp, wp = -(-h // sy) * sy, -(-w // sx) * sx
    if (hp, wp) != (h, w):
        x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    b, _, _, c = x.shape
    return x.reshape(b, hp // sy, sy, wp // sx, sx, c)[:, :, 0, :, 0, :]


class ConvNorm(nn.Module):
    """Conv (no bias when normalised) -> norm -> optional ReLU, NHWC."""

    features: int
    kernel: int = 3
    stride: int = 1
    norm: str = "group_norm"
    relu: bool = True
    dtype: Dtype = jnp.float32
    # MSRAFill (kaiming_normal_, fan_out, relu: detectron2's c2_msra_fill) unless a caller's
    # reference says otherwise (PANet's bottom-up path: XavierFill).
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    dilation: int = 1  # kernel dilation, padded to keep the size (FCIS's dilated res5)

    @nn.compact
    def __call__(self, x):
        pad = self.dilation * (self.kernel // 2)
        x = Conv(
            self.features,
            (self.kernel, self.kernel),
            (self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=self.norm == "none",
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            name="conv",
            dilation=self.dilation,
        )(x)
        x = make_norm(self.norm, self.dtype)(name="norm")(x)
        return nn.relu(x) if self.relu else x


class Deconv2x2(nn.Module):
    """2x2 transposed convolution of stride 2, as one matmul and a depth-to-space.

    y[2i + a, 2j + b] = x[i, j] @ kernel[a, b] + bias: the kernel layout is [2, 2, in, out] and
    output pixel (2i + a, 2j + b) uses tap (a, b), the convention of torch's ConvTranspose2d.
    The blocks do not overlap, so this is exactly a transposed convolution; written as a matmul,
    its weight gradient is a matmul too (XLA's CPU transposed-convolution weight gradient was
    10x slower in the mask head).

    blocked=True returns the matmul's layout [N, H, W, 2, 2, out] (tap (a, b) of pixel (i, j)),
    for callers that apply per-pixel layers before `depth_to_space_2x2`: the transpose, and its
    gradient's, then move fewer channels.
    """

    features: int
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    blocked: bool = False

    @nn.compact
    def __call__(self, x):  # [N, H, W, C] -> [N, 2H, 2W, features]
        c = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (2, 2, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = mixed_precision.contract("nhwc,abco->nhwabo", x, kernel, self.dtype)
        y = mixed_precision.add_bias(y, bias)
        return y if self.blocked else depth_to_space_2x2(y)


def depth_to_space_2x2(y):
    """[N, H, W, 2, 2, C] (tap (a, b) of pixel (i, j)) -> [N, 2H, 2W, C] (pixel (2i+a, 2j+b))."""
    n, h, w, _, _, c = y.shape
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c)


def _pool_taps(padded, out_hw):
    """The 9 strided views [B, oh, ow, C] of a padded map: tap (dy, dx) of every 3x3 window of
    stride 2, in row-major window order."""
    n, _, _, c = padded.shape
    oh, ow = out_hw
    return [
        jax.lax.slice(
            padded, (0, dy, dx, 0), (n, dy + 2 * oh - 1, dx + 2 * ow - 1, c), (1, 2, 2, 1)
        )
        for dy in range(3)
        for dx in range(3)
    ]


def _pool_geometry(x):
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return padded, ((x.shape[1] + 1) // 2, (x.shape[2] + 1) // 2)


@jax.custom_vjp
def max_pool_3x3_s2(x):
    """ResNet's stem max pool (3x3 windows, stride 2, padding 1) on [B, H, W, C].

    The same numbers as flax.linen.max_pool. Its gradient goes to the first maximum of each
    window in row-major order, as torch's and detectron2's max pool do, and is built from the
    9 strided views of the map: XLA:CPU's gradient of a reduce-window max (a variadic
    reduce-window carrying indices) took 3x longer in the nuclei training step.
    """
    padded, out_hw = _pool_geometry(x)
    taps = _pool_taps(padded, out_hw)
    out = taps[0]
    for tap in taps[1:]:
        out = jnp.maximum(out, tap)
    return out


def _max_pool_fwd(x):
    out = max_pool_3x3_s2(x)
    return out, (x, out)


def _max_pool_bwd(residuals, g):
    x, out = residuals
    padded, out_hw = _pool_geometry(x)
    hp, wp = padded.shape[1:3]
    oh, ow = out_hw
    taken = jnp.zeros(out.shape, bool)
    grad = jnp.zeros(padded.shape, g.dtype)
    for index, tap in enumerate(_pool_taps(padded, out_hw)):
        dy, dx = divmod(index, 3)
        first = (tap == out) & ~taken
        taken = taken | first
        # Back to the padded grid: row i of the view is row dy + 2i (interior padding 1).
        placed = jax.lax.pad(
            jnp.where(first, g, 0.0),
            jnp.zeros((), g.dtype),
            (
                (0, 0, 0),
                (dy, hp - dy - (2 * oh - 1), 1),
                (dx, wp - dx - (2 * ow - 1), 1),
                (0, 0, 0),
            ),
        )
        grad = grad + placed
    return (grad[:, 1:-1, 1:-1, :],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)
