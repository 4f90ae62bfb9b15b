"""Position-sensitive RoI pooling (R-FCN's PSROIPooling; FCIS's assembling) with static shapes.

The rule is that of MXNet's contrib PSROIPooling, the kernel FCIS calls
(msracver/FCIS fcis/symbols/resnet_v1_101_fcis.py, `mx.contrib.sym.PSROIPooling` with
group_size 7 and pooled_size 21; R-FCN's psroi_pooling kernel with its group index generalised
to pooled_size != group_size). For group size k, pooled size S and spatial scale s:

- a box's edges are rounded to whole pixels and scaled: start = round(x0) s, end = round(x1) s.
  The kernel takes inclusive boxes (x1 the last pixel) and ends at (round(x1) + 1) s; ours are
  continuous (x1 one past the last pixel), so round(x1) here is the kernel's round(x1 - 1) + 1.
  Rounding is half up (floor(x + 0.5)), the C `round` on the non-negative coordinates of boxes
  clipped to the image;
- the box is at least 0.1 cells per side; bin (i, j) spans the cells of rows
  [floor(y_start + i h / S), ceil(y_start + (i + 1) h / S)) and the columns likewise, clipped
  to the map; an empty bin is 0, any other the mean of its cells. An edge on a whole cell
  in exact arithmetic is taken as that cell (`_bin_edges`): the kernel's float32
  start + i (h / S) may land an ulp to either side there, its compiler deciding;
- bin (i, j) reads the channels of position group (floor(i k / S), floor(j k / S)), at most
  k - 1: a k x k grid of score-map groups assembled into the S x S output.

Channels of the score maps are position-major: channel (gy k + gx) D + d holds output channel d
of position group (gy, gx) (the kernel's is d k^2 + gy k + gx; the maps are learned, so only
the naming differs).

The mean over a bin of any size is exact under static shapes: each image's maps become an
integral image (cumulative sums over rows and columns, float32) and a bin's sum is four reads of
it, gathered per image under vmap (the tables never mix images, so a batch split over devices
pools on each device from its own images: nothing crosses chips). The reads go through
`ops.sampling.pool_bilinear_samples` (its TPU-friendly gather and scatter-add gradient) with
weights +-1 / area. Float32 integral images lose precision on large maps: a bin's sum is a
difference of prefix sums of up to H W values, so its absolute error grows like the map's total
magnitude times 2^-24.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instseg_jax.ops.sampling import pool_bilinear_samples

SNAP = 1e-4  # cells: bin edges this close to a whole cell are on it (`_bin_edges`)


def _round_half_up(x):
    return jnp.floor(x + 0.5)


def _bin_edges(low, high, pooled_size: int, spatial_scale: float, size: int):
    """int32[..., S] first and one-past-last cells of the S bins of boxes spanning [low, high)
    (image pixels) along an axis of `size` cells (the kernel's rule, module docstring)."""
    start = _round_half_up(low) * spatial_scale
    end = _round_half_up(high) * spatial_scale
    length = jnp.maximum(end - start, 0.1)
    steps = jnp.arange(pooled_size + 1, dtype=low.dtype)
    edges = start[..., None] + steps * (length / pooled_size)[..., None]  # [..., S + 1]
    # An edge that is a whole cell in exact arithmetic can land an ulp to either side of it in
    # float32 (XLA also turns the division into a product by 1/S), and then floor or ceil tips
    # a bin by a row: edges within SNAP cells of a whole cell are that cell. With a scale
    # of 1/stride the exact edges (r S + i n) / (S stride), r and n whole pixels, lie at
    # least 1 / (S stride) from any other whole cell (1/336 for FCIS), far beyond SNAP.
    whole = jnp.round(edges)
    edges = jnp.where(jnp.abs(edges - whole) < SNAP, whole, edges)
    first = jnp.floor(edges[..., :-1])
    last = jnp.ceil(edges[..., 1:])
    first = jnp.clip(first, 0, size).astype(jnp.int32)
    last = jnp.clip(last, 0, size).astype(jnp.int32)
    return first, last


def ps_roi_pool(score_maps, boxes, group_size: int, pooled_size: int, spatial_scale: float):
    """float32[B, R, S, S, D] position-sensitive pooling of boxes[B, R, 4] from score_maps.

    Args:
      score_maps: [B, H, W, k * k * D] NHWC, channel (gy k + gx) D + d (module docstring).
      boxes: float32[B, R, 4] xyxy image pixels; box r of image b pools from map b.
      group_size: k, the position groups per side.
      pooled_size: S, the output bins per side (FCIS: 21 from k = 7).
      spatial_scale: map cells per image pixel (1 / stride).
    """
    score_maps, boxes = jnp.asarray(score_maps), jnp.asarray(boxes, jnp.float32)
    if score_maps.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(
            f"ps_roi_pool expects score_maps[B,H,W,k*k*D] and boxes[B,R,4], got "
            f"{score_maps.shape} and {boxes.shape}"
        )
    batch, height, width, channels = score_maps.shape
    k, s = int(group_size), int(pooled_size)
    if channels % (k * k):
        raise ValueError(
            f"ps_roi_pool: {channels} score-map channels are not a multiple of group_size^2 = "
            f"{k * k}"
        )
    depth = channels // (k * k)
    maps = score_maps.astype(jnp.float32).reshape(batch, height, width, k * k, depth)
    integral = jnp.cumsum(jnp.cumsum(maps, axis=1), axis=2)
    integral = jnp.pad(integral, ((0, 0), (1, 0), (1, 0), (0, 0), (0, 0)))  # [B, H+1, W+1, kk, D]
    table = integral.reshape(batch, (height + 1) * (width + 1) * k * k, depth)

    y0, y1 = _bin_edges(boxes[..., 1], boxes[..., 3], s, spatial_scale, height)  # [B, R, S]
    x0, x1 = _bin_edges(boxes[..., 0], boxes[..., 2], s, spatial_scale, width)
    group = jnp.minimum(jnp.arange(s) * k // s, k - 1)  # [S] position group of each bin
    groups = group[:, None] * k + group[None, :]  # [S, S]

    def corner(y, x):  # table rows of the integral image at (y, x) of every bin: [B, R, S, S]
        return (y[..., :, None] * (width + 1) + x[..., None, :]) * (k * k) + groups

    area = ((y1 - y0)[..., :, None] * (x1 - x0)[..., None, :]).astype(jnp.float32)
    inverse = jnp.where(area > 0, 1.0 / jnp.maximum(area, 1.0), 0.0)  # an empty bin is 0
    index = jnp.stack([corner(y1, x1), corner(y0, x1), corner(y1, x0), corner(y0, x0)])
    weight = jnp.stack([inverse, -inverse, -inverse, inverse])  # [4, B, R, S, S]
    # pool_bilinear_samples' layout [4, R, oh, samples, ow, samples], one sample per bin axis.
    index = index[:, :, :, :, None, :, None]
    weight = weight[:, :, :, :, None, :, None]
    return jax.vmap(pool_bilinear_samples, in_axes=(0, 1, 1))(table, index, weight)
