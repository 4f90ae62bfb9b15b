"""YOLACT (Bolya et al. 2019, "YOLACT: Real-time Instance Segmentation"): the method module
(methods/__init__.py). A one-stage anchor detector whose every anchor also predicts 32 mask
coefficients; one prototype network at stride 4 gives 32 prototype masks per image, and an
instance's mask is sigmoid(prototypes x coefficients) cropped by its box. Defaults follow
mmdetection's configs/yolact/yolact_r50_1x8_coco.py; every one is a config field.

Static shapes:
  anchors        T = sum over P3..P7 of h x w x 3 anchors; matching is a padded [N, T] IoU.
  OHEM           the class loss keeps, per image, the positives and the 3 x positives
                 negatives of highest loss, by a rank mask over all T anchors.
  mask slots     at most `masks_per_image` (100) positive anchors per image train the masks: a
                 uniform random subset when there are more (the reference's randperm); the
                 rest are counted in the metrics (`mask_positives_over_budget`, `..._fraction`).
  test           per level the best `test_candidates_per_level` anchors by their best class
                 score, then per class the best `test_top_k`, Fast NMS and the score threshold,
                 then the best `detections_per_image` over all classes (ops.per_class_fast_nms).

Input: the reference stretches every image to 550 x 550 (Resize keep_ratio=False, training and
test); the COCO experiment does the same (input.resize = "stretch", input.stretch_hw = (550,
550), instseg_jax/input/transforms.py) on a 640 x 640 canvas (divisible by 128, the P7 stride;
the 90 px beyond the image are padding the reference does not have), and detections map back
per axis (the batch's scale_yx). Its anchors span the 550 x 550 image as the reference's
(model.anchor_extent_hw: strides 550 / (69, 35, 18, 9, 5), where the canvas grid's 8 .. 128
would put them up to 81 px away); the anchors past 550 lie in the padding. The nuclei
experiment keeps the aspect-preserving resize. The image is resized with PIL's bilinear filter
(antialiased when shrinking) where mmdetection uses cv2's bilinear interpolation. The COCO
experiment's training augmentation is the reference's (input/ssd_augment.py: Expand 1-4
filled with PIXEL_MEAN, MinIoURandomCrop, flip, PhotoMetricDistortion on the resized image),
but for the distorted pixels being clipped to uint8 (the reference normalises its unclipped
floats); the nuclei experiment keeps flip only.

Matching is mmdetection's MaxIoUAssigner(0.5, 0.4, min_pos_iou=0): an anchor whose best IoU is
>= 0.5 is positive for that ground truth, < 0.4 negative, else ignored; then every ground truth
takes its best anchor (the later ground truth wins an anchor two claim). Ground truth not
wider and higher than 4 original pixels is left out of training (mmdetection's
FilterAnnotations(min_gt_bbox_wh=(4.0, 4.0)) at the head of yolact_r50_1xb8-55e_coco.py's
train pipeline, before its expand and crop; measured here after them, on what the crop leaves
of the box, so a box the min-IoU crop cuts below 5 px is left out where the reference keeps
it). A negative
anchor mostly inside an ignore region (an instance beyond input.max_instances; structures.py,
ops.assign.ignore_mask) is ignored instead.

OHEM: an image without positives trains all its negatives (mmdetection's rule; dbolya/yolact's
trains none: `negatives_without_positives`). Normalisers are mmdetection's on its one GPU of 8
images, here the global batch: the class and box losses / the sum over images of max(positives,
1), the mask loss / the trained masks, the semantic loss / (images x cells), an image without
ground truth adding no semantic loss; ground truth the size filter leaves out is out of the
semantic targets too (the reference's FilterAnnotations removes it from the image).
experiments/parity/yolact_loss.py checks anchors, anchor labels, the four terms and their
gradients against mmdetection 3.3's YOLACTHead and YOLACTProtonet loss_by_feat (RESULTS.md).

Known differences from the reference: mask targets are the instance masks sampled at the
centres of the stride-4 cells (the reference resizes them bilinearly and thresholds at 0.5);
semantic targets use each instance's class (mmdetection shifts them by one class, a bug
dbolya/yolact does not have). The reference maps boxes to prototype cells by the image's share
of the prototype grid (550 px on 138 cells: 3.986 px a cell, both references), ours by the
stride, 4 px: its crop edges lie up to half a cell past the box at the far side of the image
and its box-area normaliser is 0.7% larger (the mask term 0.7% smaller); the stride-8
semantic grid likewise (550 px on 69 cells).
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
from instseg_jax.nn.layers import Conv
from instseg_jax.ops import dense
from instseg_jax.ops.assign import ignore_mask

PIXEL_MEAN = (123.68, 116.78, 103.94)  # the reference's (ImageNet's, rounded differently)
PIXEL_STD = (58.40, 57.12, 57.38)
PROTO_STRIDE = 4
LEVEL_STRIDES = (8, 16, 32, 64, 128)
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the reference's coder stds 0.1, 0.1, 0.2, 0.2

INPUTS = structures.Inputs(full_mask_stride=PROTO_STRIDE)


@dataclasses.dataclass(frozen=True)
class YOLACTConfig(DetectorConfig):
    canvas_hw: tuple[int, int] = (640, 640)
    freeze_at: int = 1
    fpn_channels: int = 256
    anchor_sizes: tuple = (24, 48, 96, 192, 384)  # P3..P7: base sizes 8..128 x octave scale 3
    aspect_ratios: tuple = (0.5, 1.0, 2.0)  # h / w
    # (h, w) the anchor grid spans: () = the canvas (stride 8 .. 128), or the stretched image
    # size (the COCO recipe: (550, 550)), where level l's anchors sit at (i + 0.5) x extent /
    # ceil(extent / stride_l), as the reference's strides 550 / (69, 35, 18, 9, 5) (mmdetection
    # yolact_r50_1xb8-55e_coco.py anchor_generator; dbolya/yolact make_priors likewise).
    anchor_extent_hw: tuple = ()
    head_convs: int = 1
    num_protos: int = 32
    proto_channels: int = 256
    positive_iou: float = 0.5
    negative_iou: float = 0.4
    negatives_per_positive: int = 3
    # An image without positives: "all" of its negatives train (mmdetection's YOLACTHead
    # loss_by_feat, the COCO recipe's reference) or "none" (dbolya/yolact's MultiBoxLoss OHEM,
    # whose quota is 3 x 0).
    negatives_without_positives: str = "all"
    min_gt_box_size: float = 4.0
    # The class, box and coefficient predictors' kernels: "xavier" (uniform, mmdetection's
    # YOLACTHead.init_weights, for an ImageNet backbone) or "normal" (std 0.01, RetinaNet's:
    # on a backbone trained from scratch Xavier's first losses were ~20; the nuclei experiment).
    predictor_init: str = "xavier"
    box_loss_weight: float = 1.5
    mask_loss_weight: float = 6.125
    semantic_loss_weight: float = 1.0
    masks_per_image: int = 100
    test_candidates_per_level: int = 1000
    test_top_k: int = 200
    test_nms_threshold: float = 0.5
    score_threshold: float = 0.05
    detections_per_image: int = 100

    COARSEST_LEVEL = ("P7", 128)

    def __post_init__(self):
        super().__post_init__()
        if len(self.anchor_sizes) != 5:
            raise config_lib.ConfigValueError(
                f"model.anchor_sizes needs one size per level P3..P7, got {self.anchor_sizes}"
            )
        config_lib.check_choice("model.predictor_init", self.predictor_init, ("xavier", "normal"))
        extent = tuple(self.anchor_extent_hw)
        if extent and (
            len(extent) != 2
            or not all(0 < int(e) <= c for e, c in zip(extent, self.canvas_hw, strict=True))
        ):
            raise config_lib.ConfigValueError(
                f"model.anchor_extent_hw must be () or (h, w) within the canvas {self.canvas_hw}, "
                f"got {self.anchor_extent_hw}"
            )
        if self.negatives_without_positives not in ("all", "none"):
            raise config_lib.ConfigValueError(
                "model.negatives_without_positives must be 'all' (mmdetection) or 'none' "
                f"(dbolya/yolact), got {self.negatives_without_positives!r}"
            )

    def level_anchor_sizes(self) -> tuple[tuple[float, ...], ...]:
        """The anchor sizes of each level P3..P7: one, anchor_sizes[l] (YOLACT++'s config gives
        three per level)."""
        return tuple((s,) for s in self.anchor_sizes)

    def anchors_per_cell(self) -> int:
        """A: anchors per location, sizes x aspect ratios (size-major, ops.cell_anchors)."""
        return len(self.level_anchor_sizes()[0]) * len(self.aspect_ratios)

    def anchors(self) -> list[jnp.ndarray]:
        """float32[h_l w_l A, 4] per level (per canvas cell, (y, x, size, ratio)), centred on the
        cell centres (offset 0.5), or with anchor_extent_hw on the reference's stretched grid
        (the anchors past the extent lie in the canvas's padding)."""
        if not self.anchor_extent_hw:
            return ops.multilevel_anchors(
                self.canvas_hw,
                LEVEL_STRIDES,
                self.level_anchor_sizes(),
                self.aspect_ratios,
                offset=0.5,
            )
        levels = []
        shapes = ops.level_shapes(self.canvas_hw, LEVEL_STRIDES)
        extent_shapes = ops.level_shapes(self.anchor_extent_hw, LEVEL_STRIDES)
        sizes = self.level_anchor_sizes()
        for (h, w), (eh, ew), level_sizes in zip(shapes, extent_shapes, sizes, strict=True):
            cells = ops.cell_anchors(level_sizes, self.aspect_ratios)  # float64[A, 4]
            ys = (np.arange(h) + 0.5) * (self.anchor_extent_hw[0] / eh)
            xs = (np.arange(w) + 0.5) * (self.anchor_extent_hw[1] / ew)
            grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
            centres = np.stack([grid_x, grid_y, grid_x, grid_y], -1).reshape(-1, 1, 4)
            levels.append(jnp.asarray((centres + cells[None]).reshape(-1, 4), jnp.float32))
        return levels


def _xavier():
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def _conv3x3_relu(x, channels: int, dtype, name: str):
    """A Xavier-initialised 3x3 convolution and ReLU, created in the calling compact module."""
    conv = Conv(
        channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, kernel_init=_xavier(), name=name
    )
    return nn.relu(conv(x))


class PredictionHead(nn.Module):
    """Shared over P3..P7: head_convs x (conv3x3 + ReLU), then three conv3x3 predictors: class
    logits (C + 1, background last), box deltas (4) and tanh mask coefficients, per anchor."""

    num_classes: int
    num_anchors: int
    num_protos: int
    channels: int
    convs: int
    dtype: jnp.dtype = jnp.float32
    predictor_init: str = "xavier"  # YOLACTConfig.predictor_init

    @nn.compact
    def __call__(self, x):
        b = x.shape[0]
        for i in range(self.convs):
            x = _conv3x3_relu(x, self.channels, self.dtype, f"conv{i}")
        init = _xavier() if self.predictor_init == "xavier" else nn.initializers.normal(0.01)

        def predict(outputs, name):
            y = Conv(
                self.num_anchors * outputs,
                (3, 3),
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                kernel_init=init,
                name=name,
            )(x)
            return y.reshape(b, -1, outputs)  # [B, h w A, outputs]: anchors (y, x, a)

        return (
            predict(self.num_classes + 1, "classes"),
            predict(4, "boxes"),
            jnp.tanh(predict(self.num_protos, "coefficients")),
        )


class Protonet(nn.Module):
    """P3 -> 3 x (conv3x3 + ReLU), 2x bilinear upsampling + ReLU, conv3x3 + ReLU, conv1x1 to
    num_protos + ReLU: prototypes [B, H/4, W/4, num_protos]."""

    num_protos: int
    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, p3):
        x = p3
        for i in range(3):
            x = _conv3x3_relu(x, self.channels, self.dtype, f"conv{i}")
        x = nn.relu(dense.resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2])))
        x = _conv3x3_relu(x, self.channels, self.dtype, "conv3")
        protos = Conv(
            self.num_protos, (1, 1), dtype=self.dtype, kernel_init=_xavier(), name="protos"
        )
        return nn.relu(protos(x))


