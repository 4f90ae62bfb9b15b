"""Our side of the mmdetection 3.x loss parity check for CondInst (issue 29 item 4): the
targets and losses of methods/condinst.py (CondInst.assign, the mask slots' logits, loss_fn)
on given head outputs.

experiments/parity/condinst_loss.py (the `make peer-mmdet` environment) feeds the same head
outputs and ground truth to mmdetection's CondInstBboxHead.loss_by_feat and
CondInstMaskHead.loss_by_feat and to `condinst_losses` here; tests/weights/
test_mmdet_condinst_loss.py compares ours with mmdetection's answers stored in tests/fixtures/
mmdet_condinst_loss_tiny.npz (no torch needed there).

Layouts (ours): per location, level by level P3..P7 and row-major within a level (mmdetection's
per-level [B, K, h, w] flattened the same way): class_logits float32[B, T, C], distances
float32[B, T, 4] (l, t, r, b in strides, after the head's activation: mmdetection's bbox_preds
under norm_on_bbox), centerness_logits float32[B, T], dynamic_params float32[B, T, 169]; and
mask_features float32[B, h, w, 8] at stride 8 (theirs [B, 8, h, w]). Ground truth: boxes
float32[B, N, 4] canvas xyxy, classes int32[B, N], valid bool[B, N], centers float32[B, N, 2]
(x, y) mass centres as the pipeline's gt_centers (means of pixel centres), masks
bool[B, N, H/4, W/4] (the pipeline's gt_full_masks). The mask slots (which positive
locations train the dynamic head) are given: mmdetection draws them (torch.randperm over an
image's positives beyond max_masks_to_train), so the same draw goes to both sides;
`own_slots` reports the choice methods/fcos.py positive_slots makes itself.

The scenes (`scene`, `ground_truth`) live here, torch-free, so that the CI test rebuilds the
ground truth the fixture was made from instead of storing it; the nuclei scene is read from the
shared DSB2018 data, never copied into the fixture (its masks' checksum is).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.methods import condinst, fcos
from instseg_jax.weights import mmdet_loss_parity

CANVAS = 128
MASK_STRIDE = 4  # of our mask targets: the full masks at [2::4, 2::4]
NUM_CLASSES = 3
MAX_INSTANCES = 32
NUCLEI_IMAGE = "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e"
NUCLEI_CROP = (64, 64)  # (y, x) of the 128 x 128 crop: 23 nuclei

HEAD_OUTPUTS = (
    "class_logits",
    "distances",
    "centerness_logits",
    "dynamic_params",
    "mask_features",
)
TERMS = ("loss_cls", "loss_box_reg", "loss_centerness", "loss_mask")


def condinst_config(num_classes: int, canvas: int, mask_slots: int, **overrides):
    """The tiny CondInst of the parity: the COCO recipe's loss rules (CondInstConfig's
    defaults: AdelaiDet MS_R_50_1x) on a square canvas, narrow layers (they take no part: the
    head outputs are given) and `mask_slots` trained masks per image."""
    fields = dict(
        num_classes=num_classes,
        canvas_hw=(canvas, canvas),
        fpn_channels=16,
        head_convs=1,
        mask_branch_channels=16,
        mask_branch_convs=1,
        mask_instances_per_image=mask_slots,
    )
    fields.update(overrides)
    return condinst.CondInstConfig(**fields)


def random_head_outputs(seed: int, batch_size: int, cfg) -> dict:
    """The head outputs both sides get (module docstring: layouts), drawn from numpy's PCG64
    with `seed`: the fixture stores the seed and a checksum (`head_checksum`) instead of the
    arrays (the controller parameters alone would be ~1 MB a batch)."""
    rng = np.random.default_rng(seed)
    b, t = batch_size, sum(h * w for h, w in cfg.level_shapes())
    h, w = (v // condinst.BRANCH_STRIDE for v in cfg.canvas_hw)
    return {
        "class_logits": (rng.normal(size=(b, t, cfg.num_classes)) - 2.0).astype(np.float32),
        "distances": np.exp(0.5 * rng.normal(size=(b, t, 4)) + 1.0).astype(np.float32),
        "centerness_logits": rng.normal(size=(b, t)).astype(np.float32),
        "dynamic_params": (0.3 * rng.normal(size=(b, t, cfg.num_dynamic_params))).astype(
            np.float32
        ),
        "mask_features": rng.normal(size=(b, h, w, cfg.mask_channels)).astype(np.float32),
    }


def head_checksum(head: dict) -> str:
    """mmdet_loss_parity.checksum of the head outputs as float32, in HEAD_OUTPUTS' order."""
    return mmdet_loss_parity.checksum([np.asarray(head[name], np.float32) for name in HEAD_OUTPUTS])


