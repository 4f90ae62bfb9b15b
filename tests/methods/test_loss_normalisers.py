"""The loss normalisers and weights of SOLOv2, YOLACT, CondInst and BlendMask against float64
NumPy encodings of their references' loss functions, on hand-made targets and predictions
(the loss functions are called directly: no model, no compilation of a network).

Cross-device semantics. The step computes every loss on the global batch (DESIGN: normalisers
are sums over it). A reference trains on G GPUs under DDP, which averages the G gradients, so
its effective loss is the mean over GPUs of each GPU's loss:
  - a normaliser the reference all-reduces (AdelaiDet's reduce_mean of FCOS's positives and
    centerness sums, which BlendMask's mask loss reuses) makes that mean equal to the global
    sum / the global count: ours on the global batch;
  - a normaliser the reference keeps per GPU (SOLOv2's positive cells and its dice mean,
    CondInst's dice mean) makes it the mean over GPUs of per-GPU averages: ours with
    model.loss_normaliser_images = the reference's images per GPU (2 in both COCO recipes);
  - YOLACT's COCO recipe runs on one GPU of 8 images (yolact_r50_1xb8-55e_coco.py): its
    per-GPU normalisers are ours on the global batch of 8.
Each test below encodes the reference on its GPUs' images one GPU at a time, then averages.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import config as config_lib
from instseg_jax.methods import blendmask, condinst, fcos, solov2, yolact
from tests.methods import fcos_reference


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def bce_with_logits(logit, target):
    """Elementwise binary cross-entropy of float64 logits (torch's
    binary_cross_entropy_with_logits, reduction 'none')."""
    x = np.asarray(logit, np.float64)
    return np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))


def reference_focal_sum(logits, labels, alpha=0.25, gamma=2.0):
    """Summed sigmoid focal loss over [N, C] logits against class labels [N] (C: background):
    WXinlong/SOLO mmdet/models/losses/focal_loss.py py_sigmoid_focal_loss, pt = (1 - p) t +
    p (1 - t), weight (alpha t + (1 - alpha)(1 - t)) pt^gamma on the BCE."""
    logits = np.asarray(logits, np.float64)
    target = np.eye(logits.shape[1] + 1)[labels][:, :-1]
    p = sigmoid(logits)
    pt = (1 - p) * target + p * (1 - target)
    weight = (alpha * target + (1 - alpha) * (1 - target)) * pt**gamma
    return float((bce_with_logits(logits, target) * weight).sum())


def solo_dice(mask_logits, targets):
    """WXinlong/SOLO solov2_head.py dice_loss on sigmoid(mask_logits) [N, h, w]: 1 - 2 sum(p t)
    / (sum p^2 + 0.001 + sum t^2 + 0.001), per instance."""
    p = sigmoid(mask_logits).reshape(len(mask_logits), math.prod(SOLO_HW))
    t = np.asarray(targets, np.float64).reshape(p.shape)
    return 1 - 2 * (p * t).sum(1) / ((p * p).sum(1) + 0.001 + (t * t).sum(1) + 0.001)


def condinst_dice(mask_logits, targets):
    """AdelaiDet adet/modeling/condinst/dynamic_mask_head.py dice_coefficient on the mask
    scores: 1 - 2 sum(x t) / (sum x^2 + sum t^2 + 1e-5), per instance."""
    x = sigmoid(mask_logits).reshape(len(mask_logits), math.prod(FCOS_MASK_HW))
    t = np.asarray(targets, np.float64).reshape(x.shape)
    return 1 - 2 * (x * t).sum(1) / ((x**2).sum(1) + (t**2).sum(1) + 1e-5)


# ----------------------------------------------------------------------------------- SOLOv2

SOLO_CFG = solov2.SOLOv2Config(num_classes=3)
SOLO_CELLS, SOLO_SLOTS, SOLO_HW = 12, 3, (5, 6)
# Four images (two reference GPUs of 2): positive cells (cell: class) and the trained (cell,
# instance) pairs per image; the first GPU has 2 + 1 positive cells, the second 3 + 0, so the
# per-GPU and the global normalisers differ.
SOLO_POSITIVES = [{1: 0, 5: 2}, {7: 1}, {0: 2, 3: 2, 11: 0}, {}]
SOLO_PAIRS = [2, 1, 3, 0]  # trained slots per image (valid first)


def solo_case(seed=0):
    rng = np.random.default_rng(seed)
    b, c = len(SOLO_POSITIVES), SOLO_CFG.num_classes
    labels = np.full((b, SOLO_CELLS), c)
    for i, cells in enumerate(SOLO_POSITIVES):
        for cell, cls in cells.items():
            labels[i, cell] = cls
    slot_valid = np.arange(SOLO_SLOTS)[None] < np.asarray(SOLO_PAIRS)[:, None]
    outputs = {
        "category_logits": rng.normal(-2.0, 1.5, (b, SOLO_CELLS, c)).astype(np.float32),
        "mask_logits": rng.normal(0.0, 2.0, (b, SOLO_SLOTS, *SOLO_HW)).astype(np.float32),
        "mask_targets": rng.random((b, SOLO_SLOTS, *SOLO_HW)) < 0.4,
        "targets": {
            "cell_labels": labels.astype(np.int32),
            "positive": labels < c,
            "ignored": np.zeros((b, SOLO_CELLS), bool),
            "slot_valid": slot_valid,
            "pairs": np.asarray(SOLO_PAIRS, np.int32),
            "overflow": np.zeros(b, np.int32),
        },
    }
    return outputs


def solo_reference_losses(outputs, images_per_gpu):
    """WXinlong/SOLO mmdet/models/anchor_heads/solov2_head.py SOLOv2Head.loss on each GPU's
    images: loss_cate = focal sum / (num_ins + 1) (num_ins: the GPU's positive cells,
    flatten_ins_ind_labels.sum()), loss_ins = the mean of dice_loss over the GPU's (cell,
    instance) pairs (torch.cat(loss_ins).mean()) x ins_loss_weight 3; then DDP's mean over
    GPUs."""
    t = outputs["targets"]
    b = len(t["cell_labels"])
    cls, mask = [], []
    for start in range(0, b, images_per_gpu):
        images = range(start, start + images_per_gpu)
        num_ins = sum(int(t["positive"][i].sum()) for i in images)
        focal = sum(
            reference_focal_sum(outputs["category_logits"][i], t["cell_labels"][i]) for i in images
        )
        cls.append(focal / (num_ins + 1))
        dice = np.concatenate(
            [
                solo_dice(
                    outputs["mask_logits"][i][t["slot_valid"][i]],
                    outputs["mask_targets"][i][t["slot_valid"][i]],
                )
                for i in images
            ]
        )
        mask.append(3.0 * dice.mean())
    return float(np.mean(cls)), float(np.mean(mask))


@pytest.mark.parametrize("images_per_gpu", [2, 4])
def test_solov2_normalises_per_reference_gpu(images_per_gpu):
    """loss_normaliser_images = the reference's images per GPU: its per-GPU focal normaliser
    (positive cells + 1) and dice mean, averaged over GPUs; 4 (= the batch, as 0) is one GPU."""
    outputs = solo_case()
    expected_cls, expected_mask = solo_reference_losses(outputs, images_per_gpu)
    for setting in (images_per_gpu, 0) if images_per_gpu == 4 else (images_per_gpu,):
        cfg = solov2.SOLOv2Config(num_classes=3, loss_normaliser_images=setting)
        _, metrics = jax.jit(solov2.loss_fn, static_argnums=2)(jax_tree(outputs), {}, cfg)
        assert float(metrics["loss_cls"]) == pytest.approx(expected_cls, rel=1e-5)
        assert float(metrics["loss_mask"]) == pytest.approx(expected_mask, rel=1e-5)
    # The two semantics differ on this batch (so the test tells them apart).
    assert solo_reference_losses(outputs, 2)[0] != pytest.approx(
        solo_reference_losses(outputs, 4)[0], rel=1e-3
    )


def test_solov2_rejects_a_group_that_does_not_divide_the_batch():
    cfg = solov2.SOLOv2Config(num_classes=3, loss_normaliser_images=3)
    with pytest.raises(config_lib.ConfigValueError, match="loss_normaliser_images"):
        jax.jit(solov2.loss_fn, static_argnums=2)(jax_tree(solo_case()), {}, cfg)


def test_a_batch_no_larger_than_a_group_is_one_group():
    """Fewer images than one reference GPU holds: one normaliser over them (as 0)."""
    outputs = solo_case()
    losses = [
        jax.jit(solov2.loss_fn, static_argnums=2)(
            jax_tree(outputs), {}, solov2.SOLOv2Config(num_classes=3, loss_normaliser_images=k)
        )[0]
        for k in (0, 4, 8)
    ]
    assert float(losses[1]) == float(losses[0]) == float(losses[2])


def jax_tree(tree):
    if isinstance(tree, dict):
        return {k: jax_tree(v) for k, v in tree.items()}
    return jnp.asarray(tree)


# ----------------------------------------------------------------------------------- YOLACT

YOLACT_CFG = yolact.YOLACTConfig(num_classes=3, canvas_hw=(128, 128))
ANCHORS, MASK_SLOTS, PROTO_HW = 10, 2, (8, 8)  # prototypes of a 32 x 32 canvas at stride 4
# Three images: anchor labels (1 positive, 0 negative, -1 ignored) and the positives' classes;
# the second image has no ground truth, so no positive.
YOLACT_LABELS = [
    [1, 0, 0, -1, 0, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, -1, 0, 0, 0],
    [0, 0, 0, 0, 1, 0, 0, 0, -1, 0],
]
YOLACT_CLASSES = [{0: 2, 5: 0}, {}, {4: 1}]
# Each image's ground truth (canvas xyxy, class), and which ground truth each mask slot trains.
YOLACT_GT = [
    [([2.0, 3.0, 14.0, 17.0], 2), ([16.0, 8.0, 30.0, 26.0], 0)],
    [],
    [([4.0, 12.0, 20.0, 28.0], 1)],
]
YOLACT_SLOT_GT = [[0, 1], [], [0]]


def yolact_case(seed=0):
    rng = np.random.default_rng(seed)
    b, c = len(YOLACT_LABELS), YOLACT_CFG.num_classes
    labels = np.asarray(YOLACT_LABELS, np.int32)
    classes = np.full((b, ANCHORS), c, np.int32)
    for i, chosen in enumerate(YOLACT_CLASSES):
        for anchor, cls in chosen.items():
            classes[i, anchor] = cls
    n = 2
    gt_boxes = np.zeros((b, n, 4), np.float32)
    gt_classes = np.zeros((b, n), np.int32)
    gt_valid = np.zeros((b, n), bool)
    gt_masks = np.zeros((b, n, *PROTO_HW), bool)
    rows, cols = np.mgrid[: PROTO_HW[0], : PROTO_HW[1]]
    for i, instances in enumerate(YOLACT_GT):
        for j, (box, cls) in enumerate(instances):
            gt_boxes[i, j], gt_classes[i, j], gt_valid[i, j] = box, cls, True
            x0, y0, x1, y1 = np.asarray(box) / 4  # in prototype cells
            inside = (cols + 0.5 > x0) & (cols + 0.5 < x1) & (rows + 0.5 > y0) & (rows + 0.5 < y1)
            gt_masks[i, j] = inside & (rng.random(PROTO_HW) < 0.8)
    slot_valid = np.zeros((b, MASK_SLOTS), bool)
    slot_gt = np.zeros((b, MASK_SLOTS), np.int32)
    for i, chosen in enumerate(YOLACT_SLOT_GT):
        slot_valid[i, : len(chosen)] = True
        slot_gt[i, : len(chosen)] = chosen
    take = np.arange(b)[:, None]
    outputs = {
        "class_logits": rng.normal(0.0, 2.0, (b, ANCHORS, c + 1)).astype(np.float32),
        "box_deltas": rng.normal(0.0, 1.0, (b, ANCHORS, 4)).astype(np.float32),
        "mask_logits": rng.normal(0.0, 2.0, (b, MASK_SLOTS, *PROTO_HW)).astype(np.float32),
        "mask_boxes": gt_boxes[take, slot_gt],
        "mask_targets": gt_masks[take, slot_gt],
        "semantic_logits": rng.normal(-1.0, 1.5, (b, 4, 4, c)).astype(np.float32),
        "targets": {
            "labels": labels,
            "classes": classes,
            "box_targets": np.where(
                (labels == 1)[..., None], rng.normal(0, 1, (b, ANCHORS, 4)), 0.0
            ).astype(np.float32),
            "slot_valid": slot_valid,
            "positives": (labels == 1).sum(1).astype(np.int32),
            "overflow": np.zeros(b, np.int32),
        },
    }
    batch = {"gt_full_masks": gt_masks, "gt_classes": gt_classes, "gt_valid": gt_valid}
    return outputs, batch


def yolact_reference_losses(outputs, batch, cfg):
    """mmdetection's YOLACT on one GPU (mmdet/models/dense_heads/yolact_head.py, 2.x):
    num_total_pos = sum over images of max(positives, 1) (anchor_head.py get_targets);
    YOLACTHead.loss_single_OHEM per image: softmax CE of the positives and of the
    neg_pos_ratio x positives hardest negatives (every negative when there is no positive),
    / num_total_pos; smooth L1 (beta 1) over the positives' deltas / num_total_pos x 1.5;
    YOLACTProtonet.loss: per trained mask, the BCE of the box-cropped sigmoid mask averaged
    over the prototype pixels / (box w / image w) / (box h / image h), x loss_mask_weight
    6.125, summed and / the trained masks (at least 1); YOLACTSegmHead.loss: per image with
    ground truth, the summed BCE-with-logits against the class maps (the masks resized to the
    semantic map, > 0.5) / (images x h x w), an image without ground truth 0 (zero weights)."""
    t = outputs["targets"]
    b = len(t["labels"])
    num_total_pos = sum(max(int((t["labels"][i] == 1).sum()), 1) for i in range(b))
    cls = box = 0.0
    for i in range(b):
        logits = np.asarray(outputs["class_logits"][i], np.float64)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ce = -log_probs[np.arange(ANCHORS), t["classes"][i]]
        pos = np.flatnonzero(t["labels"][i] == 1)
        neg = np.flatnonzero(t["labels"][i] == 0)
        quota = len(neg) if len(pos) == 0 else min(cfg.negatives_per_positive * len(pos), len(neg))
        hardest = np.sort(ce[neg])[::-1][:quota]
        cls += (ce[pos].sum() + hardest.sum()) / num_total_pos
        diff = np.abs(
            np.asarray(outputs["box_deltas"][i], np.float64)[pos] - t["box_targets"][i][pos]
        )
        box += np.where(diff < 1.0, 0.5 * diff**2, diff - 0.5).sum() / num_total_pos
    box *= cfg.box_loss_weight

    mh, mw = PROTO_HW
    image_h, image_w = 4 * mh, 4 * mw
    mask, total_pos = 0.0, 0
    for i in range(b):
        for s in np.flatnonzero(t["slot_valid"][i]):
            total_pos += 1
            x0, y0, x1, y1 = outputs["mask_boxes"][i, s]
            # crop(): the box in prototype cells, one cell of padding, clamped to the map.
            left, right = max(x0 / image_w * mw - 1, 0), min(x1 / image_w * mw + 1, mw)
            top, bottom = max(y0 / image_h * mh - 1, 0), min(y1 / image_h * mh + 1, mh)
            rows, cols = np.mgrid[:mh, :mw]
            crop = (cols >= left) & (cols < right) & (rows >= top) & (rows < bottom)
            p = sigmoid(outputs["mask_logits"][i, s]) * crop
            target = outputs["mask_targets"][i, s].astype(np.float64)
            with np.errstate(divide="ignore"):
                bce = -(
                    target * np.maximum(np.log(p), -100)
                    + (1 - target) * np.maximum(np.log(1 - p), -100)
                )
            per_mask = bce.mean() * cfg.mask_loss_weight
            mask += per_mask / ((x1 - x0) / image_w) / ((y1 - y0) / image_h)
    mask /= max(total_pos, 1)

    semantic_logits = np.asarray(outputs["semantic_logits"], np.float64)
    sh, sw = semantic_logits.shape[1:3]
    semantic = 0.0
    for i in range(b):
        valid = np.flatnonzero(batch["gt_valid"][i])
        if len(valid) == 0:
            continue  # segm_targets None: zero weights
        target = np.zeros((sh, sw, cfg.num_classes))
        for j in valid:
            # Bilinear (align_corners False) at exactly half the size: the 2 x 2 block's mean.
            pooled = batch["gt_full_masks"][i, j].reshape(sh, 2, sw, 2).mean(axis=(1, 3)) > 0.5
            cls_j = batch["gt_classes"][i, j]
            target[..., cls_j] = np.maximum(target[..., cls_j], pooled)
        semantic += bce_with_logits(semantic_logits[i], target).sum() / (b * sh * sw)
    return {
        "loss_cls": cls,
        "loss_box_reg": box,
        "loss_mask": mask,
        "loss_semantic": semantic * cfg.semantic_loss_weight,
    }


def test_yolact_normalisers_match_mmdetection_on_one_gpu():
    """An image without ground truth counts 1 in the class and box normaliser and adds nothing
    to the semantic loss; the other normalisers as mmdetection's (yolact_reference_losses)."""
    outputs, batch = yolact_case()
    _, metrics = jax.jit(yolact.loss_fn, static_argnums=2)(
        jax_tree(outputs), jax_tree(batch), YOLACT_CFG
    )
    expected = yolact_reference_losses(outputs, batch, YOLACT_CFG)
    for term, value in expected.items():
        assert float(metrics[term]) == pytest.approx(value, rel=1e-5), term


