"""RDSNet (Wang et al., AAAI 2020, "RDSNet: A New Deep Architecture for Reciprocal Object
Detection and Instance Segmentation"): the method module (methods/__init__.py). Two streams
over one ResNet-FPN:

  object stream   a RetinaNet head over P3..P7 (wangsr126/RDSNet mmdet/models/anchor_heads/
                  rds_retina_head.py RdsRetinaHead): three towers of 4 x (conv3x3, GroupNorm,
                  ReLU) predict, per anchor, class logits (sigmoid focal loss), box deltas
                  (smooth L1) and an instance representation: a background and a foreground
                  kernel of `rep_channels` (32) each.
  pixel stream    embedding maps at stride 4 (mmdet/models/mask_heads/rdsnet_mask_head.py
                  RdsMaskHead, end_level=2, num_convs=1): P3, P4 and P5 each through conv3x3 +
                  GroupNorm + ReLU and 2x bilinear upsamplings (align_corners=True, torch's
                  UpsamplingBilinear2d) to P3's size, summed, one more such conv and a 2x
                  upsampling, and a 1x1 convolution to `rep_channels`.
  correlation     an instance's two kernels dotted with every pixel embedding give its
                  2-channel (background, foreground) mask logits; softmax over the two
                  (RdsMaskHead.forward).
  crop            the mask counts only inside its box expanded by 0.25 of the box side (+1,
                  at least 1) on every side (1.5x) in training, 0.1 (1.2x) at test (the
                  reference's sanitize_coordinates in mmdet/core/bbox/transforms.py with the
                  config's crop.padding 0.25 and test_crop.padding 0.1); `crop_region`.
  mask loss       2-class cross-entropy inside the crop, with OHEM on the background pixels:
                  all foreground pixels and the as-many hardest background pixels train, each
                  mask / (its counted pixels + 1), summed / (trained masks + 1)
                  (RdsMaskHead.loss, mask_loss, mask_ohem_loss); `mask_loss`.
  MBRM            mask-based boundary refinement of the boxes at test (mmdet/models/detectors/
                  rdsnet.py MBRM): each box edge moves to the argmax, within a Gaussian window
                  around the edge (sigma = 0.05 x box side, at least 1), of sigmoid(a fixed
                  9-tap edge filter on the mask's max-projection); `mbrm_boxes`. Its 10 numbers
                  are the reference's trained values, which it ships as constants (README: "the
                  additional parameters in MBRM have been provided in the code").

Defaults follow configs/rdsnet/rdsnet_r50_fpn_1x.py (MBRM: rdsnet_refine_r50_fpn_1x.py, the
same weights with MBRM at test; model.mbrm). Assignment: mmdetection v1's MaxIoUAssigner(0.5,
0.4, min_pos_iou=0) with gt_max_assign_all: an anchor whose best IoU is >= 0.5 is positive for
that ground truth, < 0.4 negative, else ignored; then every anchor at a ground truth's best IoU
(ties included) is positive for it, the later ground truth winning an anchor two claim
(`anchor_targets`). Box deltas with means 0 and stds 1; focal loss alpha 0.25, gamma 2 and
smooth L1 beta 0.11, both / the positives. Test: sigmoid scores, the best 1000 anchors per
level by their best class score, per-class NMS at IoU 0.5 of (anchor, class) pairs scoring >
0.05, the best 100; masks from the detections' kernels, cropped by their boxes (1.2x).

Static shapes (what they force):
  anchors        T = sum over P3..P7 of h x w x 9 anchors; matching is a padded [N, T] IoU.
  mask slots     per image `masks_per_image` (100, the reference's masks_to_train) positive
                 anchors train the masks, a uniform random subset when there are more (the
                 reference's mask_sampler randperm); only positives whose ground-truth mask
                 covers more than `mask_min_area` (100) canvas pixels are eligible (mask_sampler's
                 ignore_area), its area counted on the stride-4 targets (cells x 16). The
                 correlation runs on those slots only: [B, P, 2, H/4, W/4] logits; the rest
                 are counted in the metrics (`mask_positives_over_budget`).
  OHEM           the k-th largest background loss of each mask, k = the foreground pixels in its
                 crop (x pos_neg_ratio, at most h w - 1), by one sort of the h x w losses; every
                 background pixel at least that large trains (exact ties at the cut all train
                 where the reference's sort keeps k of them).
  test           per level the best `test_candidates_per_level` (nms_pre, 1000) anchors; of
                 their (anchor, class) pairs above the score threshold, the best
                 `test_nms_candidates` (1000; the reference keeps every pair above 0.05) go to
                 class-aware greedy NMS with `detections_per_image` (100) output slots.

Known differences from the reference:
  - Boxes, anchors and IoUs use continuous coordinates, not mmdetection v1's "+1" pixel
    convention (widths x1 - x0 + 1, anchor centres at (stride - 1) / 2): anchors sit at the
    cell centres (i + 0.5) x stride, half a pixel from the reference's; decoded boxes are clipped
    to [0, w] x [0, h] where v1 clips to w - 1, h - 1. The crop keeps the reference's "+1" in
    its padding (0.25 x (side + 1) mask cells), as its rule is written in mask cells.
  - Mask targets are the instance masks sampled at the centres of the stride-4 cells (INPUTS)
    where the reference resizes them bilinearly and thresholds at 0.5; the mask-area filter
    counts those cells x 16.
  - The loss normalisers are over the global batch (the reference's: its GPU's 2 images):
    class and box / the sum over images of max(positives, 1), mask / (trained masks + 1).
  - Test masks stay at stride 4 (Detections' canvas_masks): the reference upsamples the
    logits to the input's pixels before the softmax, the crop (0.1 x (side + 1) pixels) and
    its 0.4 threshold; here the crop is in stride-4 cells (0.1 x (side / 4 + 1) cells) and the
    payload is sigmoid(foreground - background - logit(mask_threshold)), so the host's 0.5
    paste threshold is the reference's 0.4 (DeepMask's device).
  - MBRM reads the stride-4 probability's max-projections, resampled bilinearly
    (align_corners=False) to the canvas's pixels, and refines boxes in canvas pixels (the
    reference: the mask upsampled to the original image, boxes in original pixels); an edge
    whose Gaussian window lies wholly outside the canvas keeps its box edge (the reference
    divides 0 by 0 there).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instseg_jax import config as config_lib
from instseg_jax import ops, structures
from instseg_jax.backbones.fpn import FPNP3P7
from instseg_jax.backbones.resnet import normalize
from instseg_jax.methods.detector import DetectorConfig, build_backbone, smoke_backbone
from instseg_jax.methods.yolact import anchor_and_slot_targets
from instseg_jax.nn.layers import Conv, ConvNorm
from instseg_jax.ops import dense

PIXEL_MEAN = (123.675, 116.28, 103.53)  # configs/rdsnet/rdsnet_r50_fpn_1x.py img_norm_cfg
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_STRIDE = 4
LEVEL_STRIDES = (8, 16, 32, 64, 128)
# MBRM's trained 9-tap edge filter and bias (mmdet/models/detectors/rdsnet.py MBRM.__init__,
# the reference's learned values, shipped there as constants), and the cut below which its
# Gaussian edge windows are zero (MBRM.forward).
MBRM_KERNEL = (-0.2968, -0.2892, -0.2635, -3.2545, -0.1874, 2.5041, 0.0196, 0.0651, 0.0917)
MBRM_BIAS = -1.9536
MBRM_WINDOW_CUT = 0.0044

INPUTS = structures.Inputs(full_mask_stride=MASK_STRIDE)


@dataclasses.dataclass(frozen=True)
class RDSNetConfig(DetectorConfig):
    canvas_hw: tuple[int, int] = (1408, 1408)
    fpn_channels: int = 256
    head_convs: int = 4  # RdsRetinaHead stacked_convs
    # Anchors of level l: stride_l x anchor_octave_base x 2^(i / scales_per_octave), i < scales,
    # times the aspect ratios (h / w): RetinaNet's octave_base_scale 4, scales_per_octave 3.
    anchor_octave_base: float = 4.0
    scales_per_octave: int = 3
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    rep_channels: int = 32  # the kernels' and the pixel embeddings' channels
    pixel_channels: int = 256  # RdsMaskHead conv_out_channels
    positive_iou: float = 0.5
    negative_iou: float = 0.4
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_smooth_l1_beta: float = 0.11
    mask_loss_weight: float = 1.0
    masks_per_image: int = 100  # train_cfg masks_to_train
    mask_min_area: float = 100.0  # mask_sampler ignore_area: canvas pixels a trained mask exceeds
    train_crop_padding: float = 0.25  # train_cfg crop.padding: 1.5x boxes
    test_crop_padding: float = 0.1  # test_cfg crop.padding: 1.2x boxes
    mask_negatives_per_positive: float = 1.0  # mask_loss pos_neg_ratio (OHEM)
    test_candidates_per_level: int = 1000  # test_cfg nms_pre
    test_nms_candidates: int = 1000  # static cap on the (anchor, class) pairs NMS sees
    test_nms_threshold: float = 0.5
    score_threshold: float = 0.05
    detections_per_image: int = 100
    mask_threshold: float = 0.4  # test_cfg mask_thr_binary
    mbrm: bool = True  # the refine configs: MBRM on the boxes at test
    mbrm_gamma: float = 0.05  # mbrm_cfg gamma: the edge windows' sigma / box side

    COARSEST_LEVEL = ("P7", 128)

    def __post_init__(self):
        super().__post_init__()
        for name in ("train_crop_padding", "test_crop_padding"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise config_lib.ConfigValueError(
                    f"model.{name} must be in [0, 1) (a fraction of the box side), got "
                    f"{getattr(self, name)}"
                )
        if self.scales_per_octave < 1 or self.anchor_octave_base <= 0:
            raise config_lib.ConfigValueError(
                "model.scales_per_octave must be >= 1 and model.anchor_octave_base > 0, got "
                f"{self.scales_per_octave} and {self.anchor_octave_base}"
            )
        if not 0.0 < self.mask_threshold < 1.0:
            raise config_lib.ConfigValueError(
                f"model.mask_threshold must be in (0, 1), got {self.mask_threshold}"
            )

    def level_anchor_sizes(self) -> tuple[tuple[float, ...], ...]:
        """The anchor sizes (sqrt of area) of each level P3..P7."""
        octave = [2.0 ** (i / self.scales_per_octave) for i in range(self.scales_per_octave)]
        return tuple(
            tuple(stride * self.anchor_octave_base * o for o in octave) for stride in LEVEL_STRIDES
        )

    def anchors_per_cell(self) -> int:
        return self.scales_per_octave * len(self.aspect_ratios)

    def anchors(self) -> list[jnp.ndarray]:
        """float32[h_l w_l A, 4] per level, centred on the cells' centres (module docstring)."""
        return ops.multilevel_anchors(
            self.canvas_hw, LEVEL_STRIDES, self.level_anchor_sizes(), self.aspect_ratios, 0.5
        )


