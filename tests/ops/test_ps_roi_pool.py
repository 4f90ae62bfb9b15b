"""ops.ps_roi_pool against a float64 NumPy loop written from the rule of MXNet's contrib
PSROIPooling kernel (the operator msracver/FCIS calls in fcis/symbols/resnet_v1_101_fcis.py:
inclusive boxes rounded with C's round, ends at round(x2) + 1, bins floor/ceil'd, clipped, the
mean of their cells, position group floor(bin * group_size / pooled_size)), forward and backward;
bin edges on whole cells exact (ops/ps_roi_pool.py says why).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.ops.ps_roi_pool import ps_roi_pool


def c_round(x):
    """C's round: halves away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def reference_bins(box, group_size, pooled_size, scale, height, width):
    """[(rows, cols, group index)] of each bin (ph, pw) of one box, the kernel's loop bounds.
    `box` is ours (x1 one past the last pixel); the kernel's inclusive box ends at x1 - 1.
    Edges in float64 as start + (i length) / S, exact where they fall on a whole cell (where
    the kernel's float32 start + i (length / S) rounds either way: ops/ps_roi_pool.py)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    start_w, start_h = c_round(x0) * scale, c_round(y0) * scale
    end_w, end_h = (c_round(x1 - 1) + 1.0) * scale, (c_round(y1 - 1) + 1.0) * scale
    roi_w, roi_h = max(end_w - start_w, 0.1), max(end_h - start_h, 0.1)
    bins = {}
    for ph in range(pooled_size):
        for pw in range(pooled_size):
            hstart = int(np.floor(start_h + ph * roi_h / pooled_size))
            wstart = int(np.floor(start_w + pw * roi_w / pooled_size))
            hend = int(np.ceil(start_h + (ph + 1) * roi_h / pooled_size))
            wend = int(np.ceil(start_w + (pw + 1) * roi_w / pooled_size))
            hstart, hend = min(max(hstart, 0), height), min(max(hend, 0), height)
            wstart, wend = min(max(wstart, 0), width), min(max(wend, 0), width)
            gh = min(max(ph * group_size // pooled_size, 0), group_size - 1)
            gw = min(max(pw * group_size // pooled_size, 0), group_size - 1)
            bins[ph, pw] = (range(hstart, hend), range(wstart, wend), gh * group_size + gw)
    return bins


def reference_pool(maps, boxes, group_size, pooled_size, scale, cotangent):
    """(pooled [B, R, S, S, D], gradient of sum(pooled * cotangent) wrt maps), float64 loops."""
    maps = np.asarray(maps, np.float64)
    b, h, w, channels = maps.shape
    depth = channels // group_size**2
    grouped = maps.reshape(b, h, w, group_size**2, depth)
    out = np.zeros(boxes.shape[:2] + (pooled_size, pooled_size, depth))
    grad = np.zeros_like(grouped)
    for i in range(b):
        for r in range(boxes.shape[1]):
            bins = reference_bins(boxes[i, r], group_size, pooled_size, scale, h, w)
            for (ph, pw), (rows, cols, g) in bins.items():
                area = len(rows) * len(cols)
                if area == 0:
                    continue
                for y in rows:
                    for x in cols:
                        out[i, r, ph, pw] += grouped[i, y, x, g] / area
                        grad[i, y, x, g] += cotangent[i, r, ph, pw] / area
    return out, grad.reshape(maps.shape)


def random_case(seed, batch=2, height=9, width=11, group=3, depth=2, num_boxes=7, stride=4):
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=(batch, height, width, group * group * depth)).astype(np.float32)
    img_h, img_w = height * stride, width * stride
    xy = rng.uniform([-0.2 * img_w, -0.2 * img_h], [img_w, img_h], (batch, num_boxes, 2))
    wh = rng.uniform(0.0, 0.9, (batch, num_boxes, 2)) * [img_w, img_h]
    wh[:, 0] = rng.uniform(0.0, 2.0, (batch, 2))  # thinner than a cell: forced to 0.1 cells
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    boxes[:, 1] = [-30.0, -30.0, -10.0, -10.0]  # outside the map: every bin empty
    boxes[0, 2] = [4.0, 8.0, 28.0, 32.0]  # whole pixels: bin edges land on cell edges
    return maps, boxes


@pytest.mark.parametrize(("group", "pooled"), [(3, 7), (3, 3), (2, 5)])
def test_ps_roi_pool_matches_the_kernel_rule_forward_and_backward(group, pooled):
    maps, boxes = random_case(group * 10 + pooled, group=group)
    cotangent = np.random.default_rng(1).normal(size=(2, 7, pooled, pooled, 2))
    want, want_grad = reference_pool(maps, boxes, group, pooled, 0.25, cotangent)

    def pooled_dot(m):
        out = ps_roi_pool(m, boxes, group, pooled, 0.25)
        return jnp.sum(out * cotangent), out

    (_, got), got_grad = jax.jit(jax.value_and_grad(pooled_dot, has_aux=True))(maps)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_grad, np.float64), want_grad, atol=1e-5)
    assert np.all(np.asarray(got)[:, 1] == 0.0)  # the box outside the map


def test_ps_roi_pool_reads_each_bins_position_group():
    """A map whose group g holds the constant g: every bin of any box inside returns the index
    of its own position group (floor(i k / S) k + floor(j k / S))."""
    k, s = 3, 7
    maps = np.broadcast_to(np.arange(k * k, dtype=np.float32), (1, 8, 8, k * k))
    out = ps_roi_pool(maps, np.array([[[3.0, 5.0, 29.0, 27.0]]]), k, s, 0.25)[0, 0, ..., 0]
    group = np.arange(s) * k // s
    np.testing.assert_array_equal(np.asarray(out), group[:, None] * k + group[None, :])