class YOLACT(nn.Module):
    cfg: YOLACTConfig

    def setup(self):
        cfg = self.cfg
        self.backbone = build_backbone(cfg)
        self.fpn = FPNP3P7(cfg.fpn_channels, cfg.dtype)
        self.head = PredictionHead(
            cfg.num_classes,
            cfg.anchors_per_cell(),
            cfg.num_protos,
            cfg.fpn_channels,
            cfg.head_convs,
            cfg.dtype,
            cfg.predictor_init,
        )
        self.protonet = Protonet(cfg.num_protos, cfg.proto_channels, cfg.dtype)
        self.semantic = Conv(
            cfg.num_classes, (1, 1), dtype=cfg.dtype, kernel_init=_xavier(), name="semantic"
        )

    def predict(self, image):
        """Per anchor over P3..P7 (level by level): class logits [B, T, C + 1], box deltas
        [B, T, 4], coefficients [B, T, num_protos]; prototypes [B, H/4, W/4, num_protos]; P3."""
        features = self.fpn(self.backbone(normalize(image, self.cfg.dtype, PIXEL_MEAN, PIXEL_STD)))
        outs = [self.head(features[f"p{level}"]) for level in range(3, 8)]
        logits, deltas, coefficients = (
            jnp.concatenate([o[i] for o in outs], axis=1).astype(jnp.float32) for i in range(3)
        )
        protos = self.protonet(features["p3"]).astype(jnp.float32)
        return logits, deltas, coefficients, protos, features["p3"]

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        cfg = self.cfg
        logits, deltas, coefficients, protos, p3 = self.predict(batch["image"])
        outputs = {"class_logits": logits, "box_deltas": deltas}
        if not train:
            outputs["detections"] = detect(logits, deltas, coefficients, protos, batch, cfg)
            return outputs
        if key is None:
            raise ValueError("training needs a key for the choice of mask slots")
        anchors = jnp.concatenate(cfg.anchors())
        targets = jax.lax.stop_gradient(
            jax.vmap(
                lambda boxes, classes, valid, k, ignore, ignore_ok, scale: anchor_targets(
                    anchors, boxes, classes, valid, cfg, k, ignore, ignore_ok, scale
                )
            )(
                batch["gt_boxes"],
                batch["gt_classes"],
                batch["gt_valid"],
                jax.random.split(key, batch["image"].shape[0]),
                batch.get("ignore_boxes"),
                batch.get("ignore_valid"),
                # (sx, sy) per image: a stretched image's original w and h differ in scale
                batch["scale_yx"][:, ::-1]
                if "scale_yx" in batch
                else batch.get("scale", jnp.ones(batch["image"].shape[0], jnp.float32))[:, None],
            )
        )
        outputs["targets"] = targets
        slot_coefficients = jnp.take_along_axis(
            coefficients, targets["slot_anchor"][..., None], axis=1
        )  # [B, P, num_protos]
        outputs["mask_logits"] = dense.dynamic_masks(protos, slot_coefficients)  # [B,P,h,w]
        slot_gt = targets["slot_gt"]
        outputs["mask_targets"] = jnp.take_along_axis(
            batch["gt_full_masks"], slot_gt[..., None, None], axis=1
        )
        outputs["mask_boxes"] = jnp.take_along_axis(batch["gt_boxes"], slot_gt[..., None], axis=1)
        outputs["semantic_logits"] = self.semantic(p3).astype(jnp.float32)  # [B, H/8, W/8, C]
        return outputs


