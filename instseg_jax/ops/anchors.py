"""Anchor grids for RPN and one-stage heads.

Anchors depend only on static shapes, so they are computed once in float64 NumPy at trace time
and enter the graph as float32 constants: identical on every backend and free at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# detectron2's Mask R-CNN FPN defaults: one size per level P2..P6, ratios as h / w.
DEFAULT_STRIDES = (4, 8, 16, 32, 64)
DEFAULT_SIZES = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """float64[A, 4] anchors centred on the origin, size-major then ratio (A = sizes x ratios).

    Each anchor keeps the area size**2 with h / w = ratio.
    """
    anchors = []
    for size in sizes:
        for ratio in aspect_ratios:
            if size <= 0 or ratio <= 0:
                raise ValueError(f"anchor size and aspect ratio must be > 0, got {size}, {ratio}")
            width = math.sqrt(size * size / ratio)
            height = ratio * width
            anchors.append([-width / 2, -height / 2, width / 2, height / 2])
    return np.asarray(anchors, dtype=np.float64)


def _place_cells(cells, feature_hw, stride_yx, offset: float = 0.0) -> np.ndarray:
    """float64[h*w*A, 4]: cell anchors [A, 4] centred on every location of an h x w grid."""
    height, width = (int(v) for v in feature_hw)
    xs = (np.arange(width, dtype=np.float64) + offset) * stride_yx[1]
    ys = (np.arange(height, dtype=np.float64) + offset) * stride_yx[0]
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")  # [h, w], row-major locations
    shifts = np.stack([grid_x, grid_y, grid_x, grid_y], axis=-1).reshape(-1, 1, 4)
    return (shifts + np.asarray(cells, np.float64)[None]).reshape(-1, 4)  # [h*w*A, 4]


def _grid_anchors_np(feature_hw, stride, sizes, aspect_ratios, offset) -> np.ndarray:
    return _place_cells(cell_anchors(sizes, aspect_ratios), feature_hw, (stride, stride), offset)


def grid_anchors(
    feature_hw: Sequence[int],
    stride: float,
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    offset: float = 0.0,
) -> jnp.ndarray:
    """float32[h*w*A, 4] xyxy anchors of one feature map of static size feature_hw = (h, w).

    Location (y, x) is centred at ((x + offset) * stride, (y + offset) * stride). Locations are
    row-major and all A anchors of a location are consecutive, so row ``(y*w + x)*A + a`` is
    anchor ``a`` (size-major, then ratio) at (y, x): the layout of a conv head's
    [h, w, A] output flattened.
    """
    return jnp.asarray(
        _grid_anchors_np(feature_hw, stride, sizes, aspect_ratios, offset), dtype=jnp.float32
    )


def level_shapes(canvas_hw: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """Feature map sizes of a canvas at each stride: ceil(H / s), ceil(W / s) (padded convs)."""
    return [(-(-int(canvas_hw[0]) // s), -(-int(canvas_hw[1]) // s)) for s in strides]


def multilevel_anchors(
    canvas_hw: Sequence[int],
    strides: Sequence[int] = DEFAULT_STRIDES,
    sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    offset: float = 0.0,
) -> list[jnp.ndarray]:
    """Anchors of every pyramid level (default P2..P6) of a canvas: list of float32[h_l*w_l*A, 4].

    ``sizes[l]`` are the sizes of level l. Concatenate the list for a flat [sum_l h_l*w_l*A, 4]
    that matches heads whose per-level outputs are flattened and concatenated in the same order.
    """
    if len(sizes) != len(strides):
        raise ValueError(f"need one size tuple per stride, got {len(sizes)} for {len(strides)}")
    shapes = level_shapes(canvas_hw, strides)
    return [
        grid_anchors(shape, stride, level_sizes, aspect_ratios, offset)
        for shape, stride, level_sizes in zip(shapes, strides, sizes, strict=True)
    ]


def torchvision_anchors(
    canvas_hw: Sequence[int],
    sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
) -> list[jnp.ndarray]:
    """Anchors of P2..P6 as torchvision's AnchorGenerator makes them for a padded image of
    canvas_hw: float32 cell anchors ratio-major then size, rounded half-to-even to integers;
    each level's stride is canvas // grid per axis (so P6 of an 800-row canvas, 13 rows, has
    stride 61 along y), and location (y, x) sits at (x * stride_x, y * stride_y).

    Returns one float32[h_l*w_l*A, 4] per level, rows (y, x, a) as in `grid_anchors`.
    """
    ratios = np.asarray(aspect_ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1.0) / h_ratios
    shapes = level_shapes(canvas_hw, DEFAULT_STRIDES)
    if len(sizes) != len(shapes):
        raise ValueError(f"need one size tuple per level P2..P6, got {len(sizes)}")
    levels = []
    for (h, w), level_sizes in zip(shapes, sizes, strict=True):
        scales = np.asarray(level_sizes, np.float32)
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        cells = np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))  # [A, 4]
        # Integer cells and shifts: the float64 sum is exact, so float32 gets torch's values.
        strides = (int(canvas_hw[0]) // h, int(canvas_hw[1]) // w)
        levels.append(jnp.asarray(_place_cells(cells, (h, w), strides), dtype=jnp.float32))
    return levels
