"""FCOS (Tian et al. 2019, "FCOS: Fully Convolutional One-Stage Object Detection"): the method
module (methods/__init__.py), boxes only. Every location of P3..P7 predicts class scores, its
distances to the four sides of a box (in units of its level's stride) and a centerness. The
defaults follow AdelaiDet's configs/FCOS-Detection/R_50_1x.yaml (FCOS with the improvements
it ships on: centre sampling, GIoU, centerness on the regression tower, normalised regression
targets); every one is a config field, and `TORCHVISION` lists the conventions torchvision's
`fcos_resnet50_fpn` differs by (weights/torchvision.py switches them on import).

Static shapes:
  locations    T = sum over P3..P7 of h x w locations; assignment is a padded [T, N] test of
               every location against every ground-truth slot (padding never matches).
  test         per level the best `candidates_per_level` (location, class) pairs above the
               score threshold, ranked by class score x centerness (a fixed top_k whose slots
               below the threshold stay invalid), boxes decoded and clipped to the image,
               class-aware NMS over all levels, the best `detections_per_image`.

Assignment (both references): a location is positive for a ground truth when it lies strictly
inside the box, within `center_sampling_radius` strides of the box centre on both axes (the
centre region clipped to the box, i.e. the intersection of the two), and the largest of its
four distances lies in its level's range of `sizes_of_interest` ([0, 64], [64, 128], ...,
[512, inf); AdelaiDet's closed bounds, torchvision's open ones: `size_range_bounds`). A
location that several ground truths claim takes the smallest box (the first slot among equal
areas). A location that is not positive and lies in an ignore region (an instance beyond
input.max_instances; ops.assign.ignore_mask) takes no class loss.

Losses: sigmoid focal loss (alpha 0.25, gamma 2) over all locations and classes / the number of
positives in the global batch (at least 1); GIoU loss over the positives weighted by their
centerness targets / the sum of those targets (`box_loss_weighting="centerness"`; torchvision:
"none", / positives), its IoU term smoothed as AdelaiDet's, (I + 1) / (U + 1) in strides^2
(`giou_smoothing`; torchvision: 0); centerness BCE over the positives / positives.
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
from instseg_jax.nn.layers import Conv, GroupNorm
from instseg_jax.ops import dense
from instseg_jax.ops.assign import ignore_mask

LEVEL_STRIDES = (8, 16, 32, 64, 128)

INPUTS = structures.Inputs()

# The conventions by which torchvision's fcos_resnet50_fpn differs from AdelaiDet's FCOS.
TORCHVISION = {
    "location_offset": 0.0,  # its anchors (stride-sized squares) are centred on i x stride
    "level_scales": False,  # no learnable scale per level
    "score_threshold": 0.2,  # on sqrt(class score x centerness), not on the class score
    "score_threshold_on": "combined",
    "box_loss_weighting": "none",
    "size_range_bounds": "open",  # FCOS.compute_loss: lower < max(l, t, r, b) < upper
    "giou_smoothing": 0.0,  # torchvision's generalized_box_iou_loss: eps 1e-7 only
    "clip_before_nms": True,  # postprocess_detections clips, then batched_nms
    "freeze_at": 2,  # trainable_backbone_layers=3
}


@dataclasses.dataclass(frozen=True)
class FCOSConfig(DetectorConfig):
    canvas_hw: tuple[int, int] = (1408, 1408)  # a multiple of 128 that holds 800 x 1333
    fpn_channels: int = 256
    head_convs: int = 4
    location_offset: float = 0.5  # locations at (i + offset) x stride: AdelaiDet's stride // 2
    level_scales: bool = True  # a learnable scalar per level on the regression output
    sizes_of_interest: tuple = (64, 128, 256, 512)  # level boundaries of max(l, t, r, b)
    # "closed": max(l, t, r, b) in [low, high] of its level (AdelaiDet's fcos_outputs.py);
    # "open": in (low, high) (torchvision's fcos.py FCOS.compute_loss, strict > and <): a
    # location whose largest distance is exactly a boundary is positive on no level there.
    size_range_bounds: str = "closed"
    center_sampling_radius: float = 1.5  # in strides; 0 turns centre sampling off
    prior_prob: float = 0.01
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss_weighting: str = "centerness"  # or "none"
    # Added to the IoU term's intersection and union, in stride^2 (the regression is in
    # strides): AdelaiDet's adet/utils/comm.py compute_ious (IOULoss) adds 1.
    giou_smoothing: float = 1.0
    score_threshold: float = 0.05
    # Candidates above the threshold by "class": class score; "product": class score x
    # centerness (AdelaiDet's THRESH_WITH_CTR); "combined": sqrt(class score x centerness).
    score_threshold_on: str = "class"
    detection_score: str = "sqrt"  # of class score x centerness; "product": PolarMask's
    # "product" scores class score x (centerness + this): PolarMask's polarmask_head.py adds 0.5
    centerness_score_offset: float = 0.0
    candidates_per_level: int = 1000
    nms_threshold: float = 0.6
    # AdelaiDet runs NMS on the decoded boxes and clips the kept ones to the image afterwards
    # (fcos_outputs.py select_over_all_levels, then detector_postprocess); torchvision clips
    # first, which changes the IoU of boxes reaching past the border.
    clip_before_nms: bool = False
    detections_per_image: int = 100
    box_rescale: str = "scale"  # "per_axis": original / resized size per axis (torchvision)

    COARSEST_LEVEL = ("P7", 128)

    def __post_init__(self):
        super().__post_init__()
        config_lib.check_choice("model.box_rescale", self.box_rescale, ("scale", "per_axis"))
        if len(self.sizes_of_interest) != len(LEVEL_STRIDES) - 1:
            raise config_lib.ConfigValueError(
                f"model.sizes_of_interest needs {len(LEVEL_STRIDES) - 1} boundaries between "
                f"the levels P3..P7, got {self.sizes_of_interest}"
            )
        config_lib.check_choice(
            "model.size_range_bounds", self.size_range_bounds, ("closed", "open")
        )
        config_lib.check_choice(
            "model.box_loss_weighting", self.box_loss_weighting, ("centerness", "none")
        )
        config_lib.check_choice("model.detection_score", self.detection_score, ("sqrt", "product"))
        config_lib.check_choice(
            "model.score_threshold_on", self.score_threshold_on, ("class", "product", "combined")
        )

    def level_shapes(self) -> list[tuple[int, int]]:
        return ops.level_shapes(self.canvas_hw, LEVEL_STRIDES)

    def locations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(float32[T, 2] (x, y) canvas locations, level by level and row-major within one;
        float32[T] their strides; float32[T, 2] the (low, high) range of max(l, t, r, b))."""
        bounds = (0.0, *(float(s) for s in self.sizes_of_interest), math.inf)
        points, strides, ranges = [], [], []
        levels = zip(self.level_shapes(), LEVEL_STRIDES, strict=True)
        for level, ((h, w), stride) in enumerate(levels):
            ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            xy = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
            points.append((xy + self.location_offset) * stride)
            strides.append(np.full(h * w, stride, np.float64))
            ranges.append(np.tile([bounds[level], bounds[level + 1]], (h * w, 1)))
        return (
            np.concatenate(points).astype(np.float32),
            np.concatenate(strides).astype(np.float32),
            np.concatenate(ranges).astype(np.float32),
        )