def _xavier():
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def upsample2x_aligned(x: jnp.ndarray) -> jnp.ndarray:
    """x[B, H, W, C] -> [B, 2H, 2W, C], bilinear with align_corners=True (torch's
    nn.UpsamplingBilinear2d, which RdsMaskHead uses): output i samples i (n - 1) / (2n - 1)."""

    def matrix(n: int) -> np.ndarray:
        source = np.arange(2 * n) * ((n - 1) / max(2 * n - 1, 1))
        low = np.minimum(np.floor(source).astype(np.int64), n - 1)
        high = np.minimum(low + 1, n - 1)
        frac = source - low
        m = np.zeros((2 * n, n), np.float64)
        m[np.arange(2 * n), low] += 1.0 - frac
        m[np.arange(2 * n), high] += frac
        return m.astype(np.float32)

    _, h, w, _ = x.shape
    rows, cols = jnp.asarray(matrix(h), x.dtype), jnp.asarray(matrix(w), x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", rows, x, cols)


class ObjectStream(nn.Module):
    """RdsRetinaHead, shared over P3..P7: class, box and representation towers of `convs` x
    (conv3x3 normal(0.01), GroupNorm 32, ReLU), each ending in a conv3x3 predictor (normal
    0.01; the class bias at prior 0.01)."""

    num_classes: int
    num_anchors: int
    rep_channels: int
    channels: int
    convs: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b = x.shape[0]
        init = nn.initializers.normal(0.01)

        def branch(name, outputs, bias_init=nn.initializers.zeros):
            y = x
            for i in range(self.convs):
                y = ConvNorm(self.channels, dtype=self.dtype, kernel_init=init, name=f"{name}{i}")(
                    y
                )
            y = Conv(
                self.num_anchors * outputs,
                (3, 3),
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                kernel_init=init,
                bias_init=bias_init,
                name=f"{name}_out",
            )(y)
            return y.reshape(b, -1, outputs).astype(jnp.float32)  # anchors (y, x, a)

        prior = ops.probability_logit(0.01)  # mmdetection's bias_init_with_prob(0.01)
        return (
            branch("cls", self.num_classes, nn.initializers.constant(prior)),
            branch("reg", 4),
            branch("rep", 2 * self.rep_channels),  # (background kernel, foreground kernel)
        )


class PixelStream(nn.Module):
    """RdsMaskHead's embedding maps [B, H/4, W/4, rep_channels] from P3, P4, P5 (module
    docstring); convolutions Xavier-uniform, the last 1x1 normal(0.01)."""

    channels: int
    rep_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, p3, p4, p5):
        def conv(x, name):
            return ConvNorm(self.channels, dtype=self.dtype, kernel_init=_xavier(), name=name)(x)

        x = conv(p3, "level0")
        for level, feature in ((1, p4), (2, p5)):
            for j in range(level):
                feature = upsample2x_aligned(conv(feature, f"level{level}_{j}"))
            x = x + feature
        x = upsample2x_aligned(conv(x, "final"))
        return Conv(
            self.rep_channels, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
            name="embeddings",
        )(x)  # fmt: skip


