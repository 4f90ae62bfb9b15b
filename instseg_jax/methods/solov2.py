"""SOLOv2 (Wang et al. 2020, "SOLOv2: Dynamic and Fast Instance Segmentation"): the method
module (methods/__init__.py). Box-free: every cell of an S x S grid per level classifies the
instance whose centre falls in it and predicts a 1x1 kernel that, applied to one shared mask
feature map at stride 4, gives that instance's mask. Defaults follow mmdetection's
configs/solov2/solov2_r50_fpn_1x_coco.py and WXinlong/SOLO; every one is a config field.

Static shapes:
  grid cells     S = sum(num_grids^2) cells over all levels (3872 with the defaults); the
                 category scores are [B, S, C] and the kernels [B, S, E].
  positives      a fixed budget of `positive_slots_per_image` (cell, instance) pairs per training
                 image, a uniform random subset when more pairs are positive; what the budget
                 left out is counted in the metrics (`positive_pairs_over_budget`, `..._fraction`)
                 and its cells still train the category branch.
  candidates     test time ranks the (cell, class) scores, computes the masks of the best
                 `test_candidates`, rescores them by maskness, keeps the best `nms_pre` and runs
                 Matrix NMS on that fixed pool; `detections_per_image` slots with a `valid` flag
                 come out, as canvas masks at stride 4 (the host derives the boxes from them).
  grid extent    each image's grids span its own extent (model.grid_extent "image": its valid
                 region rounded up to 32 pixels) with static shapes: the resize of each FPN level
                 to S x S is one per-image bilinear matrix per axis (dense.bilinear_matrices)
                 over the canvas-sized map, reading only the cells inside the extent, and the
                 targets divide by the extent.

Grid extent: the reference pads each image to a multiple of 32 (Pad size_divisor=32) and its
batch to the batch's largest image; the category and kernel branches resize each level's map of
that padded batch to S x S (WXinlong/SOLO solov2_head.py forward_single, F.interpolate bilinear,
align_corners False) and the targets divide cell positions by the padded input's size
(solov2_target_single's upsampled_size); its test runs one image at a time, so there the grids
span the image padded to 32. grid_extent "image" (the default and the COCO recipe) does that at
training and test alike, with the CoordConv channels (of the grid branches and of the mask
branch's P5) spanning [-1, 1] over the extent; test-time masks are zero outside it (the
reference's map ends there), so neither the area filter, the maskness nor Matrix NMS sees the
canvas beyond. "canvas" spans the whole fixed canvas, padding included (on a 4:3 image in the
1344 x 1344 canvas, about half the level-0 cells lie on padding).

Where two instances claim one cell (their centre regions overlap on a level), the reference's
loop runs over the instances in order and writes the cell's class each time, and appends a mask
target for each: the cell takes the class of the later instance (the higher slot), and both
(cell, instance) pairs train that cell's kernel. The same happens here.

Loss normalisers: the reference divides its focal loss by its GPU's positive cells + 1 and
averages its dice loss over its GPU's (cell, instance) pairs, and DDP averages the GPUs'
gradients; model.loss_normaliser_images (2, the COCO recipe's images per GPU) groups the global
batch so, and 0 normalises over the whole global batch (the nuclei experiments'). mmdetection
3.x's SOLOV2Head divides the summed dice loss by the positive cells instead
(dense_heads/solov2_head.py loss_by_feat, num_pos): the same wherever no two instances share a
cell, 2.3x ours in the loss-parity test's crowded scene (experiments/parity/solov2_loss.py). The
COCO recipe follows WXinlong/SOLO, its reference, which averages over the pairs.

Instances beyond input.max_instances arrive as ignore regions (structures.py): a cell that is
not positive and whose centre lies in one (ops.assign.ignore_mask on the cell centres) is left
out of the focal loss instead of being trained as background. The reference has no ignore
regions; the centre rule matches how SOLO itself assigns cells (by the point where they sit).

Deviations, each with its reason:
  - At training each image's grids span its own padded extent, as at the reference's test; the
    reference's training grids span its padded batch, which depends on the other image on its
    GPU (an image smaller than its batch partner trains on coarser, partly-padding cells than
    it is tested on). The dice loss still covers the whole canvas at stride 4, where the
    reference's covers its padded batch.
  - The network runs on the whole canvas: features at the edge of an extent see the canvas's
    padding beyond it, where the reference's test map ends (convolutions' zero padding).
  - Mass centres are those of the mask's pixel centres (pixel i at i + 0.5, the convention of
    gt_centers); the reference averages integer pixel indices (half a pixel up and left).
  - Test time masks only the `test_candidates` best (cell, class) scores above score_threshold
    (ranked by category score, a static bound on the masks computed: 500 masks of 336 x 336
    at the COCO canvas); the reference masks every score above the threshold. From there the
    order is the reference's: area filter, maskness, the best nms_pre (500) after maskness,
    Matrix NMS. The two agree whenever at most test_candidates scores pass score_threshold.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instseg_jax import config as config_lib
from instseg_jax import ops, structures
from instseg_jax.backbones.fpn import FPN
from instseg_jax.backbones.resnet import normalize
from instseg_jax.methods.detector import (
    DetectorConfig,
    build_backbone,
    loss_normaliser_group,
    smoke_backbone,
)
from instseg_jax.nn.layers import Conv, GroupNorm
from instseg_jax.ops import dense
from instseg_jax.ops.assign import ignore_mask

MASK_STRIDE = 4
# The reference pads every image to a multiple of 32 pixels (its pipelines' Pad size_divisor=32);
# with grid_extent "image" each grid spans the image's valid region padded so.
GRID_SIZE_DIVISIBILITY = 32
# FPN P2..P6: the strides of the maps the grid branches start from.
NATIVE_STRIDES = (4, 8, 16, 32, 64)

INPUTS = structures.Inputs(full_mask_stride=MASK_STRIDE, centers=True)


@dataclasses.dataclass(frozen=True)
class SOLOGridConfig(DetectorConfig):
    """The fields SOLO and SOLOv2 share (grids, assignment, losses, test); each method's Config
    adds its mask branch's (SOLOv2Config here, methods/solo.py's SOLOConfig)."""

    canvas_hw: tuple[int, int] = (1344, 1344)
    fpn_channels: int = 256
    # FPN P2..P6 resampled bilinearly to these strides (P2 halved, P6 doubled to P5's size).
    level_strides: tuple = (8, 8, 16, 32, 32)
    num_grids: tuple = (40, 36, 24, 16, 12)
    # sqrt(box area) in canvas pixels, both ends inclusive; ranges overlap, so an instance may
    # be a positive on two levels.
    scale_ranges: tuple = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    # What each level's S x S grid spans. "image": the image's valid region rounded up to
    # GRID_SIZE_DIVISIBILITY pixels (the reference's test, one image padded to 32), at training
    # and test; "canvas": the whole fixed canvas, padding included.
    grid_extent: str = "image"
    center_scale: float = (
        0.2  # positives: cells of the centre region, box x this, around the mass centre
    )
    head_channels: int = 512
    head_convs: int = 4
    positive_slots_per_image: int = 256
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mask_loss_weight: float = 3.0
    # Images per loss normaliser: the focal loss of each group of this many consecutive images
    # of the global batch is divided by its own positive cells + 1 and the dice loss averaged
    # over its own trained pairs, then the groups are averaged; the reference's normalisers
    # are per GPU, which DDP's gradient average turns into this with its 2 images per GPU
    # (solov2_head.py loss: num_ins, .mean()). 0: one group, the global batch.
    loss_normaliser_images: int = 2
    dice_eps: float = 1e-3  # added to each of the two squared sums of the dice denominator
    score_threshold: float = 0.1
    # Test: masks are computed for the best test_candidates (cell, class) scores (a static
    # bound; the reference masks every score above score_threshold), and after maskness the
    # best nms_pre of them go to Matrix NMS (the reference's nms_pre).
    test_candidates: int = 500
    nms_pre: int = 500
    mask_threshold: float = 0.5
    # A mask needs more than this x its level's stride pixels above mask_threshold at stride 4
    # (the reference's 1: on COCO it drops masks under ~3 px across at stride 4); 0 keeps every
    # non-empty mask, for objects a few pixels across such as nuclei.
    min_mask_area_per_stride: float = 1.0
    matrix_nms_kernel: str = "gaussian"
    matrix_nms_sigma: float = 2.0
    keep_score_threshold: float = 0.05
    detections_per_image: int = 100

    COARSEST_LEVEL = ("P6", 64)

    def __post_init__(self):
        super().__post_init__()
        levels = len(self.num_grids)
        if not (len(self.level_strides) == len(self.scale_ranges) == levels == 5):
            raise config_lib.ConfigValueError(
                "model.level_strides, model.num_grids and model.scale_ranges need one entry per "
                f"FPN level P2..P6 (5), got {len(self.level_strides)}, {levels}, "
                f"{len(self.scale_ranges)}"
            )
        for stride in self.level_strides:
            if self.canvas_hw[0] % stride or self.canvas_hw[1] % stride:
                raise config_lib.ConfigValueError(
                    f"input.canvas_hw {self.canvas_hw} must be divisible by every "
                    f"model.level_strides entry {self.level_strides}"
                )
        config_lib.check_choice(
            "model.matrix_nms_kernel", self.matrix_nms_kernel, ("gaussian", "linear")
        )
        config_lib.check_choice("model.grid_extent", self.grid_extent, ("image", "canvas"))
        for stride in self.level_strides:
            if GRID_SIZE_DIVISIBILITY % stride:
                raise config_lib.ConfigValueError(
                    f"model.level_strides {self.level_strides} must divide the grid's size "
                    f"divisibility {GRID_SIZE_DIVISIBILITY} (an image's padded extent)"
                )
        if self.nms_pre <= 0 or self.test_candidates <= 0:
            raise config_lib.ConfigValueError("model.test_candidates and model.nms_pre must be > 0")
        if self.positive_slots_per_image <= 0:
            raise config_lib.ConfigValueError("model.positive_slots_per_image must be > 0")
        if self.loss_normaliser_images < 0:
            raise config_lib.ConfigValueError(
                "model.loss_normaliser_images must be >= 0 (0: the global batch), got "
                f"{self.loss_normaliser_images}"
            )

    @property
    def num_cells(self) -> int:
        return sum(g * g for g in self.num_grids)

    def cell_centres(self, extent_hw) -> jnp.ndarray:
        """float32[S, 2] (x, y) canvas centre of each grid cell, in the cells' order (level by
        level, row-major), for grids spanning extent_hw = (H, W) (float32[2], the top-left
        H x W of the canvas): cell (i, j) of grid g spans [j W / g, (j + 1) W / g) x [i H / g,
        ...)."""
        extent_hw = jnp.asarray(extent_hw, jnp.float32)
        centres = []
        for g in self.num_grids:
            along = (jnp.arange(g, dtype=jnp.float32) + 0.5) / g
            y, x = jnp.meshgrid(along * extent_hw[0], along * extent_hw[1], indexing="ij")
            centres.append(jnp.stack([x.ravel(), y.ravel()], axis=1))
        return jnp.concatenate(centres)

    def cell_strides(self) -> np.ndarray:
        """float32[S]: the stride of each grid cell's level (the test's minimum mask area)."""
        return np.concatenate(
            [
                np.full(g * g, s, np.float32)
                for g, s in zip(self.num_grids, self.level_strides, strict=True)
            ]
        )


@dataclasses.dataclass(frozen=True)
class SOLOv2Config(SOLOGridConfig):
    mask_feature_channels: int = 128
    mask_channels: int = 256  # E: channels of the mask feature map and length of each kernel


def coordinates(h: int, w: int, extent_hw, stride: int, dtype) -> jnp.ndarray:
    """[B, h, w, 2] CoordConv channels (x, y) of a stride-`stride` map whose image b spans
    extent_hw[b] (float32[B, 2] canvas pixels): each spans [-1, 1] over the extent's
    extent / stride cells (torch.linspace(-1, 1, n)) and keeps rising beyond it."""
    cells = extent_hw / stride  # [B, 2]
    step = 2.0 / jnp.maximum(cells - 1.0, 1.0)
    y = jnp.arange(h, dtype=jnp.float32)[None, :] * step[:, 0:1] - 1.0  # [B, h]
    x = jnp.arange(w, dtype=jnp.float32)[None, :] * step[:, 1:2] - 1.0  # [B, w]
    b = extent_hw.shape[0]
    return jnp.stack(
        [
            jnp.broadcast_to(x[:, None, :], (b, h, w)),
            jnp.broadcast_to(y[:, :, None], (b, h, w)),
        ],
        -1,
    ).astype(dtype)


def grid_extents(image_hw, cfg: SOLOGridConfig) -> jnp.ndarray:
    """float32[B, 2] (h, w) canvas pixels each image's grids span (model.grid_extent): its
    valid region image_hw int32[B, 2] rounded up to GRID_SIZE_DIVISIBILITY (at most the canvas),
    or the canvas."""
    canvas = jnp.asarray(cfg.canvas_hw, jnp.int32)
    if cfg.grid_extent == "canvas":
        return jnp.broadcast_to(canvas, image_hw.shape).astype(jnp.float32)
    unit = GRID_SIZE_DIVISIBILITY
    # At least one unit: an evaluation batch's padding examples have image_hw (0, 0).
    padded = jnp.maximum(-(-image_hw.astype(jnp.int32) // unit) * unit, unit)
    return jnp.minimum(padded, canvas).astype(jnp.float32)


def level_on_grid(feature, extent_hw, native_stride: int, level_stride: int, grid: int):
    """[B, g, g, C + 2]: one FPN level's map feature[B, h, w, C] (stride native_stride over the
    canvas) resampled to its grid over each image's extent extent_hw float32[B, 2], with the
    CoordConv channels (x, y).

    The reference's steps on a map that covers the extent only: the map (its first
    ceil(extent / native_stride) cells) resized bilinearly to extent / level_stride (P2 halved,
    P6 brought to P5's size), CoordConv channels spanning [-1, 1] over that, then both resized
    bilinearly to g x g (torch's align_corners=False, dense.bilinear_matrices). The two resizes
    of the map are one per-image matrix per axis."""
    axes = []
    for axis in (0, 1):
        extent = extent_hw[:, axis]
        native = jnp.ceil(extent / native_stride)
        level = extent / level_stride
        native_len = feature.shape[1 + axis]
        level_len = native_len * native_stride // level_stride
        to_level = dense.bilinear_matrices(native, level, level_len, native_len)
        to_grid = dense.bilinear_matrices(level, jnp.full_like(level, grid), grid, level_len)
        # CoordConv: entry k of the level map sits at -1 + 2 k / (n - 1) (torch.linspace(-1, 1,
        # n); -1 when n = 1), resampled to the grid as the features are.
        ramp = (
            jnp.arange(level_len, dtype=jnp.float32)[None] / jnp.maximum(level - 1.0, 1.0)[:, None]
        )
        coordinate = jnp.einsum("bgl,bl->bg", to_grid, 2.0 * ramp - 1.0)
        axes.append((jnp.einsum("bgl,bln->bgn", to_grid, to_level), coordinate))
    (rows, y), (cols, x) = axes
    on_grid = jnp.einsum(
        "bih,bhwc,bjw->bijc", rows.astype(feature.dtype), feature, cols.astype(feature.dtype)
    )
    b = feature.shape[0]
    coords = jnp.stack(
        [
            jnp.broadcast_to(x[:, None, :], (b, grid, grid)),
            jnp.broadcast_to(y[:, :, None], (b, grid, grid)),
        ],
        -1,
    )
    return jnp.concatenate([on_grid, coords.astype(feature.dtype)], -1)


def _head_init():
    return nn.initializers.normal(0.01)


def conv_norm_stack(x, channels: int, convs: int, dtype):
    """`convs` x (conv3x3 without bias, GroupNorm 32, ReLU): the references' ConvModule stack.
    Called inside a compact method: its layers (conv{i}, norm{i}) are the caller's own."""
    for i in range(convs):
        x = Conv(
            channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            dtype=dtype,
            kernel_init=_head_init(),
            name=f"conv{i}",
        )(x)
        x = nn.relu(GroupNorm(32, dtype, name=f"norm{i}")(x))
    return x


class Tower(nn.Module):
    """`convs` x (conv3x3 without bias, GroupNorm 32, ReLU), then a conv3x3 predictor."""

    channels: int
    convs: int
    outputs: int
    bias_init: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = conv_norm_stack(x, self.channels, self.convs, self.dtype)
        return Conv(
            self.outputs,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            kernel_init=_head_init(),
            bias_init=nn.initializers.constant(self.bias_init),
            name="predict",
        )(x)


class MaskFeatureBranch(nn.Module):
    """SOLOv2's unified mask feature: P2..P5 each brought to stride 4 (level i: i rounds of
    conv3x3-GN-ReLU and 2x bilinear upsampling; P2 one conv; CoordConv channels on P5), summed,
    then conv1x1-GN-ReLU to E channels: [B, H/4, W/4, E]."""

    channels: int
    outputs: int
    dtype: jnp.dtype = jnp.float32

    def conv_norm(self, x, features, kernel, name):
        pad = kernel // 2
        x = Conv(
            features,
            (kernel, kernel),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_head_init(),
            name=f"{name}_conv",
        )(x)
        return nn.relu(GroupNorm(32, self.dtype, name=f"{name}_norm")(x))

    @nn.compact
    def __call__(self, features: dict, extent_hw) -> jnp.ndarray:
        total = None
        for level in range(4):
            x = features[f"p{level + 2}"]
            if level == 3:  # P5, stride 32: its CoordConv channels span each image's extent
                x = jnp.concatenate(
                    [x, coordinates(*x.shape[1:3], extent_hw, NATIVE_STRIDES[3], x.dtype)], -1
                )
            if level == 0:
                x = self.conv_norm(x, self.channels, 3, "level0")
            for step in range(level):
                x = self.conv_norm(x, self.channels, 3, f"level{level}_{step}")
                x = dense.resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
            total = x if total is None else total + x
        return self.conv_norm(total, self.outputs, 1, "fuse")


class SOLOv2(nn.Module):
    cfg: SOLOv2Config

    def setup(self):
        cfg = self.cfg
        self.backbone = build_backbone(cfg)
        self.fpn = FPN(cfg.fpn_channels, cfg.dtype)
        prior = ops.probability_logit(0.01)
        self.category_tower = Tower(
            cfg.head_channels, cfg.head_convs, cfg.num_classes, prior, cfg.dtype
        )
        self.kernel_tower = Tower(
            cfg.head_channels, cfg.head_convs, cfg.mask_channels, 0.0, cfg.dtype
        )
        self.mask_branch = MaskFeatureBranch(
            cfg.mask_feature_channels, cfg.mask_channels, cfg.dtype
        )

    def predict(self, image, extent_hw):
        """(category logits [B, S, C], kernels [B, S, E], mask features [B, H/4, W/4, E]) of
        images [B, H, W, 3] in 0-255 RGB whose grids span extent_hw float32[B, 2]
        (grid_extents); cells run level by level, row-major within a grid."""
        return self.heads(self.fpn(self.backbone(normalize(image, self.cfg.dtype))), extent_hw)

    def heads(self, features: dict, extent_hw):
        """predict's outputs from the FPN maps features["p2".."p6"] [B, h, w, fpn_channels]
        (the head alone: the mmdetection head-parameter parity, weights/mmdet_solov2_head.py,
        runs it on given maps)."""
        cfg = self.cfg
        b = features["p2"].shape[0]
        logits, kernels = [], []
        for level, (stride, grid) in enumerate(zip(cfg.level_strides, cfg.num_grids, strict=True)):
            on_grid = level_on_grid(
                features[f"p{level + 2}"], extent_hw, NATIVE_STRIDES[level], stride, grid
            )
            kernels.append(self.kernel_tower(on_grid).reshape(b, grid * grid, -1))
            logits.append(self.category_tower(on_grid[..., :-2]).reshape(b, grid * grid, -1))
        mask_features = self.mask_branch(features, extent_hw)
        return (
            jnp.concatenate(logits, 1).astype(jnp.float32),
            jnp.concatenate(kernels, 1),
            mask_features,
        )

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        cfg = self.cfg
        extent_hw = grid_extents(batch["image_hw"], cfg)
        logits, kernels, mask_features = self.predict(batch["image"], extent_hw)
        outputs = {"category_logits": logits}
        if not train:
            outputs["detections"] = detect(logits, kernels, mask_features, batch, cfg, extent_hw)
            return outputs
        if key is None:
            raise ValueError("training needs a key for the choice of positive slots")
        targets = batch_targets(grid_targets, batch, extent_hw, cfg, key)
        slot_kernels = jnp.take_along_axis(kernels, targets["slot_cell"][..., None], axis=1)
        outputs["mask_logits"] = dense.dynamic_masks(mask_features, slot_kernels).astype(
            jnp.float32
        )  # [B, P, H/4, W/4]
        outputs["mask_targets"] = jnp.take_along_axis(
            batch["gt_full_masks"], targets["slot_instance"][..., None, None], axis=1
        )
        outputs["targets"] = targets
        return outputs


def batch_targets(image_targets, batch: dict, extent_hw, cfg: SOLOGridConfig, key) -> dict:
    """image_targets (grid_targets, or solo.cell_targets: one image's targets from the same
    arguments) over the batch's images, out of the gradient; extent_hw float32[B, 2]
    (grid_extents), key split into one per image."""
    return jax.lax.stop_gradient(
        jax.vmap(
            lambda extent, boxes, classes, valid, centers, masks, k, ignore, ignore_ok: (
                image_targets(
                    boxes,
                    classes,
                    valid,
                    centers,
                    masks.any(axis=(1, 2)),
                    cfg,
                    k,
                    ignore,
                    ignore_ok,
                    extent,
                )
            )
        )(
            extent_hw,
            batch["gt_boxes"],
            batch["gt_classes"],
            batch["gt_valid"],
            batch["gt_centers"],
            batch["gt_full_masks"],
            jax.random.split(key, batch["image"].shape[0]),
            batch.get("ignore_boxes"),
            batch.get("ignore_valid"),
        )
    )


def grid_targets(
    gt_boxes,
    gt_classes,
    gt_valid,
    gt_centers,
    gt_nonempty,
    cfg: SOLOGridConfig,
    key,
    ignore_boxes=None,
    ignore_valid=None,
    extent_hw=None,
):
    """One image's SOLO targets (the reference's rules; module docstring for the overlaps).

    gt_boxes float32[N, 4] canvas xyxy, gt_classes int32[N], gt_valid bool[N],
    gt_centers float32[N, 2] (x, y) canvas mass centres, gt_nonempty bool[N] (mask not empty);
    optional ignore_boxes float32[I, 4] canvas xyxy and ignore_valid bool[I] (Batch's ignore
    regions); extent_hw float32[2]: the (H, W) the grids span (grid_extents; the canvas when
    left out).

    An instance is on level l when lo_l <= sqrt(w h) <= hi_l. On a level of grid g over the
    extent H x W, the cell of a point is (floor(y / H g), floor(x / W g)) (the reference's
    (y / H) // (1 / g), H x W its padded input: WXinlong/SOLO solov2_head.py
    solov2_target_single's upsampled_size); its positives are the cells of the centre region
    (mass centre +- half the box x center_scale) clipped to the 3x3 cells around the centre's
    cell.

    Returns a dict: cell_labels int32[S] (class, or C for background), positive bool[S],
    ignored bool[S] (not positive, centre in an ignore region: out of the focal loss),
    slot_cell / slot_instance int32[P], slot_valid bool[P] (P = positive_slots_per_image; a
    random subset of the positive (cell, instance) pairs when they overflow), pairs int32 (all
    positive pairs) and overflow int32 (pairs without a slot).
    """
    assigned = cell_assignment(
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
    cells, instances, valid = assigned["pair_cells"], assigned["pair_instances"], assigned["pairs"]
    chosen, slot_valid, overflow = dense.budgeted_select(valid, cfg.positive_slots_per_image, key)
    return {
        "cell_labels": assigned["cell_labels"],
        "positive": assigned["positive"],
        "ignored": assigned["ignored"],
        "slot_cell": jnp.where(slot_valid, cells[chosen], 0),
        "slot_instance": jnp.where(slot_valid, instances[chosen], 0),
        "slot_valid": slot_valid,
        "pairs": valid.sum().astype(jnp.int32),
        "overflow": overflow,
    }


def cell_assignment(
    gt_boxes,
    gt_classes,
    gt_valid,
    gt_centers,
    gt_nonempty,
    cfg: SOLOGridConfig,
    ignore_boxes=None,
    ignore_valid=None,
    extent_hw=None,
):
    """One image's cells and (cell, instance) pairs by SOLO's rules (grid_targets' docstring;
    shared with methods/solo.py): the inputs of grid_targets but its key.

    Returns a dict: cell_labels int32[S] (class, or C for background), positive bool[S],
    ignored bool[S], cell_instance int32[S] (the instance whose class a positive cell takes: the
    later instance where several claim it; 0 on other cells), and the positive pairs as
    pair_cells / pair_instances int32[9 L N] with pairs bool[9 L N] (level by level, then the
    3 x 3 neighbourhood of each instance's centre cell)."""
    c = cfg.num_classes
    if extent_hw is None:
        extent_hw = jnp.asarray(cfg.canvas_hw, jnp.float32)
    extent_hw = jnp.asarray(extent_hw, jnp.float32)
    h_extent, w_extent = extent_hw[0], extent_hw[1]
    w = jnp.maximum(gt_boxes[:, 2] - gt_boxes[:, 0], 0.0)
    h = jnp.maximum(gt_boxes[:, 3] - gt_boxes[:, 1], 0.0)
    area = jnp.sqrt(w * h)
    cx, cy = gt_centers[:, 0], gt_centers[:, 1]
    half_w = 0.5 * w * cfg.center_scale
    half_h = 0.5 * h * cfg.center_scale
    usable = gt_valid & gt_nonempty
    cells, instances, valid = [], [], []
    offset = 0
    n = gt_boxes.shape[0]
    for grid, (lo, hi) in zip(cfg.num_grids, cfg.scale_ranges, strict=True):
        unit = 1.0 / grid

        def cell_of(coordinate, size, unit=unit):
            return jnp.floor_divide(coordinate / size, unit).astype(jnp.int32)

        on_level = usable & (area >= lo) & (area <= hi)
        centre_y, centre_x = cell_of(cy, h_extent), cell_of(cx, w_extent)
        top = jnp.maximum(jnp.maximum(cell_of(cy - half_h, h_extent), 0), centre_y - 1)
        down = jnp.minimum(jnp.minimum(cell_of(cy + half_h, h_extent), grid - 1), centre_y + 1)
        left = jnp.maximum(jnp.maximum(cell_of(cx - half_w, w_extent), 0), centre_x - 1)
        right = jnp.minimum(jnp.minimum(cell_of(cx + half_w, w_extent), grid - 1), centre_x + 1)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                i, j = centre_y + dy, centre_x + dx
                inside = (i >= top) & (i <= down) & (j >= left) & (j <= right)
                cells.append(offset + jnp.clip(i, 0, grid - 1) * grid + jnp.clip(j, 0, grid - 1))
                instances.append(jnp.arange(n, dtype=jnp.int32))
                valid.append(on_level & inside)
        offset += grid * grid
    cells = jnp.concatenate(cells)  # [9 L N] pairs, level by level
    instances = jnp.concatenate(instances)
    valid = jnp.concatenate(valid)
    # The later instance's class wins a shared cell: the largest instance slot + 1 per cell.
    winner = jnp.zeros((offset,), jnp.int32).at[cells].max(jnp.where(valid, instances + 1, 0))
    positive = winner > 0
    cell_labels = jnp.where(positive, gt_classes[jnp.maximum(winner - 1, 0)], c)
    ignored = jnp.zeros_like(positive)
    if ignore_boxes is not None:
        centres = jnp.tile(cfg.cell_centres(extent_hw), (1, 2))  # [S, 4] points (x, y, x, y)
        ignored = ignore_mask(centres, ignore_boxes, ignore_valid) & ~positive
    return {
        "cell_labels": cell_labels.astype(jnp.int32),
        "positive": positive,
        "ignored": ignored,
        "cell_instance": jnp.maximum(winner - 1, 0),
        "pair_cells": cells,
        "pair_instances": instances,
        "pairs": valid,
    }


def points_nms(scores: jnp.ndarray) -> jnp.ndarray:
    """The reference's 2x2 peak filter on a grid of scores [B, g, g, C]: a cell keeps its score
    only when no cell above, left or above-left of it scores higher."""
    padded = jnp.pad(scores, ((0, 0), (1, 0), (1, 0), (0, 0)), constant_values=-jnp.inf)
    peak = jnp.maximum(
        jnp.maximum(padded[:, 1:, 1:], padded[:, :-1, 1:]),
        jnp.maximum(padded[:, 1:, :-1], padded[:, :-1, :-1]),
    )
    return jnp.where(peak == scores, scores, 0.0)


def detect(logits, kernels, mask_features, batch, cfg: SOLOv2Config, extent_hw=None) -> dict:
    """Detections with canvas masks at stride 4 (structures.py), K = detections_per_image.

    Per image: category probabilities through the 2x2 peak filter; the best test_candidates
    (cell, class) scores above score_threshold get their masks (sigmoid of kernel x features),
    zero outside the image's extent extent_hw float32[B, 2] (grid_extents; the reference's map
    ends there; no limit when left out); masks of no more pixels above mask_threshold than their
    level's stride (x min_mask_area_per_stride) are dropped; score x maskness (mean probability
    over the mask's pixels); the best nms_pre of those to Matrix NMS on the binary masks; scores
    >= keep_score_threshold kept, the best K in descending order.
    """
    del batch

    def candidate_masks(cells, image_kernels, features):
        return jax.nn.sigmoid(
            dense.dynamic_masks(features[None], image_kernels[cells][None])[0].astype(jnp.float32)
        )

    return detect_from_masks(
        peak_filtered_scores(logits, cfg),
        candidate_masks,
        (kernels, mask_features),
        mask_features.shape[1:3],
        cfg,
        extent_hw,
    )


def peak_filtered_scores(logits, cfg: SOLOGridConfig) -> jnp.ndarray:
    """float32[B, S C]: the category probabilities of logits [B, S, C] through each level's 2x2
    peak filter (points_nms), flattened (cell, class) so that index // C is the cell."""
    b, s, c = logits.shape
    probs = jax.nn.sigmoid(logits)
    filtered, start = [], 0
    for grid in cfg.num_grids:
        level = probs[:, start : start + grid * grid].reshape(b, grid, grid, c)
        filtered.append(points_nms(level).reshape(b, grid * grid, c))
        start += grid * grid
    return jnp.concatenate(filtered, 1).reshape(b, s * c)


def detect_from_masks(
    scores, candidate_masks, mask_inputs, mask_hw, cfg: SOLOGridConfig, extent_hw=None
) -> dict:
    """detect's test procedure from the (cell, class) scores float32[B, S C]
    (peak_filtered_scores) on, for any mask branch (shared with methods/solo.py):
    candidate_masks(cells int32[Q], *one image's mask_inputs) -> float32[Q, h, w] mask
    probabilities at stride 4 of those cells; mask_inputs a tuple of [B, ...] arrays; mask_hw
    (h, w) their static size."""
    b = scores.shape[0]
    c = cfg.num_classes
    q = min(cfg.test_candidates, scores.shape[1])
    k = cfg.detections_per_image
    cell_strides = jnp.asarray(cfg.cell_strides())
    h, w = mask_hw
    if extent_hw is None:
        extent_hw = jnp.broadcast_to(jnp.asarray([h, w], jnp.float32) * MASK_STRIDE, (b, 2))
    cells_hw = extent_hw / MASK_STRIDE
    inside = (jnp.arange(h)[None, :, None] < cells_hw[:, 0, None, None]) & (
        jnp.arange(w)[None, None, :] < cells_hw[:, 1, None, None]
    )  # [B, h, w]

    def one_image(image_scores, image_inside, *image_mask_inputs):
        top, index = ops.top_k(image_scores, q)
        cell, cls = index // c, (index % c).astype(jnp.int32)
        masks = candidate_masks(cell, *image_mask_inputs)  # [Q, h, w]
        masks = jnp.where(image_inside, masks, 0.0)
        binary = masks > cfg.mask_threshold
        area = binary.sum(axis=(1, 2)).astype(jnp.float32)
        min_area = jnp.maximum(cfg.min_mask_area_per_stride * cell_strides[cell], 0.0)
        valid = (top > cfg.score_threshold) & (area > min_area)
        maskness = (masks * binary).sum(axis=(1, 2)) / jnp.maximum(area, 1.0)
        # The reference's nms_pre: the best rescored candidates go on (valid ones score > 0).
        rescored, pre = ops.top_k(jnp.where(valid, top * maskness, -1.0), min(cfg.nms_pre, q))
        masks, binary, cls, valid = masks[pre], binary[pre], cls[pre], valid[pre]
        rescored = jnp.where(valid, rescored, 0.0)
        decayed = ops.matrix_nms(
            binary & valid[:, None, None],
            cls,
            rescored,
            cfg.matrix_nms_kernel,
            cfg.matrix_nms_sigma,
        )
        kept = valid & (decayed >= cfg.keep_score_threshold)
        best, slot = ops.top_k(jnp.where(kept, decayed, -1.0), min(k, rescored.shape[0]))
        slot_valid = best >= 0
        pad = k - slot.shape[0]
        return (
            jnp.pad(jnp.where(slot_valid, best, 0.0), (0, pad)),
            jnp.pad(jnp.where(slot_valid, cls[slot], 0), (0, pad)),
            jnp.pad(slot_valid, (0, pad)),
            jnp.pad(
                jnp.where(slot_valid[:, None, None], masks[slot], 0.0),
                ((0, pad), (0, 0), (0, 0)),
            ),
        )

    det_scores, det_classes, det_valid, det_masks = jax.vmap(one_image)(
        scores, inside, *mask_inputs
    )
    return {
        "scores": det_scores,
        "classes": det_classes,
        "valid": det_valid,
        "canvas_masks": det_masks,
    }


def category_loss(logits, targets: dict, cfg: SOLOGridConfig, group: int) -> jnp.ndarray:
    """Focal loss of the category logits [B, S, C] over every cell but the ignored ones, each
    group of `group` images divided by its positive cells + 1 (shared with methods/solo.py)."""
    # Background cells (label C) get all-zero rows.
    one_hot = jax.nn.one_hot(targets["cell_labels"], cfg.num_classes, dtype=logits.dtype)
    cls_scale = ops.group_normalizer_scale(targets["positive"].sum(axis=1), group, offset=1.0)
    return ops.sigmoid_focal_loss(
        logits,
        one_hot,
        cfg.focal_alpha,
        cfg.focal_gamma,
        weights=(~targets["ignored"] * cls_scale[:, None])[..., None],  # [B, S, 1]
    )


def loss_fn(outputs: dict, batch: dict, cfg: SOLOv2Config) -> tuple[jnp.ndarray, dict]:
    """Focal loss over every grid cell but the ignored ones / (positive cells + 1) and dice
    loss (squared, weight 3) averaged over the trained (cell, instance) pairs, each within a
    group of model.loss_normaliser_images images, then averaged over the groups."""
    del batch  # every target was built inside the model
    targets = outputs["targets"]
    b, p = targets["slot_valid"].shape
    group = loss_normaliser_group(cfg.loss_normaliser_images, b)
    loss_cls = category_loss(outputs["category_logits"], targets, cfg, group)
    num_positive = targets["positive"].sum().astype(jnp.float32)
    mask_scale = ops.group_normalizer_scale(targets["slot_valid"].sum(axis=1), group)
    slot_valid = (targets["slot_valid"] * mask_scale[:, None]).reshape(b * p)
    mask_logits = outputs["mask_logits"].reshape((b * p,) + outputs["mask_logits"].shape[2:])
    mask_targets = outputs["mask_targets"].reshape(mask_logits.shape)
    loss_mask = cfg.mask_loss_weight * ops.dice_loss(
        mask_logits,
        mask_targets,
        weights=slot_valid,
        smooth=0.0,
        squared=True,
        eps=2.0 * cfg.dice_eps,
    )
    pairs = targets["pairs"].sum().astype(jnp.float32)
    over = targets["overflow"].sum().astype(jnp.float32)
    metrics = {
        "loss_cls": loss_cls,
        "loss_mask": loss_mask,
        "positive_cells": num_positive / b,
        "positive_pairs": pairs / b,
        "positive_pairs_over_budget": over / b,
        "positive_pairs_over_budget_fraction": over / jnp.maximum(pairs, 1.0),
    }
    return loss_cls + loss_mask, metrics


# ----------------------------------------------------------------------------- method interface

Config = SOLOv2Config
Model = SOLOv2


def base_config() -> ml_collections.ConfigDict:
    """mmdetection's SOLOv2 R50-FPN 1x COCO settings; experiments start from here."""
    c = config_lib.base()
    c.method = "solov2"
    c.model = config_lib.model_section(SOLOv2Config)
    # mmdetection's 1x schedule for SOLOv2: lr 0.01 at batch 16, 12 epochs (decays at 8 and
    # 11), 500 linear warmup iterations from lr x 0.001 (in steps of 7330 iterations/epoch).
    c.optim.lr = 0.01
    c.schedule.total_steps = 90_000
    c.schedule.warmup_steps = 500
    c.schedule.steps = (60_000, 82_500)
    # Both implementations clip the gradient's global norm at 35 (WXinlong/SOLO's
    # solov2_r50_fpn_8gpu_1x.py grad_clip, mmdetection's solov2_r50_fpn_1x_coco.py clip_grad).
    c.optim.clip_norm = 35.0
    return c


def object_sizes_covered(model: ml_collections.ConfigDict) -> tuple[str, float, float]:
    """(the field, smallest and largest object side, sqrt of box area in canvas pixels, that
    some level's scale range takes: an object outside every range has no target) (method
    interface, optional)."""
    return (
        "model.scale_ranges",
        float(min(lo for lo, _ in model.scale_ranges)),
        float(max(hi for _, hi in model.scale_ranges)),
    )


def smoke_grid(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The smoke settings of SOLOGridConfig's fields (SOLOv2's and SOLO's smoke): synthetic
    scenes, ResNet-18 of width 16, a 128x128 canvas, narrow one-conv towers, small grids."""
    c = config_lib.smoke_common(c)
    m = c.model
    smoke_backbone(m)
    m.fpn_channels = 32
    m.num_grids = (12, 10, 8, 6, 4)
    m.scale_ranges = ((1, 32), (16, 64), (32, 128), (64, 256), (128, 512))
    m.head_channels = 32
    m.head_convs = 1
    m.positive_slots_per_image = 32
    m.test_candidates = 100
    m.min_mask_area_per_stride = 0.0  # shapes from 8 px: 4 cells at stride 4
    m.detections_per_image = 50
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a SOLOv2 config to seconds on a CPU: smoke_grid, narrow mask features."""
    c = smoke_grid(c)
    c.model.mask_feature_channels = 32
    c.model.mask_channels = 32
    return c