class Head(nn.Module):
    """Shared over P3..P7: a classification and a regression tower of `convs` x (conv3x3 with
    bias, GroupNorm 32, ReLU); class logits (prior-probability bias) on the first, box distances
    and the centerness logit on the second; a learnable scale per level on the distances.

    A method with another regression subclasses it (PolarMask's ray head): `regression_channels`
    outputs per location, `activation` of the scaled output, `centerness_tower`."""

    num_classes: int
    channels: int
    convs: int
    prior_prob: float
    level_scales: bool
    dtype: jnp.dtype = jnp.float32
    regression_channels: int = 4

    def setup(self):
        for tower in ("cls", "box"):
            self.setup_tower(tower)
        prior = ops.probability_logit(self.prior_prob)
        self.cls_logits = self.conv3x3(
            self.num_classes, "cls_logits", nn.initializers.constant(prior)
        )
        self.bbox_pred = self.conv3x3(self.regression_channels, "bbox_pred")
        self.centerness = self.conv3x3(1, "centerness")
        if self.level_scales:
            self.scales = self.param("scales", nn.initializers.ones, (len(LEVEL_STRIDES),))

    def conv3x3(self, features: int, name: str, bias_init=nn.initializers.zeros) -> Conv:
        """One of the head's convs (in setup): 3 x 3, same padding, kernel normal(0.01)."""
        return Conv(
            features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=bias_init,
            name=name,
        )

    def setup_tower(self, name: str) -> None:
        """The `convs` x (conv3x3, GroupNorm 32) of the tower `name` (in setup), which `tower`
        applies."""
        for i in range(self.convs):
            setattr(self, f"{name}_conv{i}", self.conv3x3(self.channels, f"{name}_conv{i}"))
            setattr(
                self,
                f"{name}_norm{i}",
                GroupNorm(32, self.dtype, name=f"{name}_norm{i}"),
            )

    def tower(self, x, name):
        for i in range(self.convs):
            x = getattr(self, f"{name}_conv{i}")(x)
            x = nn.relu(getattr(self, f"{name}_norm{i}")(x))
        return x

    def activation(self, raw):
        """The regression from the (level-scaled) output: distances in strides, >= 0."""
        return nn.relu(raw)

    def centerness_tower(self, cls, box):
        """The tower whose features the centerness reads: the regression tower."""
        del cls
        return box

    def __call__(self, x, level: int):
        """x [B, h, w, D] of level index `level` -> class logits [B, h w, C], the regression
        [B, h w, regression_channels] (FCOS: l, t, r, b distances in strides), centerness logits
        [B, h w], and the regression tower's features [B, h, w, D] (CondInst's controller and
        BlendMask's top layer read them)."""
        b = x.shape[0]
        cls = self.tower(x, "cls")
        logits = self.cls_logits(cls)
        box = self.tower(x, "box")
        raw = self.bbox_pred(box).astype(jnp.float32)
        if self.level_scales:
            raw = raw * self.scales[level]
        centerness = self.centerness(self.centerness_tower(cls, box))
        return (
            logits.reshape(b, -1, self.num_classes).astype(jnp.float32),
            self.activation(raw).reshape(b, -1, self.regression_channels),
            centerness.reshape(b, -1).astype(jnp.float32),
            box,
        )


