"""Our side of the mmdetection 3.x loss parity of PointRend's mask branch (issue 29 item 4):
methods/pointrend.py training_points_and_targets and point_losses on given head outputs.

experiments/parity/pointrend_loss.py (the `make peer-mmdet` environment) feeds the same
positive RoIs, coarse logits, point logits and uniform point draws, and the same ground truth,
to mmdetection's CoarseMaskHead.loss_and_target and MaskPointHead.get_roi_rel_points_train /
loss_and_target (PointRendRoIHead.mask_loss's sequence without the networks) and to
`pointrend_losses` here; tests/weights/test_mmdet_pointrend_loss.py compares ours with
mmdetection's answers stored in tests/fixtures/mmdet_pointrend_loss_tiny.npz (no torch there).

Scenes are 128 x 128 full-resolution masks: synthetic ones drawn here (`synthetic_scene`) and a
crop of one nuclei image of the shared DSB 2018 set (`nuclei_scene`), re-read by the test (the
fixture keeps a checksum of the masks, never the data).

Layouts (ours): RoIs in F slots per image (boxes float32[B, F, 4] canvas xyxy, classes and
gt_index int32[B, F], foreground bool[B, F], the positives first); coarse_logits float32[B, F,
s, s, C]; point_logits float32[B, F, P, C]; draws, `uncertain_points`' uniform candidates
float32[B * F, 3P, 2] and fill float32[B * F, P / 4, 2]. mmdetection's are the positives of
the batch concatenated: [K, C, s, s], [K, C, P], [K, 3P, 2] and [K, P / 4, 2].
Ground truth (ours): boxes float32[B, N, 4] (the masks' tight boxes, as the input pipeline
makes them), valid bool[B, N], crops uint8[B, N, Mc, Mc] (input/transforms.py
box_crop_target, the pipeline's gt_masks).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.input.transforms import box_crop_target
from instseg_jax.methods import pointrend
from instseg_jax.weights import mmdet_loss_parity

CANVAS = 128
NUM_CLASSES = 3
ROI_SLOTS = 24  # F: foreground RoI slots per image (two RoIs per instance, <= 12 instances)
MAX_INSTANCES = 12
CROP_SIZE = 224  # Mc: the COCO recipe's input.mask_size
# One image of the shared nuclei set (tests/conftest.py SHARED_NUCLEI) with 12 nuclei in its
# top-left 128 x 128 crop.
NUCLEI_IMAGE = "0121d6759c5adb290c8e828fc882f37dfaf3663ec885c663859948c154a443ed"


def pointrend_config(**overrides) -> pointrend.PointRendConfig:
    """The tiny PointRend whose mask-branch loss the parity runs: detectron2's training points
    (196 per RoI, oversampling 3, importance 0.75) and 7 x 7 coarse side."""
    fields = dict(
        num_classes=NUM_CLASSES,
        canvas_hw=(CANVAS, CANVAS),
        mask_fg_per_image=ROI_SLOTS,
    )
    fields.update(overrides)
    return pointrend.PointRendConfig(**fields)


def synthetic_scene(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(classes int64[N], masks bool[N, 128, 128]): `few` (four ellipses of three classes,
    8 to 60 px), `crowded` (twelve overlapping discs), `empty`."""
    y, x = np.mgrid[:CANVAS, :CANVAS] + 0.5
    if name == "empty":
        return np.zeros((0,), np.int64), np.zeros((0, CANVAS, CANVAS), bool)
    if name == "few":
        shapes = [
            (20, 22, 4.5, 5.2, 0),
            (40, 88, 15, 23, 1),
            (82, 40, 31, 22, 2),
            (96, 98, 9, 27, 0),
        ]
    elif name == "crowded":
        shapes = [
            (40 + 9 * (i // 4), 34 + 9 * (i % 4) + 3 * (i // 4), 11.5, 9.5, i % 3)
            for i in range(12)
        ]
    else:
        raise ValueError(f"unknown synthetic scene {name!r} (few, crowded, empty)")
    masks = np.stack(
        [((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1 for cy, cx, ry, rx, _ in shapes]
    )
    return np.array([s[4] for s in shapes], np.int64), masks


def nuclei_scene(stage1_train: Path) -> tuple[np.ndarray, np.ndarray]:
    """(classes int64[N] (all 0), masks bool[N, 128, 128]): the nuclei of NUCLEI_IMAGE's
    top-left 128 x 128 crop (those cut by the crop keep their visible part), in file-name order.
    FileNotFoundError where the shared set is absent."""
    masks = mmdet_loss_parity.nuclei_crop(stage1_train, NUCLEI_IMAGE, 0, 0, CANVAS)
    masks = masks[:MAX_INSTANCES]
    return np.zeros(len(masks), np.int64), masks


def scene(name: str, stage1_train: Path | None = None):
    """A synthetic scene by name, or `nuclei` read from stage1_train."""
    return nuclei_scene(stage1_train) if name == "nuclei" else synthetic_scene(name)


def checksum(masks: np.ndarray) -> str:
    """SHA-256 of the masks' bits and shape: the fixture's record of the ground truth."""
    masks = np.asarray(masks, bool)
    return hashlib.sha256(np.packbits(masks).tobytes() + str(masks.shape).encode()).hexdigest()


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """float32[N, 4] xyxy pixel-edge extents of masks[N, H, W] (ops.masks_to_boxes' rule)."""
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.array(boxes, np.float32).reshape(-1, 4)


def ground_truth(images, crop_size: int = CROP_SIZE) -> dict:
    """Our padded ground truth for a batch of (classes, masks) images: boxes, classes, valid,
    crops (the pipeline's gt_masks at input.mask_size = crop_size)."""
    b = len(images)
    gt = {
        "boxes": np.zeros((b, MAX_INSTANCES, 4), np.float32),
        "classes": np.zeros((b, MAX_INSTANCES), np.int32),
        "valid": np.zeros((b, MAX_INSTANCES), bool),
        "crops": np.zeros((b, MAX_INSTANCES, crop_size, crop_size), np.uint8),
    }
    for i, (classes, masks) in enumerate(images):
        n = len(classes)
        boxes = tight_boxes(masks)
        gt["boxes"][i, :n] = boxes
        gt["classes"][i, :n] = classes
        gt["valid"][i, :n] = True
        for j in range(n):
            gt["crops"][i, j] = box_crop_target(masks[j], boxes[j], crop_size)
    return gt


def to_slots(rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The batch's positive RoIs' rows[K, ...] (mmdetection's order: image by image) -> our
    slots [B, F, ...] (zeros in the slots left free)."""
    out = np.zeros(valid.shape + rows.shape[1:], rows.dtype)
    out[valid] = rows
    return out


def head_inputs(rows: dict, valid: np.ndarray):
    """(coarse_logits, point_logits, draws) in our layout from the positive RoIs' rows
    {coarse_logits [K, s, s, C], point_logits [K, P, C], draw_candidates [K, 3P, 2],
    draw_fill [K, P / 4, 2]} (the fixture's compact form) and the slots' validity [B, F]."""
    slots = {name: to_slots(np.asarray(value), valid) for name, value in rows.items()}
    draws = tuple(
        slots[name].reshape((-1,) + slots[name].shape[2:])
        for name in ("draw_candidates", "draw_fill")
    )
    return slots["coarse_logits"], slots["point_logits"], draws


def point_order(ours: np.ndarray, theirs: np.ndarray, valid: np.ndarray):
    """(order int[B, F, P], rows whose point sets differ): ours[b, f][order[b, f]] lists the
    points of theirs[b, f] in their order. Both sides keep the same most uncertain candidates,
    but two candidates whose uncertainties differ by float32 rounding (torch's bilinear
    arithmetic against XLA's) may swap places within the kept ones, and a point's logit is the
    one at its place: the comparisons on our own targets put ours in mmdetection's order."""
    order = np.zeros(ours.shape[:-1], np.int64)
    differing = 0
    for b, f in zip(*np.nonzero(valid), strict=True):
        mine = np.lexsort((ours[b, f, :, 1], ours[b, f, :, 0]))
        other = np.lexsort((theirs[b, f, :, 1], theirs[b, f, :, 0]))
        order[b, f, other] = mine
        differing += int(not np.array_equal(ours[b, f, order[b, f]], theirs[b, f]))
    return order, differing


def pointrend_losses(
    rois: dict, coarse_logits, point_logits, draws, gt: dict, cfg, given_targets=None
) -> tuple[dict, dict]:
    """(terms, targets). terms: loss_mask (the coarse head's), loss_mask_point, the gradient
    of their sum with respect to the coarse logits (grad_coarse_logits) and the point logits
    (grad_point_logits). targets: our training points (points), coarse targets
    (mask_targets) and point labels (point_labels). given_targets: {mask_targets,
    point_labels} (mmdetection's, in our layout) used in the loss instead of ours."""
    rois, draws, given = jax_inputs(rois, draws, given_targets)
    gt = {name: jnp.asarray(gt[name]) for name in ("boxes", "crops")}
    (loss_mask, loss_point), (grad_coarse, grad_point), (points, targets) = _terms(
        rois,
        jnp.asarray(coarse_logits, jnp.float32),
        jnp.asarray(point_logits, jnp.float32),
        draws,
        gt,
        given,
        cfg,
    )
    terms = {
        "loss_mask": float(loss_mask),
        "loss_mask_point": float(loss_point),
        "grad_coarse_logits": np.asarray(grad_coarse),
        "grad_point_logits": np.asarray(grad_point),
    }
    ours = {name: np.asarray(value) for name, value in targets.items()}
    ours["points"] = np.asarray(points)
    return terms, ours


def jax_inputs(rois: dict, draws, given: dict | None):
    """(rois, draws, given) as the compiled programs take them: the RoI arrays as they are,
    uncertain_points' draws and mmdetection's given targets (or None) as float32."""
    rois = {name: jnp.asarray(value) for name, value in rois.items()}
    draws = tuple(jnp.asarray(d, jnp.float32) for d in draws)
    if given is not None:
        given = {name: jnp.asarray(value, jnp.float32) for name, value in given.items()}
    return rois, draws, given


@functools.partial(jax.jit, static_argnums=6)
def _terms(rois, coarse_logits, point_logits, draws, gt, given, cfg):
    """The two terms, the gradient of their sum with respect to both head outputs, and our
    points and targets: one compiled program per batch shape."""
    points, targets = pointrend.training_points_and_targets(
        coarse_logits, rois, gt["crops"], gt["boxes"], cfg, jax.random.key(0), draws
    )
    used = dict(targets, **given) if given is not None else targets

    def terms(coarse, logits):
        outputs = {"rois": rois, "mask_logits": coarse, "point_logits": logits, **used}
        losses = pointrend.point_losses(outputs, cfg)
        return losses["loss_mask"] + losses["loss_mask_point"], (
            losses["loss_mask"],
            losses["loss_mask_point"],
        )

    grads, values = jax.grad(terms, argnums=(0, 1), has_aux=True)(coarse_logits, point_logits)
    return values, grads, (points, targets)
