"""Keypoint R-CNN (He et al. 2017) on Mask R-CNN: the method module (methods/__init__.py).

Mask R-CNN's backbone, RPN, box head, sampling and detection selection (and its mask head when
mask_on) plus a keypoint head, as detectron2's KRCNNConvDeconvUpsampleHead and torchvision's
keypointrcnn_resnet50_fpn:

- head: RoIAlign 14x14 from each box's level, 8 x conv3x3-512 + ReLU, a 4x4 stride-2
  transposed convolution (padding 1) to one 28x28 map per keypoint, then 2x bilinear
  upsampling: 56x56 logits per keypoint;
- targets: keypoint (x, y) in a foreground RoI (x0, y0, x1, y1) falls in heatmap cell
  floor((x - x0) * 56 / (x1 - x0)) (x = x1 in the last cell); a keypoint outside the RoI or
  with visibility 0 has none;
- loss: softmax cross-entropy over the 56 x 56 cells of each keypoint that has a target,
  averaged over those keypoints in the batch (detectron2's NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS,
  torchvision's mean), times keypoint_loss_weight;
- inference: the head's heatmaps of the kept boxes travel to the host in the Detections
  ("keypoint_heatmaps"); `decode_keypoints` resizes each to its box's ceil(w) x ceil(h)
  pixels with bicubic interpolation, takes the first maximum and its cell centre.

Keypoint coordinates follow the input pipeline's convention (continuous canvas pixels, the
COCO annotation's integer pixel index + 0.5, see input/coco.py); `keypoint_output_shift`
(-0.5, detectron2's) maps the decoded positions back to COCO's, and the torchvision preset sets
it to 0 (torchvision trains and predicts on the unshifted numbers).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.nn.layers import Conv
from instseg_jax.ops.sampling import upsample2x


class KeypointHead(nn.Module):
    """[B, F, 14, 14, D] pooled -> [B, F, K, 56, 56] heatmap logits."""

    num_keypoints: int
    channels: int = 512
    num_convs: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled):
        b, f, h, w, d = pooled.shape
        x = pooled.reshape(b * f, h, w, d).astype(self.dtype)
        init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        for i in range(self.num_convs):
            x = nn.relu(
                Conv(
                    self.channels,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    kernel_init=init,
                    name=f"conv{i + 1}",
                )(x)
            )
        x = TransposedConv4x4(self.num_keypoints, self.dtype, name="score_lowres")(x)
        k = self.num_keypoints
        maps = x.transpose(0, 3, 1, 2).reshape(b * f * k, 2 * h, 2 * w).astype(jnp.float32)
        return upsample2x(maps).reshape(b, f, k, 4 * h, 4 * w)


class TransposedConv4x4(nn.Module):
    """torch's ConvTranspose2d(kernel 4, stride 2, padding 1): [n, H, W, C] -> [n, 2H, 2W, out].

    Written as the equivalent convolution of the stride-dilated input (2 zeros-padded cells per
    side, kernel mirrored); the kernel is stored as [4, 4, in, out] in the transposed
    convolution's own orientation (torch's weight[in, out, kh, kw] transposed to kh, kw, in,
    out), so imported weights need no flip.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            (4, 4, x.shape[-1], self.features),
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel[::-1, ::-1].astype(self.dtype),
            window_strides=(1, 1),
            padding=((2, 2), (2, 2)),
            lhs_dilation=(2, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(self.dtype)


def heatmap_targets(keypoints, rois, size: int):
    """(int32[..., K] target cell y * size + x, bool[..., K] has a target) of keypoints[..., K, 3]
    ((x, y, visibility), canvas pixels) in rois[..., 4]: torchvision's and detectron2's
    keypoints_to_heatmap."""
    x0, y0, x1, y1 = (rois[..., None, i] for i in range(4))
    x, y, v = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
    scale_x = size / jnp.maximum(x1 - x0, 1e-6)
    scale_y = size / jnp.maximum(y1 - y0, 1e-6)
    cell_x = jnp.floor((x - x0) * scale_x).astype(jnp.int32)
    cell_y = jnp.floor((y - y0) * scale_y).astype(jnp.int32)
    cell_x = jnp.where(x == x1, size - 1, cell_x)
    cell_y = jnp.where(y == y1, size - 1, cell_y)
    valid = (cell_x >= 0) & (cell_x < size) & (cell_y >= 0) & (cell_y < size) & (v > 0)
    index = jnp.where(valid, cell_y * size + cell_x, 0)
    return jax.lax.stop_gradient(index), valid


def keypoint_loss(heatmaps, targets, valid):
    """Softmax cross-entropy over the cells of heatmaps[..., K, S, S] at each keypoint's target
    cell, averaged over the keypoints that have one (0 when none has)."""
    flat = heatmaps.reshape(heatmaps.shape[:-2] + (-1,))
    log_probs = jax.nn.log_softmax(flat, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / count


# ------------------------------------------------------------------------------ host decoding


def _cubic(t, a=-0.75):
    t = np.abs(t)
    return np.where(
        t <= 1,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0),
    )


def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """float64[out, in]: torch's bicubic interpolation (a = -0.75, align_corners=False, taps
    clamped to the edge) from in_size to out_size samples along one axis."""
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    low = np.floor(src)
    frac = src - low
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    for tap in (-1, 0, 1, 2):
        index = np.clip(low.astype(np.int64) + tap, 0, in_size - 1)
        np.add.at(matrix, (rows, index), _cubic(frac - tap))
    return matrix


def decode_keypoints(heatmaps: np.ndarray, boxes: np.ndarray):
    """(float32[R, K, 3] (x, y, 1), float32[R, K] scores) from heatmaps[R, K, S, S] logits in
    boxes[R, 4] (the pixels the heatmaps were predicted in): each map resized bicubically to
    ceil(w) x ceil(h) cells of the box (w, h at least 1), its first maximum's cell centre mapped
    back to the box; the score is the resized logit there (torchvision's heatmaps_to_keypoints).
    """
    heatmaps = np.asarray(heatmaps, np.float32)
    num, k, size, _ = heatmaps.shape
    out = np.zeros((num, k, 3), np.float32)
    scores = np.zeros((num, k), np.float32)
    for r in range(num):
        x0, y0, x1, y1 = (float(v) for v in boxes[r])
        width, height = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cells_w, cells_h = math.ceil(width), math.ceil(height)
        rows = bicubic_matrix(cells_h, size).astype(np.float32)
        cols = bicubic_matrix(cells_w, size).astype(np.float32)
        resized = np.einsum("ys,ksz,xz->kyx", rows, heatmaps[r], cols)
        flat = resized.reshape(k, -1).argmax(axis=1)
        cy, cx = np.divmod(flat, cells_w)
        out[r, :, 0] = (cx + 0.5) * (width / cells_w) + x0
        out[r, :, 1] = (cy + 0.5) * (height / cells_h) + y0
        out[r, :, 2] = 1.0
        scores[r] = resized.reshape(k, -1)[np.arange(k), flat]
    return out, scores