def anchor_targets(
    anchors,
    gt_boxes,
    gt_classes,
    gt_valid,
    cfg: YOLACTConfig,
    key,
    ignore_boxes=None,
    ignore_valid=None,
    scale=1.0,
):
    """One image's anchor labels (module docstring: MaxIoUAssigner(0.5, 0.4, min_pos_iou=0)).

    anchors float32[T, 4]; gt_boxes float32[N, 4] canvas xyxy; gt_classes int32[N];
    gt_valid bool[N]; optional ignore_boxes float32[I, 4], ignore_valid bool[I]: a negative
    anchor that ops.assign.ignore_mask puts in one of them is ignored (-1). scale: canvas
    pixels per original pixel, one number or (sx, sy) (the batch's `scale_yx` reversed): ground
    truth takes part only if wider and
    higher than cfg.min_gt_box_size original pixels.
    Returns a dict: labels int32[T] (1 positive, 0 negative, -1 ignored),
    matched int32[T] (ground-truth slot of positives), classes int32[T] (class of positives,
    C elsewhere), box_targets float32[T, 4], slot_anchor / slot_gt int32[P] and slot_valid
    bool[P] (P = masks_per_image: the positives whose masks train), positives int32, overflow
    int32 (positives without a mask slot), gt_usable bool[N] (the ground truth that trains: the
    semantic loss's too).
    """
    # mmdetection's FilterAnnotations(min_gt_bbox_wh=(4, 4)) runs first in the reference's
    # pipeline, on the original image: w > 4 and h > 4 there.
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]) / scale
    usable = gt_valid & (wh > cfg.min_gt_box_size).all(axis=1)
    iou = jnp.where(usable[:, None], ops.box_iou(gt_boxes, anchors), -1.0)  # [N, T]
    best_iou = iou.max(axis=0)
    matched = jnp.argmax(iou, axis=0).astype(jnp.int32)
    labels = jnp.where(
        best_iou >= cfg.positive_iou, 1, jnp.where(best_iou < cfg.negative_iou, 0, -1)
    )
    labels = jnp.where(best_iou < 0, 0, labels)  # no usable ground truth: negative
    # Every usable ground truth takes its best anchor; the later one wins a shared anchor.
    best_anchor = jnp.argmax(iou, axis=1)  # [N]
    n = gt_boxes.shape[0]
    claim = (
        jnp.zeros(anchors.shape[0], jnp.int32)
        .at[best_anchor]
        .max(jnp.where(usable, jnp.arange(1, n + 1, dtype=jnp.int32), 0))
    )
    labels = jnp.where(claim > 0, 1, labels)
    matched = jnp.where(claim > 0, claim - 1, matched)
    targets = anchor_and_slot_targets(
        labels,
        matched,
        anchors,
        gt_boxes,
        gt_classes,
        cfg.num_classes,
        cfg.masks_per_image,
        key,
        ignore=None if ignore_boxes is None else (ignore_boxes, ignore_valid),
        box_weights=BOX_WEIGHTS,
    )
    return {**targets, "gt_usable": usable}