# ------------------------------------------------------------------------- CondInst, BlendMask

FCOS_LOCATIONS, FCOS_SLOTS, FCOS_MASK_HW = 6, 3, (6, 5)
# Four images, two reference GPUs of 2: the positive locations and their classes per image
# (5 + 1 on the first GPU, 0 + 2 on the second; an image without positives on the second).
FCOS_POSITIVES = [{0: 1, 2: 0, 5: 1}, {3: 0}, {}, {1: 1, 4: 1}]


def fcos_case(seed=0):
    rng = np.random.default_rng(seed)
    b, c = len(FCOS_POSITIVES), 2
    classes = np.full((b, FCOS_LOCATIONS), c, np.int32)
    for i, chosen in enumerate(FCOS_POSITIVES):
        for location, cls in chosen.items():
            classes[i, location] = cls
    positive = classes < c
    ltrb = rng.uniform(0.3, 4.0, (b, FCOS_LOCATIONS, 4))
    centerness = np.sqrt(
        np.minimum(ltrb[..., 0], ltrb[..., 2])
        / np.maximum(ltrb[..., 0], ltrb[..., 2])
        * np.minimum(ltrb[..., 1], ltrb[..., 3])
        / np.maximum(ltrb[..., 1], ltrb[..., 3])
    )
    # The mask slots train exactly the positives (nothing over the budget), in order.
    slot_location = np.zeros((b, FCOS_SLOTS), np.int32)
    slot_valid = np.zeros((b, FCOS_SLOTS), bool)
    for i in range(b):
        where = np.flatnonzero(positive[i])
        slot_location[i, : len(where)], slot_valid[i, : len(where)] = where, True
    take = np.arange(b)[:, None]
    outputs = {
        "class_logits": rng.normal(-2.0, 1.5, (b, FCOS_LOCATIONS, c)).astype(np.float32),
        "distances": rng.uniform(0.2, 4.0, (b, FCOS_LOCATIONS, 4)).astype(np.float32),
        "centerness_logits": rng.normal(0, 1, (b, FCOS_LOCATIONS)).astype(np.float32),
        "mask_logits": rng.normal(0, 2, (b, FCOS_SLOTS, *FCOS_MASK_HW)).astype(np.float32),
        "mask_targets": rng.random((b, FCOS_SLOTS, *FCOS_MASK_HW)) < 0.4,
        "targets": {
            "classes": classes,
            "distances": np.where(positive[..., None], ltrb, 0.0).astype(np.float32),
            "centerness": np.where(positive, centerness, 0.0).astype(np.float32),
            "ignored": np.zeros((b, FCOS_LOCATIONS), bool),
            "unassigned": np.zeros(b, np.int32),
            "slot_valid": slot_valid,
            "slot_centerness": np.where(slot_valid, centerness[take, slot_location], 0.0).astype(
                np.float32
            ),
            "positives": positive.sum(1).astype(np.int32),
            "overflow": np.zeros(b, np.int32),
        },
        "slot_location": slot_location,
    }
    return outputs