def correlate(pixels: jnp.ndarray, kernels: jnp.ndarray) -> jnp.ndarray:
    """The correlation module: mask logits float32[B, K, 2, h, w] (background, foreground) of
    instance kernels[B, K, 2 E] (background kernel, then foreground) on pixel embeddings
    pixels[B, h, w, E] (RdsMaskHead.forward: pixel_rep @ obj_rep.view(-1, E).t())."""
    b, k, _ = kernels.shape
    e = pixels.shape[-1]
    logits = dense.dynamic_masks(pixels, kernels.reshape(b, 2 * k, e))
    return logits.reshape(b, k, 2, *pixels.shape[1:3]).astype(jnp.float32)


class RDSNet(nn.Module):
    cfg: RDSNetConfig

    def setup(self):
        cfg = self.cfg
        self.backbone = build_backbone(cfg)
        # mmdetection v1's FPN(add_extra_convs=True): P6 from res5, no ReLU before P7, nearest
        # upsampling, Xavier-uniform init.
        self.fpn = FPNP3P7(cfg.fpn_channels, cfg.dtype, upsample="nearest")
        self.objects = ObjectStream(
            cfg.num_classes,
            cfg.anchors_per_cell(),
            cfg.rep_channels,
            cfg.fpn_channels,
            cfg.head_convs,
            cfg.dtype,
        )
        self.pixels = PixelStream(cfg.pixel_channels, cfg.rep_channels, cfg.dtype)

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        cfg = self.cfg
        image = normalize(batch["image"], cfg.dtype, PIXEL_MEAN, PIXEL_STD)
        features = self.fpn(self.backbone(image))
        outs = [self.objects(features[f"p{level}"]) for level in range(3, 8)]
        logits, deltas, kernels = (jnp.concatenate([o[i] for o in outs], axis=1) for i in range(3))
        pixels = self.pixels(features["p3"], features["p4"], features["p5"]).astype(jnp.float32)
        outputs = {"class_logits": logits, "box_deltas": deltas}
        if not train:
            outputs["detections"] = detect(logits, deltas, kernels, pixels, batch, cfg)
            return outputs
        if key is None:
            raise ValueError("training needs a key for the choice of mask slots")
        anchors = jnp.concatenate(cfg.anchors())
        area = batch["gt_full_masks"].astype(jnp.float32).sum(axis=(2, 3)) * MASK_STRIDE**2
        b = batch["image"].shape[0]
        targets = jax.lax.stop_gradient(
            jax.vmap(
                lambda boxes, classes, valid, mask_area, k, ignore, ignore_ok: anchor_targets(
                    anchors, boxes, classes, valid, mask_area, cfg, k, ignore, ignore_ok
                )
            )(
                batch["gt_boxes"],
                batch["gt_classes"],
                batch["gt_valid"],
                area,
                jax.random.split(key, b),
                batch.get("ignore_boxes"),
                batch.get("ignore_valid"),
            )
        )
        outputs["targets"] = targets
        slot_kernels = jnp.take_along_axis(kernels, targets["slot_anchor"][..., None], axis=1)
        outputs["mask_logits"] = correlate(pixels, slot_kernels)  # [B, P, 2, h, w]
        slot_gt = targets["slot_gt"]
        outputs["mask_targets"] = jnp.take_along_axis(
            batch["gt_full_masks"], slot_gt[..., None, None], axis=1
        )
        # The reference crops with the positives' decoded box targets: the ground truth,
        # clipped to the image (RdsnetHead.loss, delta2bbox(..., max_shape=img_shape)).
        boxes = jnp.take_along_axis(batch["gt_boxes"], slot_gt[..., None], axis=1)
        outputs["mask_boxes"] = ops.clip_boxes(
            boxes, batch["image_hw"][:, None, :].astype(jnp.float32)
        )
        return outputs