def anchor_and_slot_targets(
    labels,
    matched,
    anchors,
    gt_boxes,
    gt_classes,
    num_classes: int,
    masks_per_image: int,
    key,
    ignore=None,
    box_weights=(1.0, 1.0, 1.0, 1.0),
    mask_eligible_gt=None,
) -> dict:
    """The anchor targets of an assignment (labels int32[T]: 1, 0 or -1 ignored; matched int32[T])
    and the mask slots drawn from its positives, shared by the prototype-and-coefficient methods
    (YOLACT, RDSNet): negatives inside ignore = (boxes, valid) become ignored; classes take C off
    the positives; box targets are zero off them; masks_per_image slots are drawn at random
    (key) from the positives whose ground truth mask_eligible_gt bool[N] allows (all by
    default), the rest counted as overflow."""
    if ignore is not None:
        covered = ignore_mask(anchors, *ignore)
        labels = jnp.where((labels == 0) & covered, -1, labels)
    positive = labels == 1
    classes = jnp.where(positive, gt_classes[matched], num_classes)
    box_targets = ops.encode_boxes(gt_boxes[matched], anchors, box_weights)
    box_targets = jnp.where(positive[:, None], box_targets, 0.0)
    eligible = positive if mask_eligible_gt is None else positive & mask_eligible_gt[matched]
    chosen, slot_valid, overflow = dense.budgeted_select(eligible, masks_per_image, key)
    return {
        "labels": labels.astype(jnp.int32),
        "matched": matched,
        "classes": classes.astype(jnp.int32),
        "box_targets": box_targets,
        "slot_anchor": chosen,
        "slot_gt": jnp.where(slot_valid, matched[chosen], 0),
        "slot_valid": slot_valid,
        "positives": positive.sum().astype(jnp.int32),
        "overflow": overflow,
    }


