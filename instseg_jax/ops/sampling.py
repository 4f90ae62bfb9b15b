"""Bilinear sampling by gathers: the machinery RoIAlign, point sampling and multi-scale
deformable attention share.

`pool_bilinear_samples` sums weighted rows of a flat feature table (four bilinear neighbours per
sample) with a chunked forward and a scatter-add backward (RoIAlign's bins, deformable
attention's sampling points). `bilinear_corners` gives the four neighbours and weights of points
in normalised [0, 1] coordinates with the convention of torch's
grid_sample(align_corners=False, padding_mode="zeros"): pixel centres at (i + 0.5) / size, a
neighbour outside the map contributes 0. Gradients flow into the point coordinates through the
bilinear weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.ops.topk import top_k

# Boxes are pooled in chunks of about this many gathered bytes: the samples of one chunk stay in
# cache between the gathers and the reduction (and the scatter-add of the backward pass), which
# measured 1.5-2x faster on CPU than one pass over all boxes (experiments/benchmarks/ops.py).
_CHUNK_BYTES = 4 * 1024 * 1024


def _chunks(index, weight, bytes_per_row):
    """Split index/weight [4, S, N] into [num_chunks, 4, S, chunk] (padding has zero weight)."""
    _, samples, num = index.shape
    chunk = int(max(1, min(num, _CHUNK_BYTES // max(bytes_per_row * samples, 1))))
    padded = -(-num // chunk) * chunk
    if padded != num:
        pad = [(0, 0), (0, 0), (0, padded - num)]
        index = jnp.pad(index, pad)
        weight = jnp.pad(weight, pad)

    def split(x):
        return jnp.moveaxis(x.reshape(4, samples, padded // chunk, chunk), 2, 0)

    return split(index), split(weight), padded


def _pool_chunk(flat_features, index, weight, sample_shape):
    """[n, oh, ow, D] bins of one chunk (index, weight [4, S, n]): four gathers that XLA fuses
    with the products and the sum, reduced over the sub-bin samples."""
    samples = None
    for k in range(4):
        term = jnp.take(flat_features, index[k], axis=0, mode="clip") * weight[k][..., None]
        samples = term if samples is None else samples + term  # [S, n, D]
    samples = samples.reshape(sample_shape + samples.shape[1:])  # [oh, sr, ow, sr, n, D]
    return jnp.moveaxis(samples.sum(axis=(1, 3)), 2, 0)


@jax.custom_vjp
def pool_bilinear_samples(flat_features, index, weight):
    """Bins [N, oh, ow, D] = sum over samples and neighbours of weight * flat_features[index].

    index int32[4, N, oh, sr, ow, sr] and weight [4, N, oh, sr, ow, sr] are the four bilinear
    neighbours (corner axis first) of every sample of N groups (RoIAlign: boxes, whose weights
    hold the 1/sr^2 of the bin mean; deformable attention: heads x queries, oh = ow = 1).
    Forward: four gathers per chunk of boxes. Backward: a scatter-add of every neighbour row,
    chunk by chunk into one gradient buffer.

    Inside, the residuals and chunks are [4, S, N]: corners first, then the S = oh x sr x ow x sr
    samples of a group, the groups last. TPUs tile an array's two minor axes in 8 x 128 blocks;
    with (sr, 4) or the 4 corners at the minor end the index and weight arrays were padded up to
    64x there, and the adaptive RoIAlign's slots multiplied that (one COCO box pooler's backward:
    1.83 GiB of v5e temporaries, 0.08 GiB in this order; RESULTS.md, "Bilinear gathers on TPU").
    """
    return _pool_samples_fwd(flat_features, index, weight)[0]


def _flat_samples(index, weight):
    """index, weight [4, N, oh, sr, ow, sr] -> [4, S, N] and the sample shape (oh, sr, ow, sr)."""
    if index.ndim != 6 or index.shape[0] != 4 or weight.shape != index.shape:
        raise ValueError(
            "pool_bilinear_samples: index and weight must both be [4, N, oh, sr, ow, sr], got "
            f"{index.shape} and {weight.shape}"
        )

    def flat(x):
        return jnp.moveaxis(x.reshape(x.shape[:2] + (-1,)), 1, 2)

    return flat(index), flat(weight), index.shape[2:]


def _pool_samples_fwd(flat_features, index, weight):
    index, weight, sample_shape = _flat_samples(index, weight)
    num = index.shape[2]
    row_bytes = flat_features.shape[-1] * flat_features.dtype.itemsize
    index_c, weight_c, _ = _chunks(index, weight, row_bytes)
    pooled = jax.lax.map(
        lambda c: _pool_chunk(flat_features, *c, sample_shape), (index_c, weight_c)
    )
    pooled = pooled.reshape((-1,) + pooled.shape[2:])[:num]
    return pooled, (flat_features, index, weight, sample_shape)


def _pool_samples_bwd(residuals, cotangent):
    flat_features, index, weight, sample_shape = residuals
    depth = flat_features.shape[-1]
    num = index.shape[2]
    row_bytes = depth * flat_features.dtype.itemsize
    index_c, weight_c, padded = _chunks(index, weight, row_bytes)
    if padded != num:
        cotangent = jnp.pad(cotangent, [(0, padded - num)] + [(0, 0)] * 3)
    chunk = index_c.shape[3]
    cotangent_c = cotangent.reshape((index_c.shape[0], chunk) + cotangent.shape[1:])
    grid = (4,) + sample_shape + (chunk,)

    def spread(g):  # [n, oh, ow, D] -> [1, oh, 1, ow, 1, n, D]
        g = jnp.moveaxis(g, 0, 2)  # [oh, ow, n, D]
        return g[None, :, None, :, None, :, :]

    def scatter_chunk(i, grad):
        updates = spread(cotangent_c[i]) * weight_c[i].reshape(grid)[..., None]
        return grad.at[index_c[i].reshape(-1)].add(
            updates.reshape(-1, depth), mode="promise_in_bounds"
        )

    grad_features = jax.lax.fori_loop(
        0, index_c.shape[0], scatter_chunk, jnp.zeros_like(flat_features)
    )

    def weight_chunk(c):
        idx, g = c
        values = jnp.take(flat_features, idx, axis=0, mode="clip").reshape(grid + (depth,))
        return (values * spread(g)).sum(axis=-1).reshape(idx.shape)

    # The weights depend on the box coordinates: their cotangent carries the box gradient
    # (a separate pass, which XLA drops when nothing asks for box gradients).
    grad_weight = jax.lax.map(weight_chunk, (index_c, cotangent_c))  # [chunks, 4, S, n]
    grad_weight = jnp.moveaxis(grad_weight, 0, 2).reshape(4, grad_weight.shape[2], padded)[
        ..., :num
    ]
    grad_weight = jnp.moveaxis(grad_weight, 2, 1)  # [4, N, S]
    return grad_features, None, grad_weight.reshape((4, num) + sample_shape)


pool_bilinear_samples.defvjp(_pool_samples_fwd, _pool_samples_bwd)


def bilinear_corners(points: jnp.ndarray, height, width) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Neighbours of points[..., 2] ((x, y) in [0, 1] of a height x width map).

    Returns (index int32[4, ...] flat row-major cells, clamped into the map; weight [4, ...],
    zero for neighbours outside the map), the corner axis first (see pool_bilinear_samples).
    """
    dtype = points.dtype
    x = points[..., 0] * jnp.asarray(width, dtype) - 0.5
    y = points[..., 1] * jnp.asarray(height, dtype) - 0.5
    return pixel_corners(x, y, height, width)