def adelaidet_fcos_losses(outputs, images_per_gpu, c=2):
    """AdelaiDet adet/modeling/fcos/fcos_outputs.py FCOSOutputs.fcos_losses on each GPU's
    images: num_pos_avg = max(reduce_mean(local positives), 1) (the mean over GPUs);
    loss_fcos_cls = focal sum / num_pos_avg; loss_denorm = max(reduce_mean(local sum of
    centerness targets), 1e-6); loss_fcos_loc = sum of centerness x (1 - GIoU) / loss_denorm;
    loss_fcos_ctr = BCE sum / num_pos_avg; then DDP's mean over GPUs."""
    t = outputs["targets"]
    b = len(t["classes"])
    gpus = [range(s, s + images_per_gpu) for s in range(0, b, images_per_gpu)]
    positive = t["classes"] < c
    num_pos_avg = max(positive.sum() / len(gpus), 1.0)
    loss_denorm = max(t["centerness"][positive].sum() / len(gpus), 1e-6)
    terms = {"loss_cls": [], "loss_box_reg": [], "loss_centerness": []}
    for images in gpus:
        focal = loc = ctr = 0.0
        for i in images:
            focal += sum(
                fcos_reference.focal(outputs["class_logits"][i, t_, k], t["classes"][i, t_] == k)
                for t_ in range(FCOS_LOCATIONS)
                for k in range(c)
            )
            for t_ in np.flatnonzero(positive[i]):
                giou = fcos_reference.giou_ltrb(
                    outputs["distances"][i, t_], t["distances"][i, t_], 1.0
                )
                loc += t["centerness"][i, t_] * (1 - giou)
                ctr += fcos_reference.bce(
                    outputs["centerness_logits"][i, t_], t["centerness"][i, t_]
                )
        terms["loss_cls"].append(focal / num_pos_avg)
        terms["loss_box_reg"].append(loc / loss_denorm)
        terms["loss_centerness"].append(ctr / num_pos_avg)
    return {k: float(np.mean(v)) for k, v in terms.items()}, gpus, loss_denorm


