import math

import numpy as np
import pytest

from instseg_jax import ops


def loop_anchors(h, w, stride, sizes, ratios, offset):
    out = []
    for y in range(h):
        for x in range(w):
            cx, cy = (x + offset) * stride, (y + offset) * stride
            for size in sizes:
                for ratio in ratios:
                    aw = math.sqrt(size * size / ratio)
                    ah = ratio * aw
                    out.append([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2])
    return np.array(out)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_grid_anchors_match_loops(offset):
    got = np.asarray(ops.grid_anchors((3, 5), 8, (16, 32), (0.5, 1.0, 2.0), offset))
    want = loop_anchors(3, 5, 8, (16, 32), (0.5, 1.0, 2.0), offset)
    assert got.shape == (3 * 5 * 6, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_cell_anchor_order_is_size_major_and_ratio_is_h_over_w():
    cells = ops.cell_anchors((32, 64), (0.5, 2.0))
    widths = cells[:, 2] - cells[:, 0]
    heights = cells[:, 3] - cells[:, 1]
    np.testing.assert_allclose(heights / widths, [0.5, 2.0, 0.5, 2.0])
    np.testing.assert_allclose(np.sqrt(widths * heights), [32, 32, 64, 64])


def test_multilevel_anchors_cover_p2_to_p6():
    levels = ops.multilevel_anchors((64, 96))
    assert [a.shape[0] for a in levels] == [
        16 * 24 * 3,
        8 * 12 * 3,
        4 * 6 * 3,
        2 * 3 * 3,
        1 * 2 * 3,
    ]
    # Odd canvases round the feature size up, like a stride-2 "same" conv.
    assert ops.level_shapes((65, 33), (4, 64)) == [(17, 9), (2, 1)]
    with pytest.raises(ValueError, match="one size tuple per stride"):
        ops.multilevel_anchors((64, 64), strides=(4, 8), sizes=((32,),))
