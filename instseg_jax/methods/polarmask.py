"""PolarMask (Xie et al. 2020, "PolarMask: Single Shot Instance Segmentation with Polar
Representation"): the method module (methods/__init__.py). FCOS's detector (methods/fcos.py)
where every location regresses, instead of a box, the lengths of `num_rays` (36) rays at angles
0, 10, ..., 350 degrees to its instance's contour; the polygon of the ray ends is the mask. The
defaults follow xieenze/PolarMask's configs/polarmask/4gpu/polar_768_1x_r50.py; every one is a
config field.

Angles: ray k points along (cos, sin)(2 pi k / num_rays) in canvas (x, y) pixels (y down).

Targets: locations are assigned as FCOS assigns them (box sizes for the level ranges, the
smallest box for ties) with centre sampling about each instance's mass centre (radius 1.5
strides); the ray targets are computed on the device for at most `mask_instances_per_image`
positive locations per image (a uniform random subset when there are more; counted) from each
instance's contour, which the input pipeline traces on the host (structures.py gt_contours: L
boundary points, the midpoints of the mask's pixel edges facing the background). A ray's target
is the distance to the contour point nearest its angle, the farthest of those within
`angle_tolerance` degrees of that nearest one (where a concave contour crosses the ray several
times: the reference takes the farthest point at the ray's integer degree, searching +-1..3
degrees when there is none, and 1e-6 past that); the centerness target is sqrt(min / max) of
the 36 targets (polar centerness). A location within about a pixel of its contour sees the
boundary points near it spread over wide angles, so a ray there can take a farther point's
length (the reference's integer-degree search shares the limit); tests/methods/
test_polarmask.py checks the rule against ray casting from locations inside the shapes.

Losses: FCOS's focal class loss; polar IoU loss log(sum max(d, d*) / sum min(d, d*)) over the
rays of each trained location, weighted by its centerness target / the sum of those targets;
centerness BCE (the centerness branch on the classification tower) / trained locations.
Predicted lengths are exp(level scale x output) pixels, as in the reference.

Test: FCOS's candidates (class score > 0.05, 1000 per level, ranked by class score x
centerness), the box of each ray polygon, class-aware NMS at 0.5, 100 detections scored class
score x centerness; the polygons (`polygons` payload: vertices clamped to the image) are
rasterised on the host by pycocotools.

Known differences from the reference: the reference resizes every image to exactly 1280 x 768
(aspect ratio not kept); here the short side is 768 and the long side at most 1280 on a
1280 x 1280 canvas. The reference traces the largest outer contour with OpenCV; the boundary
points here are every mask-background edge (holes and other parts included; the farthest point
per ray makes the outer contour win where they overlap in angle).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instseg_jax import config as config_lib
from instseg_jax import ops, structures
from instseg_jax.methods import fcos

CONTOUR_POINTS = 256  # L boundary points per instance from the input pipeline

INPUTS = structures.Inputs(centers=True, contour_points=CONTOUR_POINTS)


@dataclasses.dataclass(frozen=True)
class PolarMaskConfig(fcos.FCOSConfig):
    canvas_hw: tuple[int, int] = (1280, 1280)  # holds 768 x 1280 either way; 128 divides it
    num_rays: int = 36
    nms_threshold: float = 0.5
    detection_score: str = "product"
    angle_tolerance: float = 1.0  # degrees past the nearest contour point's angle
    mask_instances_per_image: int = 250
    mask_loss_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.num_rays < 3:
            raise config_lib.ConfigValueError(
                f"model.num_rays must be >= 3 (a polygon), got {self.num_rays}"
            )

    def ray_angles(self) -> np.ndarray:
        """float32[R]: 2 pi k / R."""
        return (2 * np.pi * np.arange(self.num_rays) / self.num_rays).astype(np.float32)


def ray_targets(points, contours, cfg: PolarMaskConfig):
    """float32[P, R] ray lengths from points [P, 2] to their instances' contours [P, L, 2] (module
    docstring: the rule), at least 1e-6."""
    offsets = contours - points[:, None, :]  # [P, L, 2]
    distance = jnp.sqrt((offsets**2).sum(-1))  # [P, L]
    angle = jnp.arctan2(offsets[..., 1], offsets[..., 0])  # [P, L]
    rays = jnp.asarray(cfg.ray_angles())
    # Circular difference in [0, pi] of every point's angle from every ray's.
    diff = jnp.abs(jnp.remainder(angle[..., None] - rays + math.pi, 2 * math.pi) - math.pi)
    nearest = diff.min(axis=1, keepdims=True)  # [P, 1, R]
    close = diff <= nearest + math.radians(cfg.angle_tolerance)
    return jnp.maximum(jnp.where(close, distance[..., None], 0.0).max(axis=1), 1e-6)


def polar_centerness(rays):
    """sqrt(min / max) over the last axis."""
    return jnp.sqrt(rays.min(-1) / jnp.maximum(rays.max(-1), 1e-6))


def ray_polygons(rays, points, cfg: PolarMaskConfig):
    """float32[..., R, 2] (x, y) ray ends of lengths rays [..., R] about points [..., 2]."""
    angles = jnp.asarray(cfg.ray_angles())
    direction = jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)  # [R, 2]
    return points[..., None, :] + rays[..., None] * direction


def polar_iou_loss(predicted, target, weights, normalizer):
    """sum over slots of weights x log(sum_k max(d, d*) / sum_k min(d, d*)) / normalizer."""
    total = jnp.maximum(predicted, target).sum(-1)
    inner = jnp.maximum(jnp.minimum(predicted, target).sum(-1), 1e-6)
    return (jnp.log(total / inner) * weights).sum() / normalizer


class RayHead(fcos.Head):
    """FCOS's head with ray lengths exp(level scale x output) pixels (regression_channels =
    num_rays) and the centerness on the classification tower."""

    def activation(self, raw):
        return jnp.exp(raw)

    def centerness_tower(self, cls, box):
        del box
        return cls


class PolarMask(fcos.FCOS):
    """FCOS with 36 exp-activated ray lengths per location (predictions' "distances") and the
    centerness on the classification tower."""

    cfg: PolarMaskConfig

    def setup_head(self):
        super().setup_head(RayHead, regression_channels=self.cfg.num_rays)

    def prediction_outputs(self, predictions: dict) -> dict:
        return {
            "class_logits": predictions["class_logits"],
            "rays": predictions["distances"],  # [B, T, R] pixels
            "centerness_logits": predictions["centerness_logits"],
        }

    def assign(self, batch: dict) -> dict:
        """FCOS's assignment with centre sampling about the instances' mass centres."""
        return fcos.batch_targets(batch, self.cfg, centres=batch["gt_centers"])

    def head_training(self, predictions: dict, targets: dict, batch: dict, key) -> dict:
        """The trained slots' predicted rays and centerness logits, and their ray targets."""
        cfg = self.cfg
        points = jnp.asarray(cfg.locations()[0])
        slots = fcos.positive_slots(targets, cfg.mask_instances_per_image, key)
        contours = jnp.take_along_axis(
            batch["gt_contours"], slots["gt"][..., None, None], axis=1
        )  # [B, P, L, 2]
        slot_rays = jax.lax.stop_gradient(
            jax.vmap(lambda loc, c: ray_targets(points[loc], c, cfg))(slots["location"], contours)
        )
        rays = predictions["distances"]
        return {
            "slot_rays": jnp.take_along_axis(rays, slots["location"][..., None], axis=1),
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

    def select_detections(self, predictions: dict, batch: dict) -> dict:
        """FCOS's test procedure with each candidate's box that of its ray polygon."""
        cfg = self.cfg

        def polygon_boxes(lengths, centres, _strides):
            vertices = ray_polygons(lengths, centres, cfg)  # [n, R, 2]
            return jnp.concatenate([vertices.min(axis=1), vertices.max(axis=1)], axis=-1)

        return fcos.select_detections(
            predictions["class_logits"],
            predictions["distances"],
            predictions["centerness_logits"],
            batch["image_hw"],
            cfg,
            decode_boxes=polygon_boxes,
        )

    def payloads(self, predictions: dict, kept: dict, batch: dict) -> dict:
        """The `polygons` payload: the kept locations' ray polygons in original pixels."""
        cfg = self.cfg
        points = jnp.asarray(cfg.locations()[0])
        rays = predictions["distances"]
        chosen = jnp.take_along_axis(rays, kept["location"][..., None], axis=1)  # [B, K, R]
        canvas = ray_polygons(chosen, points[kept["location"]], cfg)  # [B, K, R, 2]
        b, k, r, _ = canvas.shape
        as_boxes = jnp.concatenate([canvas, canvas], axis=-1).reshape(b, k * r, 4)
        original = fcos.canvas_to_original(as_boxes, batch, cfg)[..., :2].reshape(b, k, r, 2)
        return {"polygons": jnp.where(kept["valid"][..., None, None], original, 0.0)}


def loss_fn(outputs: dict, batch: dict, cfg: PolarMaskConfig) -> tuple[jnp.ndarray, dict]:
    """Focal class loss, polar IoU loss and polar centerness BCE (module docstring)."""
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
    metrics = {
        "loss_cls": loss_cls,
        "loss_mask": loss_mask,
        "loss_centerness": loss_ctr,
        "positive_locations": targets["positives"].sum().astype(jnp.float32) / b,
        "unassigned_instances": targets["unassigned"].sum().astype(jnp.float32) / b,
        **fcos.slot_budget_metrics(targets),
    }
    return loss_cls + loss_mask + loss_ctr, metrics


# ----------------------------------------------------------------------------- method interface

Config = PolarMaskConfig
Model = PolarMask


def base_config() -> ml_collections.ConfigDict:
    """xieenze/PolarMask's polar_768_1x_r50 COCO settings: short side 768 (long side at most
    1280) on a 1280 x 1280 canvas, batch 16, SGD lr 0.01, weight decay 1e-4, 500 linear warmup
    steps from lr / 3, 12 epochs (88k steps at batch 16) with decays after epochs 8 and 11,
    gradients clipped at norm 35."""
    c = fcos.base_config()
    c.method = "polarmask"
    c.model = config_lib.model_section(PolarMaskConfig)
    c.input.canvas_hw = (1280, 1280)
    c.input.short_side = (768,)
    c.input.max_long_side = 1280
    c.input.test_short_side = 768
    c.input.test_max_long_side = 1280
    c.optim.clip_norm = 35.0
    c.schedule.warmup_steps = 500
    c.schedule.total_steps = 88_000
    c.schedule.steps = (58_600, 80_600)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a PolarMask config to seconds on a CPU: FCOS's smoke shrink plus 16 ray slots."""
    c = fcos.smoke(c)
    c.model.mask_instances_per_image = 16
    return c