def anchor_targets(
    anchors,
    gt_boxes,
    gt_classes,
    gt_valid,
    gt_mask_area,
    cfg: RDSNetConfig,
    key,
    ignore_boxes=None,
    ignore_valid=None,
):
    """One image's anchor targets (module docstring: MaxIoUAssigner with gt_max_assign_all;
    mask_sampler's budget).

    anchors float32[T, 4]; gt_boxes float32[N, 4] canvas xyxy; gt_classes int32[N];
    gt_valid bool[N]; gt_mask_area float32[N] canvas pixels; optional ignore regions (a negative
    anchor ops.assign.ignore_mask puts in one is ignored). Returns labels int32[T] (1, 0, -1
    ignored), matched int32[T], classes int32[T] (C off the positives), box_targets float32[T,
    4], slot_anchor / slot_gt int32[P], slot_valid bool[P], positives int32, overflow int32 (the
    eligible positives without a mask slot).
    """
    iou = ops.box_iou(gt_boxes, anchors)  # [N, T]
    matched, labels = ops.match(
        iou,
        (cfg.negative_iou, cfg.positive_iou),
        (0, -1, 1),
        allow_low_quality_matches=False,
        gt_valid=gt_valid,
    )
    # gt_max_assign_all: each ground truth takes every anchor at its best IoU, in index order,
    # so the later one wins an anchor two claim. The reference's min_pos_iou=0 would let a
    # ground truth that overlaps no anchor claim every anchor (IoU 0): here its best must be > 0.
    valid_iou = jnp.where(gt_valid[:, None], iou, -1.0)
    best_for_gt = valid_iou.max(axis=1, keepdims=True)
    claims = (valid_iou == best_for_gt) & (best_for_gt > 0)
    n = gt_boxes.shape[0]
    claim = jnp.max(jnp.where(claims, jnp.arange(1, n + 1, dtype=jnp.int32)[:, None], 0), axis=0)
    labels = jnp.where(claim > 0, 1, labels)
    matched = jnp.where(claim > 0, claim - 1, matched)
    return anchor_and_slot_targets(
        labels,
        matched,
        anchors,
        gt_boxes,
        gt_classes,
        cfg.num_classes,
        cfg.masks_per_image,
        key,
        ignore=None if ignore_boxes is None else (ignore_boxes, ignore_valid),
        mask_eligible_gt=gt_mask_area > cfg.mask_min_area,
    )