@pytest.mark.parametrize("images_per_gpu", [2, 4])
def test_condinst_losses_match_adelaidet_per_gpu(images_per_gpu):
    """FCOS's terms are global for any split (AdelaiDet all-reduces them); the dice loss is
    each GPU's mean over its instances (dynamic_mask_head.py: dice_coefficient(...).mean()),
    averaged over GPUs: loss_normaliser_images = images per GPU."""
    outputs = fcos_case()
    expected, gpus, _ = adelaidet_fcos_losses(outputs, images_per_gpu)
    t = outputs["targets"]
    dice = []
    for images in gpus:
        per_instance = np.concatenate(
            [
                condinst_dice(
                    outputs["mask_logits"][i][t["slot_valid"][i]],
                    outputs["mask_targets"][i][t["slot_valid"][i]],
                )
                for i in images
            ]
        )
        dice.append(per_instance.mean())
    expected["loss_mask"] = float(np.mean(dice))
    cfg = condinst.CondInstConfig(num_classes=2, loss_normaliser_images=images_per_gpu)
    _, metrics = jax.jit(condinst.loss_fn, static_argnums=2)(jax_tree(outputs), {}, cfg)
    for term, value in expected.items():
        assert float(metrics[term]) == pytest.approx(value, rel=1e-5), term
    if images_per_gpu == 2:  # the per-GPU and global dice means differ on this batch
        assert expected["loss_mask"] != pytest.approx(
            float(np.mean(np.concatenate([condinst_dice(
                outputs["mask_logits"][i][t["slot_valid"][i]],
                outputs["mask_targets"][i][t["slot_valid"][i]],
            ) for i in range(4)]))),
            rel=1e-3,
        )  # fmt: skip


