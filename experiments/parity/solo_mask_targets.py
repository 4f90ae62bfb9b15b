"""SOLO's coarser mask targets against mmcv.imrescale itself (OpenCV), the function both SOLO
references shrink their targets with (WXinlong/SOLO solo_head.py solo_target_single,
mmdetection 3.x dense_heads/solo_head.py SOLOHead._get_targets_single:
mmcv.imrescale(mask, scale=1. / output_stride)): the fixture of
tests/methods/test_solo.py::test_coarser_mask_targets_are_mmcv_imrescale.

    .venv-mmdet/bin/python experiments/parity/solo_mask_targets.py \
        tests/fixtures/mmcv_imrescale_masks.npz

Writes a random {0, 1} uint8 mask (blobs and single pixels, so that halves and quarters of a
sampled pair occur) and its mmcv.imrescale at scales 1/2 and 1/4: our stride-4 targets shrunk
to the stride-8 and stride-16 levels.
"""

import sys

import mmcv
import numpy as np


def main(path: str) -> None:
    rng = np.random.default_rng(0)
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), np.uint8)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 9)
        mask |= ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
    mask[rng.integers(0, h, 40), rng.integers(0, w, 40)] = 1  # isolated pixels
    half = mmcv.imrescale(mask, scale=1.0 / 2)
    quarter = mmcv.imrescale(mask, scale=1.0 / 4)
    assert half.shape == (h // 2, w // 2) and quarter.shape == (h // 4, w // 4)
    np.savez_compressed(path, mask=mask, half=half, quarter=quarter)
    print(
        f"wrote {path}: {mask.sum()} / {mask.size} pixels; half {half.sum()}, quarter {quarter.sum()}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