LOCATION_OUTPUTS = ("class_logits", "distances", "centerness_logits")


class FCOS(nn.Module):
    """FCOS's detector, with the hooks a method built on it overrides (as `MaskRCNN` has them for
    the R-CNN family): `setup_head` (the head over P3..P7), `predict` (what the model predicts per
    location and per image), `prediction_outputs` (which predictions the outputs carry), `assign`
    (the location targets), `head_training` (training outputs beyond FCOS's: the per-instance
    branch on `positive_slots`), `select_detections` (the test procedure on the canvas) and
    `payloads` (what the detections carry besides boxes, scores and classes)."""

    cfg: FCOSConfig

    def setup(self):
        cfg = self.cfg
        self.backbone = build_backbone(cfg)
        self.fpn = FPNP3P7(
            cfg.fpn_channels,
            cfg.dtype,
            extra_input="p5",
            relu_before_p7=True,
            upsample="nearest",
            init_fan="fan_in",
        )
        self.setup_head()

    def setup_head(self, head_class=Head, **fields):
        """The head shared over P3..P7: `Head`, or a method's subclass of it with its fields."""
        cfg = self.cfg
        self.head = head_class(
            cfg.num_classes,
            cfg.fpn_channels,
            cfg.head_convs,
            cfg.prior_prob,
            cfg.level_scales,
            cfg.dtype,
            **fields,
        )

    def predict(self, image) -> dict:
        """Per location over P3..P7 (level by level): "class_logits" [B, T, C], "distances"
        [B, T, R] (the head's regression: l, t, r, b in strides for FCOS), "centerness_logits"
        [B, T]; "features" the pyramid {"p3".."p7"}; "towers" the regression tower's features of
        each level. A method with more branches adds their predictions."""
        return self.heads(self.fpn(self.backbone(normalize(image, self.cfg.dtype))))

    def heads(self, features: dict) -> dict:
        """predict's outputs from the pyramid features["p3".."p7"] [B, h, w, fpn_channels]: the
        heads alone (the mmdetection head-parameter parity, weights/mmdet_condinst_head.py,
        runs them on given maps)."""
        outs = [self.head(features[f"p{level}"], level - 3) for level in range(3, 8)]
        logits, distances, centerness = (
            jnp.concatenate([o[i] for o in outs], axis=1) for i in range(3)
        )
        return {
            "class_logits": logits,
            "distances": distances,
            "centerness_logits": centerness,
            "features": features,
            "towers": [o[3] for o in outs],
        }

    def prediction_outputs(self, predictions: dict) -> dict:
        """The predictions the outputs carry: the per-location ones the loss reads, and FCOS's
        pyramid (weights/parity.py compares it with torchvision's)."""
        return {name: predictions[name] for name in (*LOCATION_OUTPUTS, "features")}

    def assign(self, batch: dict) -> dict:
        """The location targets of the batch (`batch_targets`)."""
        return batch_targets(batch, self.cfg)

    def head_training(self, predictions: dict, targets: dict, batch: dict, key) -> dict:
        """The training outputs besides the predictions: FCOS's are the location targets; a
        method with a per-instance branch adds its slots to them (`positive_slots`) and returns
        that branch's outputs too."""
        del predictions, batch, key
        return {"targets": targets}

    def select_detections(self, predictions: dict, batch: dict) -> dict:
        """The test procedure on the canvas (module-level `select_detections`)."""
        return select_detections(
            predictions["class_logits"],
            predictions["distances"],
            predictions["centerness_logits"],
            batch["image_hw"],
            self.cfg,
        )

    def payloads(self, predictions: dict, kept: dict, batch: dict) -> dict:
        """What the detections carry besides boxes, scores and classes (FCOS: nothing) from the
        kept detections on the canvas (`select_detections`: their locations and boxes)."""
        del predictions, kept, batch
        return {}

    def detect(self, predictions: dict, batch: dict) -> dict:
        """Detections (structures.py) with the method's payloads."""
        kept = self.select_detections(predictions, batch)
        detections = original_detections(kept, batch, self.cfg)
        detections.update(self.payloads(predictions, kept, batch))
        return detections

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        predictions = self.predict(batch["image"])
        outputs = self.prediction_outputs(predictions)
        if not train:
            outputs["detections"] = self.detect(predictions, batch)
            return outputs
        targets = self.assign(batch)
        outputs.update(self.head_training(predictions, targets, batch, key))
        return outputs


