"""SOLO and Decoupled SOLO (Wang et al. 2020, "SOLO: Segmenting Objects by Locations", ECCV):
the method module (methods/__init__.py). Box-free: every cell of an S x S grid per level
classifies the instance whose centre falls in it, and the level's mask branch predicts that
cell's mask directly:

  model.mask_branch "vanilla"    one output channel per cell: S^2 channels per level
                                 (WXinlong/SOLO mmdet/models/anchor_heads/solo_head.py
                                 SOLOHead; mmdetection 3.x dense_heads/solo_head.py SOLOHead)
  model.mask_branch "decoupled"  two branches of S channels each, X (x CoordConv channel) and Y
                                 (y channel); the mask of cell (i, j) (row i, column j) is
                                 sigmoid(X_j) * sigmoid(Y_i), each sigmoid taken before the
                                 product, at training and test alike (decoupled_solo_head.py
                                 DecoupledSOLOHead: loss `input_x.sigmoid() * input_y.sigmoid()`;
                                 get_seg_single multiplies the upsampled sigmoids;
                                 mmdetection's DecoupledSOLOHead likewise, DiceLoss
                                 activate=False)

Published COCO val2017 mask AP, ResNet-50-FPN 1x, single scale: SOLO 33.1 and Decoupled SOLO
33.9 (mmdetection 3.x configs/solo/metafile.yml, solo_r50_fpn_1x_coco and
decoupled-solo_r50_fpn_1x_coco); WXinlong/SOLO's README: SOLO_R50_1x 32.9, Decoupled_SOLO_R50_1x
33.9 (minival). experiments/solo_r50_fpn_coco_1x.py and
experiments/solo_decoupled_r50_fpn_coco_1x.py are the recipes; neither has been reproduced here.

Shared with SOLOv2 (methods/solov2.py, imported; its module docstring says why each rule is
as it is): the grids, each image's grid extent, the scale ranges, the centre region (sigma,
model.center_scale) and the 3 x 3 clip, the later instance winning a shared cell, the ignore
regions, the category branch (each level resized to S x S, then a tower), the focal loss / (positive
cells + 1), the squared dice loss with 1e-3 on each sum (weight 3), the loss normaliser groups,
the 2x2 peak filter, maskness, nms_pre and Matrix NMS (solov2.detect_from_masks), and the
declared deviations that follow from the fixed canvas.

SOLO's own rules (both references):
  - The mask branch starts from the same level maps as the category branch (P2 halved to
    stride 8, P3, P4, P5, P6 brought to P5's size: the references' split_feats / resize_feats)
    with CoordConv channels over each (both for vanilla, x or y for decoupled); a tower of
    model.head_convs conv3x3-GN-ReLU (shared by the levels), 2x bilinear upsampling, then the
    level's predictor: a 1x1 conv to S^2 channels (vanilla) or a 3x3 conv to S channels per
    branch (decoupled), its bias at prior 0.01. Mask predictions are thus at half the level's
    stride: 4, 4, 8, 16, 16.
  - One mask target per positive cell: the instance whose class the cell takes (the reference
    overwrites the cell's mask target as it overwrites its class), at the level's mask
    resolution. The dice loss averages over the positive cells (WXinlong/SOLO's .mean() over
    them; mmdetection's sum / num_pos: the same number here, one target per cell).
  - Test: each candidate's mask probabilities are upsampled bilinearly to stride 4 over the
    image's extent (the reference's F.interpolate of sigmoid(ins_pred) to the padded input / 4),
    then the SOLOv2 test procedure.

Static shapes (beyond solov2's):
  positives      a fixed budget of `positive_slots_per_image` positive cells per training
                 image, a uniform random subset when more cells are positive; what the budget
                 left out is counted (`positive_cells_over_budget`, `..._fraction`) and its
                 cells still train the category branch.
  vanilla masks  the S^2-channel output is never formed (1600 channels at stride 4 on the COCO
                 canvas): the 1x1 predictor is linear, so the mask of a cell is the upsampled
                 tower map times that cell's weight column plus its bias, computed for the
                 trained slots (training) or the test candidates (test) only. The same numbers.
  levels         a slot's level is known only at run time, so every slot's mask is computed at
                 each level's resolution and the loss takes its own level's (at training 2.4x the
                 mask work of one stride-4 map per slot; at test likewise per candidate).

Deviations, each with its reason:
  - The mask targets of the stride-8 and stride-16 levels are the stride-4 targets
    (gt_full_masks, sampled at the centres of 4 x 4 pixel blocks) rescaled by the reference's
    rule (mmcv.imrescale: cv2 bilinear sampling at the coarser pixel's centre, a half rounded
    up); the reference rescales the full-resolution mask. Both sample the same points of the
    image up to a pixel of the input.
  - The dice loss covers each level's map over the whole canvas (as SOLOv2's covers the canvas at
    stride 4), where the reference's covers its padded batch.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from instseg_jax import config as config_lib
from instseg_jax import ops, structures
from instseg_jax.backbones.fpn import FPN
from instseg_jax.backbones.resnet import normalize
from instseg_jax.methods import solov2
from instseg_jax.methods.detector import build_backbone, loss_normaliser_group
from instseg_jax.nn.layers import Conv
from instseg_jax.ops import dense

MASK_STRIDE = solov2.MASK_STRIDE
NATIVE_STRIDES = solov2.NATIVE_STRIDES
INPUTS = structures.Inputs(full_mask_stride=MASK_STRIDE, centers=True)
# bias_init_with_prob(0.01) of both references' category and mask predictors.
PRIOR_BIAS = ops.probability_logit(0.01)


@dataclasses.dataclass(frozen=True)
class SOLOConfig(solov2.SOLOGridConfig):
    # "vanilla": one mask channel per grid cell (S^2 per level); "decoupled": X and Y branches of
    # S channels each, mask of cell (i, j) = sigmoid(X_j) * sigmoid(Y_i).
    mask_branch: str = "vanilla"
    # The category tower and each mask tower: head_convs x (conv3x3 of head_channels, GN, ReLU)
    # (the references' stacked_convs 7 and seg_feat_channels / feat_channels 256).
    head_channels: int = 256
    head_convs: int = 7

    def __post_init__(self):
        super().__post_init__()
        config_lib.check_choice("model.mask_branch", self.mask_branch, ("vanilla", "decoupled"))
        for stride in self.level_strides:
            if stride % (2 * MASK_STRIDE):
                raise config_lib.ConfigValueError(
                    f"model.level_strides {self.level_strides}: SOLO's mask predictions sit at "
                    f"half each level's stride, which must be a multiple of {MASK_STRIDE} (the "
                    f"stride of the mask targets): use multiples of {2 * MASK_STRIDE}"
                )

    def mask_strides(self) -> tuple[int, ...]:
        """The stride of each level's mask predictions (the tower's map upsampled 2x)."""
        return tuple(s // 2 for s in self.level_strides)

    def cell_offsets(self) -> tuple[int, ...]:
        """The first cell index of each level in the [S] order (level by level, row-major)."""
        offsets, start = [], 0
        for g in self.num_grids:
            offsets.append(start)
            start += g * g
        return tuple(offsets)


def _head_init():
    return nn.initializers.normal(0.01)


class ConvNormStack(nn.Module):
    """solov2.conv_norm_stack as a module of its own (its layers conv{i}, norm{i})."""

    channels: int
    convs: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return solov2.conv_norm_stack(x, self.channels, self.convs, self.dtype)


def level_map(feature, extent_hw, native_stride: int, level_stride: int) -> jnp.ndarray:
    """[B, h, w, C] at level_stride: an FPN map feature[B, h0, w0, C] at native_stride resampled
    bilinearly (align_corners False) over each image's extent extent_hw float32[B, 2] (the
    references' split_feats: P2 halved, P6 to P5's size: ceil(extent / native) cells to
    extent / level); the map itself where the strides agree."""
    if native_stride == level_stride:
        return feature
    matrices = []
    for axis in (0, 1):
        extent = extent_hw[:, axis]
        native_len = feature.shape[1 + axis]
        matrices.append(
            dense.bilinear_matrices(
                jnp.ceil(extent / native_stride),
                extent / level_stride,
                native_len * native_stride // level_stride,
                native_len,
            ).astype(feature.dtype)
        )
    rows, cols = matrices
    return jnp.einsum("bih,bhwc,bjw->bijc", rows, feature, cols)


def resample(x, extent_hw, in_stride: int, out_stride: int, out_hw, axes=(-2, -1)) -> jnp.ndarray:
    """x[B, ...] whose spatial axes `axes` (rows, columns: the last two, or 1 and 2 of a
    channels-last map) lie at stride in_stride over the canvas, resampled bilinearly
    (align_corners False) to out_stride over each image's extent extent_hw float32[B, 2]:
    extent / in_stride entries to extent / out_stride (the references' F.interpolate of a map
    that ends at the padded image); out_hw the static output size."""
    if in_stride == out_stride:
        return x
    row_axis, col_axis = (a % x.ndim for a in axes)
    rows = dense.bilinear_matrices(
        extent_hw[:, 0] / in_stride, extent_hw[:, 0] / out_stride, out_hw[0], x.shape[row_axis]
    ).astype(x.dtype)
    cols = dense.bilinear_matrices(
        extent_hw[:, 1] / in_stride, extent_hw[:, 1] / out_stride, out_hw[1], x.shape[col_axis]
    ).astype(x.dtype)
    letters = "acdefgkl"[: x.ndim]
    source = "b" + letters[1:]
    source = source[:row_axis] + "h" + source[row_axis + 1 :]
    source = source[:col_axis] + "w" + source[col_axis + 1 :]
    target = source.replace("h", "i").replace("w", "j")
    return jnp.einsum(f"bih,{source},bjw->{target}", rows, x, cols)


def rescaled_targets(masks, factor: int) -> jnp.ndarray:
    """uint8[..., h / factor, w / factor]: {0, 1} masks[..., h, w] shrunk as mmcv.imrescale
    shrinks the references' targets (cv2 bilinear, no antialiasing: output pixel i samples
    (i + 0.5) factor - 0.5; a uint8 result rounds a half up)."""
    if factor == 1:
        return masks
    h, w = masks.shape[-2:]
    rows = jnp.asarray(dense.bilinear_matrix(h, h // factor))
    cols = jnp.asarray(dense.bilinear_matrix(w, w // factor))
    sampled = jnp.einsum("ih,...hw,jw->...ij", rows, masks.astype(jnp.float32), cols)
    return (sampled >= 0.5).astype(jnp.uint8)


class SOLO(nn.Module):
    cfg: SOLOConfig

    def setup(self):
        cfg = self.cfg
        self.backbone = build_backbone(cfg)
        self.fpn = FPN(cfg.fpn_channels, cfg.dtype)
        self.category_tower = solov2.Tower(
            cfg.head_channels, cfg.head_convs, cfg.num_classes, PRIOR_BIAS, cfg.dtype
        )
        if cfg.mask_branch == "vanilla":
            self.mask_tower = ConvNormStack(cfg.head_channels, cfg.head_convs, cfg.dtype)
            # Level l's 1x1 conv to S_l^2 channels as [E, S_l^2] weights and [S_l^2] biases: a
            # cell's mask is one weight column against the level's map.
            self.mask_kernels = [
                self.param(f"mask_predict{level}_kernel", _head_init(), (cfg.head_channels, g * g))
                for level, g in enumerate(cfg.num_grids)
            ]
            self.mask_biases = [
                self.param(
                    f"mask_predict{level}_bias", nn.initializers.constant(PRIOR_BIAS), (g * g,)
                )
                for level, g in enumerate(cfg.num_grids)
            ]
        else:
            self.mask_tower_x = ConvNormStack(cfg.head_channels, cfg.head_convs, cfg.dtype)
            self.mask_tower_y = ConvNormStack(cfg.head_channels, cfg.head_convs, cfg.dtype)
            # Level l's 3x3 conv to S_l channels, per branch.
            self.predict_x = [self._grid_conv(g) for g in cfg.num_grids]
            self.predict_y = [self._grid_conv(g) for g in cfg.num_grids]

    def _grid_conv(self, grid: int):
        return Conv(
            grid,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.cfg.dtype,
            kernel_init=_head_init(),
            bias_init=nn.initializers.constant(PRIOR_BIAS),
        )

    def predict(self, image, extent_hw):
        """heads' outputs for images [B, H, W, 3] in 0-255 RGB whose grids span extent_hw
        float32[B, 2] (solov2.grid_extents)."""
        return self.heads(self.fpn(self.backbone(normalize(image, self.cfg.dtype))), extent_hw)

    def heads(self, features: dict, extent_hw):
        """(category logits float32[B, S, C], mask maps) from the FPN maps features["p2".."p6"].
        Mask maps, one per level at its mask stride (level stride / 2): vanilla the upsampled
        tower map [B, h, w, E] (the 1x1 predictor is applied per cell, cell_mask_logits);
        decoupled (X, Y) logits [B, h, w, S_l] each."""
        cfg = self.cfg
        b = features["p2"].shape[0]
        logits, mask_maps = [], []
        for level, (stride, grid) in enumerate(zip(cfg.level_strides, cfg.num_grids, strict=True)):
            native = features[f"p{level + 2}"]
            on_grid = solov2.level_on_grid(native, extent_hw, NATIVE_STRIDES[level], stride, grid)
            logits.append(self.category_tower(on_grid[..., :-2]).reshape(b, grid * grid, -1))
            x = level_map(native, extent_hw, NATIVE_STRIDES[level], stride)
            coords = solov2.coordinates(*x.shape[1:3], extent_hw, stride, x.dtype)  # (x, y)
            h, w = 2 * x.shape[1], 2 * x.shape[2]

            def upsampled(tower_map, stride=stride, h=h, w=w):
                return resample(tower_map, extent_hw, stride, stride // 2, (h, w), axes=(1, 2))

            if cfg.mask_branch == "vanilla":
                tower = self.mask_tower(jnp.concatenate([x, coords], -1))
                mask_maps.append(upsampled(tower))
            else:
                tower_x = self.mask_tower_x(jnp.concatenate([x, coords[..., :1]], -1))
                tower_y = self.mask_tower_y(jnp.concatenate([x, coords[..., 1:]], -1))
                mask_maps.append(
                    (
                        self.predict_x[level](upsampled(tower_x)).astype(jnp.float32),
                        self.predict_y[level](upsampled(tower_y)).astype(jnp.float32),
                    )
                )
        return jnp.concatenate(logits, 1).astype(jnp.float32), mask_maps

    def predictor_weights(self):
        """(kernels, biases) of the vanilla 1x1 predictors per level; (None, None) decoupled."""
        if self.cfg.mask_branch == "vanilla":
            return self.mask_kernels, self.mask_biases
        return None, None

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        cfg = self.cfg
        extent_hw = solov2.grid_extents(batch["image_hw"], cfg)
        logits, mask_maps = self.predict(batch["image"], extent_hw)
        outputs = {"category_logits": logits}
        if not train:
            outputs["detections"] = self.detect(logits, mask_maps, extent_hw)
            return outputs
        if key is None:
            raise ValueError("training needs a key for the choice of positive slots")
        outputs.update(
            training_outputs(cfg, mask_maps, batch, extent_hw, key, *self.predictor_weights())
        )
        return outputs

    def detect(self, logits, mask_maps, extent_hw) -> dict:
        """solov2.detect_from_masks with this mask branch: each candidate's probabilities on its
        level, upsampled bilinearly to stride 4 over the image's extent."""
        cfg = self.cfg
        h, w = (v // MASK_STRIDE for v in cfg.canvas_hw)
        offsets = cfg.cell_offsets()
        weights = self.predictor_weights()  # read outside the vmap below

        def candidate_masks(cells, extent, *image_maps):
            maps = jax.tree.map(lambda m: m[None], list(image_maps))
            masks = jnp.zeros((cells.shape[0], h, w), jnp.float32)
            for level, (grid, stride) in enumerate(
                zip(cfg.num_grids, cfg.mask_strides(), strict=True)
            ):
                level_masks = cell_mask_probabilities(
                    cfg,
                    maps if cfg.mask_branch == "vanilla" else _pairs(maps),
                    cells[None],
                    level,
                    *weights,
                )
                level_masks = resample(level_masks, extent[None], stride, MASK_STRIDE, (h, w))[0]
                on_level = (cells >= offsets[level]) & (cells < offsets[level] + grid * grid)
                masks = jnp.where(on_level[:, None, None], level_masks, masks)
            return masks

        flat_maps = mask_maps if cfg.mask_branch == "vanilla" else _flatten(mask_maps)
        return solov2.detect_from_masks(
            solov2.peak_filtered_scores(logits, cfg),
            candidate_masks,
            (extent_hw, *flat_maps),
            (h, w),
            cfg,
            extent_hw,
        )


def training_outputs(
    cfg: SOLOConfig, mask_maps, batch: dict, extent_hw, key, kernels=None, biases=None
) -> dict:
    """What loss_fn reads beside the category logits, from the mask maps (SOLO.heads) and the
    batch's ground truth: the targets (solov2.batch_targets of cell_targets), and per level the
    trained slots' mask probabilities (cell_mask_probabilities) and mask targets (the slot's
    instance, rescaled_targets at the level's mask stride), each [B, P, h_l, w_l]. A function
    so that the mmdetection loss parity (weights/mmdet_solo_loss.py) runs it on given maps."""
    targets = solov2.batch_targets(cell_targets, batch, extent_hw, cfg, key)
    probabilities, mask_targets = [], []
    for level, stride in enumerate(cfg.mask_strides()):
        probabilities.append(
            cell_mask_probabilities(cfg, mask_maps, targets["slot_cell"], level, kernels, biases)
        )
        level_masks = rescaled_targets(batch["gt_full_masks"], stride // MASK_STRIDE)
        mask_targets.append(
            jnp.take_along_axis(level_masks, targets["slot_instance"][..., None, None], axis=1)
        )
    return {
        "mask_probabilities": probabilities,
        "mask_targets": mask_targets,
        "targets": targets,
    }


def cell_mask_probabilities(
    cfg: SOLOConfig, mask_maps, cells, level: int, kernels=None, biases=None
) -> jnp.ndarray:
    """float32[B, K, h, w]: the mask probabilities of cells int32[B, K] (indices into [S]) on
    `level`'s map (SOLO.heads' mask maps), as if every cell were on that level (a cell elsewhere
    reads an arbitrary entry of this level: the caller keeps each cell's own level). Vanilla:
    sigmoid(map . kernels[level][:, cell] + biases[level][cell]) (the 1x1 predictor's weights);
    decoupled: sigmoid(X[..., j]) * sigmoid(Y[..., i]) for cell (i, j) of the level's grid."""
    grid = cfg.num_grids[level]
    local = jnp.clip(cells - cfg.cell_offsets()[level], 0, grid * grid - 1)
    if cfg.mask_branch == "vanilla":
        cell_kernels = kernels[level].T[local]  # [B, K, E]
        logits = dense.dynamic_masks(mask_maps[level], cell_kernels).astype(jnp.float32)
        return jax.nn.sigmoid(logits + biases[level][local][..., None, None].astype(jnp.float32))
    x_map, y_map = mask_maps[level]  # [B, h, w, S_l]
    # Cell (i, j) reads X's channel j and Y's channel i (one-hot products: no gather).
    column = jax.nn.one_hot(local % grid, grid, dtype=jnp.float32)
    row = jax.nn.one_hot(local // grid, grid, dtype=jnp.float32)
    x = jnp.einsum("bhwg,bkg->bkhw", jax.nn.sigmoid(x_map), column)
    y = jnp.einsum("bhwg,bkg->bkhw", jax.nn.sigmoid(y_map), row)
    return x * y


def _flatten(pairs):
    return [m for pair in pairs for m in pair]


def _pairs(flat):
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def cell_targets(
    gt_boxes,
    gt_classes,
    gt_valid,
    gt_centers,
    gt_nonempty,
    cfg: SOLOConfig,
    key,
    ignore_boxes=None,
    ignore_valid=None,
    extent_hw=None,
):
    """One image's SOLO targets: solov2.cell_assignment's cells (its inputs; the same grids,
    centre regions and ignore regions), each positive cell trained on the mask of the instance
    whose class it takes (WXinlong/SOLO solo_head.py solo_target_single writes ins_label[cell]
    for each instance in turn, as it writes cate_label: the later instance wins).

    Returns a dict: cell_labels int32[S] (class, or C for background), positive bool[S],
    ignored bool[S], slot_cell / slot_instance int32[P], slot_valid bool[P] (P =
    positive_slots_per_image; a random subset of the positive cells when they overflow),
    overflow int32 (positive cells without a slot).
    """
    assigned = solov2.cell_assignment(
        gt_boxes,
        gt_classes,
        gt_valid,
        gt_centers,
        gt_nonempty,
        cfg,
        ignore_boxes,
        ignore_valid,
        extent_hw,
    )
    chosen, slot_valid, overflow = dense.budgeted_select(
        assigned["positive"], cfg.positive_slots_per_image, key
    )
    return {
        "cell_labels": assigned["cell_labels"],
        "positive": assigned["positive"],
        "ignored": assigned["ignored"],
        "slot_cell": chosen,
        "slot_instance": jnp.where(slot_valid, assigned["cell_instance"][chosen], 0),
        "slot_valid": slot_valid,
        "overflow": overflow,
    }


def loss_fn(outputs: dict, batch: dict, cfg: SOLOConfig) -> tuple[jnp.ndarray, dict]:
    """Focal loss over every grid cell but the ignored ones / (positive cells + 1) and dice
    loss (squared, weight 3) averaged over the trained positive cells, each on its own level's
    map, each within a group of model.loss_normaliser_images images, then averaged over the
    groups (solov2.loss_fn's normalisers)."""
    del batch  # every target was built inside the model
    targets = outputs["targets"]
    b, p = targets["slot_valid"].shape
    group = loss_normaliser_group(cfg.loss_normaliser_images, b)
    loss_cls = solov2.category_loss(outputs["category_logits"], targets, cfg, group)
    mask_scale = ops.group_normalizer_scale(targets["slot_valid"].sum(axis=1), group)
    weights = targets["slot_valid"] * mask_scale[:, None]  # [B, P]
    cells = targets["slot_cell"]
    loss_mask = jnp.zeros((), jnp.float32)
    for level, (offset, grid) in enumerate(zip(cfg.cell_offsets(), cfg.num_grids, strict=True)):
        on_level = (cells >= offset) & (cells < offset + grid * grid)
        probabilities = outputs["mask_probabilities"][level]
        loss_mask = loss_mask + ops.dice_loss(
            probabilities.reshape((b * p,) + probabilities.shape[2:]),
            outputs["mask_targets"][level].reshape((b * p,) + probabilities.shape[2:]),
            weights=(weights * on_level).reshape(b * p),
            smooth=0.0,
            squared=True,
            eps=2.0 * cfg.dice_eps,
            activate=False,
        )
    loss_mask = cfg.mask_loss_weight * loss_mask
    positive = targets["positive"].sum().astype(jnp.float32)
    over = targets["overflow"].sum().astype(jnp.float32)
    metrics = {
        "loss_cls": loss_cls,
        "loss_mask": loss_mask,
        "positive_cells": positive / b,
        "positive_cells_over_budget": over / b,
        "positive_cells_over_budget_fraction": over / jnp.maximum(positive, 1.0),
    }
    return loss_cls + loss_mask, metrics


# ----------------------------------------------------------------------------- method interface

Config = SOLOConfig
Model = SOLO
object_sizes_covered = solov2.object_sizes_covered


def base_config() -> ml_collections.ConfigDict:
    """mmdetection 3.x's SOLO R50-FPN 1x COCO settings (configs/solo/solo_r50_fpn_1x_coco.py:
    lr 0.01 at batch 16 over _base_/schedules/schedule_1x.py, no gradient clipping);
    experiments start from here."""
    c = solov2.base_config()
    c.method = "solo"
    c.model = config_lib.model_section(SOLOConfig)
    c.optim.clip_norm = 0.0
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a SOLO config to seconds on a CPU: solov2.smoke_grid (SOLOv2's smoke less its
    mask-feature fields)."""
    return solov2.smoke_grid(c)
