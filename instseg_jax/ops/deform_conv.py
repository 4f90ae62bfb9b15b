"""Modulated deformable convolution (DCNv2; Zhu et al. 2019, "Deformable ConvNets v2"), on the
static bilinear gathers of `ops/sampling.py`.

    y(p) = sum over kernel taps k of  w_k . x(p_in + p_k + dp_k(p)) * m_k(p)

p_in = p x stride - padding is the window's first tap, p_k = k x dilation the tap's place in
the window, dp_k(p) = (dy, dx) a learned offset and m_k(p) in [0, 1] a learned modulation;
x(.) is bilinear with zero outside the map (DCNv2's dmcn_im2col_bilinear, torchvision's
deform_conv2d: a position reads its four neighbours, those off the map count 0). Offsets
and masks come per output position and tap, one group for all input channels (the reference's
deformable_groups=1; dbolya/yolact backbone.py). With zero offsets and unit masks this is the
plain convolution.

Each image samples its own map under vmap (`pool_bilinear_samples`' chunked gathers and
scatter-add backward): a batch split over devices exchanges nothing. Gradients reach the
features, the masks, the kernel and, through the bilinear weights, the offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from instseg_jax.ops import mixed_precision
from instseg_jax.ops.sampling import pixel_corners, pool_bilinear_samples


def deform_conv_output_hw(
    in_hw: Sequence[int],
    kernel_hw: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[Sequence[int]],
    dilation: Sequence[int],
) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of this geometry (the offsets' and masks' grid)."""
    return tuple(
        (size + pad[0] + pad[1] - dil * (k - 1) - 1) // s + 1
        for size, k, s, pad, dil in zip(in_hw, kernel_hw, stride, padding, dilation, strict=True)
    )


def deform_conv2d(
    x: jnp.ndarray,
    offset: jnp.ndarray,
    mask: jnp.ndarray,
    kernel: jnp.ndarray,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[Sequence[int]] = ((1, 1), (1, 1)),
    dilation: Sequence[int] = (1, 1),
) -> jnp.ndarray:
    """Modulated deformable convolution, NHWC (module docstring).

    x [B, H, W, Cin]; offset [B, Ho, Wo, 2 kh kw]: per tap k (row-major over the kh x kw
    window) the pair (dy, dx) at channels 2k, 2k + 1 (torchvision's deform_conv2d and DCNv2's
    channel order); mask [B, Ho, Wo, kh kw] (the modulation, already through its sigmoid);
    kernel [kh, kw, Cin, Cout] (HWIO). Returns [B, Ho, Wo, Cout] in x's dtype; sampling
    positions are float32.
    """
    _, height, width, channels = x.shape
    kh, kw, kernel_in, out_channels = kernel.shape
    if kernel_in != channels:
        raise ValueError(f"deform_conv2d: kernel takes {kernel_in} channels, x has {channels}")
    ho, wo = deform_conv_output_hw((height, width), (kh, kw), stride, padding, dilation)
    taps = kh * kw
    if offset.shape[1:] != (ho, wo, 2 * taps) or mask.shape[1:] != (ho, wo, taps):
        raise ValueError(
            f"deform_conv2d: offset must be [B, {ho}, {wo}, {2 * taps}] and mask "
            f"[B, {ho}, {wo}, {taps}], got {offset.shape} and {mask.shape}"
        )
    # The undeformed taps, in pixel units (cell (i, j)'s centre at (j, i)).
    rows = jnp.arange(ho, dtype=jnp.float32) * stride[0] - padding[0][0]
    cols = jnp.arange(wo, dtype=jnp.float32) * stride[1] - padding[1][0]
    tap_rows = jnp.arange(kh, dtype=jnp.float32) * dilation[0]
    tap_cols = jnp.arange(kw, dtype=jnp.float32) * dilation[1]
    base_y = rows[:, None, None, None] + tap_rows[None, None, :, None]  # [Ho, 1, kh, 1]
    base_x = cols[None, :, None, None] + tap_cols[None, None, None, :]  # [1, Wo, 1, kw]
    # The kernel keeps its own dtype (float32 parameters) until the product, whose weight
    # gradient mixed_precision keeps in float32.
    flat_kernel = kernel.reshape(taps * channels, out_channels)

    def one_image(image, image_offset, image_mask):
        deltas = image_offset.astype(jnp.float32).reshape(ho, wo, kh, kw, 2)
        y = base_y + deltas[..., 0]  # [Ho, Wo, kh, kw]
        x_pos = base_x + deltas[..., 1]
        index, weight = pixel_corners(x_pos, y, height, width)  # [4, Ho, Wo, kh, kw]
        weight = weight * image_mask.astype(jnp.float32).reshape(ho, wo, kh, kw)
        # One group per output position, its kh x kw taps as the pooled grid (one sample each).
        shape = (4, ho * wo, kh, 1, kw, 1)
        columns = pool_bilinear_samples(
            image.reshape(height * width, channels),
            index.reshape(shape),
            weight.astype(image.dtype).reshape(shape),
        )  # [Ho Wo, kh, kw, Cin]
        return mixed_precision.dense(
            columns.reshape(ho * wo, taps * channels), flat_kernel, image.dtype
        ).reshape(ho, wo, out_channels)

    return jax.vmap(one_image)(x, offset, mask)