def batch_targets(batch: dict, cfg: FCOSConfig, centres=None) -> dict:
    """`location_targets` of every image of the batch (each value gains a leading B axis);
    centres float32[B, N, 2]: centre sampling about them instead of the box centres."""
    points, strides, ranges = (jnp.asarray(a) for a in cfg.locations())
    return jax.lax.stop_gradient(
        jax.vmap(
            lambda boxes, classes, valid, ignore, ignore_ok, centres: location_targets(
                points, strides, ranges, boxes, classes, valid, cfg, ignore, ignore_ok, centres
            )
        )(
            batch["gt_boxes"],
            batch["gt_classes"],
            batch["gt_valid"],
            batch.get("ignore_boxes"),
            batch.get("ignore_valid"),
            centres,
        )
    )


def location_targets(
    points,
    strides,
    ranges,
    gt_boxes,
    gt_classes,
    gt_valid,
    cfg: FCOSConfig,
    ignore_boxes=None,
    ignore_valid=None,
    centres=None,
):
    """One image's FCOS targets (module docstring: the assignment rule); with centres
    float32[N, 2] (x, y) the centre region is about them instead of the box centres.

    points float32[T, 2] (x, y); strides float32[T]; ranges float32[T, 2]; gt_boxes float32[N, 4]
    canvas xyxy; gt_classes int32[N]; gt_valid bool[N]; optional ignore_boxes float32[I, 4] and
    ignore_valid bool[I] (instances beyond input.max_instances). Returns a dict: classes
    int32[T] (the class of positives, C elsewhere), matched int32[T] (ground-truth slot, -1 for
    negatives), distances float32[T, 4] (l, t, r, b of the matched box in strides, 0 for
    negatives), centerness float32[T] (target, 0 for negatives), ignored bool[T] (negatives
    inside an ignore region: no class loss), positives int32, unassigned int32.
    """
    x, y = points[:, 0:1], points[:, 1:2]  # [T, 1]
    x0, y0, x1, y1 = (gt_boxes[None, :, i] for i in range(4))  # [1, N]
    ltrb = jnp.stack([x - x0, y - y0, x1 - x, y1 - y], axis=-1)  # [T, N, 4] pixels
    inside = ltrb.min(axis=-1) > 0
    if cfg.center_sampling_radius > 0:
        if centres is None:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        else:
            cx, cy = centres[None, :, 0], centres[None, :, 1]
        reach = cfg.center_sampling_radius * strides[:, None]
        inside &= (jnp.abs(x - cx) < reach) & (jnp.abs(y - cy) < reach)
    largest = ltrb.max(axis=-1)
    if cfg.size_range_bounds == "open":
        in_range = (largest > ranges[:, 0:1]) & (largest < ranges[:, 1:2])
    else:
        in_range = (largest >= ranges[:, 0:1]) & (largest <= ranges[:, 1:2])
    candidate = inside & in_range & gt_valid[None, :]
    area = (x1 - x0) * (y1 - y0)  # [1, N]
    area = jnp.where(candidate, area, jnp.inf)
    matched = jnp.argmin(area, axis=1).astype(jnp.int32)  # first slot among equal areas
    positive = jnp.isfinite(area.min(axis=1))
    chosen = jnp.take_along_axis(ltrb, matched[:, None, None], axis=1)[:, 0]  # [T, 4]
    ignored = jnp.zeros(positive.shape, bool)
    if ignore_boxes is not None:
        # Locations as zero-area boxes: inside an ignore region, not a positive -> no label.
        ignored = ~positive & ignore_mask(
            jnp.concatenate([points, points], axis=1), ignore_boxes, ignore_valid
        )
    lr, tb = chosen[:, 0::2], chosen[:, 1::2]
    ratio = (lr.min(axis=1) / jnp.maximum(lr.max(axis=1), 1e-6)) * (
        tb.min(axis=1) / jnp.maximum(tb.max(axis=1), 1e-6)
    )
    return {
        "classes": jnp.where(positive, gt_classes[matched], cfg.num_classes).astype(jnp.int32),
        "matched": jnp.where(positive, matched, -1),
        "distances": jnp.where(positive[:, None], chosen / strides[:, None], 0.0),
        "centerness": jnp.where(positive, jnp.sqrt(jnp.maximum(ratio, 0.0)), 0.0),
        "ignored": ignored,
        "positives": positive.sum().astype(jnp.int32),
        # Ground truths no location is assigned to (smaller than a stride, or claimed by
        # smaller boxes everywhere): they train nothing, so the metrics count them.
        "unassigned": (gt_valid & ~jnp.zeros(gt_valid.shape, bool).at[matched].max(positive))
        .sum()
        .astype(jnp.int32),
    }


