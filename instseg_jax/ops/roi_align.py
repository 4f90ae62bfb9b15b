"""RoIAlign with static shapes: by gathers (default) or by one-hot weight matrices (einsum).

Semantics are those of detectron2's ROIAlign / torchvision's roi_align with a fixed
``sampling_ratio``:

- a box (x0, y0, x1, y1) in image pixels is scaled by ``spatial_scale``; ``aligned=True`` then
  shifts it by -0.5 so that pixel centres sit at integer feature coordinates (the half-pixel
  correction); ``aligned=False`` is the legacy form that forces every box to at least 1x1;
- each of the ``oh x ow`` bins is the mean of ``sampling_ratio**2`` bilinear samples placed at
  the centres of a regular sub-grid of the bin;
- ``sampling_ratio=0`` is the kernels' adaptive rule (detectron2's POOLER_SAMPLING_RATIO 0):
  ceil(roi_height / oh) x ceil(roi_width / ow) samples per bin for each box, its sides measured in
  cells of the map it pools from, the mean over that count (a side of zero or less takes no
  sample: the bin is 0). Shapes stay static: every box gets ``sampling_ratio_max`` sample slots
  per bin axis and the slots beyond its own count carry zero weight. A box needing more than
  ``sampling_ratio_max`` along an axis takes exactly ``sampling_ratio_max`` there, spread over
  the whole bin (what a fixed sampling_ratio of that value gives), where the kernels take more;
- a sample outside [-1, size] along either axis contributes 0; otherwise it is clamped into
  the map (below 0 to 0, at or beyond size - 1 to size - 1) and interpolated.

Bilinear weights factor into a y part and an x part, and so does the zero rule, so both forms
build per-axis (index, weight) pairs and never loop over boxes in Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from instseg_jax.ops.boxes import box_area
from instseg_jax.ops.sampling import pool_bilinear_samples

# Exact float32 products on every backend (TPUs default to bfloat16 passes in matmuls).
_EXACT = jax.lax.Precision.HIGHEST


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    oh, ow = size
    return int(oh), int(ow)


def _axis_samples(start, length, bins: int, sampling_ratio: int, size, sampling_ratio_max=0):
    """Sample positions of one axis for boxes start[...], length[...] on a map of ``size`` cells.

    Every sample reads two neighbouring cells ``first`` and ``first + 1`` (size must be >= 2).
    Returns first int32[..., bins, slots] and the weights (w_first, w_second)
    float32[..., bins, slots] of the two cells: bilinear weights, already zero for samples
    outside [-1, size] and divided by the box's sample count along this axis (the mean over
    this axis). slots is sampling_ratio, or sampling_ratio_max for the adaptive rule
    (sampling_ratio 0), whose slots beyond a box's count get zero weight.
    """
    dtype = length.dtype
    bin_size = length / bins
    if sampling_ratio > 0:
        # Sample s of bin b sits at (b + (s + 0.5) / sampling_ratio) bin widths from the start.
        steps = (
            jnp.arange(bins, dtype=dtype)[:, None]
            + (jnp.arange(sampling_ratio, dtype=dtype)[None, :] + 0.5) / sampling_ratio
        )  # [bins, sr]
        coords = start[..., None, None] + steps * bin_size[..., None, None]  # [..., bins, sr]
        used = 1.0
        count = float(sampling_ratio)
    else:
        # The adaptive count: ceil(length / bins) samples, none for an empty or inverted side,
        # at most the slots there are.
        count = jnp.clip(jnp.ceil(bin_size), 0.0, float(sampling_ratio_max))[..., None, None]
        slot = jnp.arange(sampling_ratio_max, dtype=dtype)  # [slots]
        steps = jnp.arange(bins, dtype=dtype)[:, None] + (slot + 0.5) / jnp.maximum(count, 1.0)
        coords = start[..., None, None] + steps * bin_size[..., None, None]  # [..., bins, slots]
        used = (slot < count).astype(dtype)
        count = jnp.maximum(count, 1.0)
    size_f = jnp.asarray(size, dtype)[..., None, None]
    size_i = jnp.asarray(size, jnp.int32)[..., None, None]
    inside = (coords >= -1.0) & (coords <= size_f)
    coords = jnp.maximum(coords, 0.0)
    low = jnp.floor(coords).astype(jnp.int32)
    scale = inside.astype(dtype) * used / count
    # At or beyond the last cell the sample is clamped onto it: read the pair (last-1, last)
    # with all the weight on the second cell, so that every read stays inside the map (a
    # 1-cell axis reads (0, 1) with the weight on cell 0; the caller pads that map).
    last = size_i - 1
    at_last = low >= last
    first = jnp.where(at_last, jnp.maximum(last - 1, 0), low)
    on_second = at_last & (last > first)
    frac = coords - low.astype(dtype)
    w_first = jnp.where(at_last, jnp.where(on_second, 0.0, scale), (1.0 - frac) * scale)
    w_second = jnp.where(at_last, jnp.where(on_second, scale, 0.0), frac * scale)
    return first, w_first, w_second


def _sample_grids(
    boxes, spatial_scale, output_size, sampling_ratio, aligned, heights, widths, sampling_ratio_max
):
    """Per-axis samples of boxes[..., 4] (image pixels) on maps of heights/widths [...]."""
    if not isinstance(sampling_ratio, int) or sampling_ratio < 0:
        raise ValueError(
            "sampling_ratio must be a positive int (samples per bin axis) or 0 (adaptive), got "
            f"{sampling_ratio!r}"
        )
    if sampling_ratio == 0 and (not isinstance(sampling_ratio_max, int) or sampling_ratio_max < 1):
        raise ValueError(
            "sampling_ratio 0 (adaptive) needs sampling_ratio_max, a positive int of sample "
            f"slots per bin axis (static shapes), got {sampling_ratio_max!r}"
        )
    oh, ow = _pair(output_size)
    offset = 0.5 if aligned else 0.0
    scaled = boxes * jnp.asarray(spatial_scale, boxes.dtype)[..., None] - offset
    x0, y0, x1, y1 = (scaled[..., i] for i in range(4))
    box_w = x1 - x0
    box_h = y1 - y0
    if not aligned:
        box_w = jnp.maximum(box_w, 1.0)
        box_h = jnp.maximum(box_h, 1.0)
    ys = _axis_samples(y0, box_h, oh, sampling_ratio, heights, sampling_ratio_max)
    xs = _axis_samples(x0, box_w, ow, sampling_ratio, widths, sampling_ratio_max)
    return ys, xs


def _at_least_two_cells(features):
    """Zero-pad a map with a single row or column so that every pair read stays inside it.

    The padding only ever gets zero weight, so results are unchanged.
    """
    pad_h = max(0, 2 - features.shape[1])
    pad_w = max(0, 2 - features.shape[2])
    if pad_h or pad_w:
        features = jnp.pad(features, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return features


def _gather_pool(table, row_base, widths, ys, xs):
    """Bins of one image's boxes from its flat table[T, D] by gathers.

    row_base int32[R] is the table row of each box's map origin, widths int32[R] its map row
    length; ys / xs come from `_axis_samples` with shapes [R, oh, sr] / [R, ow, sr].
    Returns [R, oh, ow, D].
    """
    y_first, wy_first, wy_second = ys
    x_first, wx_first, wx_second = xs
    grid = (slice(None), slice(None), slice(None), None, None)  # [R, oh, sr, 1, 1]
    cols = (slice(None), None, None, slice(None), slice(None))  # [R, 1, 1, ow, sr]
    row_start = row_base[:, None, None] + y_first * widths[:, None, None]  # [R, oh, sr]
    top_left = row_start[grid] + x_first[cols]  # [R, oh, sr, ow, sr]
    below = widths[:, None, None, None, None]
    index = jnp.stack([top_left, top_left + 1, top_left + below, top_left + below + 1])
    weight = jnp.stack(
        [
            wy_first[grid] * wx_first[cols],
            wy_first[grid] * wx_second[cols],
            wy_second[grid] * wx_first[cols],
            wy_second[grid] * wx_second[cols],
        ]
    ).astype(table.dtype)  # [4, R, oh, sr, ow, sr]
    return pool_bilinear_samples(table, index, weight)


def _gather_from_levels(features_by_level, level_index, ys, xs):
    """Gather-form bins of boxes whose samples ys / xs lie on map level_index int32[B, R].

    Each image gets its own flat table [T, D] of its levels (each map padded to >= 2 cells per
    axis), so a box is pooled once from its own level: no box is computed on a level it does
    not belong to. The tables are per image, and the pooling is vmapped over the batch, so
    that a batch split over devices pools on each device from its own images only (a table
    mixing images would make the SPMD partitioner exchange features between devices).
    """
    padded = [_at_least_two_cells(f) for f in features_by_level]
    batch, depth = padded[0].shape[0], padded[0].shape[-1]
    tables = jnp.concatenate([f.reshape(batch, -1, depth) for f in padded], axis=1)
    cells = [f.shape[1] * f.shape[2] for f in padded]  # cells of one image's map per level
    level_start = [0]
    for level_cells in cells[:-1]:
        level_start.append(level_start[-1] + level_cells)
    row_base = jnp.asarray(level_start, jnp.int32)[level_index]  # [B, R]
    row_length = jnp.asarray([f.shape[2] for f in padded], jnp.int32)[level_index]
    return jax.vmap(_gather_pool)(tables, row_base, row_length, ys, xs)


def _one_hot_weights(first, w_first, w_second, size: int):
    """float[..., bins, size]: row i holds the averaged bilinear weights of bin i on each cell."""
    hot = (
        jax.nn.one_hot(first, size, dtype=w_first.dtype) * w_first[..., None]
        + jax.nn.one_hot(first + 1, size, dtype=w_first.dtype) * w_second[..., None]
    )  # [..., bins, sr, size]
    return hot.sum(axis=-2)


def _einsum_pool(features, ys, xs, chunk_size: int):
    """Bins of features[B, H, W, D] as Wy @ F @ Wx^T with one-hot weight matrices.

    The box axis is processed in chunks so that the [chunk, oh, W, D] intermediate stays small.
    """
    _, height, width, _ = features.shape
    wy = _one_hot_weights(*ys, height)  # [B, R, oh, H]
    wx = _one_hot_weights(*xs, width)  # [B, R, ow, W]
    num_boxes = wy.shape[1]
    chunk = max(1, min(chunk_size, num_boxes))
    padded = -(-num_boxes // chunk) * chunk
    if padded != num_boxes:
        pad = ((0, 0), (0, padded - num_boxes), (0, 0), (0, 0))
        wy = jnp.pad(wy, pad)
        wx = jnp.pad(wx, pad)

    def split(x):  # [B, R', ...] -> [R'/chunk, B, chunk, ...]
        x = x.reshape((x.shape[0], padded // chunk, chunk) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def pool_chunk(weights):
        wy_c, wx_c = weights
        rows = jnp.einsum("brih,bhwd->briwd", wy_c, features.astype(wy_c.dtype), precision=_EXACT)
        return jnp.einsum(
            "briwd,brjw->brijd", rows, wx_c, precision=_EXACT
        )  # [B, chunk, oh, ow, D]

    pooled = jax.lax.map(pool_chunk, (split(wy), split(wx)))  # [R'/chunk, B, chunk, oh, ow, D]
    pooled = jnp.moveaxis(pooled, 0, 1).reshape((features.shape[0], padded) + pooled.shape[3:])
    return pooled[:, :num_boxes].astype(features.dtype)


def roi_align(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    output_size,
    spatial_scale: float,
    sampling_ratio: int = 2,
    aligned: bool = True,
    method: str = "gather",
    chunk_size: int = 64,
    sampling_ratio_max: int = 0,
) -> jnp.ndarray:
    """Pool float32[B, R, oh, ow, D] bins from features[B, H, W, D] inside boxes[B, R, 4].

    Args:
      features: float32[B, H, W, D] one feature map, NHWC.
      boxes: float32[B, R, 4] xyxy in image pixels; box r of image b pools from map b.
      output_size: int or (oh, ow).
      spatial_scale: feature cells per image pixel (1 / stride).
      sampling_ratio: samples per bin along each axis, a positive int; 0 is the adaptive rule,
        ceil(box side in map cells / bins) per axis and box (see the module docstring).
      aligned: True for the half-pixel-corrected form, False for the legacy one.
      method: "gather" (default; gathers with separable weights) or "einsum" (one-hot weight
        matrices contracted with the map: the same numbers, the TPU-friendly form).
      chunk_size: boxes per step of the einsum form (bounds its memory), unused by "gather".
      sampling_ratio_max: the adaptive rule's sample slots per bin axis (sampling_ratio 0 only):
        the cost is that of sampling_ratio = sampling_ratio_max; boxes needing more take this
        many.
    """
    features, boxes = jnp.asarray(features), jnp.asarray(boxes)
    if features.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(
            f"roi_align expects features[B,H,W,D] and boxes[B,R,4], got {features.shape} and "
            f"{boxes.shape}"
        )
    if features.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"batch of features {features.shape[0]} != batch of boxes {boxes.shape[0]}"
        )
    batch, height, width, _ = features.shape
    num_boxes = boxes.shape[1]
    ys, xs = _sample_grids(
        boxes,
        spatial_scale,
        output_size,
        sampling_ratio,
        aligned,
        height,
        width,
        sampling_ratio_max,
    )
    if method == "gather":
        level_index = jnp.zeros((batch, num_boxes), jnp.int32)
        return _gather_from_levels([features], level_index, ys, xs)
    if method == "einsum":
        return _einsum_pool(features, ys, xs, chunk_size)
    raise ValueError(f"roi_align method must be 'gather' or 'einsum', got {method!r}")


def fpn_level(
    boxes: jnp.ndarray,
    min_level: int = 2,
    max_level: int = 5,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
    rule: str = "detectron2",
) -> jnp.ndarray:
    """int32[...] pyramid level of boxes[..., 4]: floor(k0 + log2(sqrt(area) / s0 + 1e-8)).

    The FPN paper's rule (eq. 1) as detectron2 writes it, clamped to [min_level, max_level];
    empty boxes go to min_level. rule="torchvision" is its MultiScaleRoIAlign's variant,
    floor(k0 + log2(sqrt(area) / s0) + 1e-6): the eps after the log2, which moves boxes just
    below a level's lower edge up to that level.
    """
    sizes = jnp.sqrt(box_area(boxes))
    if rule == "torchvision":
        levels = jnp.floor(canonical_level + jnp.log2(sizes / canonical_size) + 1e-6)
    elif rule == "detectron2":
        levels = jnp.floor(canonical_level + jnp.log2(sizes / canonical_size + 1e-8))
    else:
        raise ValueError(f"fpn_level rule must be 'detectron2' or 'torchvision', got {rule!r}")
    return jnp.clip(levels, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(
    features_by_level: Sequence[jnp.ndarray],
    boxes: jnp.ndarray,
    output_size,
    min_level: int = 2,
    sampling_ratio: int = 2,
    aligned: bool = True,
    method: str = "gather",
    levels: jnp.ndarray | None = None,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
    chunk_size: int = 64,
    sampling_ratio_max: int = 0,
) -> jnp.ndarray:
    """Pool float32[B, R, oh, ow, D] bins of boxes[B, R, 4], each from its own pyramid level.

    Args:
      features_by_level: maps [B, H_l, W_l, D] of levels min_level, min_level + 1, ...; level l
        has stride 2**l (spatial scale 2**-l).
      boxes: float32[B, R, 4] xyxy image pixels.
      levels: optional int32[B, R] absolute level of each box (e.g. torchvision's mapper);
        default `fpn_level` with the canonical size and level given, clamped to the levels there.
      method: "gather" pools each box once, from one flat table holding every level; "einsum"
        contracts each level with weights zeroed for boxes of other levels and sums.
      sampling_ratio, sampling_ratio_max: as in `roi_align`; the adaptive rule (0) measures a
        box in cells of its own level.
    """
    features_by_level = [jnp.asarray(f) for f in features_by_level]
    boxes = jnp.asarray(boxes)
    num_levels = len(features_by_level)
    max_level = min_level + num_levels - 1
    if levels is None:
        levels = fpn_level(boxes, min_level, max_level, canonical_size, canonical_level)
    level_index = jnp.clip(levels - min_level, 0, num_levels - 1)  # [B, R]
    heights = jnp.asarray([f.shape[1] for f in features_by_level], jnp.int32)[level_index]
    widths = jnp.asarray([f.shape[2] for f in features_by_level], jnp.int32)[level_index]
    scales = jnp.asarray([2.0 ** -(min_level + i) for i in range(num_levels)], boxes.dtype)
    ys, xs = _sample_grids(
        boxes,
        scales[level_index],
        output_size,
        sampling_ratio,
        aligned,
        heights,
        widths,
        sampling_ratio_max,
    )
    if method == "gather":
        return _gather_from_levels(features_by_level, level_index, ys, xs)
    if method == "einsum":
        pooled = None
        for i, level_features in enumerate(features_by_level):
            on_level = (level_index == i)[..., None, None]
            # Boxes of other levels get zero weights (their indices were computed for their own
            # level's size, so they are clamped into this one before the one-hot).
            h, w = level_features.shape[1:3]
            ys_l = (jnp.minimum(ys[0], h - 1), ys[1] * on_level, ys[2] * on_level)
            xs_l = (jnp.minimum(xs[0], w - 1), xs[1] * on_level, xs[2] * on_level)
            part = _einsum_pool(level_features, ys_l, xs_l, chunk_size)
            pooled = part if pooled is None else pooled + part
        return pooled
    raise ValueError(f"multilevel_roi_align method must be 'gather' or 'einsum', got {method!r}")
