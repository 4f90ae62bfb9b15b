"""PointRend (Kirillov et al. 2020) on Mask R-CNN: the method module (methods/__init__.py).

Mask R-CNN's backbone, RPN, box head, sampling and detection selection, with its mask head
replaced by detectron2's PointRendMaskHead (projects/PointRend):

- coarse head: 14x14 features point-sampled from P2 only (aligned RoIAlign, one sample per
  bin), a 2x2 stride-2 convolution, 2 FC x 1024 and a 7x7 logit map per class, trained with
  Mask R-CNN's mask loss on 7x7 targets (detectron2's: the gt mask's share of each bin by
  adaptive RoIAlign, >= 0.5; ours on the box crop, ops.mask_targets sampling_ratio 0);
- point head: 3 FC x 256 on the P2 feature vector at a point with the coarse logits of every
  class at that point concatenated to every layer's input, one logit per class;
- training: 196 points per foreground RoI chosen by uncertainty of the coarse logits of the
  ground-truth class (588 uniform candidates, the 147 most uncertain kept, 49 fresh uniform
  ones), in the box head's predicted boxes (TRAIN_ON_PRED_BOXES), labelled by bilinear samples
  (soft labels) of the ground-truth mask, BCE. detectron2's sample_point_labels samples the
  full-resolution bitmask; ours reads its pixels from the box crop at input.mask_size
  (`point_labels`): the same labels for boxes up to 0.58 x input.mask_size pixels a side (130
  px with the COCO recipe's 224 crops), the crop's nearest cells beyond (at 2 px a cell, 448 px
  boxes there, 11.5% of the points within 3 px of a test ellipse's box differ, by 0.032 on
  average: tests/methods/test_pointrend.py; the AP this costs on COCO is not measured);
- loss parity with mmdetection 3.3's PointRendRoIHead (experiments/parity/pointrend_loss.py,
  which declares where mmdetection leaves detectron2): the same kept points from the same
  draws, the same point labels (8e-6), both terms and their gradients to float32 noise on the
  same targets; our coarse targets differ in 0-2 cells of ~1500 (a crop cell is the mask's
  thresholded bilinear surface, not its pixels), 0.3% of the coarse term; the two heads with
  CoarseMaskHead's and MaskPointHead's weights converted (weights/mmdet_pointrend_head.py):
  outputs and every parameter's gradient to float32 noise;
- inference: adaptive subdivision: the point head on a regular 28x28 grid (the 7x7 coarse map
  refined twice with every point), then 3 steps of 2x bilinear upsampling with the 784 most
  uncertain cells re-predicted, to a 224x224 box-relative mask, shipped as bfloat16.

All of it static: fixed point counts, top-k selection, gathers (`ops.sampling.point_features`)
and a scatter of the refined cells. The point head runs as a scan over chunks of points so the
224x224 inference of a full detection budget does not hold every hidden layer at once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from instseg_jax import config as config_lib
from instseg_jax import ops
from instseg_jax.methods import mask_rcnn, roi_heads
from instseg_jax.nn.layers import Dense
from instseg_jax.ops.sampling import (
    point_features,
    uncertain_cells,
    uncertain_points,
    upsample2x,
)

INPUTS = mask_rcnn.INPUTS

# Rows of the point head per scan step at inference (about 64 MB per hidden layer at 256
# channels); training runs all rows as one step.
POINT_HEAD_CHUNK_ROWS = 65536


@dataclasses.dataclass(frozen=True)
class PointRendConfig(mask_rcnn.MaskRCNNConfig):
    """Mask R-CNN's fields (mask_pool_size is the coarse head's pooled side; mask_head_convs
    is unused) and PointRend's, with detectron2's defaults."""

    coarse_conv_dim: int = 256
    coarse_fc_dim: int = 1024
    coarse_num_fc: int = 2
    coarse_side: int = 7
    point_fc_dim: int = 256
    point_num_fc: int = 3
    train_num_points: int = 14 * 14
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    subdivision_steps: int = 5
    subdivision_num_points: int = 28 * 28
    # The mask head's training boxes: the box head's (detached) predictions for the
    # ground-truth class of each foreground RoI, as detectron2's TRAIN_ON_PRED_BOXES; False
    # trains on the sampled RoIs themselves.
    train_on_pred_boxes: bool = True
    mask_payload_dtype: str = "bfloat16"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.importance_sample_ratio <= 1.0 or self.oversample_ratio < 1.0:
            raise config_lib.ConfigValueError(
                "model.importance_sample_ratio must lie in [0, 1] and model.oversample_ratio "
                f"be >= 1, got {self.importance_sample_ratio} and {self.oversample_ratio}"
            )
        if self.mask_pool_size % 2:
            raise config_lib.ConfigValueError(
                f"model.mask_pool_size {self.mask_pool_size} must be even (the coarse head's "
                "2x2 stride-2 convolution halves it)"
            )

    def subdivision_plan(self) -> tuple[int, int]:
        """(initial grid side, refinement steps): detectron2 starts at the coarse side and
        doubles it while a refinement would re-predict every cell anyway (7 -> 14 -> 28 with
        784 points), so 5 steps from 7x7 become a 28x28 grid and 3 steps to 224x224."""
        side, steps = self.coarse_side, self.subdivision_steps
        while steps > 0 and 4 * side * side <= self.subdivision_num_points:
            side, steps = 2 * side, steps - 1
        return side, steps


class CoarseMaskHead(nn.Module):
    """[B, F, S, S, D] pooled -> [B, F, s, s, C] coarse logits (s = coarse_side): a 1x1
    reduction when D exceeds conv_dim, a 2x2 stride-2 convolution, FCs, one FC to s*s*C."""

    num_classes: int
    conv_dim: int = 256
    fc_dim: int = 1024
    num_fc: int = 2
    side: int = 7
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled):
        b, f, h, w, d = pooled.shape
        x = pooled.reshape(b * f, h, w, d).astype(self.dtype)
        if d > self.conv_dim:
            x = nn.relu(
                Dense(
                    self.conv_dim,
                    dtype=self.dtype,
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    name="reduce_channels",
                )(x)
            )
            d = self.conv_dim
        # The 2x2 stride-2 convolution as space-to-depth and a matmul (the same numbers; its
        # fan-out, 4 x conv_dim, set through the 0.5 scale on the matmul kernel's conv_dim).
        x = x.reshape(b * f, h // 2, 2, w // 2, 2, d).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b * f, h // 2, w // 2, 4 * d)
        x = nn.relu(
            Dense(
                self.conv_dim,
                dtype=self.dtype,
                kernel_init=nn.initializers.variance_scaling(0.5, "fan_out", "normal"),
                name="reduce_spatial",
            )(x)
        )
        x = x.reshape(b * f, -1)
        for i in range(self.num_fc):
            x = nn.relu(
                Dense(
                    self.fc_dim,
                    dtype=self.dtype,
                    kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                    name=f"fc{i + 1}",
                )(x)
            )
        x = Dense(
            self.side * self.side * self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.001),
            name="prediction",
        )(x)
        return x.reshape(b, f, self.side, self.side, self.num_classes).astype(jnp.float32)


class PointHead(nn.Module):
    """StandardPointHead on rows: fine [n, D] and coarse [n, C] -> logits [n, C]; FCs with the
    coarse logits concatenated to every layer's input. Called under nn.scan (the carry passes
    through): xs are chunks [chunks, n, ...]."""

    num_classes: int
    fc_dim: int = 256
    num_fc: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, xs):
        fine, coarse = xs
        coarse = coarse.astype(self.dtype)
        x = fine.astype(self.dtype)
        for i in range(self.num_fc):
            x = jnp.concatenate([x, coarse], axis=-1)
            x = nn.relu(
                Dense(
                    self.fc_dim,
                    dtype=self.dtype,
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    name=f"fc{i + 1}",
                )(x)
            )
        x = jnp.concatenate([x, coarse], axis=-1)
        logits = Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.001),
            name="predictor",
        )(x)
        return carry, logits.astype(jnp.float32)


ScannedPointHead = nn.scan(
    PointHead, variable_broadcast="params", split_rngs={"params": False}, in_axes=0, out_axes=0
)


def box_points_to_pixels(boxes, points):
    """Box-relative points[..., P, 2] ((x, y) in [0, 1] of boxes[..., 4]) -> canvas pixels."""
    return boxes[..., None, :2] + points * (boxes[..., None, 2:] - boxes[..., None, :2])


def coarse_at_points(coarse_logits, points):
    """Bilinear coarse logits [B, F, P, C] of every class at box-relative points[B, F, P, 2]
    (grid_sample's convention on the s x s map, as detectron2's point_sample)."""
    b, f, s, _, c = coarse_logits.shape
    values = point_features(coarse_logits.reshape(b * f, s, s, c), points.reshape(b * f, 1, -1, 2))
    return values.reshape(b, f, -1, c)


def of_class(values, classes):
    """values[B, F, ..., C] at each RoI's class[B, F] -> [B, F, ...]."""
    index = classes.reshape(classes.shape + (1,) * (values.ndim - classes.ndim))
    return jnp.take_along_axis(values, index, axis=-1)[..., 0]