def positive_slots(targets: dict, budget: int, key: jax.Array | None) -> dict:
    """The positive locations a mask head trains on, at most `budget` per image (a uniform random
    subset when there are more; the rest are counted): {location int32[B, P], valid bool[B, P],
    gt int32[B, P] (the matched ground-truth slot, 0 for padding), overflow int32[B]}."""
    if key is None:
        raise ValueError("training needs a key for the choice of mask slots")
    positive = targets["matched"] >= 0
    location, valid, overflow = jax.vmap(lambda v, k: dense.budgeted_select(v, budget, k))(
        positive, jax.random.split(key, positive.shape[0])
    )
    gt = jnp.where(valid, jnp.take_along_axis(targets["matched"], location, axis=1), 0)
    return {"location": location, "valid": valid, "gt": gt, "overflow": overflow}


def slot_budget_metrics(targets: dict) -> dict:
    """What `positive_slots` left out: positive locations over the budget per image, and as a
    fraction of all positives (targets carry "overflow" [B] and "positives" [B])."""
    over = targets["overflow"].sum().astype(jnp.float32)
    positives = targets["positives"].sum().astype(jnp.float32)
    return {
        "mask_positives_over_budget": over / targets["overflow"].shape[0],
        "mask_positives_over_budget_fraction": over / jnp.maximum(positives, 1.0),
    }


def distance_boxes(distances, points):
    """xyxy boxes [..., 4] from (l, t, r, b) distances [..., 4] about points [..., 2]."""
    return jnp.concatenate([points - distances[..., :2], points + distances[..., 2:]], axis=-1)


