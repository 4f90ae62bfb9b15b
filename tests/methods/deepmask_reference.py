"""Float64 NumPy encodings of facebookresearch/deepmask's DataSampler.lua rules, written from the
Lua file (loops as it loops), for tests/methods/test_deepmask.py. Uniform draws are given, not
drawn, so both sides see the same ones (torch.uniform(a, b) = a + (b - a) u)."""

from __future__ import annotations

import math

import numpy as np


def jitter_box(box_xyxy, u_scale, u_x, u_y, obj_sz, w_sz, scale, shift):
    """DataSampler:jitterBox on an xyxy box: the (x, y, w, h) window of wSz 2^s pixels."""
    x, y = box_xyxy[0], box_xyxy[1]
    w, h = box_xyxy[2] - x, box_xyxy[3] - y
    xc, yc = x + w / 2, y + h / 2
    max_dim = max(w, h)
    s = math.log2(max_dim / obj_sz) + (-scale + 2 * scale * u_scale)
    xc = xc + (-shift + 2 * shift * u_x) * 2**s
    yc = yc + (-shift + 2 * shift * u_y) * 2**s
    side = w_sz * 2**s
    return xc - side / 2, yc - side / 2, side, side


def quantised_scale(box_xyxy, obj_sz, scale):
    """DataSampler:createBBstruct: the ss an annotation is filed under (None: no s fits)."""
    w, h = box_xyxy[2] - box_xyxy[0], box_xyxy[3] - box_xyxy[1]
    max_dim = max(w, h)
    for s in range(-32, 33):
        if obj_sz * 2 ** ((s - 1) * scale) < max_dim <= obj_sz * 2 ** ((s + 1) * scale):
            return -s * scale
    return None


def is_negative(x, y, window_scale, boxes, obj_sz, scale, shift):
    """negSamplingBB's test of one draw: centre (x, y) in canvas pixels, log2 image scale
    `window_scale`. Blocked when an object filed at ss = window_scale + k scale (k = -10..10)
    has its centre within 3 shift pixels, both measured in the window's frame (x 2^scale: the
    reference measures object centres in their own frame 2^ss, module docstring)."""
    filed = {}
    for box in boxes:
        ss = quantised_scale(box, obj_sz, scale)
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        filed.setdefault(round(ss / scale), []).append(centre)
    for k in range(-10, 11):
        ss = round(window_scale / scale) + k
        for cx, cy in filed.get(ss, []):
            dist = math.hypot(x - cx, y - cy) * 2**window_scale
            if dist < 3 * shift:
                return False
    return True


def negative_window(tries, boxes, obj_sz, w_sz, scale, shift):
    """The loop of negSamplingBB over given tries [(x, y, log2 scale)]: the first negative, else
    the last (the reference returns its last draw after its budget); as (x, y, w, h), found."""
    found = False
    for x, y, s in tries:
        if is_negative(x, y, s, boxes, obj_sz, scale, shift):
            found = True
            break
    side = w_sz * 2.0**-s
    return (x - side / 2, y - side / 2, side, side), found


def crop_mask(inside, inner_xywh, size):
    """DataSampler:cropMask: the mask rasterised at `size / inner side` pixels per canvas pixel
    (a target pixel is set when its centre is inside the shape, the polygon rasteriser's rule),
    cropped at the rounded origin (cropTensor: torch.round), size x size, > 0.5.
    inside(x, y) float64 arrays -> bool: the object's shape in canvas pixels."""
    x0, y0, side = inner_xywh[0], inner_xywh[1], inner_xywh[2]
    per_pixel = size / side
    ox, oy = np.round(x0 * per_pixel), np.round(y0 * per_pixel)
    j = np.arange(size, dtype=np.float64)
    xs = (ox + j + 0.5) / per_pixel
    ys = (oy + j + 0.5) / per_pixel
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return inside(xx, yy).astype(np.float64)