def ohem_class_loss(
    logits, classes, labels, negatives_per_positive: int, without_positives: str = "all"
):
    """Per image, the summed softmax cross-entropy of the positives and of the
    negatives_per_positive x positives negatives with the highest loss: float32[B]. An image
    without positives trains every negative ("all") or none ("none")."""
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), classes[..., None], axis=-1)[..., 0]
    positive = labels == 1
    negative = labels == 0
    ranked = jnp.where(negative, jax.lax.stop_gradient(ce), -jnp.inf)
    order = jnp.argsort(-ranked, axis=1)
    rank = jnp.argsort(order, axis=1)  # 0 for the hardest negative
    count = positive.sum(axis=1, keepdims=True)
    quota = negatives_per_positive * count
    if without_positives == "all":
        quota = jnp.where(count == 0, logits.shape[1], quota)
    hard = negative & (rank < quota)
    return jnp.sum(jnp.where(positive | hard, ce, 0.0), axis=1)


def crop_masks(masks, boxes, stride: int, padding: float = 1.0):
    """Zero masks[..., h, w] outside boxes[..., 4] (canvas xyxy), in mask cells: cell column c
    is inside when x0 / stride - padding <= c < x1 / stride + padding (the reference's crop)."""
    h, w = masks.shape[-2:]
    scaled = boxes / stride
    x0 = jnp.maximum(scaled[..., 0] - padding, 0.0)[..., None]
    x1 = jnp.minimum(scaled[..., 2] + padding, w)[..., None]
    y0 = jnp.maximum(scaled[..., 1] - padding, 0.0)[..., None]
    y1 = jnp.minimum(scaled[..., 3] + padding, h)[..., None]
    cols = jnp.arange(w, dtype=jnp.float32)
    rows = jnp.arange(h, dtype=jnp.float32)
    inside_x = (cols >= x0) & (cols < x1)  # [..., w]
    inside_y = (rows >= y0) & (rows < y1)  # [..., h]
    return inside_y[..., :, None] & inside_x[..., None, :]