def crop_region(boxes: jnp.ndarray, hw, padding: float) -> jnp.ndarray:
    """bool[..., h, w]: the cells of an (h, w) grid inside boxes[..., 4] (xyxy in cells) grown
    on every side by max(padding x (side + 1), 1) cells, clamped to the grid, edges truncated to
    whole cells: column c is inside when x0' <= c < x1' (the reference's sanitize_coordinates
    with cast=True, then RdsMaskHead.crop). padding 0: the box's own cells."""
    h, w = hw

    def edges(a, b, size):
        low, high = jnp.minimum(a, b), jnp.maximum(a, b)
        if padding > 0:
            grow = jnp.maximum(padding * (high - low + 1.0), 1.0)
            low, high = jnp.maximum(low - grow, 0.0), jnp.minimum(high + grow, size)
        return jnp.floor(low)[..., None], jnp.floor(high)[..., None]

    x0, x1 = edges(boxes[..., 0], boxes[..., 2], w)
    y0, y1 = edges(boxes[..., 1], boxes[..., 3], h)
    cols = jnp.arange(w, dtype=boxes.dtype)
    rows = jnp.arange(h, dtype=boxes.dtype)
    inside_x = (cols >= x0) & (cols < x1)
    inside_y = (rows >= y0) & (rows < y1)
    return inside_y[..., :, None] & inside_x[..., None, :]