def loss_fn(outputs: dict, batch: dict, cfg: FCOSConfig) -> tuple[jnp.ndarray, dict]:
    """Focal class loss, GIoU box loss and centerness BCE (module docstring: normalisers)."""
    targets = outputs["targets"]
    classes = targets["classes"]  # [B, T]
    positive = classes < cfg.num_classes
    b = classes.shape[0]
    positives = positive.sum().astype(jnp.float32)
    normalizer = jnp.maximum(positives, 1.0)
    loss_cls = class_loss(outputs["class_logits"], targets, cfg)
    # GIoU is invariant to translation and scale: boxes about the origin, in strides.
    origin = jnp.zeros(classes.shape + (2,), jnp.float32)
    predicted = distance_boxes(outputs["distances"], origin)
    target = distance_boxes(targets["distances"], origin)
    safe_target = jnp.where(positive[..., None], target, jnp.array([-1.0, -1.0, 1.0, 1.0]))
    ctr_target = targets["centerness"]
    if cfg.box_loss_weighting == "centerness":
        box_weights, box_normalizer = ctr_target, jnp.maximum(ctr_target.sum(), 1e-6)
    else:
        box_weights, box_normalizer = positive, normalizer
    loss_box = ops.giou_loss(
        predicted,
        safe_target,
        weights=box_weights * positive,
        normalizer=box_normalizer,
        smooth=cfg.giou_smoothing,
    )
    loss_ctr = ops.binary_cross_entropy_with_logits(
        outputs["centerness_logits"], ctr_target, weights=positive, normalizer=normalizer
    )
    metrics = {
        "loss_cls": loss_cls,
        "loss_box_reg": loss_box,
        "loss_centerness": loss_ctr,
        "positive_locations": positives / b,
        "unassigned_instances": targets["unassigned"].sum().astype(jnp.float32) / b,
    }
    return loss_cls + loss_box + loss_ctr, metrics


def class_loss(class_logits, targets: dict, cfg: FCOSConfig):
    """Sigmoid focal loss over every location and class (none for ignored locations) / the
    number of positives in the batch (at least 1)."""
    classes = targets["classes"]  # [B, T]
    positives = (classes < cfg.num_classes).sum().astype(jnp.float32)
    return ops.sigmoid_focal_loss(
        class_logits,
        jax.nn.one_hot(classes, cfg.num_classes),  # C (background) -> all zeros
        cfg.focal_alpha,
        cfg.focal_gamma,
        weights=~targets["ignored"][..., None],
        normalizer=jnp.maximum(positives, 1.0),
    )


def detect(logits, distances, centerness, batch, cfg: FCOSConfig) -> dict:
    """Boxes-only Detections (structures.py); module docstring: the test procedure. Scores are
    sqrt(class score x centerness), as in both references."""
    kept = select_detections(logits, distances, centerness, batch["image_hw"], cfg)
    return original_detections(kept, batch, cfg)


def canvas_to_original(boxes, batch: dict, cfg: FCOSConfig):
    """Canvas xyxy boxes [B, ..., 4] at the original images' pixels (the batch's geometry and
    the config's rescale rule)."""
    return ops.canvas_to_original_boxes(
        boxes,
        batch["image_hw"],
        batch["orig_hw"],
        batch.get("scale_yx", batch["scale"]),
        batch["crop_offset"],
        batch.get("flipped"),
        per_axis=cfg.box_rescale == "per_axis",
    )


def original_detections(kept: dict, batch: dict, cfg: FCOSConfig) -> dict:
    """Detections' boxes, scores, classes and valid from `select_detections`' canvas boxes."""
    original = canvas_to_original(kept["boxes"], batch, cfg)
    return {
        "boxes": jnp.where(kept["valid"][..., None], original, 0.0),
        "scores": kept["scores"],
        "classes": kept["classes"],
        "valid": kept["valid"],
    }