def test_blendmask_mask_loss_matches_adelaidet_on_two_gpus():
    """AdelaiDet adet/modeling/blendmask/blender.py Blender.__call__: per positive, the mask
    BCE averaged over its R x R pixels x its centerness target, summed and / loss_denorm
    (FCOS's all-reduced centerness sum), then DDP's mean over 2 GPUs: the global sum over the
    global centerness sum, whatever the split; FCOS's terms as AdelaiDet's."""
    outputs = fcos_case()
    r = 4
    rng = np.random.default_rng(1)
    b = len(FCOS_POSITIVES)
    outputs["mask_logits"] = rng.normal(0, 2, (b, FCOS_SLOTS, r, r)).astype(np.float32)
    outputs["mask_targets"] = (rng.random((b, FCOS_SLOTS, r, r)) < 0.5).astype(np.float32)
    outputs["semantic_logits"] = np.zeros((b, 2, 2, 3), np.float32)
    expected, gpus, loss_denorm = adelaidet_fcos_losses(outputs, 2)
    t = outputs["targets"]
    per_gpu = []
    for images in gpus:
        total = 0.0
        for i in images:
            for s in np.flatnonzero(t["slot_valid"][i]):
                bce = bce_with_logits(outputs["mask_logits"][i, s], outputs["mask_targets"][i, s])
                total += bce.mean() * t["slot_centerness"][i, s]
        per_gpu.append(total / loss_denorm)
    expected["loss_mask"] = float(np.mean(per_gpu))
    cfg = blendmask.BlendMaskConfig(num_classes=2, bottom_resolution=r)
    batch = {
        "image": np.zeros((b, 16, 16, 3), np.uint8),
        "image_hw": np.full((b, 2), 16, np.int32),
        "gt_full_masks": np.zeros((b, 1, 2, 2), bool),
        "gt_classes": np.zeros((b, 1), np.int32),
        "gt_valid": np.zeros((b, 1), bool),
    }
    _, metrics = jax.jit(blendmask.loss_fn, static_argnums=2)(
        jax_tree(outputs), jax_tree(batch), cfg
    )
    for term, value in expected.items():
        assert float(metrics[term]) == pytest.approx(value, rel=1e-5), term
    assert float(metrics["loss_semantic"]) == pytest.approx(0.3 * math.log(3), rel=1e-5)