def mask_loss(logits, targets, boxes, slot_valid, cfg: RDSNetConfig):
    """The reference's mask loss (RdsMaskHead.loss / mask_loss / mask_ohem_loss): (scalar,
    per-mask float32[B, P]).

    logits float32[B, P, 2, h, w] (background, foreground); targets [B, P, h, w] in {0, 1};
    boxes float32[B, P, 4] canvas xyxy (the crop: `crop_region` at train_crop_padding in
    stride-4 cells); slot_valid bool[B, P]. Per mask: 2-class cross-entropy summed over its
    foreground pixels in the crop and its k hardest background pixels in the crop (k = its
    foreground pixels x mask_negatives_per_positive, at most h w - 1) / (those pixels + 1);
    the sum over trained masks / (their number + 1) x mask_loss_weight."""
    h, w = logits.shape[-2:]
    inside = crop_region(boxes / MASK_STRIDE, (h, w), cfg.train_crop_padding)
    foreground = targets.astype(jnp.int32) == 1
    log_probs = jax.nn.log_softmax(logits, axis=2)
    ce = -jnp.where(foreground, log_probs[:, :, 1], log_probs[:, :, 0])  # [B, P, h, w]
    fg = inside & foreground
    background = inside & ~foreground
    quota = jnp.floor(cfg.mask_negatives_per_positive * fg.sum(axis=(2, 3)))
    quota = jnp.minimum(quota, h * w - 1).astype(jnp.int32)  # [B, P]
    ranked = jnp.where(background, jax.lax.stop_gradient(ce), -1.0).reshape(*ce.shape[:2], -1)
    ascending = jnp.sort(ranked, axis=-1)
    kth = jnp.take_along_axis(ascending, jnp.minimum(h * w - quota, h * w - 1)[..., None], axis=-1)
    hard = background & (ranked.reshape(ce.shape) >= kth[..., None]) & (quota > 0)[..., None, None]
    counted = fg | hard
    per_mask = jnp.sum(jnp.where(counted, ce, 0.0), axis=(2, 3)) / (
        counted.sum(axis=(2, 3)).astype(jnp.float32) + 1.0
    )
    trained = slot_valid.sum().astype(jnp.float32)
    total = jnp.sum(jnp.where(slot_valid, per_mask, 0.0)) / (trained + 1.0)
    return cfg.mask_loss_weight * total, per_mask


def loss_fn(outputs: dict, batch: dict, cfg: RDSNetConfig) -> tuple[jnp.ndarray, dict]:
    """Sigmoid focal class loss over the non-ignored anchors and smooth-L1 (beta 0.11) box loss
    over the positives, both / the sum over images of max(positives, 1) (mmdetection v1's
    anchor_target num_total_pos); the mask loss (`mask_loss`)."""
    targets = outputs["targets"]
    b = targets["labels"].shape[0]
    positive = targets["labels"] == 1
    normalizer = jnp.maximum(positive.sum(axis=1).astype(jnp.float32), 1.0).sum()
    loss_cls = ops.sigmoid_focal_loss(
        outputs["class_logits"],
        jax.nn.one_hot(targets["classes"], cfg.num_classes),  # C (background): all zeros
        cfg.focal_alpha,
        cfg.focal_gamma,
        weights=(targets["labels"] >= 0)[..., None],
        normalizer=normalizer,
    )
    loss_box = ops.smooth_l1_loss(
        outputs["box_deltas"],
        targets["box_targets"],
        beta=cfg.box_smooth_l1_beta,
        weights=positive[..., None],
        normalizer=normalizer,
    )
    loss_mask, _ = mask_loss(
        outputs["mask_logits"],
        outputs["mask_targets"],
        outputs["mask_boxes"],
        targets["slot_valid"],
        cfg,
    )
    total_positives = targets["positives"].sum().astype(jnp.float32)
    over = targets["overflow"].sum().astype(jnp.float32)
    metrics = {
        "loss_cls": loss_cls,
        "loss_box_reg": loss_box,
        "loss_mask": loss_mask,
        "positive_anchors": total_positives / b,
        "trained_masks": targets["slot_valid"].sum().astype(jnp.float32) / b,
        "mask_positives_over_budget": over / b,
    }
    return loss_cls + loss_box + loss_mask, metrics


