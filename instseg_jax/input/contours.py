"""The outer contour of a mask's largest part (host side, NumPy and scipy.ndimage), as PolarMask's
reference traces it: xieenze/PolarMask mmdet/datasets/coco_seg.py get_single_centerpoint runs
cv2.findContours(mask, RETR_TREE, CHAIN_APPROX_NONE) on the mask at the network's input size and
keeps the contour of the largest area; its points are pixels (all of them: no approximation).

For a mask whose parts are 8-connected (OpenCV's border following), the points of a part's outer
border are the part's pixels with a 4-neighbour in the background around it (Suzuki and Abe's
border points; the pixels around a hole trace the hole's border instead, which is never the
largest contour because the part's outer border encloses it). Only the set of points matters to
the rays (each ray takes the farthest point in its angle bin), so no tracing order is built: the
part is chosen by its pixel count (OpenCV: by the area of the contour polygon through the pixel
centres, which differs only between parts of similar size one of which is thin), and the
border is the part's pixels with a 4-neighbour in the 4-connected background region that
reaches the image's edge (labelled once: linear in the pixels).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


def outer_contour_pixels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int64[n] of the outer-border pixels of mask[h, w]'s largest 8-connected
    part (module docstring); empty for an empty mask."""
    mask = np.asarray(mask, bool)
    labels, parts = ndimage.label(mask, structure=_EIGHT)
    if parts == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    part = np.pad(labels == int(np.argmax(sizes)), 1)  # the first of equal sizes
    # The background around the part: the 4-connected background region (the 8-connected
    # part's dual) holding the padding ring; the rest of the background is holes.
    background, _ = ndimage.label(~part, structure=_FOUR)
    outside = background == background[0, 0]
    touching = (
        outside[:-2, 1:-1] | outside[2:, 1:-1] | outside[1:-1, :-2] | outside[1:-1, 2:]
    )  # a 4-neighbour outside
    rows, cols = np.nonzero(part[1:-1, 1:-1] & touching)
    return rows.astype(np.int64), cols.astype(np.int64)


def grid_subsample(points: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` of points float[n, 2]: the first point of each cell of the coarsest
    needed square grid (cell side 2, 3, ... px), so that thin parts keep points at the cell
    spacing, where a stride through a list would skip them; points unchanged if n <= limit."""
    if len(points) <= limit:
        return points
    # A contour crosses about n / side cells of side `side`: start there.
    side = max(2, len(points) // limit)
    while True:
        cells = np.floor(points / side).astype(np.int64)
        keys = cells[:, 0] * (int(cells[:, 1].max()) + 1) + cells[:, 1]
        _, first = np.unique(keys, return_index=True)
        if len(first) <= limit:
            return points[np.sort(first)]
        side += 1
