"""PolarMask (Xie et al. 2020, "PolarMask: Single Shot Instance Segmentation with Polar
Representation"): the method module (methods/__init__.py). FCOS's detector (methods/fcos.py)
where every location also regresses the lengths of `num_rays` (36) rays at angles 0, 10, ...,
350 degrees to its instance's contour; the polygon of the ray ends is the mask. The defaults
follow xieenze/PolarMask (mmdet/models/anchor_heads/polarmask_head.py, mmdet/datasets/
coco_seg.py, configs/polarmask/4gpu/polar_768_1x_r50.py); every one is a config field.

Angles (the reference's): ray k points along (x, y) = (sin, cos)(2 pi k / num_rays) in canvas
pixels (y down), i.e. measured from +y towards +x (coco_seg.py get_36_coordinates' atan2(x, y),
polarmask_head.py distance2mask).

Head (polarmask_head.py _init_layers / forward_single): three towers of 4 x (conv3x3, GroupNorm
32, ReLU): classification (class logits and the centerness), regression (a box: 4 distances,
exp(level scale x output) pixels) and mask (the rays, exp(its own level scale x output)
pixels). `box_branch=False` drops the third tower: the rays on the regression tower, no box.

Targets: locations are assigned as FCOS assigns them (box sizes for the level ranges, the
smallest box for ties) with centre sampling about each instance's mass centre (radius 1.5
strides); the ray targets are computed on the device for at most `mask_instances_per_image`
positive locations per image (a uniform random subset when there are more; counted) from each
instance's contour, which the input pipeline takes as the reference does (input/contours.py:
the outer border of the mask's largest part, traced on the mask at canvas resolution, every
pixel; at most CONTOUR_POINTS, more kept on a grid and counted as contour_subsampled). A ray's
target (ray_rule "reference", get_36_coordinates): each contour point's angle about the
location truncated to a whole degree; the ray takes the farthest point at its own degree, else
at +1, -1, +2, -2, +3, -3 degrees (ray 0 does not wrap to 359..357, as there), else 1e-6;
`ray_rule="nearest"` takes the farthest point within `angle_tolerance` degrees of the point
nearest the ray's angle. The centerness target is sqrt(min / max) of the 36 targets (polar
centerness).

Losses (polarmask_head.py loss): FCOS's focal class loss; polar IoU loss log(sum max(d, d*) /
sum min(d, d*)) over the rays of each trained location and (box branch) IoU loss -log IoU of
its box, each weighted by its polar centerness target / the sum of those targets; centerness
BCE (on the classification tower) / trained locations.

Test (get_bboxes_single): per level the best 1000 (location, class) pairs by class score x
centerness among those whose class score passes 0.05, the box-branch boxes clipped to the image
(without the box branch: each ray polygon's box), class-aware NMS at 0.5, 100 detections scored
class score x (centerness + 0.5); the polygons (`polygons` payload: vertices clamped to the
image) are rasterised on the host by pycocotools.

Training data: the COCO recipe sets input.instance_filter = "coco_seg", coco_seg.py's drop of
instances with <= 15 mask pixels or under 10 x 10 px (counted as small_instance_dropped).

Known differences from the reference, and why:
- Input size: the COCO recipe stretches every image to exactly 1280 x 768 as the reference
  (resize_keep_ratio False, training and test; input.resize "stretch", a 768 x 1280 canvas;
  polygons map back per axis through the batch's scale_yx), but with PIL's bilinear filter
  (antialiased when shrinking) where mmcv uses cv2's. Contours are traced on the mask at canvas
  resolution through nearest original pixels (pixel centres), where the reference resizes the
  mask with cv2's nearest rule before tracing: a boundary may move by one canvas pixel.
- Norm parameters: mmdetection's build_optimizer (mmdet/apis/train.py) decays GroupNorm's
  weights and biases (norm_decay_mult 1); the optimizer here never decays norm parameters.
  Conv biases train at twice the learning rate without decay, as there (optim.bias_*).
- Backbone: torchvision's ImageNet ResNet-50 (pytorch style, RGB mean/std) where the reference
  loads open-mmlab's caffe-style ResNet-50 (stride in the 1x1 conv, BGR mean, std 1).
- Candidates: the reference keeps the best 1000 locations per level by their best class score
  x centerness and then every class of them above 0.05; here the best 1000 (location, class)
  pairs (a static top-k; FCOS's rule), which differs only where a location has several classes
  above 0.05 among the last ranks.
- Focal loss normaliser: the reference divides by positives + images (num_pos + num_imgs);
  here by positives (at least 1), FCOS's rule: 16 more in about a thousand at batch 16.
- Ray, box and centerness losses are taken over at most `mask_instances_per_image` positive
  locations per image (static shapes; the overflow is counted), the reference over all.
- Mass centres: the reference centres sampling on the centroid of the largest contour's polygon
  (get_centerpoint, truncated to integers); here the mean of the instance's visible pixels
  (structures.py gt_centers, shared with CondInst): within a pixel or so of it for a single
  part without holes.
- The largest contour is chosen by the part's pixel count, OpenCV's by its polygon's area
  (input/contours.py); they differ only between parts of similar size one of which is thin.
- The filter's area <= 15 test reads the mask's pixel count: the annotation's polygon area is
  not carried to the example.
- Contours: the canvas-resolution mask takes, per canvas pixel, the original pixel under its
  centre (mmcv's nearest resize takes floor(dst x src / dst)); contours over CONTOUR_POINTS
  (1024) are kept on a grid of 2+ px cells, where the reference keeps every pixel (how many
  COCO contours that reaches is not measured here: no COCO data on this machine).
- experiments/polarmask_nuclei.py uses ray_rule "nearest": on nuclei 5-47 px across the
  whole-degree rule leaves a quarter of the rays without a point (measured there).
- Images whose every instance the filter drops train as background; the reference skips them
  (draws another image), which a batch that is a pure function of seed and position cannot.
- Locations: (i + 0.5) x stride in continuous pixels (FCOS's location_offset), the reference's
  i x stride + stride // 2 in pixel indices: the same point half a pixel away from the contour
  pixels' centres, which moves each ray's angle by under half a pixel's.
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
from instseg_jax.backbones.resnet import normalize
from instseg_jax.methods import fcos

# L: the most contour points per instance the input pipeline sends (input/contours.py: more are
# kept on a grid, counted as contour_subsampled); 4 x 1280 + 4 x 768 would hold any box's
# perimeter on the COCO canvas, a 1024-point grid keeps a point every 2-4 px of the longest.
CONTOUR_POINTS = 1024

INPUTS = structures.Inputs(centers=True, contour_points=CONTOUR_POINTS)

# The reference's search order about a ray's integer degree (coco_seg.py get_36_coordinates).
_DEGREE_SEARCH = (0, 1, -1, 2, -2, 3, -3)


@dataclasses.dataclass(frozen=True)
class PolarMaskConfig(fcos.FCOSConfig):
    canvas_hw: tuple[int, int] = (1280, 1280)  # holds 768 x 1280 either way; 128 divides it
    num_rays: int = 36
    nms_threshold: float = 0.5
    detection_score: str = "product"
    centerness_score_offset: float = 0.5  # polarmask_head.py get_bboxes_single
    clip_before_nms: bool = True  # distance2bbox(max_shape=img_shape) before the NMS
    # A third tower whose 4 exp-activated distances (pixels) give the box NMS and the bbox
    # results use, trained by IoU loss weighted by the polar centerness (the reference's);
    # False: the rays on the regression tower, NMS on the ray polygon's box.
    box_branch: bool = True
    box_loss_weight: float = 1.0
    # "reference": the farthest contour point at the ray's integer degree, then +1, -1, ...,
    # -3 (module docstring); "nearest": the farthest of the points within angle_tolerance
    # degrees of the point nearest the ray's angle.
    ray_rule: str = "reference"
    angle_tolerance: float = 1.0  # degrees; ray_rule "nearest" only
    mask_instances_per_image: int = 250
    mask_loss_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.num_rays < 3 or 360 % self.num_rays:
            raise config_lib.ConfigValueError(
                f"model.num_rays must divide 360 (whole-degree rays) and be >= 3 (a polygon), "
                f"got {self.num_rays}"
            )
        config_lib.check_choice("model.ray_rule", self.ray_rule, ("reference", "nearest"))

    def ray_angles(self) -> np.ndarray:
        """float32[R]: 2 pi k / R, measured from +y towards +x (ray_directions)."""
        return (2 * np.pi * np.arange(self.num_rays) / self.num_rays).astype(np.float32)

    def ray_directions(self) -> np.ndarray:
        """float32[R, 2]: (x, y) = (sin, cos) of each ray's angle, the reference's convention
        (coco_seg.py get_36_coordinates: atan2(x, y); polarmask_head.py distance2mask)."""
        angles = self.ray_angles()
        return np.stack([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def ray_targets(points, contours, cfg: PolarMaskConfig):
    """float32[P, R] ray lengths from points [P, 2] to their instances' contour points
    [P, L, 2] (module docstring: the rule of cfg.ray_rule), at least 1e-6."""
    offsets = contours - points[:, None, :]  # [P, L, 2]
    distance = jnp.sqrt((offsets**2).sum(-1))  # [P, L]
    # The reference's angle: atan2(x, y) in degrees, from +y towards +x, in [0, 360).
    angle = jnp.degrees(jnp.arctan2(offsets[..., 0], offsets[..., 1]))
    angle = jnp.where(angle < 0, angle + 360.0, angle)
    if cfg.ray_rule == "nearest":
        rays = jnp.asarray(np.degrees(cfg.ray_angles()))
        diff = jnp.abs(jnp.remainder(angle[..., None] - rays + 180.0, 360.0) - 180.0)
        close = diff <= diff.min(axis=1, keepdims=True) + cfg.angle_tolerance  # [P, L, R]
        return jnp.maximum(jnp.where(close, distance[..., None], 0.0).max(axis=1), 1e-6)
    # Integer degrees (the reference truncates); float32 angles are nudged by 1e-4 degrees so
    # that a point exactly at a whole degree (axis or diagonal, common on the pixel grid) takes
    # it as exact arithmetic does. 360 (a float32 round-up) is a bin no ray reads, as there.
    degree = jnp.clip(jnp.floor(angle + 1e-4), 0, 360).astype(jnp.int32)
    p = points.shape[0]
    farthest = jnp.full((p, 361), -1.0, distance.dtype)
    farthest = farthest.at[jnp.arange(p)[:, None], degree].max(distance)  # [P, 361]
    ray_degree = np.arange(cfg.num_rays) * (360 // cfg.num_rays)
    length = jnp.full((p, cfg.num_rays), 1e-6, distance.dtype)
    found = jnp.zeros((p, cfg.num_rays), bool)
    for step in _DEGREE_SEARCH:
        wanted = ray_degree + step
        inside = (wanted >= 0) & (wanted < 360)  # no wrap: 0 - 1 is never a point's degree
        value = farthest[:, np.clip(wanted, 0, 359)]
        hit = jnp.asarray(inside) & (value >= 0) & ~found
        length = jnp.where(hit, value, length)
        found = found | hit
    return jnp.maximum(length, 1e-6)


def polar_centerness(rays):
    """sqrt(min / max) over the last axis."""
    return jnp.sqrt(rays.min(-1) / jnp.maximum(rays.max(-1), 1e-6))


def ray_polygons(rays, points, cfg: PolarMaskConfig):
    """float32[..., R, 2] (x, y) ray ends of lengths rays [..., R] about points [..., 2]."""
    direction = jnp.asarray(cfg.ray_directions())  # [R, 2]
    return points[..., None, :] + rays[..., None] * direction


def polar_iou_loss(predicted, target, weights, normalizer):
    """sum over slots of weights x log(sum_k max(d, d*) / sum_k min(d, d*)) / normalizer."""
    total = jnp.maximum(predicted, target).sum(-1)
    inner = jnp.maximum(jnp.minimum(predicted, target).sum(-1), 1e-6)
    return (jnp.log(total / inner) * weights).sum() / normalizer


def box_iou_loss(predicted, target, weights, normalizer):
    """sum over slots of weights x -log(IoU) / normalizer, for (l, t, r, b) distances [..., 4]
    about one point; IoU at least 1e-6 (mmdetection's iou_loss, which the reference uses; its
    +1 pixel widths are the inclusive-pixel boxes' extent, which continuous boxes have)."""
    inter_w = jnp.minimum(predicted[..., 0], target[..., 0]) + jnp.minimum(
        predicted[..., 2], target[..., 2]
    )
    inter_h = jnp.minimum(predicted[..., 1], target[..., 1]) + jnp.minimum(
        predicted[..., 3], target[..., 3]
    )
    inter = jnp.maximum(inter_w, 0.0) * jnp.maximum(inter_h, 0.0)
    area_p = (predicted[..., 0] + predicted[..., 2]) * (predicted[..., 1] + predicted[..., 3])
    area_t = (target[..., 0] + target[..., 2]) * (target[..., 1] + target[..., 3])
    iou = inter / jnp.maximum(area_p + area_t - inter, 1e-6)
    return (-jnp.log(jnp.maximum(iou, 1e-6)) * weights).sum() / normalizer


class RayHead(fcos.Head):
    """FCOS's head with exp(level scale x output) regressions in pixels and the centerness on
    the classification tower. num_rays > 0 (the box branch): the regression tower predicts the
    box's 4 distances and a third tower ("mask", its own level scales) the rays, as the
    reference's cls / reg / mask convs; 0: the regression (regression_channels) is the rays."""

    num_rays: int = 0

    def setup(self):
        super().setup()
        if not self.num_rays:
            return
        self.setup_tower("mask")
        self.ray_pred = self.conv3x3(self.num_rays, "ray_pred")
        if self.level_scales:
            self.ray_scales = self.param(
                "ray_scales", nn.initializers.ones, (len(fcos.LEVEL_STRIDES),)
            )

    def activation(self, raw):
        return jnp.exp(raw)

    def centerness_tower(self, cls, box):
        del box
        return cls

    def __call__(self, x, level: int):
        """FCOS's head outputs, then (box branch) the rays [B, h w, num_rays] in pixels."""
        outputs = super().__call__(x, level)
        if not self.num_rays:
            return outputs
        raw = self.ray_pred(self.tower(x, "mask")).astype(jnp.float32)
        if self.level_scales:
            raw = raw * self.ray_scales[level]
        return (*outputs, jnp.exp(raw).reshape(x.shape[0], -1, self.num_rays))


class PolarMask(fcos.FCOS):
    """FCOS with 36 exp-activated ray lengths per location (predictions' "rays"), the centerness
    on the classification tower and (box_branch) exp-activated box distances in pixels
    ("distances")."""

    cfg: PolarMaskConfig

    def setup_head(self):
        cfg = self.cfg
        if cfg.box_branch:
            super().setup_head(RayHead, regression_channels=4, num_rays=cfg.num_rays)
        else:
            super().setup_head(RayHead, regression_channels=cfg.num_rays)

    def predict(self, image) -> dict:
        """FCOS's predictions with "rays" [B, T, R] pixels (without the box branch the same
        array as "distances")."""
        features = self.fpn(self.backbone(normalize(image, self.cfg.dtype)))
        outs = [self.head(features[f"p{level}"], level - 3) for level in range(3, 8)]

        def levels(i):
            return jnp.concatenate([o[i] for o in outs], axis=1)

        return {
            "class_logits": levels(0),
            "distances": levels(1),
            "centerness_logits": levels(2),
            "rays": levels(4) if self.cfg.box_branch else levels(1),
            "features": features,
            "towers": [o[3] for o in outs],
        }

    def prediction_outputs(self, predictions: dict) -> dict:
        names = ("class_logits", "rays", "centerness_logits")
        outputs = {name: predictions[name] for name in names}
        if self.cfg.box_branch:
            outputs["box_distances"] = predictions["distances"]  # [B, T, 4] pixels
        return outputs

    def assign(self, batch: dict) -> dict:
        """FCOS's assignment with centre sampling about the instances' mass centres."""
        return fcos.batch_targets(batch, self.cfg, centres=batch["gt_centers"])

    def head_training(self, predictions: dict, targets: dict, batch: dict, key) -> dict:
        """The trained slots' predicted rays, boxes and centerness logits, and their targets."""
        cfg = self.cfg
        points, strides, _ = (jnp.asarray(a) for a in cfg.locations())
        slots = fcos.positive_slots(targets, cfg.mask_instances_per_image, key)
        contours = jnp.take_along_axis(
            batch["gt_contours"], slots["gt"][..., None, None], axis=1
        )  # [B, P, L, 2]
        slot_rays = jax.lax.stop_gradient(
            jax.vmap(lambda loc, c: ray_targets(points[loc], c, cfg))(slots["location"], contours)
        )
        location = slots["location"][..., None]
        outputs = {
            "slot_rays": jnp.take_along_axis(predictions["rays"], location, axis=1),
            "slot_centerness_logits": jnp.take_along_axis(
                predictions["centerness_logits"], slots["location"], axis=1
            ),
            "targets": {
                **targets,
                "slot_valid": slots["valid"],
                "slot_rays": slot_rays,
                "slot_centerness": polar_centerness(slot_rays),
                "overflow": slots["overflow"],
            },
        }
        if cfg.box_branch:
            outputs["slot_boxes"] = jnp.take_along_axis(predictions["distances"], location, axis=1)
            # FCOS's targets are in strides; the box branch predicts pixels.
            outputs["targets"]["slot_boxes"] = (
                jnp.take_along_axis(targets["distances"], location, axis=1)
                * strides[slots["location"]][..., None]
            )
        return outputs

    def select_detections(self, predictions: dict, batch: dict) -> dict:
        """FCOS's test procedure, the candidates' boxes from the box branch (or, without it,
        each one's ray polygon's box)."""
        cfg = self.cfg
        if cfg.box_branch:
            distances = predictions["distances"]

            def decode(lengths, centres, _strides):
                return fcos.distance_boxes(lengths, centres)
        else:
            distances = predictions["rays"]

            def decode(lengths, centres, _strides):
                vertices = ray_polygons(lengths, centres, cfg)  # [n, R, 2]
                return jnp.concatenate([vertices.min(axis=1), vertices.max(axis=1)], axis=-1)

        return fcos.select_detections(
            predictions["class_logits"],
            distances,
            predictions["centerness_logits"],
            batch["image_hw"],
            cfg,
            decode_boxes=decode,
        )

    def payloads(self, predictions: dict, kept: dict, batch: dict) -> dict:
        """The `polygons` payload: the kept locations' ray polygons in original pixels."""
        cfg = self.cfg
        points = jnp.asarray(cfg.locations()[0])
        rays = predictions["rays"]
        chosen = jnp.take_along_axis(rays, kept["location"][..., None], axis=1)  # [B, K, R]
        canvas = ray_polygons(chosen, points[kept["location"]], cfg)  # [B, K, R, 2]
        b, k, r, _ = canvas.shape
        as_boxes = jnp.concatenate([canvas, canvas], axis=-1).reshape(b, k * r, 4)
        original = fcos.canvas_to_original(as_boxes, batch, cfg)[..., :2].reshape(b, k, r, 2)
        return {"polygons": jnp.where(kept["valid"][..., None, None], original, 0.0)}


def loss_fn(outputs: dict, batch: dict, cfg: PolarMaskConfig) -> tuple[jnp.ndarray, dict]:
    """Focal class loss, polar IoU loss, (box branch) IoU box loss and polar centerness BCE
    (module docstring)."""
    targets = outputs["targets"]
    b = targets["classes"].shape[0]
    loss_cls = fcos.class_loss(outputs["class_logits"], targets, cfg)
    valid = targets["slot_valid"]
    ctr_target = targets["slot_centerness"] * valid
    loss_mask = cfg.mask_loss_weight * polar_iou_loss(
        outputs["slot_rays"],
        targets["slot_rays"],
        ctr_target,
        jnp.maximum(ctr_target.sum(), 1e-6),
    )
    loss_ctr = ops.binary_cross_entropy_with_logits(
        outputs["slot_centerness_logits"],
        targets["slot_centerness"],
        weights=valid,
        normalizer=jnp.maximum(valid.sum().astype(jnp.float32), 1.0),
    )
    total = loss_cls + loss_mask + loss_ctr
    box_metrics = {}
    if cfg.box_branch:
        loss_box = cfg.box_loss_weight * box_iou_loss(
            outputs["slot_boxes"],
            targets["slot_boxes"],
            ctr_target,
            jnp.maximum(ctr_target.sum(), 1e-6),
        )
        total = total + loss_box
        box_metrics["loss_box_reg"] = loss_box
    metrics = {
        "loss_cls": loss_cls,
        "loss_mask": loss_mask,
        "loss_centerness": loss_ctr,
        **box_metrics,
        "positive_locations": targets["positives"].sum().astype(jnp.float32) / b,
        "unassigned_instances": targets["unassigned"].sum().astype(jnp.float32) / b,
        **fcos.slot_budget_metrics(targets),
    }
    return total, metrics


# ----------------------------------------------------------------------------- method interface

Config = PolarMaskConfig
Model = PolarMask


def base_config() -> ml_collections.ConfigDict:
    """xieenze/PolarMask's polar_768_1x_r50 COCO settings but its stretch (which the COCO
    experiment adds: input.resize "stretch" to 768 x 1280): short side 768 (long side at most
    1280) on a 1280 x 1280 canvas, batch 16, SGD lr 0.01, weight decay 1e-4 (biases: lr x 2,
    no decay), 500 linear warmup steps from lr / 3, 12 epochs (87,960 steps at batch 16) with
    decays after epochs 8 and 11, gradients clipped at norm 35."""
    c = fcos.base_config()
    c.method = "polarmask"
    c.model = config_lib.model_section(PolarMaskConfig)
    c.input.canvas_hw = (1280, 1280)
    c.input.short_side = (768,)
    c.input.max_long_side = 1280
    c.input.test_short_side = 768
    c.input.test_max_long_side = 1280
    c.optim.clip_norm = 35.0
    c.optim.bias_lr_multiplier = 2.0  # paramwise_options bias_lr_mult
    c.optim.bias_weight_decay_multiplier = 0.0  # bias_decay_mult
    c.schedule.warmup_steps = 500
    c.schedule.warmup_factor = 1.0 / 3  # warmup_ratio
    c.schedule.total_steps = 12 * 7330  # 117,266 COCO images with instances / 16 per step
    c.schedule.steps = (8 * 7330, 11 * 7330)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a PolarMask config to seconds on a CPU: FCOS's smoke shrink plus 16 ray slots."""
    c = fcos.smoke(c)
    c.model.mask_instances_per_image = 16
    return c