def correlate_1d(profiles: jnp.ndarray, kernel) -> jnp.ndarray:
    """profiles[K, L] cross-correlated with kernel (odd length), zero-padded to length L (torch's
    conv1d with padding (len - 1) / 2): out[i] = sum_j kernel[j] x[i + j - p]."""
    kernel = tuple(kernel)
    p = (len(kernel) - 1) // 2
    length = profiles.shape[-1]
    padded = jnp.pad(profiles, ((0, 0), (p, p)))
    return sum(weight * padded[:, j : j + length] for j, weight in enumerate(kernel))


def mbrm_boxes(probabilities, boxes, canvas_hw, gamma: float) -> jnp.ndarray:
    """MBRM (mmdet/models/detectors/rdsnet.py MBRM.forward and get_boxes): refined boxes
    float32[K, 4] (canvas pixels) from foreground probabilities[K, h, w] (cropped, at any
    stride of the canvas) and boxes[K, 4] canvas xyxy.

    The mask's column maxima (left and right edges) and row maxima (top and bottom), resampled
    to the canvas's pixels; the edge filter (MBRM_KERNEL, reversed for the right and bottom
    edges) + MBRM_BIAS, a sigmoid, times a Gaussian window exp(-(i - edge)^2 / (2 sigma^2))
    around the box edge, sigma = max(gamma x box side, 1), zero below MBRM_WINDOW_CUT; the new
    edge is the argmax pixel index (an all-zero window keeps the edge)."""
    canvas_h, canvas_w = canvas_hw
    h, w = probabilities.shape[-2:]
    columns = probabilities.max(axis=1) @ jnp.asarray(dense.bilinear_matrix(w, canvas_w)).T
    rows = probabilities.max(axis=2) @ jnp.asarray(dense.bilinear_matrix(h, canvas_h)).T
    flipped = MBRM_KERNEL[::-1]

    def refine(profile, low, high, kernel_low, kernel_high):
        sigma = jnp.maximum((high - low) * gamma, 1.0)[:, None]
        grid = jnp.arange(profile.shape[-1], dtype=jnp.float32)[None]
        out = []
        for edge, kernel in ((low, kernel_low), (high, kernel_high)):
            window = jnp.exp(-((grid - edge[:, None]) ** 2) / (2.0 * sigma**2))
            window = jnp.where(window > MBRM_WINDOW_CUT, window, 0.0)
            score = jax.nn.sigmoid(correlate_1d(profile, kernel) + MBRM_BIAS) * window
            found = jnp.argmax(score, axis=1).astype(jnp.float32)
            out.append(jnp.where(score.max(axis=1) > 0, found, edge))
        return out

    x0, x1 = refine(columns, boxes[:, 0], boxes[:, 2], MBRM_KERNEL, flipped)
    y0, y1 = refine(rows, boxes[:, 1], boxes[:, 3], MBRM_KERNEL, flipped)
    return jnp.stack([x0, y0, x1, y1], axis=-1)