def loss_fn(outputs: dict, batch: dict, cfg: YOLACTConfig) -> tuple[jnp.ndarray, dict]:
    """OHEM softmax class loss and smooth-L1 box loss (x 1.5) over the batch's positives; mask
    BCE inside each ground-truth box / its area in prototype cells (x 6.125) over the trained
    mask slots; semantic BCE on P3 per pixel and class (x 1) over the batch's images."""
    targets = outputs["targets"]
    b = targets["labels"].shape[0]
    # mmdetection's num_total_pos: an image without positives counts 1 (anchor_head.py
    # get_targets: sum(max(inds.numel(), 1) for inds in pos_inds_list)).
    per_image = (targets["labels"] == 1).sum(axis=1).astype(jnp.float32)
    normalizer = jnp.maximum(per_image, 1.0).sum()
    loss_cls = (
        ohem_class_loss(
            outputs["class_logits"],
            targets["classes"],
            targets["labels"],
            cfg.negatives_per_positive,
            cfg.negatives_without_positives,
        ).sum()
        / normalizer
    )
    loss_box = cfg.box_loss_weight * ops.smooth_l1_loss(
        outputs["box_deltas"],
        targets["box_targets"],
        beta=1.0,
        weights=(targets["labels"] == 1)[..., None],
        normalizer=normalizer,
    )

    mask_logits = outputs["mask_logits"]  # [B, P, h, w]
    boxes = outputs["mask_boxes"]  # [B, P, 4] canvas
    inside = crop_masks(mask_logits, boxes, PROTO_STRIDE)
    mask_targets = outputs["mask_targets"].astype(jnp.float32)
    # -[t log s(x) + (1 - t) log s(-x)]: its gradient is s(x) - t at every x. The prototypes
    # are ReLU outputs, so a cell where all are 0 has a logit of exactly 0, where JAX's gradient
    # of the max(x, 0) + log1p(exp(-|x|)) form is off by 1/2 (|x|' = 1 at 0, max's 1/2); the
    # mmdetection loss parity (experiments/parity/yolact_loss.py) measured it.
    bce = -(
        mask_targets * jax.nn.log_sigmoid(mask_logits)
        + (1.0 - mask_targets) * jax.nn.log_sigmoid(-mask_logits)
    )
    wh = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 1.0) / PROTO_STRIDE
    per_mask = jnp.sum(jnp.where(inside, bce, 0.0), axis=(2, 3)) / (wh[..., 0] * wh[..., 1])
    slot_valid = targets["slot_valid"]
    trained = slot_valid.sum().astype(jnp.float32)
    loss_mask = (
        cfg.mask_loss_weight
        * jnp.sum(jnp.where(slot_valid, per_mask, 0.0))
        / (jnp.maximum(trained, 1.0))
    )

    semantic = outputs["semantic_logits"]  # [B, H/8, W/8, C]
    # Only the ground truth min_gt_box_size keeps: the reference's FilterAnnotations removes
    # the rest from the image, semantic targets included. An image without ground truth adds
    # nothing (mmdetection's YOLACTProtonet.loss_by_feat: segm_preds.sum() * 0) but still
    # counts in the normaliser (images x h x w).
    usable = targets.get("gt_usable", batch["gt_valid"])  # hand-made targets: every valid one
    has_gt = usable.any(axis=1)[:, None, None, None]
    loss_semantic = cfg.semantic_loss_weight * ops.binary_cross_entropy_with_logits(
        semantic,
        semantic_targets(batch, cfg.num_classes, semantic.shape[1:3], usable),
        weights=has_gt,
        normalizer=b * semantic.shape[1] * semantic.shape[2],
    )
    total_positives = targets["positives"].sum().astype(jnp.float32)
    over = targets["overflow"].sum().astype(jnp.float32)
    metrics = {
        "loss_cls": loss_cls,
        "loss_box_reg": loss_box,
        "loss_mask": loss_mask,
        "loss_semantic": loss_semantic,
        "positive_anchors": total_positives / b,
        "mask_positives_over_budget": over / b,
        "mask_positives_over_budget_fraction": over / jnp.maximum(total_positives, 1.0),
    }
    return loss_cls + loss_box + loss_mask + loss_semantic, metrics


