"""InstanceFCN's assembling module and training samples as plain float64 NumPy loops, written
from the paper's text (Dai et al., "Instance-sensitive Fully Convolutional Networks", ECCV 2016,
arXiv 1603.08678, sections 3 and 4) and the DeepMask definition of positive and negative windows
it takes (Pinheiro et al., "Learning to Segment Object Candidates", NeurIPS 2015, section 3.1):
the independent side of tests/methods/test_instancefcn.py. One window, one cell, one object at a
time; no shared code with instseg_jax/methods/instancefcn.py."""

from __future__ import annotations

import numpy as np


def sub_window(a: int, m: int, k: int) -> int:
    """The grid row (or column) i of cell a of an m-cell window: the k x k grid splits the window
    into sub-windows [i m / k, (i + 1) m / k) (section 3, "Instance assembling module")."""
    for i in range(k):
        if i * m / k <= a < (i + 1) * m / k:
            return i
    raise AssertionError("every cell lies in a sub-window")


def assemble(maps: np.ndarray, row: int, col: int, m: int, k: int) -> np.ndarray:
    """float64[m, m]: the window of m x m cells centred on cell (row, col) of score maps
    maps[H, W, k^2]; cell (a, b) in sub-window (i, j) copies map i k + j at the same cell (the
    paper: "for each pixel ... we copy the score value from the corresponding score map at its
    relative position"); 0 where the cell lies beyond the maps."""
    h, w, _ = maps.shape
    r = (m - 1) // 2
    out = np.zeros((m, m), np.float64)
    for a in range(m):
        for b in range(m):
            y, x = row - r + a, col - r + b
            if 0 <= y < h and 0 <= x < w:
                out[a, b] = maps[y, x, sub_window(a, m, k) * k + sub_window(b, m, k)]
    return out


def window_label(centre_xy, side: float, boxes, valid) -> tuple[int, int]:
    """(label, matched instance) of one window of `side` canvas pixels centred at centre_xy, by
    DeepMask's rules on a 224-pixel patch with a canonical object of 128 px, scaled to the
    window: positive for an object whose box centre is within +-16 px of the patch centre along
    each axis and whose larger side is 128 px within a factor 2^(1/4); negative when every
    object is at least 32 px away along some axis or off by a factor 2 or more in scale; else
    neither (-1). A window positive for several objects takes the nearest centre (the first on
    ties)."""
    unit = side / 224.0
    canonical = 128.0 * unit
    best, best_distance, near = -1, np.inf, False
    for n, box in enumerate(boxes):
        if not valid[n]:
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        dx = abs((x0 + x1) / 2 - centre_xy[0])
        dy = abs((y0 + y1) / 2 - centre_xy[1])
        ratio = max(x1 - x0, y1 - y0) / canonical
        centred = dx <= 16 * unit and dy <= 16 * unit
        in_scale = 2.0**-0.25 <= ratio <= 2.0**0.25
        if centred and in_scale:
            distance = dx * dx + dy * dy
            if distance < best_distance:
                best, best_distance = n, distance
        far = max(dx, dy) >= 32 * unit or ratio <= 0.5 or ratio >= 2.0
        near = near or not far
    if best >= 0:
        return 1, best
    return (-1 if near else 0), 0


def window_mask_target(mask: np.ndarray, mask_stride: int, row, col, m, stride) -> np.ndarray:
    """float64[m, m] ground truth of the m x m window centred on cell (row, col) of a level of
    `stride`: a cell is foreground when at least half of the full mask's stride-mask_stride
    cells inside it are (DeepMask's 0.5 threshold); 0 beyond the canvas."""
    r = (m - 1) // 2
    f = stride // mask_stride
    out = np.zeros((m, m), np.float64)
    for a in range(m):
        for b in range(m):
            y, x = (row - r + a) * f, (col - r + b) * f
            if 0 <= y and y + f <= mask.shape[0] and 0 <= x and x + f <= mask.shape[1]:
                out[a, b] = float(mask[y : y + f, x : x + f].astype(np.float64).mean() >= 0.5)
    return out
