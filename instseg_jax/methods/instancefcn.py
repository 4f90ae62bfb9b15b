"""InstanceFCN (Dai, He, Li, Ren, Sun, "Instance-sensitive Fully Convolutional Networks",
ECCV 2016, arXiv 1603.08678): the method module (methods/__init__.py). There is no official
code; every rule below is written from the paper, cited by section and equation.

What it is (paper section 3 and 4, Fig. 3):
  - a fully convolutional trunk; on its feature map two branches. The instance branch, a 1x1
    512-d convolution with ReLU and a 3x3 convolution, gives k x k instance-sensitive score maps
    (k^2 channels, k = 5), each a pixel-wise classifier of one relative position (i, j) of a
    k x k grid on an instance (section 3, "Instance-sensitive score maps").
  - the assembling module (section 3, "Instance assembling module"): the mask of an m x m
    sliding window is the k x k grid of its sub-windows, sub-window (i, j) (rows and columns
    [i m / k, (i + 1) m / k)) copying map (i, j) at the same cells. A static gather here
    (`assemble_windows`): no parameter, one index per window cell.
  - the objectness branch (section 4): a 3x3 512-d convolution with ReLU and a 1x1 convolution,
    a per-position logistic classifier of the window centred there.
  - training (section 4, eq. 1): 256 windows sampled per image, positives : negatives 1 : 1,
    loss = logistic objectness over the sampled windows + per-pixel logistic loss of the
    assembled masks against the ground-truth instance in the window. Positives and negatives
    are DeepMask's (the paper cites its definition; Pinheiro et al. 2015 section 3.1): a window
    is positive for an object centred in it (offset within +-16/224 of the window side per
    axis) whose larger side is the canonical 128/224 of the window side within a factor
    2^(+-1/4); negative when every object is off centre by at least 32/224 of the side or off
    scale by at least a factor 2; the windows in between are not sampled (`window_labels`).
  - inference: dense windows on every position and scale, ranked by objectness; masks
    assembled for the best, non-maximum suppression, a fixed number K kept (`detect`).

Deviations, each declared:
  - Trunk: a ResNet (the library's; ImageNet ResNet-50 in the COCO recipe) with an FPN, its
    windows on the pyramid levels model.levels; the paper has VGG-16 with pool4's stride
    removed and conv5 dilated ("hole algorithm"), one feature map at stride 8, and reaches other
    object scales with an image pyramid. The library's ResNet has no dilation; FPN P3 is the
    paper's stride 8, and each coarser level stands for one octave of the pyramid (one trunk
    pass instead of one per scale). Half-octave steps (DeepMask's pyramid steps 2^(1/2), whose
    +-1/4 scale tolerance they tile) come from several window sides per level
    (model.window_cells, (21, 15) cells: the paper's m = 21 and 21 / sqrt 2); every side shares
    the same k^2 score maps, each with its own objectness output.
  - Classes: the paper scores class-agnostic windows (one objectness logit). Here the
    objectness output has one logistic logit per class (per window side): with one class
    (nuclei) it is exactly the paper's; with C classes a positive window's target is its
    instance's class (a class head on top, trained with the same logistic loss) and the
    detection takes the best class's probability and that class. The COCO recipe therefore
    detects 80 classes, evaluated with COCO's per-class segm AP; the paper's figure is
    class-agnostic segment-proposal AR, which this library's evaluation does not compute.
  - Loss normalisers: eq. (1) sums both terms with unit weights and no normaliser; here the
    objectness term is the mean over the sampled windows of the global batch (summed over
    classes) and the mask term the mean over the sampled positives of each one's mean per-cell
    loss (DeepMask's normalisation of its mask loss), each with a weight (model.
    objectness_loss_weight, model.mask_loss_weight, both 1). The mask term trains positives
    only: a negative window has no ground-truth instance S*.
  - Sampling: up to 128 positives (positive_fraction x windows_per_image) and negatives to fill
    the 256 (detectron2's balanced sampler), since an image may have fewer than 128 positive
    windows; which windows are positive follows DeepMask's rule above, the matched instance of a
    window positive for several is the one whose centre is nearest (lowest slot on ties).
  - Ground truth: the instance's box centre (DeepMask's) and larger box side; its mask at a
    window cell is the mean of the stride-s0 full-mask cells (s0 = the finest level's stride)
    that the cell covers, >= 0.5 (DeepMask thresholds its resized crops at 0.5). Window cells
    beyond the feature map (windows at the border) take no mask loss and probability 0 at test.
    Windows whose centre lies outside the image's valid region, or (not positive) in an ignore
    region (structures.py), are never sampled.
  - Inference: the best model.pre_nms_topk windows by objectness logit (probability >
    score_threshold, centre in the image) are assembled; NMS runs on the boxes of their
    binarised masks (box IoU > model.nms_threshold suppresses), keeping K =
    detections_per_image. The Detections carry box-relative masks of side mask_side
    (structures.py) whose boxes are the kept windows within the image (each mask resampled
    bilinearly from its window to that part): the boxes are windows, not the objects' tight
    boxes, so COCO's bbox figures measure windows; the segm figures are the method's.
  - Scales: the training images come at input.short_side's scales (one drawn per image), the
    test at one scale; the pyramid of scales is the FPN's (above).

Published figure: the paper's MS COCO segment-proposal table (first 5k val images, class-agnostic,
VGG-16): AR@10 16.6, AR@100 31.7, AR@1000 39.2 (DeepMask 12.6 / 24.5 / 33.1), quoted without the
paper at hand: check them against its table. This library evaluates per-class COCO AP, not that
AR (above); experiments/instancefcn_r50_coco.py is the paper's settings and has not been run.

Static shapes: T windows (levels x sides x positions, `window_layout`), a [T, N] label matrix
per image, exactly windows_per_image sampled windows per image (a seeded key inside the jitted
step), pre_nms_topk assembled candidates and K detection slots with a `valid` flag at test.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instseg_jax import config as config_lib
from instseg_jax import ops, structures
from instseg_jax.backbones.fpn import FPN
from instseg_jax.backbones.resnet import normalize
from instseg_jax.methods.detector import DetectorConfig, build_backbone, smoke_backbone
from instseg_jax.nn.layers import Conv
from instseg_jax.ops.assign import ignore_mask
from instseg_jax.ops.dense import bilinear_matrix

# DeepMask's canonical positive (Pinheiro et al. 2015, section 3.1): on a 224-pixel input, an
# object whose larger side is 128 px, centred within +-16 px; negatives at least +-32 px or a
# factor 2 away. As fractions of the window side.
CANONICAL_OBJECT = 128 / 224
POSITIVE_SHIFT = 16 / 224
NEGATIVE_SHIFT = 32 / 224


@dataclasses.dataclass(frozen=True)
class InstanceFCNConfig(DetectorConfig):
    canvas_hw: tuple[int, int] = (1024, 1024)
    fpn_channels: int = 256
    # FPN levels the windows slide on (2: P2 at stride 4, ..., 6: P6 at stride 64). P3 is the
    # paper's stride 8; each further level one octave of its image pyramid.
    levels: tuple = (3, 4, 5, 6)
    # Window sides m in cells of each level (odd: a window is centred on a cell). The paper's
    # m = 21; 15 ~ 21 / sqrt 2 gives the half-octave steps of DeepMask's pyramid.
    window_cells: tuple = (21, 15)
    grid_k: int = 5  # k: the k x k relative positions (the paper's best, its Table 1)
    branch_channels: int = 512  # the 512-d convolutions of both branches (section 4)
    # DeepMask's window rules as fractions of the window side (module constants' values).
    canonical_object: float = CANONICAL_OBJECT
    positive_shift: float = POSITIVE_SHIFT
    positive_scale_log2: float = 0.25
    negative_shift: float = NEGATIVE_SHIFT
    negative_scale_log2: float = 1.0
    windows_per_image: int = 256  # section 4: 256 sampled windows
    positive_fraction: float = 0.5  # section 4: positives : negatives 1 : 1
    objectness_loss_weight: float = 1.0
    mask_loss_weight: float = 1.0
    # Test: windows assembled (the best by objectness), NMS on their masks' boxes, K kept.
    # Many windows score high around each object (neighbour positions and sides, and the
    # never-sampled band between positives and negatives): a small budget misses objects.
    pre_nms_topk: int = 6000
    nms_threshold: float = 0.7
    score_threshold: float = 0.0
    detections_per_image: int = 100
    mask_side: int = 0  # M of the box-relative masks; 0: the largest window side

    COARSEST_LEVEL = ("P6", 64)

    def __post_init__(self):
        super().__post_init__()
        if not self.levels or any(level not in (2, 3, 4, 5, 6) for level in self.levels):
            raise config_lib.ConfigValueError(
                f"model.levels must name FPN levels among 2..6 (P2..P6), got {self.levels}"
            )
        if any(m % 2 == 0 or m < self.grid_k for m in self.window_cells) or not (self.window_cells):
            raise config_lib.ConfigValueError(
                f"model.window_cells {self.window_cells}: each window side must be odd (centred "
                f"on a cell) and at least model.grid_k = {self.grid_k} cells"
            )
        if self.windows_per_image <= 0 or not 0.0 < self.positive_fraction <= 1.0:
            raise config_lib.ConfigValueError(
                "model.windows_per_image must be > 0 and model.positive_fraction in (0, 1]"
            )
        if self.pre_nms_topk <= 0 or self.detections_per_image <= 0:
            raise config_lib.ConfigValueError(
                "model.pre_nms_topk and model.detections_per_image must be > 0"
            )
        if not 0.0 <= self.score_threshold <= 1.0:  # compared as a logit in detect
            raise config_lib.ConfigValueError(
                f"model.score_threshold must be a probability in [0, 1], got {self.score_threshold}"
            )

    @property
    def output_side(self) -> int:
        return self.mask_side or max(self.window_cells)


# Ground-truth masks come at the stride of the finest level a recipe may use (P2); the targets
# pool them to each level's stride (`pooled_mask_table`).
MASK_STRIDE = 4
INPUTS = structures.Inputs(full_mask_stride=MASK_STRIDE)


@functools.lru_cache(maxsize=16)
def window_layout(canvas_hw: tuple, levels: tuple, window_cells: tuple) -> dict:
    """Every sliding window of the canvas, in the order (level, side, row, column): a dict of
    NumPy arrays [T] level (index into levels), side (index into window_cells), row, col (the
    centre cell on its level), stride, centre_x, centre_y (canvas pixels: the cell's centre),
    extent (the window side in canvas pixels), and the static per-level map shapes
    level_hw [(H_l, W_l)] with each level's offset into the images' flat score-map table."""
    parts = {k: [] for k in ("level", "side", "row", "col", "stride")}
    level_hw, offsets, offset = [], [], 0
    for li, level in enumerate(levels):
        stride = 2**level
        h, w = canvas_hw[0] // stride, canvas_hw[1] // stride
        level_hw.append((h, w))
        offsets.append(offset)
        offset += h * w
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        for si in range(len(window_cells)):
            parts["level"].append(np.full(h * w, li))
            parts["side"].append(np.full(h * w, si))
            parts["row"].append(rows.ravel())
            parts["col"].append(cols.ravel())
            parts["stride"].append(np.full(h * w, stride))
    layout = {k: np.concatenate(v).astype(np.int32) for k, v in parts.items()}
    layout["centre_x"] = ((layout["col"] + 0.5) * layout["stride"]).astype(np.float32)
    layout["centre_y"] = ((layout["row"] + 0.5) * layout["stride"]).astype(np.float32)
    cells = np.asarray(window_cells, np.int32)[layout["side"]]
    layout["cells"] = cells
    layout["extent"] = (cells * layout["stride"]).astype(np.float32)
    layout["level_hw"] = tuple(level_hw)
    layout["level_offset"] = np.asarray(offsets, np.int32)
    layout["table_size"] = offset
    return layout


def window_boxes(layout: dict) -> np.ndarray:
    """float32[T, 4] canvas xyxy of every window."""
    half = layout["extent"] / 2
    cx, cy = layout["centre_x"], layout["centre_y"]
    return np.stack([cx - half, cy - half, cx + half, cy + half], 1).astype(np.float32)


def window_cells_of(row, col, level, m: int, level_hw, level_offset):
    """The cells of m x m windows centred on (row, col) int32[W] of levels level int32[W]:
    (flat index int32[W, m, m] into the images' flat per-level table, clamped into its map,
    inside bool[W, m, m]: the cell lies on the map)."""
    r = (m - 1) // 2
    steps = jnp.arange(m, dtype=jnp.int32)
    heights = jnp.asarray([hw[0] for hw in level_hw], jnp.int32)[level]
    widths = jnp.asarray([hw[1] for hw in level_hw], jnp.int32)[level]
    rows = row[:, None] - r + steps[None]  # [W, m]
    cols = col[:, None] - r + steps[None]
    row_in = (rows >= 0) & (rows < heights[:, None])
    col_in = (cols >= 0) & (cols < widths[:, None])
    inside = row_in[:, :, None] & col_in[:, None, :]
    rows = jnp.clip(rows, 0, heights[:, None] - 1)
    cols = jnp.clip(cols, 0, widths[:, None] - 1)
    flat = (
        jnp.asarray(level_offset)[level][:, None, None]
        + rows[:, :, None] * widths[:, None, None]
        + cols[:, None, :]
    )
    return flat, inside


def relative_position_channels(m: int, k: int) -> np.ndarray:
    """int32[m, m]: the score map each cell of an m x m window copies (section 3): cell (a, b)
    lies in sub-window (a k // m, b k // m) of the k x k grid, map index i k + j."""
    sub = np.arange(m) * k // m
    return (sub[:, None] * k + sub[None, :]).astype(np.int32)


def assemble_windows(score_table, row, col, level, m: int, k: int, level_hw, level_offset):
    """The assembling module (section 3, Fig. 2): m x m masks of windows centred on (row, col)
    int32[W] of levels level int32[W], from one image's flat score-map table
    score_table[S, k^2] (the levels' maps [H_l, W_l, k^2] flattened and concatenated).

    Returns (logits [W, m, m]: cell (a, b) copies map (a k // m, b k // m) at that cell, 0
    beyond the map; inside bool[W, m, m]). One static gather of W m^2 entries."""
    flat, inside = window_cells_of(row, col, level, m, level_hw, level_offset)
    channel = jnp.asarray(relative_position_channels(m, k))
    logits = score_table.reshape(-1)[flat * (k * k) + channel[None]]
    return jnp.where(inside, logits, 0.0), inside


def window_labels(gt_boxes, gt_valid, layout: dict, cfg: InstanceFCNConfig):
    """DeepMask's positive and negative windows (InstanceFCN section 4 takes its definition;
    Pinheiro et al. 2015 section 3.1), for one image.

    gt_boxes float32[N, 4] canvas xyxy, gt_valid bool[N]. With window side S (canvas pixels),
    offset (dx, dy) of an object's box centre from the window's centre and scale
    d = log2(max(w, h) / (canonical_object S)): positive for the object when |dx| <= positive_
    shift S, |dy| <= positive_shift S and |d| <= positive_scale_log2; near it unless
    max(|dx|, |dy|) >= negative_shift S or |d| >= negative_scale_log2. A window positive for
    some object is labelled 1 and matched to the nearest such centre; else 0 when near no
    object; else -1 (not sampled).

    Returns (labels int32[T], matched int32[T] instance slot (0 where not positive))."""
    cx = jnp.asarray(layout["centre_x"])[:, None]
    cy = jnp.asarray(layout["centre_y"])[:, None]
    side = jnp.asarray(layout["extent"])[:, None]
    box_cx = 0.5 * (gt_boxes[:, 0] + gt_boxes[:, 2])
    box_cy = 0.5 * (gt_boxes[:, 1] + gt_boxes[:, 3])
    larger = jnp.maximum(gt_boxes[:, 2] - gt_boxes[:, 0], gt_boxes[:, 3] - gt_boxes[:, 1])
    dx = jnp.abs(box_cx[None] - cx)  # [T, N]
    dy = jnp.abs(box_cy[None] - cy)
    scale = jnp.abs(jnp.log2(jnp.maximum(larger[None], 1e-6) / (cfg.canonical_object * side)))
    valid = gt_valid[None]
    positive = (
        valid
        & (dx <= cfg.positive_shift * side)
        & (dy <= cfg.positive_shift * side)
        & (scale <= cfg.positive_scale_log2)
    )
    far = (jnp.maximum(dx, dy) >= cfg.negative_shift * side) | (scale >= cfg.negative_scale_log2)
    near = valid & ~far
    distance = jnp.where(positive, dx * dx + dy * dy, jnp.inf)
    matched = jnp.argmin(distance, axis=1).astype(jnp.int32)
    is_positive = positive.any(axis=1)
    labels = jnp.where(is_positive, 1, jnp.where(near.any(axis=1), -1, 0))
    return labels.astype(jnp.int32), jnp.where(is_positive, matched, 0)


def pooled_mask_table(full_masks, levels: tuple, mask_stride: int):
    """One image's ground-truth masks at each level's stride, flattened per instance:
    float32[N, S] (S = sum of H_l W_l over levels, in window_layout's order), cell value 1 where
    at least half the stride-mask_stride cells it covers are foreground (DeepMask's 0.5)."""
    n, h, w = full_masks.shape
    tables = []
    for level in levels:
        f = 2**level // mask_stride
        pooled = full_masks.astype(jnp.float32).reshape(n, h // f, f, w // f, f).mean((2, 4))
        tables.append((pooled >= 0.5).astype(jnp.float32).reshape(n, -1))
    return jnp.concatenate(tables, axis=1)


def _init():
    return nn.initializers.normal(0.01)


class InstanceFCN(nn.Module):
    cfg: InstanceFCNConfig

    def setup(self):
        cfg = self.cfg
        d = cfg.branch_channels
        self.backbone = build_backbone(cfg)
        self.fpn = FPN(cfg.fpn_channels, cfg.dtype)
        # Section 4, Fig. 3: instance branch 1x1 512-d + ReLU, 3x3 -> k^2 maps; objectness
        # branch 3x3 512-d + ReLU, 1x1 -> one logistic output per (window side, class).
        self.score_reduce = Conv(d, (1, 1), dtype=cfg.dtype, kernel_init=_init(), name="score1")
        self.score_maps = Conv(
            cfg.grid_k**2,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=cfg.dtype,
            kernel_init=_init(),
            name="score2",
        )
        self.objectness_conv = Conv(
            d, (3, 3), padding=((1, 1), (1, 1)), dtype=cfg.dtype, kernel_init=_init(), name="obj1"
        )
        self.objectness = Conv(
            len(cfg.window_cells) * cfg.num_classes,
            (1, 1),
            dtype=cfg.dtype,
            kernel_init=_init(),
            name="obj2",
        )

    def predict(self, image):
        """(score table float32[B, S, k^2] of the levels' maps flattened in window_layout's
        order, objectness logits float32[B, T, C] in window_layout's order)."""
        cfg = self.cfg
        pyramid = self.fpn(self.backbone(normalize(image, cfg.dtype)))
        b = image.shape[0]
        tables, objectness = [], []
        for level in cfg.levels:
            x = pyramid[f"p{level}"]
            maps = self.score_maps(nn.relu(self.score_reduce(x)))  # [B, H_l, W_l, k^2]
            tables.append(maps.astype(jnp.float32).reshape(b, -1, cfg.grid_k**2))
            logits = self.objectness(nn.relu(self.objectness_conv(x))).astype(jnp.float32)
            h, w = logits.shape[1:3]
            logits = logits.reshape(b, h, w, len(cfg.window_cells), cfg.num_classes)
            objectness.append(logits.transpose(0, 3, 1, 2, 4).reshape(b, -1, cfg.num_classes))
        return jnp.concatenate(tables, 1), jnp.concatenate(objectness, 1)

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        cfg = self.cfg
        layout = window_layout(tuple(cfg.canvas_hw), tuple(cfg.levels), tuple(cfg.window_cells))
        table, objectness = self.predict(batch["image"])
        if not train:
            return {"detections": detect(table, objectness, batch, cfg)}
        if key is None:
            raise ValueError("training needs a key for the choice of sampled windows")
        b = batch["image"].shape[0]
        targets = jax.lax.stop_gradient(
            jax.vmap(
                lambda boxes, classes, valid, masks, hw, k, ignore, ignore_ok: training_targets(
                    boxes, classes, valid, masks, hw, layout, cfg, k, ignore, ignore_ok
                )
            )(
                batch["gt_boxes"],
                batch["gt_classes"],
                batch["gt_valid"],
                batch["gt_full_masks"],
                batch["image_hw"],
                jax.random.split(key, b),
                batch.get("ignore_boxes"),
                batch.get("ignore_valid"),
            )
        )
        window = targets["window"]
        outputs = {
            "targets": targets,
            "objectness_logits": jnp.take_along_axis(objectness, window[..., None], axis=1),
        }
        sides = jnp.asarray(layout["side"])[window]  # [B, W]
        for si, m in enumerate(cfg.window_cells):
            logits, _ = jax.vmap(
                lambda t, w, m=m: assemble_windows(
                    t,
                    jnp.asarray(layout["row"])[w],
                    jnp.asarray(layout["col"])[w],
                    jnp.asarray(layout["level"])[w],
                    m,
                    cfg.grid_k,
                    layout["level_hw"],
                    layout["level_offset"],
                )
            )(table, window)
            outputs[f"mask_logits_{m}"] = logits  # [B, W, m, m]
            outputs[f"of_side_{m}"] = sides == si
        return outputs


def training_targets(
    gt_boxes,
    gt_classes,
    gt_valid,
    gt_full_masks,
    image_hw,
    layout: dict,
    cfg: InstanceFCNConfig,
    key,
    ignore_boxes=None,
    ignore_valid=None,
):
    """One image's sampled windows and their targets.

    Labels by `window_labels`; windows centred outside the valid region image_hw int32[2], or
    (not positive) in an ignore region, take -1; windows_per_image sampled with up to
    positive_fraction positives (ops.sample_balanced). Returns a dict: window int32[W] (into
    window_layout), sampled bool[W], positive bool[W], class_targets float32[W, C] (one-hot of
    the matched instance's class on positives, zeros otherwise), and per window side m
    mask_targets_m float32[W, m, m] and mask_weights_m float32[W, m, m] (1 on a positive's
    cells inside the map), positives int32 and negatives int32 (labelled windows)."""
    labels, matched = window_labels(gt_boxes, gt_valid, layout, cfg)
    cx, cy = jnp.asarray(layout["centre_x"]), jnp.asarray(layout["centre_y"])
    in_image = (cx < image_hw[1]) & (cy < image_hw[0])
    labels = jnp.where(in_image, labels, -1)
    if ignore_boxes is not None:
        points = jnp.stack([cx, cy, cx, cy], 1)
        covered = ignore_mask(points, ignore_boxes, ignore_valid)
        labels = jnp.where(covered & (labels != 1), -1, labels)
    window, sampled = ops.sample_balanced(labels, cfg.windows_per_image, cfg.positive_fraction, key)
    positive = sampled & (labels[window] == 1)
    instance = matched[window]
    class_targets = jax.nn.one_hot(gt_classes[instance], cfg.num_classes) * positive[:, None]
    table = pooled_mask_table(gt_full_masks, tuple(cfg.levels), MASK_STRIDE)  # [N, S]
    out = {
        "window": window,
        "sampled": sampled,
        "positive": positive,
        "class_targets": class_targets,
        "positives": (labels == 1).sum().astype(jnp.int32),
        "negatives": (labels == 0).sum().astype(jnp.int32),
    }
    row = jnp.asarray(layout["row"])[window]
    col = jnp.asarray(layout["col"])[window]
    level = jnp.asarray(layout["level"])[window]
    side = jnp.asarray(layout["side"])[window]
    for si, m in enumerate(cfg.window_cells):
        flat, inside = window_cells_of(
            row, col, level, m, layout["level_hw"], layout["level_offset"]
        )
        targets = table.reshape(-1)[instance[:, None, None] * table.shape[1] + flat]
        weight = inside & (positive & (side == si))[:, None, None]
        out[f"mask_targets_{m}"] = jnp.where(weight, targets, 0.0)
        out[f"mask_weights_{m}"] = weight.astype(jnp.float32)
    return out


def loss_fn(outputs: dict, batch: dict, cfg: InstanceFCNConfig) -> tuple[jnp.ndarray, dict]:
    """Eq. (1) of section 4 with the module docstring's normalisers: logistic objectness
    summed over classes, averaged over the sampled windows of the global batch; per-cell
    logistic loss of the assembled masks, averaged over each sampled positive's cells on the
    map, then over the positives of the global batch."""
    del batch  # every target was built inside the model
    targets = outputs["targets"]
    sampled = targets["sampled"].astype(jnp.float32)  # [B, W]
    num_sampled = jnp.maximum(sampled.sum(), 1.0)
    loss_objectness = cfg.objectness_loss_weight * ops.binary_cross_entropy_with_logits(
        outputs["objectness_logits"],
        targets["class_targets"],
        weights=sampled[..., None],
        normalizer=num_sampled,
    )
    positive = targets["positive"].astype(jnp.float32)
    num_positive = positive.sum()
    per_window = jnp.zeros_like(positive)
    for m in cfg.window_cells:
        weights = targets[f"mask_weights_{m}"]
        cells = weights.sum(axis=(2, 3))
        logits = outputs[f"mask_logits_{m}"]
        t = targets[f"mask_targets_{m}"]
        cell_loss = jnp.maximum(logits, 0.0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        per_window += (cell_loss * weights).sum(axis=(2, 3)) / jnp.maximum(cells, 1.0)
    loss_mask = cfg.mask_loss_weight * per_window.sum() / jnp.maximum(num_positive, 1.0)
    b = positive.shape[0]
    metrics = {
        "loss_objectness": loss_objectness,
        "loss_mask": loss_mask,
        "sampled_positives": num_positive / b,
        "positive_windows": targets["positives"].sum().astype(jnp.float32) / b,
        "negative_windows": targets["negatives"].sum().astype(jnp.float32) / b,
    }
    return loss_objectness + loss_mask, metrics


def _resample_matrices(start, length, window_start, window_extent, side: int):
    """float32[K, side, side]: rows sample the window's side x side mask (spanning
    [window_start, window_start + window_extent) in canvas pixels) bilinearly at the centres of
    `side` equal bins of [start, start + length) (all float32[K]), clamped at its edge cells."""
    centres = start[:, None] + (jnp.arange(side, dtype=jnp.float32)[None] + 0.5) * (
        length[:, None] / side
    )
    u = (centres - window_start[:, None]) / window_extent[:, None] * side - 0.5
    u = jnp.clip(u, 0.0, side - 1.0)
    cells = jnp.arange(side, dtype=jnp.float32)
    return jnp.maximum(1.0 - jnp.abs(u[:, :, None] - cells[None, None]), 0.0)


def detect(table, objectness, batch: dict, cfg: InstanceFCNConfig) -> dict:
    """Dense multi-scale inference (section 4): every window ranked by its best class's
    objectness logit (the probability is the detection's score), the best pre_nms_topk
    centred in the image assembled at each window side and resized to M = cfg.output_side,
    NMS on the boxes of the binarised (>= 0.5) masks clipped to the image, K =
    detections_per_image kept. Detections (structures.py) with box-relative masks
    [B, K, M, M] whose boxes are the kept windows within the image (each mask resampled from
    its window to that part of it)."""
    layout = window_layout(tuple(cfg.canvas_hw), tuple(cfg.levels), tuple(cfg.window_cells))
    boxes_np = window_boxes(layout)
    big_m = cfg.output_side
    k_out = cfg.detections_per_image
    q = min(cfg.pre_nms_topk, boxes_np.shape[0])
    # Windows are ranked by the best class's logit, not its probability: a trained window's
    # logit passes 17, where float32's sigmoid is exactly 1.0, and the tied windows would fall
    # back to index order (level, side, row, column), not to how sure the model is.
    scores = objectness.max(-1)  # [B, T] logits
    classes = jnp.argmax(objectness, -1).astype(jnp.int32)
    logit_threshold = ops.probability_logit(cfg.score_threshold)

    def one_image(image_table, image_scores, image_classes, image_hw):
        cx, cy = jnp.asarray(layout["centre_x"]), jnp.asarray(layout["centre_y"])
        usable = (cx < image_hw[1]) & (cy < image_hw[0]) & (image_scores > logit_threshold)
        top, index = ops.top_k(jnp.where(usable, image_scores, -jnp.inf), q)
        row = jnp.asarray(layout["row"])[index]
        col = jnp.asarray(layout["col"])[index]
        level = jnp.asarray(layout["level"])[index]
        side = jnp.asarray(layout["side"])[index]
        masks = jnp.zeros((q, big_m, big_m), jnp.float32)
        for si, m in enumerate(cfg.window_cells):
            logits, inside = assemble_windows(
                image_table,
                row,
                col,
                level,
                m,
                cfg.grid_k,
                layout["level_hw"],
                layout["level_offset"],
            )
            window_probs = jnp.where(inside, jax.nn.sigmoid(logits), 0.0)
            resize = jnp.asarray(bilinear_matrix(m, big_m))
            resized = jnp.einsum("ia,qab,jb->qij", resize, window_probs, resize)
            masks = jnp.where((side == si)[:, None, None], resized, masks)
        window = jnp.asarray(boxes_np)[index]  # [Q, 4]
        extent = window[:, 2] - window[:, 0]
        cell_box = ops.masks_to_boxes(masks >= 0.5)  # M-cells [x0, y0, x1 + 1, y1 + 1]
        origin = jnp.concatenate([window[:, :2], window[:, :2]], 1)
        box = origin + cell_box * (extent / big_m)[:, None]
        hw = image_hw.astype(jnp.float32)
        box = ops.clip_boxes(box, hw)
        nonempty = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
        valid = (top > logit_threshold) & nonempty & jnp.isfinite(top)
        keep, _ = ops.nms(box, top, cfg.nms_threshold, min(k_out, q), valid)
        kept = keep >= 0
        pick = jnp.maximum(keep, 0)
        masks, window, extent = masks[pick], window[pick], extent[pick]
        # The payload's frame: the window within the image (the window itself where it fits),
        # the mask resampled into it. Not the mask's tight box: a second resampling would put
        # the object's edge cells at the frame's border, where pasting halves them.
        frame = ops.clip_boxes(window, hw)
        rows = _resample_matrices(
            frame[:, 1], frame[:, 3] - frame[:, 1], window[:, 1], extent, big_m
        )
        cols = _resample_matrices(
            frame[:, 0], frame[:, 2] - frame[:, 0], window[:, 0], extent, big_m
        )
        masks = jnp.einsum("kia,kab,kjb->kij", rows, masks, cols)
        box = frame
        pad = k_out - keep.shape[0]
        return (
            jnp.pad(jnp.where(kept[:, None], box, 0.0), ((0, pad), (0, 0))),
            jnp.pad(jnp.where(kept, jax.nn.sigmoid(top[pick]), 0.0), (0, pad)),
            jnp.pad(jnp.where(kept, image_classes[index][pick], 0), (0, pad)),
            jnp.pad(kept, (0, pad)),
            jnp.pad(jnp.where(kept[:, None, None], masks, 0.0), ((0, pad), (0, 0), (0, 0))),
        )

    boxes, det_scores, det_classes, valid, masks = jax.vmap(one_image)(
        table, scores, classes, batch["image_hw"]
    )
    flipped = batch.get("flipped")
    if flipped is not None:  # a mirrored canvas: masks relative to the unmirrored boxes
        masks = ops.mirror_box_masks(masks, flipped)
    return {
        "boxes": ops.original_detection_boxes(boxes, valid, batch),
        "scores": det_scores,
        "classes": det_classes,
        "valid": valid,
        "masks": masks,
    }


# ----------------------------------------------------------------------------- method interface

Config = InstanceFCNConfig
Model = InstanceFCN


def base_config() -> ml_collections.ConfigDict:
    """The paper's settings where it gives them (section 4: k = 5, m = 21, 256 windows 1 : 1,
    512-d branches); experiments start from here."""
    c = config_lib.base()
    c.method = "instancefcn"
    c.model = config_lib.model_section(InstanceFCNConfig)
    c.input.canvas_hw = (1024, 1024)
    c.optim.lr = 0.01
    c.schedule.total_steps = 90_000
    c.schedule.warmup_steps = 500
    c.schedule.steps = (60_000, 80_000)
    return c


def object_sizes_covered(model: ml_collections.ConfigDict) -> tuple[str, float, float]:
    """(the field, smallest and largest object side, canvas pixels, that some window takes as a
    positive) (method interface, optional): canonical sizes within DeepMask's scale tolerance."""
    tolerance = 2.0 ** float(model.positive_scale_log2)
    canonical = [
        float(model.canonical_object) * m * 2**level
        for level in model.levels
        for m in model.window_cells
    ]
    return ("model.window_cells", min(canonical) / tolerance, max(canonical) * tolerance)


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink an InstanceFCN config to seconds on a CPU: synthetic scenes, ResNet-18 of width
    16, a 128x128 canvas, narrow branches, windows of 7 and 9 cells on P2 and P3 (objects of
    about 14-46 px)."""
    c = config_lib.smoke_common(c)
    m = c.model
    smoke_backbone(m)
    m.fpn_channels = 32
    m.branch_channels = 32
    m.levels = (2, 3)
    m.window_cells = (7, 9)
    m.windows_per_image = 64
    m.pre_nms_topk = 200
    m.detections_per_image = 50
    return c