def condinst_outputs(head: dict, gt: dict, slot_location, slot_valid, cfg) -> tuple[dict, dict]:
    """(outputs, batch): what CondInst.__call__ hands loss_fn in training, on given head
    outputs and given mask slots (int32[B, P] locations, bool[B, P]) instead of the network's
    and positive_slots' draw; head_training's other steps as there."""
    model = condinst.CondInst(cfg)
    batch = {
        "gt_boxes": gt["boxes"],
        "gt_classes": gt["classes"],
        "gt_valid": gt["valid"],
        "gt_centers": gt["centers"],
        "gt_full_masks": gt["masks"],
    }
    targets = model.apply({}, batch, method="assign")
    matched = jnp.take_along_axis(targets["matched"], slot_location, axis=1)
    slot_gt = jnp.where(slot_valid, matched, 0)
    overflow = targets["positives"] - slot_valid.sum(axis=1).astype(jnp.int32)
    predictions = {"dynamic_params": head["dynamic_params"], "mask_features": head["mask_features"]}
    outputs = {
        **{name: head[name] for name in fcos.LOCATION_OUTPUTS},
        "targets": {**targets, "slot_valid": slot_valid, "overflow": overflow},
        "mask_logits": model.apply({}, predictions, slot_location, method="mask_logits"),
        "mask_targets": jnp.take_along_axis(gt["masks"], slot_gt[..., None, None], axis=1),
    }
    return outputs, batch


def condinst_losses(head: dict, gt: dict, slot_location, slot_valid, cfg) -> tuple[dict, dict]:
    """(terms, targets): our four loss terms and the gradient of their sum (the total loss)
    with respect to each head output ("grad_<name>"); our targets: location_classes int32[B, T]
    (C for background), matched int32[B, T] (ground-truth slot, -1 background), slots_matched
    int32[B, P] (the ground truth each given slot trains on, -1 for empty slots), own_slots
    bool[B, T] (the locations fcos.positive_slots picks itself, with cfg's budget and key 0)
    and own_overflow int32[B]."""
    head = {name: jnp.asarray(head[name], jnp.float32) for name in HEAD_OUTPUTS}
    gt = {name: jnp.asarray(value) for name, value in gt.items()}
    values, grads, targets = _terms_and_gradient(
        head, gt, jnp.asarray(slot_location, jnp.int32), jnp.asarray(slot_valid, bool), cfg
    )
    terms = {name: float(v) for name, v in zip(TERMS, values, strict=True)}
    terms.update({f"grad_{name}": np.asarray(grads[name]) for name in HEAD_OUTPUTS})
    return terms, {name: np.asarray(v) for name, v in targets.items()}


@functools.partial(jax.jit, static_argnums=4)
def _terms_and_gradient(head, gt, slot_location, slot_valid, cfg):
    """The four terms, the gradient of their sum and our targets: one compiled program for
    every batch of one shape."""

    def total(head):
        outputs, batch = condinst_outputs(head, gt, slot_location, slot_valid, cfg)
        loss, metrics = condinst.loss_fn(outputs, batch, cfg)
        return loss, (tuple(metrics[name] for name in TERMS), outputs["targets"])

    (_, (values, targets)), grads = jax.value_and_grad(total, has_aux=True)(head)
    own = fcos.positive_slots(targets, cfg.mask_instances_per_image, jax.random.key(0))
    own_slots = jax.vmap(
        lambda loc, ok: jnp.zeros(targets["matched"].shape[1], bool).at[loc].max(ok)
    )(own["location"], own["valid"])
    slots_matched = jnp.where(
        slot_valid, jnp.take_along_axis(targets["matched"], slot_location, axis=1), -1
    )
    return (
        values,
        grads,
        {
            "location_classes": targets["classes"],
            "matched": targets["matched"],
            "slots_matched": slots_matched,
            "own_slots": own_slots,
            "own_overflow": own["overflow"],
        },
    )


