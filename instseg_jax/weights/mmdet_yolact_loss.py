"""Our side of the mmdetection 3.x loss parity check for YOLACT (issue 29 item 4): the anchor
targets and the four losses of methods/yolact.py (anchor_targets, loss_fn) on given head
outputs, and the nuclei scene's ground truth read from the shared DSB 2018 set.

experiments/parity/yolact_loss.py (the `make peer-mmdet` environment) feeds the same class
logits, box deltas, mask coefficients, prototypes and semantic logits, and the same ground
truth, to mmdetection's YOLACTHead.loss_by_feat and YOLACTProtonet.loss_by_feat and to
`yolact_losses` here; tests/weights/test_mmdet_yolact_loss.py compares ours with mmdetection's
answers stored in tests/fixtures/mmdet_yolact_loss_tiny.npz (no torch needed there).

Layouts (ours): class_logits float32[B, T, C + 1] (background last), box_deltas float32[B, T,
4] and coefficients float32[B, T, K] (after tanh) with the anchors level by level, (y, x,
aspect ratio) within a level (mmdetection's per-level [B, A x C', h, w] permuted to (y, x, A)
the same way); prototypes float32[B, h, w, K] at stride 4 (theirs [B, K, h, w]); semantic_logits
float32[B, h8, w8, C] at stride 8 (theirs [B, C, h8, w8]). Ground truth: boxes float32[B, N, 4]
canvas xyxy, classes int32[B, N], valid bool[B, N], masks bool[B, N, h, w] at stride 4 (the
pipeline's gt_full_masks). Every image fills the canvas (mmdetection's img_shape = the canvas),
and a batch is one mmdetection GPU's (one loss normaliser group).

convert_mmdet_heads maps mmdetection's YOLACT head tensors (bbox_head, mask_head) onto our
PredictionHead, Protonet and semantic convolution; yolact_head_losses then runs our heads on
given FPN features and differentiates the losses with respect to those parameters.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.methods import yolact
from instseg_jax.nn.layers import Conv
from instseg_jax.ops import dense
from instseg_jax.weights.mmdet_loss_parity import nuclei_crop, relative_difference

__all__ = ["nuclei_ground_truth", "relative_difference", "yolact_config", "yolact_losses"]

GT_FIELDS = ("boxes", "classes", "valid", "masks")


def yolact_config(num_classes: int, canvas: int, num_protos: int, masks_per_image: int):
    """The tiny YOLACT the parity runs: the smoke experiment's anchor sizes (methods/yolact.py
    smoke: 12 .. 192, mmdetection's base sizes 4 .. 64 x octave_base_scale 3) on a square
    canvas."""
    return yolact.YOLACTConfig(
        num_classes=num_classes,
        canvas_hw=(canvas, canvas),
        anchor_sizes=(12, 24, 48, 96, 192),
        num_protos=num_protos,
        masks_per_image=masks_per_image,
    )


def anchors(cfg) -> np.ndarray:
    """float32[T, 4]: our anchors, level by level (to check against mmdetection's)."""
    return np.asarray(jnp.concatenate(cfg.anchors()))


def yolact_outputs(head_outputs, gt: dict, cfg, mask_slots=None) -> dict:
    """The training outputs YOLACT.__call__ assembles (anchor targets, the trained slots' mask
    logits, targets and boxes, the semantic logits) on given head outputs. mask_slots: optional
    (slot_anchor int32[B, P], slot_valid bool[B, P]) replacing our random choice of the trained
    masks (the reference's draw, where an image has more positives than masks_per_image)."""
    logits, deltas, coefficients, protos, semantic = head_outputs
    b = logits.shape[0]
    all_anchors = jnp.concatenate(cfg.anchors())
    targets = jax.vmap(
        lambda boxes, classes, valid, key: yolact.anchor_targets(
            all_anchors, boxes, classes, valid, cfg, key
        )
    )(gt["boxes"], gt["classes"], gt["valid"], jax.random.split(jax.random.key(0), b))
    if mask_slots is not None:
        slot_anchor, slot_valid = mask_slots
        targets["slot_anchor"] = slot_anchor
        targets["slot_valid"] = slot_valid
        matched = jnp.take_along_axis(targets["matched"], slot_anchor, axis=1)
        targets["slot_gt"] = jnp.where(slot_valid, matched, 0)
    targets = jax.lax.stop_gradient(targets)
    slot_coefficients = jnp.take_along_axis(coefficients, targets["slot_anchor"][..., None], 1)
    slot_gt = targets["slot_gt"]
    return {
        "class_logits": logits,
        "box_deltas": deltas,
        "targets": targets,
        "mask_logits": dense.dynamic_masks(protos, slot_coefficients),
        "mask_targets": jnp.take_along_axis(gt["masks"], slot_gt[..., None, None], axis=1),
        "mask_boxes": jnp.take_along_axis(gt["boxes"], slot_gt[..., None], axis=1),
        "semantic_logits": semantic,
    }


TERMS = ("loss_cls", "loss_box_reg", "loss_mask", "loss_semantic")
INPUTS = ("class_logits", "box_deltas", "coefficients", "prototypes", "semantic_logits")


def yolact_losses(head_outputs, gt: dict, cfg, mask_slots=None) -> tuple[dict, dict]:
    """(terms, targets): our four loss terms (TERMS), the gradient of their sum with respect
    to each head output (grad_<INPUTS name>), and our anchor targets (classes int32[B, T]: the
    class of positives, C elsewhere; ignored bool[B, T]; positives int32[B])."""
    inputs = tuple(jnp.asarray(x, jnp.float32) for x in head_outputs)
    gt = {name: jnp.asarray(gt[name]) for name in GT_FIELDS}
    if mask_slots is not None:
        mask_slots = (jnp.asarray(mask_slots[0], jnp.int32), jnp.asarray(mask_slots[1], bool))
    values, grads, targets = _terms_and_gradient(inputs, gt, mask_slots, cfg)
    terms = {name: float(v) for name, v in zip(TERMS, values, strict=True)}
    terms.update({f"grad_{n}": np.asarray(g) for n, g in zip(INPUTS, grads, strict=True)})
    return terms, {
        "classes": np.asarray(targets["classes"]),
        "ignored": np.asarray(targets["labels"] == -1),
        "positives": np.asarray(targets["positives"]),
    }


@functools.partial(jax.jit, static_argnums=3)
def _terms_and_gradient(inputs, gt, mask_slots, cfg):
    """The four terms, the gradient of their sum with respect to the five inputs, and our
    targets: one compiled program for every batch of one shape."""
    batch = {"gt_valid": gt["valid"], "gt_classes": gt["classes"], "gt_full_masks": gt["masks"]}

    def total(*args):
        outputs = yolact_outputs(args, gt, cfg, mask_slots)
        loss, metrics = yolact.loss_fn(outputs, batch, cfg)
        return loss, (tuple(metrics[t] for t in TERMS), outputs["targets"])

    (_, (values, targets)), grads = jax.value_and_grad(
        total, argnums=tuple(range(len(inputs))), has_aux=True
    )(*inputs)
    return values, grads, targets


# ----------------------------------------------------------------------------- nuclei scene


# A crop of one DSB 2018 training image with 26 nuclei, two of them slivers the crop cuts to
# boxes not wider and higher than 4 px (mmdetection's FilterAnnotations drops them; ours keeps
# them as ground truth that methods/yolact.py's min_gt_box_size leaves out of every loss).
NUCLEI_IMAGE = "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e"
NUCLEI_TOP_LEFT = (64, 96)


def padded_ground_truth(images, max_instances: int, side: int) -> dict:
    """Our padded ground truth arrays of one batch of images ({boxes, classes, masks bool[N,
    side, side]} each, every instance, filtered by min_gt_box_size or not): boxes float32[B, M,
    4], classes int32[B, M], valid bool[B, M], masks bool[B, M, side, side]."""
    b = len(images)
    gt = {
        "boxes": np.zeros((b, max_instances, 4), np.float32),
        "classes": np.zeros((b, max_instances), np.int32),
        "valid": np.zeros((b, max_instances), bool),
        "masks": np.zeros((b, max_instances, side, side), bool),
    }
    for i, image in enumerate(images):
        n = len(image["classes"])
        for name in ("boxes", "classes", "masks"):
            gt[name][i, :n] = image[name]
        gt["valid"][i, :n] = True
    return gt


def nuclei_ground_truth(root: Path, canvas: int, stride: int) -> dict:
    """The nuclei scene (class 0): full_masks bool[N, canvas, canvas] (the crop as read),
    boxes float32[N, 4] (their pixel-edge extents), masks bool[N, canvas / stride, ...] (the
    stride-4 masks by mmdetection's rule: bilinear, align_corners=False, > 0.5, which at a
    4x reduction averages the two middle pixels of each cell per axis; YOLACTProtonet.
    _get_targets_single), classes int32[N] and checksum (masks_checksum of full_masks)."""
    full = nuclei_crop(root, NUCLEI_IMAGE, *NUCLEI_TOP_LEFT, canvas)
    middle = full[:, 1::stride, 1::stride].astype(np.float32)
    middle = middle + full[:, 2::stride, 1::stride] + full[:, 1::stride, 2::stride]
    masks = (middle + full[:, 2::stride, 2::stride]) / 4.0 > 0.5
    boxes = np.zeros((len(full), 4), np.float32)
    for i, mask in enumerate(full):
        ys, xs = np.nonzero(mask)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return {
        "full_masks": full,
        "boxes": boxes,
        "masks": masks,
        "classes": np.zeros(len(full), np.int32),
        "checksum": masks_checksum(full),
    }


def masks_checksum(masks: np.ndarray) -> str:
    """sha256 of bool masks (shape and bits): the fixture's check that the nuclei ground truth
    re-read from the shared data is the one mmdetection's answers were computed on."""
    masks = np.ascontiguousarray(masks, bool)
    digest = hashlib.sha256(repr(masks.shape).encode())
    digest.update(np.packbits(masks).tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- head parameters

# Our parameter path -> mmdetection's YOLACT state-dict prefix (its detector's bbox_head and
# mask_head: YOLACTHead, YOLACTProtonet with its protonet Sequential of conv, ReLU, ..., and
# SegmentationModule).
MMDET_HEAD_NAMES = {
    ("head", "conv0"): "bbox_head.head_convs.0.conv",
    ("head", "classes"): "bbox_head.conv_cls",
    ("head", "boxes"): "bbox_head.conv_reg",
    ("head", "coefficients"): "bbox_head.conv_coeff",
    ("protonet", "conv0"): "mask_head.protonet.0",
    ("protonet", "conv1"): "mask_head.protonet.2",
    ("protonet", "conv2"): "mask_head.protonet.4",
    ("protonet", "conv3"): "mask_head.protonet.8",  # after the interpolation (6) and ReLU (7)
    ("protonet", "protos"): "mask_head.protonet.10",
    ("semantic",): "mask_head.segm_branch.segm_conv",
}


def convert_mmdet_heads(state: dict) -> dict:
    """mmdetection YOLACT head tensors (name -> array, torch layout: weight [out, in, kh, kw],
    bias [out]) -> our params {"head", "protonet", "semantic"} (kernel [kh, kw, in, out]). Both
    sides lay a predictor's channels out anchor-major (a x outputs + o), so nothing permutes."""
    params: dict = {}
    for path, prefix in MMDET_HEAD_NAMES.items():
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node["kernel"] = np.asarray(state[f"{prefix}.weight"], np.float32).transpose(2, 3, 1, 0)
        node["bias"] = np.asarray(state[f"{prefix}.bias"], np.float32)
    return params


def head_outputs_from_params(params, features, cfg, channels: int):
    """Our PredictionHead on each level of features (P3..P7, NHWC), Protonet and the semantic
    1x1 convolution on P3: the five head outputs yolact_losses takes."""
    head = yolact.PredictionHead(
        cfg.num_classes, len(cfg.aspect_ratios), cfg.num_protos, channels, cfg.head_convs
    )
    outs = [head.apply({"params": params["head"]}, level) for level in features]
    logits, deltas, coefficients = (jnp.concatenate([o[i] for o in outs], 1) for i in range(3))
    protonet = yolact.Protonet(cfg.num_protos, channels)
    protos = protonet.apply({"params": params["protonet"]}, features[0])
    semantic = Conv(cfg.num_classes, (1, 1)).apply({"params": params["semantic"]}, features[0])
    return logits, deltas, coefficients, protos, semantic


def yolact_head_losses(params, features, gt: dict, cfg, channels: int, mask_slots):
    """(terms, grads): the four terms of our heads with the given params on the given FPN
    features, and the gradient of their sum with respect to every parameter (our tree)."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    features = tuple(jnp.asarray(f, jnp.float32) for f in features)
    gt = {name: jnp.asarray(gt[name]) for name in GT_FIELDS}
    slots = (jnp.asarray(mask_slots[0], jnp.int32), jnp.asarray(mask_slots[1], bool))
    values, grads = _head_terms_and_gradient(params, features, gt, slots, cfg, channels)
    terms = {name: float(v) for name, v in zip(TERMS, values, strict=True)}
    return terms, jax.tree.map(np.asarray, grads)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _head_terms_and_gradient(params, features, gt, mask_slots, cfg, channels):
    batch = {"gt_valid": gt["valid"], "gt_classes": gt["classes"], "gt_full_masks": gt["masks"]}

    def total(p):
        outputs = head_outputs_from_params(p, features, cfg, channels)
        loss, metrics = yolact.loss_fn(yolact_outputs(outputs, gt, cfg, mask_slots), batch, cfg)
        return loss, tuple(metrics[t] for t in TERMS)

    (_, values), grads = jax.value_and_grad(total, has_aux=True)(params)
    return values, grads