def semantic_targets(batch, num_classes: int, out_hw, usable=None):
    """float32[B, H/8, W/8, C]: per class, the union of its instances (those `usable`, bool[B,
    N], when given, else gt_valid) at stride 8 (a cell is inside a mask when more than half of
    its 2 x 2 stride-4 cells are)."""
    masks = batch["gt_full_masks"].astype(jnp.float32)  # [B, N, H/4, W/4]
    b, n = masks.shape[:2]
    oh, ow = out_hw
    pooled = masks[:, :, : 2 * oh, : 2 * ow].reshape(b, n, oh, 2, ow, 2).mean(axis=(3, 5)) > 0.5
    valid = batch["gt_valid"] if usable is None else usable
    onehot = jax.nn.one_hot(batch["gt_classes"], num_classes) * valid[..., None]
    return jnp.minimum(jnp.einsum("bnhw,bnc->bhwc", pooled.astype(jnp.float32), onehot), 1.0)


def detect(logits, deltas, coefficients, protos, batch, cfg: YOLACTConfig) -> dict:
    """Detections with boxes and canvas masks at stride 4 (structures.py).

    Per image: softmax class scores; per level the best test_candidates_per_level anchors by
    their best class score; boxes decoded and clipped to the image; per class the best
    test_top_k, Fast NMS at test_nms_threshold, scores > score_threshold; the best K over all
    classes; masks = sigmoid(prototypes x coefficients) cropped by the detected box.
    """
    anchors_by_level = cfg.anchors()
    scores = jax.nn.softmax(logits)[..., : cfg.num_classes]  # [B, T, C]
    k = cfg.detections_per_image

    def one_image(image_scores, image_deltas, image_coefficients, image_protos, image_hw):
        picked, start = [], 0
        for anchors in anchors_by_level:
            count = anchors.shape[0]
            best = image_scores[start : start + count].max(axis=1)
            top = min(cfg.test_candidates_per_level, count)
            _, index = ops.top_k(best, top)
            picked.append(start + index)
            start += count
        index = jnp.concatenate(picked)
        anchors = jnp.concatenate(anchors_by_level)[index]
        boxes = ops.decode_boxes(image_deltas[index], anchors, BOX_WEIGHTS)
        boxes = ops.clip_boxes(boxes, image_hw.astype(jnp.float32))
        chosen, classes, det_scores, valid = ops.per_class_fast_nms(
            boxes,
            image_scores[index],
            cfg.test_top_k,
            cfg.test_nms_threshold,
            cfg.score_threshold,
            k,
        )
        det_boxes = jnp.where(valid[:, None], boxes[chosen], 0.0)
        coeff = image_coefficients[index][chosen]  # [K, num_protos]
        masks = jax.nn.sigmoid(dense.dynamic_masks(image_protos[None], coeff[None])[0])
        masks = jnp.where(
            crop_masks(masks, det_boxes, PROTO_STRIDE) & valid[:, None, None], masks, 0.0
        )
        return det_boxes, det_scores, classes, valid, masks

    det_boxes, det_scores, det_classes, det_valid, det_masks = jax.vmap(one_image)(
        scores, deltas, coefficients, protos, batch["image_hw"]
    )
    return {
        "boxes": ops.original_detection_boxes(det_boxes, det_valid, batch),
        "scores": det_scores,
        "classes": det_classes,
        "valid": det_valid,
        "canvas_masks": det_masks,
    }