def point_labels(gt_crops, gt_boxes, gt_index, canvas_points):
    """float32[B, F, P] ground-truth mask values at points[B, F, P, 2] (canvas pixels):
    detectron2's soft point labels (projects/PointRend point_features.py sample_point_labels:
    bilinear samples of the full-resolution bitmask, zero outside it), with each of the four
    canvas pixels around a point read from its RoI's matched box crop (uint8[B, N, Mc, Mc],
    the mask inside its box gt_boxes[B, N, 4], zero outside) at the crop cell that holds the
    pixel's centre.

    A crop cell is the mask's bilinear surface at the cell's centre thresholded at 0.5
    (input/transforms.py box_crop_target); within 0.29 px of a pixel's centre (both axes) that
    pixel's own bilinear weight exceeds 0.5, so the cell holding the centre reads the pixel's
    value whenever the cells are at most 0.58 px apart: the labels are the full mask's exactly
    for boxes up to 0.58 Mc pixels a side (130 px at Mc = 224) and read the crop's nearest cell
    beyond. (Bilinear samples of the crop itself, the earlier rule, are sharper than the full
    mask's within a pixel of every edge: 0.03-0.06 mean and 0.5 largest label differences on
    the mmdetection loss parity's scenes, experiments/parity/pointrend_loss.py.)"""
    b, f, p, _ = canvas_points.shape
    crop = gt_crops.shape[-1]
    gt = jnp.take_along_axis(gt_boxes, gt_index[..., None], axis=1)[:, :, None]  # [B, F, 1, 4]
    crops = jnp.take_along_axis(gt_crops, gt_index[..., None, None], axis=1)
    # grid_sample's corners (align_corners=False): pixel centres at integer + 0.5.
    shifted = canvas_points - 0.5
    first = jnp.floor(shifted)
    frac = shifted - first
    cells_per_pixel = crop / jnp.maximum(gt[..., 2:] - gt[..., :2], 1e-6)  # (x, y)
    index, weight = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            offset = jnp.asarray([dx, dy], canvas_points.dtype)
            centre = first + offset + 0.5  # [B, F, P, 2] (x, y)
            cell = jnp.floor((centre - gt[..., :2]) * cells_per_pixel).astype(jnp.int32)
            inside = jnp.all((cell >= 0) & (cell < crop), axis=-1)
            cell = jnp.clip(cell, 0, crop - 1)
            index.append((cell[..., 1] * crop + cell[..., 0]).reshape(b * f, p))
            w = jnp.where(offset == 1, frac, 1.0 - frac).prod(-1)
            weight.append(jnp.where(inside, w, 0.0).reshape(b * f, p))
    # Each crop gathers from itself, corner axis first (ops/sampling.py point_sample's layout).
    gather = jax.vmap(lambda one_crop, cells: one_crop[cells], in_axes=(0, 1), out_axes=1)
    values = gather(crops.reshape(b * f, crop * crop), jnp.stack(index))  # [4, B*F, P]
    labels = (values.astype(jnp.float32) * jnp.stack(weight)).sum(0)
    return jax.lax.stop_gradient(labels.reshape(b, f, p))