def pixel_corners(x: jnp.ndarray, y: jnp.ndarray, height, width):
    """bilinear_corners of points given in pixel units: x[...], y[...] with cell (i, j)'s centre
    at (x, y) = (j, i) (deformable convolution's sampling positions). The same (index, weight)
    layout and zero weight for neighbours outside the map."""
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)
    height = jnp.asarray(height, jnp.int32)
    width = jnp.asarray(width, jnp.int32)
    index, weight = [], []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            index.append(jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1))
            weight.append(jnp.where(inside, wy * wx, 0.0))
    return jnp.stack(index), jnp.stack(weight)


def point_sample(maps: jnp.ndarray, points: jnp.ndarray) -> jnp.ndarray:
    """Bilinear values float[N, P] of maps[N, H, W] at points[N, P, 2] ((x, y) in [0, 1]).

    torch's point_sample / grid_sample(align_corners=False) with zero padding; maps may be bool
    (ground-truth masks: sampled as 0/1 floats).
    """
    maps = jnp.asarray(maps)
    if maps.dtype == bool:
        maps = maps.astype(points.dtype)
    num, height, width = maps.shape
    index, weight = bilinear_corners(points, height, width)  # [4, N, P]
    # Each map gathers from itself (the map axis stays a batch axis of the gather, so maps of
    # images on different chips never meet), corner axis first: TPUs tile an array's two minor
    # axes in 8 x 128 blocks, and index arrays ending in the 4 corners, or in the (map, cell)
    # pairs take_along_axis builds, were padded 32-40x there (Mask2Former's COCO loss layer:
    # 1.28 GiB of v5e temporaries before, RESULTS.md "Bilinear gathers on TPU").
    gather = jax.vmap(lambda one_map, cells: one_map[cells], in_axes=(0, 1), out_axes=1)
    values = gather(maps.reshape(num, height * width), index)  # [4, N, P]
    return (values * weight).sum(0)