def ellipse(cy, cx, ry, rx) -> np.ndarray:
    """bool[128, 128]: the pixels whose centres fall inside the ellipse."""
    y, x = np.mgrid[:CANVAS, :CANVAS] + 0.5
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def nuclei_masks(stage1_train: Path) -> np.ndarray:
    """bool[N, 128, 128]: NUCLEI_IMAGE's masks (stage1_train/<id>/masks/*.png, in sorted file
    order) that have a pixel in the crop NUCLEI_CROP."""
    return mmdet_loss_parity.nuclei_crop(stage1_train, NUCLEI_IMAGE, *NUCLEI_CROP, CANVAS)


def masks_checksum(masks: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.asarray(masks, bool)).tobytes()).hexdigest()


def scene(name: str, stage1_train: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(classes int64[N], masks bool[N, 128, 128]) of a parity scene: "empty"; "few" (four
    ellipses of three classes, one large enough for P4); "crowded" (twelve equal discs of radius
    12, 14 px apart: locations claimed by several equal-area instances, and more positives than
    the mask slots); "nuclei" (the crop of NUCLEI_IMAGE, classes cycling 0, 1, 2)."""
    if name == "empty":
        return np.zeros((0,), np.int64), np.zeros((0, CANVAS, CANVAS), bool)
    if name == "nuclei":
        masks = nuclei_masks(stage1_train)
        return np.arange(len(masks), dtype=np.int64) % NUM_CLASSES, masks
    if name == "few":
        shapes = [(20, 20, 6, 6, 0), (40, 90, 14, 22, 1), (85, 40, 30, 24, 2), (70, 70, 56, 52, 0)]
    elif name == "crowded":
        shapes = [(40 + 14 * (i // 4), 30 + 14 * (i % 4), 12, 12, i % 3) for i in range(12)]
    else:
        raise ValueError(f"unknown parity scene {name!r}")
    masks = np.stack([ellipse(cy, cx, ry, rx) for cy, cx, ry, rx, _ in shapes])
    return np.array([s[4] for s in shapes], np.int64), masks


def boxes_of(masks) -> np.ndarray:
    """float32[N, 4]: the masks' pixel-edge extents (x0, y0, x1, y1)."""
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.array(boxes, np.float32).reshape(-1, 4)


def mass_centres(masks, offset: float = 0.0) -> np.ndarray:
    """float32[N, 2] (x, y): mmdetection's and AdelaiDet's centroid (means of integer pixel
    indices: condinst_head.py _get_targets_single's m10 / m00) + offset (0.5: ours)."""
    centres = [[np.nonzero(m)[1].mean(), np.nonzero(m)[0].mean()] for m in masks]
    return (np.array(centres, np.float64).reshape(-1, 2) + offset).astype(np.float32)


def ground_truth(images, centre_offset: float = 0.5) -> dict:
    """Our padded ground truth for a batch of (classes, full masks) images: mass centres as the
    pipeline's gt_centers (means of pixel centres: centre_offset 0.5 on the integer-index
    means), masks at stride 4 sampled at [2::4, 2::4], as mmdetection's and AdelaiDet's mask
    targets."""
    b, s = len(images), CANVAS // MASK_STRIDE
    gt = {
        "boxes": np.zeros((b, MAX_INSTANCES, 4), np.float32),
        "classes": np.zeros((b, MAX_INSTANCES), np.int32),
        "valid": np.zeros((b, MAX_INSTANCES), bool),
        "centers": np.zeros((b, MAX_INSTANCES, 2), np.float32),
        "masks": np.zeros((b, MAX_INSTANCES, s, s), bool),
    }
    start = MASK_STRIDE // 2
    for i, (classes, masks) in enumerate(images):
        n = len(classes)
        gt["boxes"][i, :n] = boxes_of(masks)
        gt["classes"][i, :n] = classes
        gt["valid"][i, :n] = True
        gt["centers"][i, :n] = mass_centres(masks, centre_offset)
        gt["masks"][i, :n] = masks[:, start::MASK_STRIDE, start::MASK_STRIDE]
    return gt