def test_fcos_alone_has_the_global_normalisers():
    """FCOS's own loss_fn on the same four images: AdelaiDet's terms on 2 GPUs or on one."""
    outputs = fcos_case()
    cfg = fcos.FCOSConfig(num_classes=2)
    _, metrics = jax.jit(fcos.loss_fn, static_argnums=2)(jax_tree(outputs), {}, cfg)
    for split in (2, 4):
        expected, _, _ = adelaidet_fcos_losses(outputs, split)
        for term, value in expected.items():
            assert float(metrics[term]) == pytest.approx(value, rel=1e-5), (term, split)


@pytest.mark.parametrize(
    "experiment",
    [
        # WXinlong/SOLO configs/solov2/solov2_r50_fpn_8gpu_1x.py: data imgs_per_gpu=2 (8 GPUs).
        "experiments/solov2_r50_fpn_coco_1x.py",
        # AdelaiDet configs/CondInst/Base-CondInst.yaml SOLVER.IMS_PER_BATCH 16, trained with
        # --num-gpus 8 (configs/CondInst/README.md): 2 images per GPU.
        "experiments/condinst_r50_fpn_coco_1x.py",
    ],
)
def test_the_coco_recipes_normalise_per_reference_gpu(experiment):
    config = config_lib.load(experiment, [])
    assert config.model.loss_normaliser_images == 2
    assert config.input.global_batch % config.model.loss_normaliser_images == 0


GROUP_COLLECTIVES = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from instseg_jax import hlo_collectives, ops
data = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
counts = jax.device_put(jnp.arange(8, dtype=jnp.int32), data)
losses = jax.device_put(jnp.ones(8), data)
step = jax.jit(lambda c, x: (ops.group_normalizer_scale(c, 2, offset=1.0) * x).sum())
found = hlo_collectives.collectives(step.lower(counts, losses).compile().as_text())
print(sorted(k for k, v in hlo_collectives.summary(found).items() if v["count"]))
"""


@pytest.mark.slow
def test_group_normalisers_cross_devices_as_all_reduces_only():
    """On the 8-device "data" mesh, one image per device, groups of 2 spanning two devices:
    the group sums compile to all-reduces, nothing else (DESIGN "Only gradients cross
    chips")."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    process = subprocess.run(
        [sys.executable, "-c", GROUP_COLLECTIVES], env=env, capture_output=True, text=True
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip().splitlines()[-1] == "['all-reduce']"