def select_detections(
    logits, distances, centerness, image_hw, cfg: FCOSConfig, decode_boxes=None
) -> dict:
    """The test procedure on the canvas: {boxes float32[B, K, 4] canvas xyxy, scores, classes,
    valid, location int32[B, K] (the index into T each detection comes from)}.

    decode_boxes(distances [n, R], points [n, 2], strides [n]) -> boxes [n, 4] replaces FCOS's
    (l, t, r, b) x stride decoding (PolarMask: the box of the ray polygon)."""
    points, strides, _ = cfg.locations()
    sizes = [h * w for h, w in cfg.level_shapes()]
    probs = jax.nn.sigmoid(logits)  # [B, T, C]
    ctr = jax.nn.sigmoid(centerness)  # [B, T]
    c = cfg.num_classes

    def one_image(image_probs, image_distances, image_ctr, image_hw):
        boxes_all, scores_all, classes_all, valid_all, locations_all = [], [], [], [], []
        start = 0
        for count in sizes:
            level = slice(start, start + count)
            combined = image_probs[level] * image_ctr[level, None]  # [n, C]
            if cfg.score_threshold_on == "class":
                candidate = image_probs[level] > cfg.score_threshold
            elif cfg.score_threshold_on == "product":
                candidate = combined > cfg.score_threshold
            else:
                candidate = jnp.sqrt(combined) > cfg.score_threshold
            ranked = jnp.where(candidate, combined, -1.0).reshape(-1)
            top = min(cfg.candidates_per_level, count * c)
            best, flat = ops.top_k(ranked, top)
            location = flat // c
            point = jnp.asarray(points[level])[location]
            stride = jnp.asarray(strides[level])[location]
            chosen = image_distances[level][location]
            if decode_boxes is None:
                boxes = distance_boxes(chosen * stride[:, None], point)
            else:
                boxes = decode_boxes(chosen, point, stride)
            if cfg.clip_before_nms:
                boxes = ops.clip_boxes(boxes, image_hw.astype(jnp.float32))
            boxes_all.append(boxes)
            score = jnp.maximum(best, 0.0)
            if cfg.detection_score == "product" and cfg.centerness_score_offset:
                class_score = image_probs[level].reshape(-1)[flat]
                offset_ctr = image_ctr[level][location] + cfg.centerness_score_offset
                score = jnp.where(best >= 0.0, class_score * offset_ctr, 0.0)
            scores_all.append(jnp.sqrt(score) if cfg.detection_score == "sqrt" else score)
            classes_all.append((flat % c).astype(jnp.int32))
            valid_all.append(best >= 0.0)
            locations_all.append(start + location)
            start += count
        boxes, scores, classes, valid, location = (
            jnp.concatenate(v)
            for v in (boxes_all, scores_all, classes_all, valid_all, locations_all)
        )
        keep, _ = ops.batched_nms(
            boxes, scores, classes, cfg.nms_threshold, cfg.detections_per_image, valid
        )
        kept = keep >= 0
        index = jnp.maximum(keep, 0)
        boxes = ops.clip_boxes(boxes, image_hw.astype(jnp.float32))  # a no-op if done before
        return {
            "boxes": jnp.where(kept[:, None], boxes[index], 0.0),
            "scores": jnp.where(kept, scores[index], 0.0),
            "classes": jnp.where(kept, classes[index], 0),
            "valid": kept,
            "location": jnp.where(kept, location[index], 0).astype(jnp.int32),
        }

    return jax.vmap(one_image)(probs, distances, ctr, image_hw)


# ----------------------------------------------------------------------------- method interface

Config = FCOSConfig
Model = FCOS


def base_config() -> ml_collections.ConfigDict:
    """AdelaiDet's FCOS R_50_1x COCO settings: 800 x 1333 input on a 1408 x 1408 canvas (P7's
    stride 128 divides it; Mask R-CNN's 1344 does not), batch
    16, SGD lr 0.01, weight decay 1e-4, 1000 warmup iterations from lr / 1000 (detectron2's
    SOLVER.WARMUP_FACTOR default, which no AdelaiDet config overrides; the original FCOS code,
    on maskrcnn-benchmark, warmed up from lr / 3), 90k iterations with decays at 60k and 80k.
    Multi-scale short sides 640..800 (Base-FCOS.yaml; FCOS's R_50_1x recipe trains at 800)."""
    c = config_lib.base()
    c.method = "fcos"
    c.model = config_lib.model_section(FCOSConfig)
    c.input.canvas_hw = (1408, 1408)
    c.input.global_batch = 16
    c.optim.lr = 0.01
    c.optim.weight_decay = 1e-4
    c.schedule.warmup_steps = 1000
    c.schedule.warmup_factor = 1.0 / 1000
    c.schedule.total_steps = 90_000
    c.schedule.steps = (60_000, 80_000)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink an FCOS config to seconds on a CPU: synthetic scenes, ResNet-18 of width 16, a
    128x128 canvas, narrow towers of 2 convs."""
    c = config_lib.smoke_common(c)
    m = c.model
    smoke_backbone(m)
    m.fpn_channels = 32
    m.head_convs = 2
    m.sizes_of_interest = (32, 64, 128, 256)
    m.candidates_per_level = 200
    m.detections_per_image = 50
    c.optim.weight_decay = 1e-4
    c.schedule.warmup_factor = 0.001
    return c