def uncertain_points(
    key: jax.Array,
    logits: jnp.ndarray,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    draws: tuple[jnp.ndarray, jnp.ndarray] | None = None,
) -> jnp.ndarray:
    """points float[N, num_points, 2] in [0, 1] where the masks logits[N, H, W] are least sure.

    PointRend's training rule (Mask2Former's loss points): draw num_points x oversample_ratio
    uniform points, keep the int(importance_sample_ratio x num_points) of them with the largest
    uncertainty -|logit| (bilinear logit at the point), and fill up with fresh uniform points.
    Point positions carry no gradient. draws: the two uniform draws (candidates
    [N, num_points x oversample_ratio, 2], fill [N, num_points - kept, 2]) given instead of drawn
    from `key` (None then): the loss parity feeds a reference implementation the same ones.
    """
    logits = jax.lax.stop_gradient(logits)
    num = logits.shape[0]
    num_drawn = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    if draws is None:
        draw_key, fill_key = jax.random.split(key)
        drawn = jax.random.uniform(draw_key, (num, num_drawn, 2), logits.dtype)
        fill = jax.random.uniform(fill_key, (num, num_points - num_uncertain, 2), logits.dtype)
    else:
        drawn, fill = draws
        if drawn.shape != (num, num_drawn, 2) or fill.shape != (num, num_points - num_uncertain, 2):
            raise ValueError(
                f"draws must be shaped {(num, num_drawn, 2)} and "
                f"{(num, num_points - num_uncertain, 2)}, got {drawn.shape} and {fill.shape}"
            )
    uncertainty = -jnp.abs(point_sample(logits, drawn))
    _, most = top_k(uncertainty, num_uncertain)
    chosen = jnp.take_along_axis(drawn, most[..., None], axis=1)
    return jnp.concatenate([chosen, fill.astype(chosen.dtype)], axis=1)


def point_features(features: jnp.ndarray, points: jnp.ndarray) -> jnp.ndarray:
    """Bilinear feature vectors [B, N, P, D] of features[B, H, W, D] at points[B, N, P, 2]
    ((x, y) in [0, 1] of the map, grid_sample's convention and zero padding): PointRend's
    fine-grained features. Point n of image b reads map b; the gathers and their scatter-add
    backward are `pool_bilinear_samples`', vmapped over the images so that each reads only its
    own map (a batch split over devices exchanges nothing)."""
    _, height, width, depth = features.shape
    _, num, per, _ = points.shape

    def one_image(image_features, image_points):
        index, weight = bilinear_corners(image_points, height, width)  # [4, N, P]
        shape = (4, num, per, 1, 1, 1)
        pooled = pool_bilinear_samples(
            image_features.reshape(height * width, depth),
            index.reshape(shape),
            weight.astype(features.dtype).reshape(shape),
        )
        return pooled.reshape(num, per, depth)

    return jax.vmap(one_image)(features, points)