class PointRend(mask_rcnn.MaskRCNN):
    cfg: PointRendConfig

    def setup_mask_head(self):
        cfg = self.cfg
        self.coarse_head = CoarseMaskHead(
            cfg.num_classes,
            cfg.coarse_conv_dim,
            cfg.coarse_fc_dim,
            cfg.coarse_num_fc,
            cfg.coarse_side,
            cfg.dtype,
        )
        self.point_head = ScannedPointHead(
            cfg.num_classes, cfg.point_fc_dim, cfg.point_num_fc, cfg.dtype
        )

    def coarse_logits(self, features, boxes):
        """[B, F, s, s, C] coarse logits of boxes[B, F, 4] from P2 (detectron2's point-sampled
        14x14 grid: aligned RoIAlign with one sample per bin)."""
        pooled = ops.roi_align(features["p2"], boxes, self.cfg.mask_pool_size, 0.25, 1, True)
        return self.coarse_head(pooled)

    def point_logits(self, features, boxes, coarse, points, chunk_rows: int = 0):
        """Point-head logits [B, F, P, C] at box-relative points[B, F, P, 2] of boxes[B, F, 4]:
        P2's feature vector there and the coarse logits of every class there. chunk_rows > 0
        runs the head over chunks of that many rows (one scan step each)."""
        canvas_wh = jnp.asarray(self.cfg.canvas_hw[::-1], jnp.float32)
        fine = point_features(features["p2"], box_points_to_pixels(boxes, points) / canvas_wh)
        return self.point_head_logits(fine, coarse, points, chunk_rows)

    def point_head_logits(self, fine, coarse, points, chunk_rows: int = 0):
        """point_logits' head on given fine-grained features fine[B, F, P, D] at points[B, F,
        P, 2] (the mmdetection head-parameter parity, weights/mmdet_pointrend_head.py, gives
        them in place of P2's samples)."""
        coarse_there = coarse_at_points(coarse, points)
        shape = fine.shape[:-1]
        fine = fine.reshape(-1, fine.shape[-1])
        coarse_there = coarse_there.reshape(-1, coarse_there.shape[-1])
        rows = fine.shape[0]
        chunk = min(chunk_rows, rows) if chunk_rows > 0 else rows
        padded = -(-rows // chunk) * chunk
        pad = ((0, padded - rows), (0, 0))
        xs = (
            jnp.pad(fine, pad).reshape(padded // chunk, chunk, -1),
            jnp.pad(coarse_there, pad).reshape(padded // chunk, chunk, -1),
        )
        _, logits = self.point_head(None, xs)
        return logits.reshape(padded, -1)[:rows].reshape(shape + (-1,))

    def mask_training(self, features, outputs: dict, batch: dict, key) -> dict:
        cfg = self.cfg
        fg = cfg.mask_fg_per_image
        rois = {k: v[:, :fg] for k, v in outputs["rois"].items()}
        classes = jnp.clip(rois["classes"], 0, cfg.num_classes - 1)
        if cfg.train_on_pred_boxes:
            deltas = jnp.take_along_axis(
                outputs["box_deltas"][:, :fg], classes[..., None, None], axis=2
            )[:, :, 0]
            rois["boxes"] = jax.lax.stop_gradient(
                ops.decode_boxes(deltas, rois["boxes"], roi_heads.BOX_WEIGHTS)
            )
        coarse = self.coarse_logits(features, rois["boxes"])  # [B, F, s, s, C]
        points, targets = training_points_and_targets(
            coarse, rois, batch["gt_masks"], batch["gt_boxes"], cfg, jax.random.fold_in(key, 1)
        )
        return {
            "mask_logits": coarse,
            **targets,
            "point_logits": self.point_logits(features, rois["boxes"], coarse, points),
        }

    def box_masks(self, features, canvas_boxes, classes, flipped=None):
        """[B, S, M, M] mask probabilities (M = 224 with the defaults) of classes[B, S] in
        canvas_boxes[B, S, 4] by adaptive subdivision (module docstring)."""
        cfg = self.cfg
        coarse = self.coarse_logits(features, canvas_boxes)
        b, s = classes.shape

        def predict(points):  # [B*S, P, 2] box-relative -> [B*S, P] logits of the class
            logits = self.point_logits(
                features, canvas_boxes, coarse, points.reshape(b, s, -1, 2), POINT_HEAD_CHUNK_ROWS
            )
            return of_class(logits, classes).reshape(b * s, -1)

        side, steps = cfg.subdivision_plan()
        logits = adaptive_subdivision(predict, b * s, side, steps, cfg.subdivision_num_points)
        masks = jax.nn.sigmoid(logits).reshape((b, s) + logits.shape[1:])
        masks = masks.astype(jnp.dtype(cfg.mask_payload_dtype))
        if flipped is not None:
            masks = ops.mirror_box_masks(masks, flipped)
        return masks


def training_points_and_targets(coarse, rois: dict, gt_crops, gt_boxes, cfg, key, draws=None):
    """(points float32[B, F, P, 2] box-relative, {mask_targets, mask_valid, point_labels}): the
    mask branch's training points and targets for the coarse logits[B, F, s, s, C] of the
    foreground RoIs (rois: boxes, classes, gt_index, foreground, each [B, F, ...]). draws: the
    uniform draws of `uncertain_points` (flattened over B x F) given instead of drawn from key
    (the mmdetection loss parity feeds both sides the same ones)."""
    b, fg = coarse.shape[:2]
    classes = jnp.clip(rois["classes"], 0, cfg.num_classes - 1)
    # detectron2's coarse targets: BitMasks.crop_and_resize, RoIAlign with adaptive sampling.
    targets, valid = ops.mask_targets(gt_crops, gt_boxes, rois, fg, cfg.coarse_side, 0)
    points = uncertain_points(
        key,
        of_class(coarse, classes).reshape(b * fg, cfg.coarse_side, cfg.coarse_side),
        cfg.train_num_points,
        cfg.oversample_ratio,
        cfg.importance_sample_ratio,
        draws,
    ).reshape(b, fg, cfg.train_num_points, 2)
    labels = point_labels(
        gt_crops, gt_boxes, rois["gt_index"], box_points_to_pixels(rois["boxes"], points)
    )
    return points, {"mask_targets": targets, "mask_valid": valid, "point_labels": labels}


def adaptive_subdivision(predict, num: int, side: int, steps: int, num_points: int):
    """float32[num, side x 2^steps, same] logits of `predict` (box-relative points[num, P, 2]
    -> logits[num, P]) by PointRend's adaptive subdivision: predicted on the regular side x side
    grid of cell centres, then `steps` times upsampled 2x bilinearly with the num_points cells
    of the smallest |logit| re-predicted at their centres (fixed counts: top-k and a scatter)."""
    grid = (jnp.arange(side, dtype=jnp.float32) + 0.5) / side
    points = jnp.stack(jnp.meshgrid(grid, grid, indexing="xy"), -1).reshape(1, -1, 2)
    logits = predict(jnp.broadcast_to(points, (num, side * side, 2))).reshape(num, side, side)
    rows = jnp.arange(num)[:, None]
    for _ in range(steps):
        logits = upsample2x(logits)
        side *= 2
        cells, points = uncertain_cells(-jnp.abs(logits), num_points)
        refined = predict(points)
        logits = logits.reshape(num, -1).at[rows, cells].set(refined).reshape(num, side, side)
    return logits


def point_losses(outputs: dict, cfg: PointRendConfig) -> dict:
    """The coarse head's Mask R-CNN loss on s x s targets (loss_mask) and the point head's BCE
    with soft labels, averaged over the points of valid foreground RoIs (loss_mask_point)."""
    losses = mask_rcnn.mask_head_losses(outputs, cfg)
    fg = cfg.mask_fg_per_image
    classes = jnp.clip(outputs["rois"]["classes"][:, :fg], 0, cfg.num_classes - 1)
    logits = of_class(outputs["point_logits"], classes)  # [B, F, P]
    valid = outputs["mask_valid"]
    normalizer = jnp.maximum(valid.sum(), 1).astype(jnp.float32) * logits.shape[-1]
    losses["loss_mask_point"] = ops.binary_cross_entropy_with_logits(
        logits, outputs["point_labels"], weights=valid[..., None], normalizer=normalizer
    )
    return losses


# ----------------------------------------------------------------------------- method interface

Config = PointRendConfig
Model = PointRend
loss_fn = functools.partial(mask_rcnn.loss_fn, mask_losses=point_losses)
defaults_from_data = mask_rcnn.defaults_from_data
object_sizes_covered = mask_rcnn.object_sizes_covered
make_inference = mask_rcnn.make_inference


def base_config() -> ml_collections.ConfigDict:
    """detectron2's PointRend R50-FPN 1x (projects/PointRend,
    pointrend_rcnn_R_50_FPN_1x_coco.yaml) defaults; experiments start from here."""
    c = config_lib.base()
    c.method = "pointrend"
    c.model = config_lib.model_section(PointRendConfig)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Mask R-CNN's smoke shrink with small coarse and point heads and fewer points."""
    c = mask_rcnn.smoke(c)
    m = c.model
    m.coarse_conv_dim = 32
    m.coarse_fc_dim = 64
    m.point_fc_dim = 32
    m.train_num_points = 49
    m.subdivision_num_points = 196
    return c