# ----------------------------------------------------------------------------- method interface

Config = YOLACTConfig
Model = YOLACT


def base_config() -> ml_collections.ConfigDict:
    """mmdetection's YOLACT R50 1x8 COCO settings (aspect-preserving input, module docstring)."""
    c = config_lib.base()
    c.method = "yolact"
    c.model = config_lib.model_section(YOLACTConfig)
    c.input.canvas_hw = (640, 640)
    c.input.short_side = (550,)
    c.input.max_long_side = 550
    c.input.test_short_side = 550
    c.input.test_max_long_side = 550
    c.input.global_batch = 8
    # mmdetection: SGD lr 1e-3, weight decay 5e-4, 500 warmup iterations from lr x 0.1, 55
    # epochs at batch 8 (14.7k iterations each) with decays at epochs 20, 42, 49 and 52.
    c.optim.lr = 1e-3
    c.optim.weight_decay = 5e-4
    c.schedule.warmup_steps = 500
    c.schedule.warmup_factor = 0.1
    c.schedule.total_steps = 55 * 14_658
    c.schedule.steps = tuple(epoch * 14_658 for epoch in (20, 42, 49, 52))
    return c


def object_sizes_covered(model: ml_collections.ConfigDict) -> tuple[str, float, float]:
    """(the field, smallest and largest object side, sqrt of box area in canvas pixels, that a
    square anchor matches at model.positive_iou) (method interface, optional)."""
    ratio = math.sqrt(float(model.positive_iou))
    sides = [float(s) for s in model.anchor_sizes]
    return "model.anchor_sizes", min(sides) * ratio, max(sides) / ratio


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a YOLACT config to seconds on a CPU: synthetic scenes, ResNet-18 of width 16, a
    128x128 canvas, narrow heads."""
    c = config_lib.smoke_common(c)
    m = c.model
    smoke_backbone(m)
    m.fpn_channels = 32
    m.anchor_sizes = (12, 24, 48, 96, 192)
    m.num_protos = 8
    m.proto_channels = 32
    m.masks_per_image = 16
    if m.anchor_extent_hw:  # the stretched image on the smoke canvas
        m.anchor_extent_hw = tuple(c.input.stretch_hw)
    m.test_candidates_per_level = 200
    m.test_top_k = 50
    m.detections_per_image = 50
    c.optim.weight_decay = 1e-4
    c.schedule.warmup_factor = 0.001
    return c