def detect(logits, deltas, kernels, pixels, batch, cfg: RDSNetConfig) -> dict:
    """Detections with boxes (MBRM-refined when cfg.mbrm) and canvas masks at stride 4
    (structures.py); module docstring: the test procedure."""
    anchors_by_level = cfg.anchors()
    scores = jax.nn.sigmoid(logits)  # [B, T, C]
    k, c = cfg.detections_per_image, cfg.num_classes
    cut = ops.probability_logit(cfg.mask_threshold)
    canvas_hw = tuple(cfg.canvas_hw)

    def one_image(image_scores, image_deltas, image_kernels, image_pixels, image_hw):
        picked, start = [], 0
        for anchors in anchors_by_level:
            count = anchors.shape[0]
            best = image_scores[start : start + count].max(axis=1)
            _, index = ops.top_k(best, min(cfg.test_candidates_per_level, count))
            picked.append(start + index)
            start += count
        index = jnp.concatenate(picked)
        anchors = jnp.concatenate(anchors_by_level)[index]
        boxes = ops.decode_boxes(image_deltas[index], anchors)
        boxes = ops.clip_boxes(boxes, image_hw.astype(jnp.float32))
        pair_scores = image_scores[index]  # [M, C]
        above = pair_scores > cfg.score_threshold
        flat = jnp.where(above, pair_scores, -1.0).reshape(-1)
        best, pair = ops.top_k(flat, min(cfg.test_nms_candidates, flat.shape[0]))
        candidate, classes = pair // c, pair % c
        kept, count = ops.batched_nms(
            boxes[candidate], best, classes, cfg.test_nms_threshold, k, valid=best > 0
        )
        valid = jnp.arange(k) < count
        slot = jnp.where(valid, kept, 0)
        det_boxes = jnp.where(valid[:, None], boxes[candidate[slot]], 0.0)
        det_scores = jnp.where(valid, best[slot], 0.0)
        det_classes = jnp.where(valid, classes[slot], 0)
        det_kernels = image_kernels[index][candidate[slot]]  # [K, 2 E]
        logits2 = correlate(image_pixels[None], det_kernels[None])[0]  # [K, 2, h, w]
        margin = logits2[:, 1] - logits2[:, 0]  # softmax's foreground = sigmoid(margin)
        inside = crop_region(det_boxes / MASK_STRIDE, margin.shape[-2:], cfg.test_crop_padding)
        inside = inside & valid[:, None, None]
        probabilities = jnp.where(inside, jax.nn.sigmoid(margin), 0.0)
        masks = jnp.where(inside, jax.nn.sigmoid(margin - cut), 0.0)
        if cfg.mbrm:
            refined = mbrm_boxes(probabilities, det_boxes, canvas_hw, cfg.mbrm_gamma)
            det_boxes = jnp.where(valid[:, None], refined, 0.0)
        return det_boxes, det_scores, det_classes, valid, masks

    det_boxes, det_scores, det_classes, det_valid, det_masks = jax.vmap(one_image)(
        scores, deltas, kernels, pixels, batch["image_hw"]
    )
    return {
        "boxes": ops.original_detection_boxes(det_boxes, det_valid, batch),
        "scores": det_scores,
        "classes": det_classes.astype(jnp.int32),
        "valid": det_valid,
        "canvas_masks": det_masks,
    }


# ----------------------------------------------------------------------------- method interface

Config = RDSNetConfig
Model = RDSNet

# mmdetection's epoch at batch 16: 117,266 COCO train2017 images with annotations / 16.
ITERATIONS_PER_EPOCH = 7330


def base_config() -> ml_collections.ConfigDict:
    """configs/rdsnet/rdsnet_r50_fpn_1x.py: 1333 x 800 input on a 1408 x 1408 canvas (P7's
    stride 128 divides it), batch 16 (2 per GPU on 8), SGD lr 0.005 (momentum 0.9, weight
    decay 1e-4), gradients clipped at norm 35, 500 linear warmup iterations from lr / 3, 12
    epochs (~88k iterations; the README's 90k) with decays at epochs 8 and 11."""
    c = config_lib.base()
    c.method = "rdsnet"
    c.model = config_lib.model_section(RDSNetConfig)
    c.input.canvas_hw = (1408, 1408)
    c.input.short_side = (800,)
    c.input.max_long_side = 1333
    c.input.global_batch = 16
    c.optim.lr = 0.005
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 35.0
    c.schedule.warmup_steps = 500
    c.schedule.warmup_factor = 1.0 / 3
    c.schedule.total_steps = 12 * ITERATIONS_PER_EPOCH
    c.schedule.steps = (8 * ITERATIONS_PER_EPOCH, 11 * ITERATIONS_PER_EPOCH)
    return c


def object_sizes_covered(model: ml_collections.ConfigDict) -> tuple[str, float, float]:
    """(the field, smallest and largest object side, sqrt of box area in canvas pixels, that a
    square anchor matches at model.positive_iou) (method interface, optional)."""
    ratio = math.sqrt(float(model.positive_iou))
    octave = 2.0 ** ((int(model.scales_per_octave) - 1) / int(model.scales_per_octave))
    base = float(model.anchor_octave_base)
    return (
        "model.anchor_octave_base",
        LEVEL_STRIDES[0] * base * ratio,
        LEVEL_STRIDES[-1] * base * octave / ratio,
    )


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink an RDSNet config to seconds on a CPU: synthetic scenes, ResNet-18 of width 16, a
    128x128 canvas, narrow streams of one conv per tower."""
    c = config_lib.smoke_common(c)
    m = c.model
    smoke_backbone(m)
    m.fpn_channels = 32
    m.head_convs = 1
    m.anchor_octave_base = 1.5
    m.rep_channels = 8
    m.pixel_channels = 32
    m.masks_per_image = 16
    m.mask_min_area = 16.0
    m.test_candidates_per_level = 200
    m.test_nms_candidates = 200
    m.detections_per_image = 50
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 10.0
    c.schedule.warmup_factor = 0.001
    return c
