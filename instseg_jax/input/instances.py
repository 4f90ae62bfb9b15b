"""The instance masks of one image, each kept only over its own box (host side, NumPy).

An image with 1000 instances at 1024x1024 holds 1 GB of full-resolution boolean masks, but only
the sum of its instances' box areas of mask pixels (a few MB on COCO-like data). Sources decode
one segmentation at a time and keep its crop; the transforms sample targets from the crops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) tight box of a mask[H, W]'s pixels, +1 on the max side as COCO's mask
    boxes; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def tight_crop(mask: np.ndarray, copy: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """(bool[h, w] mask over its tight box, (y0, x0) of that box) of a bool mask[H, W].

    An empty mask gives a 0x0 crop at (0, 0). ``copy=False`` returns a view of ``mask``.
    """
    box = mask_box(mask)
    if box is None:
        return np.zeros((0, 0), bool), (0, 0)
    x0, y0, x1, y1 = box
    crop = mask[y0:y1, x0:x1]
    return (crop.astype(bool, copy=True) if copy else crop), (int(y0), int(x0))


class InstanceMasks:
    """n masks of an H x W image, mask i False outside rows y0..y0+h and columns x0..x0+w.

    Args:
      crops: bool[h_i, w_i] per instance: the mask over its box (a 0x0 crop: an empty mask).
      origins: (y0, x0) of each crop in the image.
      hw: (H, W) of the image.

    Reads like bool[n, H, W] where a caller needs full masks: len(), ``shape``, iteration and
    integer indexing give one full mask at a time; np.asarray gives all of them at once
    (n * H * W bytes).
    """

    dtype = np.dtype(bool)
    ndim = 3

    def __init__(self, crops: Sequence[np.ndarray], origins, hw):
        self.crops = list(crops)
        self.origins = np.asarray(origins, np.int64).reshape(-1, 2)  # [n, 2] (y0, x0)
        self.hw = (int(hw[0]), int(hw[1]))
        if len(self.crops) != len(self.origins):
            raise ValueError(f"{len(self.crops)} crops but {len(self.origins)} origins")

    @classmethod
    def from_dense(cls, masks) -> InstanceMasks:
        """The crops of bool[n, H, W] masks (views of them, not copies); an InstanceMasks is
        returned as it is."""
        if isinstance(masks, InstanceMasks):
            return masks
        masks = np.asarray(masks)
        crops, origins = [], []
        for mask in masks:
            crop, origin = tight_crop(mask, copy=False)
            crops.append(crop)
            origins.append(origin)
        return cls(crops, origins, masks.shape[1:])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.crops), *self.hw)

    def __len__(self) -> int:
        return len(self.crops)

    def areas(self) -> np.ndarray:
        """int64[n] pixels of each mask."""
        return np.asarray([int(crop.sum()) for crop in self.crops], np.int64)

    def full(self, index: int) -> np.ndarray:
        """bool[H, W] mask `index`."""
        mask = np.zeros(self.hw, bool)
        crop = self.crops[index]
        y0, x0 = self.origins[index]
        mask[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        return mask

    def __getitem__(self, index):
        if isinstance(index, int | np.integer):
            return self.full(range(len(self))[index])
        return np.asarray(self)[index]  # slices and the rest: through the full stack

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.full(i) for i in range(len(self)))

    def __array__(self, dtype=None, copy=None):
        stack = np.zeros(self.shape, bool)
        for i in range(len(self)):
            stack[i] = self.full(i)
        return stack if dtype is None else stack.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def __repr__(self) -> str:
        return f"InstanceMasks({len(self)} masks of {self.hw[0]}x{self.hw[1]})"