def upsample2x(maps: jnp.ndarray) -> jnp.ndarray:
    """maps[N, H, W] -> [N, 2H, 2W], bilinear with half-pixel centres and edge clamping
    (torch's interpolate(scale_factor=2, mode="bilinear", align_corners=False)): every output
    cell is 3/4 of its source cell and 1/4 of the neighbour on its side."""

    def along(x, axis):
        size = x.shape[axis]
        before = jnp.take(x, jnp.maximum(jnp.arange(size) - 1, 0), axis=axis)
        after = jnp.take(x, jnp.minimum(jnp.arange(size) + 1, size - 1), axis=axis)
        even = 0.75 * x + 0.25 * before
        odd = 0.75 * x + 0.25 * after
        stacked = jnp.stack([even, odd], axis=axis + 1)
        shape = x.shape[:axis] + (2 * size,) + x.shape[axis + 1 :]
        return stacked.reshape(shape)

    return along(along(maps, 1), 2)


def uncertain_cells(uncertainty: jnp.ndarray, num_points: int):
    """The num_points cells of the largest uncertainty[N, H, W] of each map: (flat cell index
    int32[N, k], their centres float[N, k, 2] as (x, y) in [0, 1]); k = min(num_points, H x W).
    PointRend's inference rule (get_uncertain_point_coords_on_grid)."""
    num, height, width = uncertainty.shape
    k = min(num_points, height * width)
    _, index = top_k(uncertainty.reshape(num, height * width), k)
    x = (index % width).astype(uncertainty.dtype) + 0.5
    y = (index // width).astype(uncertainty.dtype) + 0.5
    return index, jnp.stack([x / width, y / height], axis=-1)


def deformable_attention(
    value: jnp.ndarray,
    level_shapes: Sequence[tuple[int, int]],
    locations: jnp.ndarray,
    attention: jnp.ndarray,
) -> jnp.ndarray:
    """Multi-scale deformable attention's sampling (Zhu et al. 2021, MSDeformAttn's core).

    value [B, S, M, D]: M heads of D channels over the S = sum(H_l x W_l) cells of the levels
    (row-major, level after level, as `level_shapes` lists them); locations [B, Q, M, L, K, 2]:
    (x, y) in [0, 1] of K points per level, head and query; attention [B, Q, M, L, K]: their
    weights. Returns [B, Q, M, D] = sum over levels and points of weight x bilinear value
    (grid_sample's zero padding outside a map), as static gathers.
    """
    _, cells, heads, depth = value.shape
    _, queries, _, levels, points, _ = locations.shape
    if len(level_shapes) != levels or sum(h * w for h, w in level_shapes) != cells:
        raise ValueError(
            f"deformable_attention: level_shapes {list(level_shapes)} do not tile the {cells} "
            f"cells of value over {levels} levels"
        )
    heights = jnp.asarray([h for h, _ in level_shapes], jnp.int32)[:, None]
    widths = jnp.asarray([w for _, w in level_shapes], jnp.int32)[:, None]
    starts = np.cumsum([0] + [h * w for h, w in level_shapes[:-1]])
    # Head-major throughout: rows of an image's flat table are (head, cell), and the sampling
    # arrays are [B, M, Q, ...]. With the 8 heads next to the minor axes instead, TPU's 8 x 128
    # tiling pads them 16x: one COCO encoder layer's backward took 1.22 GiB of temporaries on
    # v5e against 0.49 GiB in this order (RESULTS.md "Bilinear gathers on TPU").
    locations = jnp.moveaxis(locations, 2, 1)  # [B, M, Q, L, K, 2]
    attention = jnp.moveaxis(attention, 2, 1)
    index, weight = bilinear_corners(locations, heights, widths)  # [4, B, M, Q, L, K]
    index = index + jnp.asarray(starts, jnp.int32)[:, None]
    weight = weight * attention
    # One gather serves all heads of an image. The tables are per image and vmapped over the
    # batch, so that a batch split over devices samples on each device from its own images'
    # values only.
    head = (jnp.arange(heads, dtype=jnp.int32) * cells)[:, None, None, None]
    shape = (4, heads * queries, 1, levels * points, 1, 1)

    def one_image(image_value, image_index, image_weight):
        pooled = pool_bilinear_samples(
            jnp.moveaxis(image_value, 1, 0).reshape(heads * cells, depth),
            (image_index + head).reshape(shape),
            image_weight.astype(value.dtype).reshape(shape),
        )
        return jnp.moveaxis(pooled.reshape(heads, queries, depth), 0, 1)

    return jax.vmap(one_image, in_axes=(0, 1, 1))(value, index, weight)
