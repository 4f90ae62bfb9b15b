"""Loss parity of our CondInst's training side (methods/condinst.py: CondInst.assign, the mask
slots' dynamic-head logits, loss_fn) with mmdetection 3.x's CondInstBboxHead.loss_by_feat and
CondInstMaskHead.loss_by_feat (issue 29 item 4; `make peer-mmdet`).

    .venv-mmdet/bin/python experiments/parity/condinst_loss.py
    .venv-mmdet/bin/python experiments/parity/condinst_loss.py --make-fixture \
        tests/fixtures/mmdet_condinst_loss_tiny.npz                 # the CI test's data

Environment: as experiments/parity/solov2_loss.py (mmcv's lite build, `mmdet_shim` stubbing
mmcv.ops; every stub raises if called). These losses call none: FocalLoss takes its
pure-PyTorch path on CPU tensors, GIoULoss, CrossEntropyLoss and DiceLoss are PyTorch, the
dynamic convolution is F.conv2d and aligned_bilinear F.interpolate.

Inputs: no network runs. Random head outputs (mmdet_condinst_loss.random_head_outputs, a
fixed seed per batch; the fixture stores the seed and a checksum) go to both sides: per level class
logits, box distances (in strides, positive: mmdetection's bbox_preds after norm_on_bbox's
clamp), centerness logits and controller parameters (169), and the stride-8 mask features
(8 channels). Ground truth on a 128 x 128 canvas at full resolution: `few` (four ellipses of
three classes, one large enough for P4), `crowded` (twelve equal discs 14 px apart: locations
claimed by several equal-area instances, and more positives than mask slots), `empty`, and
`nuclei` (the masks of a 128 x 128 crop of a DSB2018 stage1_train image, NUCLEI_IMAGE in
`mmdet_condinst_loss`, which builds every scene; its mask checksum is in the fixture, its masks are not). Boxes are the masks' pixel-edge extents;
our stride-4 masks are the full ones sampled at [2::4, 2::4], as mmdetection's and AdelaiDet's
mask targets are (condinst_head.py _get_targets_single).

Batches: four images each = two mmdetection GPUs of two images (the COCO recipe's 2 images per
GPU; ours model.loss_normaliser_images 2). mmdetection's FCOS normalisers are all-reduced means
(reduce_mean), so its DDP-averaged box-head loss is its loss_by_feat over the four images at
once; its mask loss is per GPU (summed dice / that GPU's trained masks), so loss_by_feat runs
on each pair and the two are averaged, as DDP averages the gradients.

Random draw: mmdetection trains at most max_masks_to_train masks per image, a torch.randperm
subset of the image's positives (condinst_head.py _get_targets_single). The script wraps
torch.randperm to record each draw and gives ours the same subset (the mask slots are an input
of mmdet_condinst_loss.condinst_losses); our own draw (fcos.positive_slots) is checked only
where no image overflows (every positive trained, the same set) and in its overflow counts.

Where mmdetection deviates from AdelaiDet (the COCO recipe's reference,
experiments/condinst_r50_fpn_coco_1x.py), ours keeps AdelaiDet's rule; the parity runs ours
with mmdetection's rule switched on where ours has the option, and reports the raw difference:
- GIoU: AdelaiDet's IOULoss smooths the IoU term, (I + 1) / (U + 1) (adet/layers/iou_loss.py;
  ours model.giou_smoothing 1.0); mmdetection's GIoULoss does not (eps 1e-6 only). Compared
  with giou_smoothing 0; `raw_loss_box_reg` reports ours at 1.0.
- Mask budget: AdelaiDet trains at most 500 masks per GPU (MAX_PROPOSALS, one randperm over
  the GPU's 2 images; ours 250 per image, a declared difference in methods/condinst.py);
  mmdetection 300 per image (max_masks_to_train). The parity injects mmdetection's draw.
Upsampling of the stride-8 mask logits: both references use aligned_bilinear (mmdet/models/
utils/misc.py, from AdelaiDet adet/utils/comm.py); ours did half-pixel bilinear until this
parity measured what that changes (on the mask term 7e-5 to 5e-4 relative, but 6-9% of the
gradient on the controller parameters and 27-29% on the mask features), and now has model.mask_upsampling,
"aligned" in the COCO recipe. The parity proper runs mmdetection unpatched against ours at
"aligned"; `half_pixel` reports ours at "half_pixel" against mmdetection with aligned_bilinear
patched to F.interpolate(align_corners=False) (checked to the same tolerance), and
`raw_half_pixel` ours at "half_pixel" against the reference's own upsampling.
Mass centres: mmdetection and AdelaiDet average integer pixel indices of the bitmask; our
pipeline's gt_centers average pixel centres, half a pixel later. Ours gets its own convention
(`ground_truth`) and reproduces theirs through model.mass_centre_convention "pixel_index" (the
COCO recipe's, added after this parity counted the labels it moves);
`labels_moved_by_pixel_centres` counts the location labels that move at "pixel_centre".

Checks: location labels and matched instances (exact), each loss term (relative difference)
and the gradient of the total loss with respect to each head output (relative norm of the
difference).

Head parameters (weights/mmdet_condinst_head.py): the first batch runs again through the whole
heads: mmdetection's CondInstBboxHead (cls/reg towers, one conv + GroupNorm each, conv_cls,
conv_reg, conv_centerness, the five Scale modules, the controller) and CondInstMaskHead's
MaskFeatModule (a conv + GroupNorm per level P3..P5, one after their sum, conv_pred), 64 and 16
channels, a seeded state dict (`random_state_dict`, loaded strictly) on seeded FPN maps P3..P7
(`random_fpn_maps`); ours runs CondInst.heads with the same numbers through `convert_head` and
mmdetection's randperm draw of that run. Neither input is stored: the CI test draws both again
and checks their SHA-256 against the fixture's. Compared: the five head outputs, labels and
matches, the four terms and the gradient of the total loss with respect to every parameter
(35 tensors), by mmdetection key (ours mapped back through the converter). mmdetection's COCO
config has BatchNorm in the mask branch (AdelaiDet too); ours GroupNorm (methods/condinst.py),
so theirs is built with GroupNorm here, at our groups (min(32, C)) and torch's epsilon (ours).
Found: the mask branch brought P4 and P5 to P3 by half-pixel bilinear; both references use
aligned_bilinear there (mmdet condinst_head.py MaskFeatModule.forward, AdelaiDet
condinst/mask_branch.py forward), so model.mask_upsampling now covers it too ("aligned" in the
COCO recipe; `raw_half_pixel` reports ours at "half_pixel": 22% on the mask features, up to
97% on the mask branch's gradients). The worst parameter gradient (about 1e-5, the P3 refine
GroupNorm's weight) is float32 cancellation: run in float64, torch's answer is 6e-6 from each
float32 side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
common = importlib.import_module("mmdet_common")  # before mmdet: it stubs mmcv.ops

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mmdet.models.dense_heads import CondInstBboxHead, CondInstMaskHead  # noqa: E402
from mmdet.models.dense_heads import condinst_head as condinst_module  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from instseg_jax.weights import mmdet_condinst_head as head_parity  # noqa: E402
from instseg_jax.weights import mmdet_condinst_loss as ours_side  # noqa: E402
from instseg_jax.weights.mmdet_loss_parity import checksum, relative_difference  # noqa: E402

CANVAS = ours_side.CANVAS
MASK_STRIDE = ours_side.MASK_STRIDE
NUM_CLASSES = ours_side.NUM_CLASSES
MASK_SLOTS = 16  # per image, both sides (mmdetection's max_masks_to_train)
IMAGES_PER_GPU = 2
SEED = 29  # batch k's head outputs: ours_side.random_head_outputs(SEED + k, ...)
BATCHES = (
    ("few", "crowded", "nuclei", "empty"),
    ("crowded", "empty", "empty", "few"),
    ("empty", "empty", "empty", "empty"),
)
SHARED_NUCLEI = common.SHARED_NUCLEI
TOLERANCES = {"loss": 1e-5, "grad": 1e-5}  # relative; float32 on both sides
GRAD_NAMES = [f"grad_{n}" for n in ours_side.HEAD_OUTPUTS]
# The whole heads: outputs pass through convolutions and GroupNorm (float32 sums of a few
# thousand terms), measured 9e-7, so 1e-5. Parameter gradients: 34 of 35 within 6e-6; the
# worst, the P3 refine GroupNorm's weight (1.1e-5), is a sum that cancels (its norm 3e-3, the
# convs' 0.1), each float32 side 6e-6 from torch's float64 answer (module docstring): 4e-5
# leaves room for another summation order; a wrong rule moves it by 1e-3 to 1.
HEAD_TOLERANCES = {"output": 1e-5, "loss": 1e-5, "grad": 4e-5}
HEAD_BATCH = 0  # BATCHES[0]: all four scenes, two GPUs, the crowded image's randperm draw
HEAD_STATE_DICT_SEED = 29
HEAD_FPN_SEED = 2929


def scene(name):
    return ours_side.scene(name, SHARED_NUCLEI)


def make_heads(cfg=None):
    """mmdetection's heads at configs/condinst/condinst_r50_fpn_ms-poly-90k_coco_instance.py's
    loss settings: narrow layers where only loss_by_feat runs (cfg None: the head outputs are
    given), else cfg's widths (head_parity.head_config) with our GroupNorm groups."""
    register_all_modules()
    c = 16 if cfg is None else cfg.fpn_channels
    m = 16 if cfg is None else cfg.mask_branch_channels
    tower_gn = dict(type="GN", num_groups=4 if cfg is None else head_parity.norm_groups(c))
    mask_gn = dict(type="GN", num_groups=4 if cfg is None else head_parity.norm_groups(m))
    bbox_head = CondInstBboxHead(
        num_params=169,
        num_classes=NUM_CLASSES,
        in_channels=c,
        stacked_convs=1,
        feat_channels=c,
        strides=[8, 16, 32, 64, 128],
        norm_on_bbox=True,
        centerness_on_reg=True,
        center_sampling=True,
        conv_bias=True,
        norm_cfg=dict(**tower_gn, requires_grad=True),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=1.0),
        loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    )
    mask_head = CondInstMaskHead(
        num_layers=3,
        feat_channels=8,
        size_of_interest=8,
        mask_out_stride=MASK_STRIDE,
        max_masks_to_train=MASK_SLOTS,
        mask_feature_head=dict(
            in_channels=c,
            feat_channels=m,
            start_level=0,
            end_level=2,
            out_channels=8,
            mask_stride=8,
            num_stacked_convs=1,
            norm_cfg=mask_gn,
        ),
        loss_mask=dict(type="DiceLoss", use_sigmoid=True, activate=True, eps=5e-6, loss_weight=1.0),
    )
    return bbox_head, mask_head


def half_pixel_bilinear(tensor, factor):
    """The patch for aligned_bilinear: ours (torch align_corners=False)."""
    return F.interpolate(tensor, scale_factor=factor, mode="bilinear", align_corners=False)


def run_mmdet(heads, head, images, shapes, seed, patch_upsampling):
    """mmdetection's terms, the gradient of their total in our layouts, its targets and its
    mask-slot draw."""
    levels = {
        "class_logits": common.split_levels(head["class_logits"], shapes),
        "distances": common.split_levels(head["distances"], shapes),
        "centerness_logits": common.split_levels(head["centerness_logits"][..., None], shapes),
        "dynamic_params": common.split_levels(head["dynamic_params"], shapes),
    }
    tensors = {k: [torch.tensor(x, requires_grad=True) for x in v] for k, v in levels.items()}
    features = torch.tensor(
        np.ascontiguousarray(head["mask_features"].transpose(0, 3, 1, 2)), requires_grad=True
    )
    losses, loss_mask, infos, draws = mmdet_losses(
        heads, tensors, features, images, seed, patch_upsampling
    )
    total = losses["loss_cls"] + losses["loss_bbox"] + losses["loss_centerness"] + loss_mask
    inputs = [*(t for k in levels for t in tensors[k]), features]
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
    n = len(shapes)
    grad = {}
    for k, name in enumerate(levels):
        grad[f"grad_{name}"] = common.join_levels([g.numpy() for g in grads[k * n : (k + 1) * n]])
    grad["grad_centerness_logits"] = grad["grad_centerness_logits"][..., 0]
    grad["grad_mask_features"] = grads[-1].numpy().transpose(0, 2, 3, 1)
    return {
        "loss_cls": float(losses["loss_cls"]),
        "loss_box_reg": float(losses["loss_bbox"]),
        "loss_centerness": float(losses["loss_centerness"]),
        "loss_mask": float(loss_mask),
        **grad,
        **mmdet_targets(infos, draws, images, shapes),
    }


def mmdet_losses(heads, tensors, features, images, seed, patch_upsampling):
    """(the box head's loss_by_feat, the mask loss averaged over the GPUs, the positive infos,
    the randperm draws) of per-level head outputs tensors (class_logits, distances,
    centerness_logits, dynamic_params: lists of [B, K, h, w]) and mask features [B, 8, h, w]."""
    bbox_head, mask_head = heads
    instances = [
        InstanceData(
            bboxes=torch.tensor(ours_side.boxes_of(masks)),
            labels=torch.tensor(classes),
            masks=BitmapMasks(masks.astype(np.uint8), CANVAS, CANVAS),
        )
        for classes, masks in images
    ]
    metas = [dict(img_shape=(CANVAS, CANVAS), pad_shape=(CANVAS, CANVAS))] * len(images)
    losses = bbox_head.loss_by_feat(
        tensors["class_logits"],
        tensors["distances"],
        tensors["centerness_logits"],
        tensors["dynamic_params"],
        instances,
        metas,
    )
    infos = bbox_head.get_positive_infos()
    draws = []
    real_randperm = torch.randperm

    def recorded_randperm(n, *args, **kwargs):
        perm = real_randperm(n, *args, **kwargs)
        draws.append(perm.clone())
        return perm

    torch.manual_seed(seed)
    real_upsampling = condinst_module.aligned_bilinear
    torch.randperm = recorded_randperm
    if patch_upsampling:
        condinst_module.aligned_bilinear = half_pixel_bilinear
    try:
        per_gpu = []
        for g in range(0, len(images), IMAGES_PER_GPU):
            part = slice(g, g + IMAGES_PER_GPU)
            preds = [
                mask_head.forward_single(features[i], infos[i])[0]
                for i in range(part.start, part.stop)
            ]
            per_gpu.append(
                mask_head.loss_by_feat(preds, instances[part], metas[part], infos[part])[
                    "loss_mask"
                ]
            )
    finally:
        torch.randperm = real_randperm
        condinst_module.aligned_bilinear = real_upsampling
    loss_mask = sum(per_gpu) / len(per_gpu)  # DDP's average over the GPUs
    return losses, loss_mask, infos, draws


def mmdet_targets(infos, draws, images, shapes):
    """mmdetection's location labels and matches [B, T] and its mask slots [B, MASK_SLOTS]
    (the randperm draw where an image has more positives)."""
    # Targets and the mask slots: each image's positive locations, the subset trained.
    t = sum(h * w for h, w in shapes)
    labels = np.full((len(images), t), NUM_CLASSES, np.int32)
    matched = np.full((len(images), t), -1, np.int32)
    positives = []
    for i, (info, (classes, _)) in enumerate(zip(infos, images, strict=True)):
        pos = info.pos_inds.numpy()
        matched[i, pos] = info.pos_assigned_gt_inds.numpy()
        labels[i, pos] = classes[info.pos_assigned_gt_inds.numpy()]
        positives.append(pos)
    slot_location, slot_valid = common.mask_slots(positives, draws, MASK_SLOTS)
    return {
        "location_classes": labels,
        "matched": matched,
        "slot_location": slot_location,
        "slot_valid": slot_valid,
    }


def run_mmdet_head(heads, state_dict, fpn, images, shapes, seed):
    """mmdetection's head outputs (our layouts), terms, the gradient of their total with
    respect to every parameter (by key, torch layouts), its targets and mask-slot draw."""
    bbox_head, mask_head = heads
    torch_keys = {f"bbox_head.{k}" for k in bbox_head.state_dict()}
    torch_keys |= {f"mask_head.{k}" for k in mask_head.state_dict()}
    assert torch_keys == set(state_dict), sorted(torch_keys ^ set(state_dict))
    for prefix, module in (("bbox_head.", bbox_head), ("mask_head.", mask_head)):
        module.load_state_dict(
            {
                k[len(prefix) :]: torch.tensor(v)
                for k, v in state_dict.items()
                if k.startswith(prefix)
            },
            strict=True,
        )
    maps = [torch.tensor(np.ascontiguousarray(f.transpose(0, 3, 1, 2))) for f in fpn]
    class_logits, distances, centerness, params = bbox_head(maps)
    features = mask_head.mask_feature_head(maps)
    tensors = {
        "class_logits": class_logits,
        "distances": distances,
        "centerness_logits": centerness,
        "dynamic_params": params,
    }
    losses, loss_mask, infos, draws = mmdet_losses(heads, tensors, features, images, seed, False)
    total = losses["loss_cls"] + losses["loss_bbox"] + losses["loss_centerness"] + loss_mask
    named = [(f"bbox_head.{n}", p) for n, p in bbox_head.named_parameters()]
    named += [(f"mask_head.{n}", p) for n, p in mask_head.named_parameters()]
    grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    outputs = {
        name: common.join_levels([x.detach().numpy() for x in v]) for name, v in tensors.items()
    }
    outputs["centerness_logits"] = outputs["centerness_logits"][..., 0]
    outputs["mask_features"] = features.detach().numpy().transpose(0, 2, 3, 1)
    return {
        **outputs,
        "loss_cls": float(losses["loss_cls"]),
        "loss_box_reg": float(losses["loss_bbox"]),
        "loss_centerness": float(losses["loss_centerness"]),
        "loss_mask": float(loss_mask),
        "grads": {
            name: (torch.zeros_like(p) if g is None else g).numpy()
            for (name, p), g in zip(named, grads, strict=True)
        },
        **mmdet_targets(infos, draws, images, shapes),
    }


def compare_heads(fixture, failures):
    """The head-parameter batch: mmdetection's CondInstBboxHead and CondInstMaskHead against
    our CondInst.heads on seeded FPN maps with one seeded state dict; ours at the recipe's
    mask_upsampling ("aligned") and, reported raw, at "half_pixel"."""
    cfg = head_parity.head_config(MASK_SLOTS, giou_smoothing=0.0)
    loss_cfg = ours_side.condinst_config(NUM_CLASSES, CANVAS, MASK_SLOTS, giou_smoothing=0.0)
    half_pixel = dict(giou_smoothing=0.0, mask_upsampling="half_pixel")
    half_pixel_cfg = head_parity.head_config(MASK_SLOTS, **half_pixel)
    half_pixel_loss_cfg = ours_side.condinst_config(NUM_CLASSES, CANVAS, MASK_SLOTS, **half_pixel)
    heads = make_heads(cfg)
    state_dict = head_parity.random_state_dict(cfg, seed=HEAD_STATE_DICT_SEED)
    names = BATCHES[HEAD_BATCH]
    images = [scene(n) for n in names]
    fpn = head_parity.random_fpn_maps(cfg, len(images), seed=HEAD_FPN_SEED)
    shapes = cfg.level_shapes()
    theirs = run_mmdet_head(heads, state_dict, fpn, images, shapes, seed=HEAD_BATCH)
    gt = ours_side.ground_truth(images)
    slots = (theirs["slot_location"], theirs["slot_valid"])
    outputs, terms, grads, targets = head_parity.head_losses(
        state_dict, fpn, gt, *slots, cfg, loss_cfg
    )
    report = {
        "head_batch": "+".join(names),
        "location_label_mismatches": int(
            (targets["location_classes"] != theirs["location_classes"]).sum()
        ),
        "matched_mismatches": int((targets["matched"] != theirs["matched"]).sum()),
        "positives": [int(p) for p in (theirs["matched"] >= 0).sum(axis=1)],
        "parameters": len(theirs["grads"]),
    }
    for name in ours_side.HEAD_OUTPUTS:
        report[f"rel_{name}"] = relative_difference(outputs[name], theirs[name])
    for name in ours_side.TERMS:
        report[f"rel_{name}"] = relative_difference(terms[name], theirs[name])
    per_param = {key: relative_difference(grads[key], g) for key, g in theirs["grads"].items()}
    report["rel_grad_worst_parameter"] = max(per_param.items(), key=lambda kv: kv[1])
    report["rel_grad_all_parameters"] = relative_difference(
        np.concatenate([grads[key].ravel() for key in theirs["grads"]]),
        np.concatenate([g.ravel() for g in theirs["grads"].values()]),
    )
    # Ours with the mask branch's levels (and the logits) upsampled at half-pixel centres.
    half_outputs, half_terms, half_grads, _ = head_parity.head_losses(
        state_dict, fpn, gt, *slots, half_pixel_cfg, half_pixel_loss_cfg
    )
    report["raw_half_pixel"] = {
        "mask_features": relative_difference(
            half_outputs["mask_features"], theirs["mask_features"]
        ),
        "loss_mask": relative_difference(half_terms["loss_mask"], theirs["loss_mask"]),
        "worst_mask_branch_grad": max(
            relative_difference(half_grads[k], g)
            for k, g in theirs["grads"].items()
            if k.startswith("mask_head.")
        ),
    }
    checks = {
        "output": [report[f"rel_{n}"] for n in ours_side.HEAD_OUTPUTS],
        "loss": [report[f"rel_{n}"] for n in ours_side.TERMS],
        "grad": list(per_param.values()),
    }
    worst = {}
    common.check_tolerances(
        f"{report['head_batch']}: head", checks, HEAD_TOLERANCES, worst, failures
    )
    for count in ("location_label_mismatches", "matched_mismatches"):
        if report[count]:
            failures.append(f"{report['head_batch']}: head {count} {report[count]}")
    print(json.dumps(report))
    if fixture is not None:
        fixture["h_state_dict_sha256"] = np.asarray(checksum(state_dict))
        fixture["h_fpn_sha256"] = np.asarray(checksum(fpn))
        for name in (*ours_side.HEAD_OUTPUTS, *ours_side.TERMS, "location_classes", "matched"):
            fixture[f"h_mmdet_{name}"] = np.asarray(theirs[name])
        for name in ("slot_location", "slot_valid"):
            fixture[f"h_mmdet_{name}"] = np.asarray(theirs[name])
        for key, g in theirs["grads"].items():
            fixture[f"h_mmdet_grad.{key}"] = g
    return worst


def compare(ours, theirs):
    figures = {f"rel_{n}": relative_difference(ours[n], theirs[n]) for n in ours_side.TERMS}
    figures.update({f"rel_{n}": relative_difference(ours[n], theirs[n]) for n in GRAD_NAMES})
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-fixture", type=Path, help="write the CI test's npz here")
    args = parser.parse_args()
    start = time.time()
    cfg = ours_side.condinst_config(NUM_CLASSES, CANVAS, MASK_SLOTS, giou_smoothing=0.0)
    recipe_cfg = ours_side.condinst_config(NUM_CLASSES, CANVAS, MASK_SLOTS)
    pixel_centre_cfg = ours_side.condinst_config(
        NUM_CLASSES, CANVAS, MASK_SLOTS, giou_smoothing=0.0, mass_centre_convention="pixel_centre"
    )
    half_pixel_cfg = ours_side.condinst_config(
        NUM_CLASSES, CANVAS, MASK_SLOTS, giou_smoothing=0.0, mask_upsampling="half_pixel"
    )
    heads = make_heads()
    shapes = cfg.level_shapes()
    fixture, failures = {}, []
    worst = {"loss": 0.0, "grad": 0.0}
    for k, names in enumerate(BATCHES):
        images = [scene(n) for n in names]
        head = ours_side.random_head_outputs(SEED + k, len(images), cfg)
        theirs = run_mmdet(heads, head, images, shapes, seed=k, patch_upsampling=False)
        patched = run_mmdet(heads, head, images, shapes, seed=k, patch_upsampling=True)
        assert np.array_equal(patched["slot_location"], theirs["slot_location"])
        gt = ours_side.ground_truth(images)
        slots = (theirs["slot_location"], theirs["slot_valid"])
        ours, targets = ours_side.condinst_losses(head, gt, *slots, cfg)
        report = {"batch": "+".join(names)}
        report["location_label_mismatches"] = int(
            (targets["location_classes"] != theirs["location_classes"]).sum()
        )
        report["matched_mismatches"] = int((targets["matched"] != theirs["matched"]).sum())
        report["positives"] = [int(p) for p in (theirs["matched"] >= 0).sum(axis=1)]
        overflowing = (theirs["matched"] >= 0).sum(axis=1) > MASK_SLOTS
        report["overflowing_images"] = int(overflowing.sum())
        # Our own draw: every positive where there is room, and the overflow it counts.
        room = ~overflowing
        report["own_slot_set_mismatches"] = int(
            (targets["own_slots"][room] != (theirs["matched"][room] >= 0)).sum()
        )
        expected_overflow = np.maximum((theirs["matched"] >= 0).sum(axis=1) - MASK_SLOTS, 0)
        report["own_overflow_mismatches"] = int(
            (targets["own_overflow"] != expected_overflow).sum()
        )
        report.update(compare(ours, theirs))
        report["terms_ours_theirs"] = {n: (ours[n], theirs[n]) for n in ours_side.TERMS}
        # Ours at half_pixel: against mmdetection patched alike, and against the reference.
        half, _ = ours_side.condinst_losses(head, gt, *slots, half_pixel_cfg)
        report["half_pixel"] = max(compare(half, patched).values())
        report["raw_half_pixel"] = {
            n: relative_difference(half[n], theirs[n])
            for n in ("loss_mask", "grad_dynamic_params", "grad_mask_features")
        }
        if report["half_pixel"] > max(TOLERANCES.values()):
            failures.append(f"{report['batch']}: half_pixel {report['half_pixel']:.2e}")
        # Ours at the recipe's GIoU smoothing (AdelaiDet's) against mmdetection's GIoU.
        recipe, _ = ours_side.condinst_losses(head, gt, *slots, recipe_cfg)
        report["raw_loss_box_reg"] = relative_difference(
            recipe["loss_box_reg"], theirs["loss_box_reg"]
        )
        _, own = ours_side.condinst_losses(head, gt, *slots, pixel_centre_cfg)
        report["labels_moved_by_pixel_centres"] = int(
            (own["location_classes"] != theirs["location_classes"]).sum()
        )
        checks = {
            "loss": [report[f"rel_{n}"] for n in ours_side.TERMS],
            "grad": [report[f"rel_{n}"] for n in GRAD_NAMES],
        }
        common.check_tolerances(f"{report['batch']}:", checks, TOLERANCES, worst, failures)
        for count in (
            "location_label_mismatches",
            "matched_mismatches",
            "own_slot_set_mismatches",
            "own_overflow_mismatches",
        ):
            if report[count]:
                failures.append(f"{report['batch']}: {count} {report[count]}")
        print(json.dumps(report))
        if args.make_fixture:
            fixture[f"b{k}_head_checksum"] = np.asarray(ours_side.head_checksum(head))
            # No ground truth: the test rebuilds it (ours_side.scene), nuclei from shared data.
            for name in (
                *ours_side.TERMS,
                *GRAD_NAMES,
                "location_classes",
                "matched",
                "slot_location",
                "slot_valid",
            ):
                fixture[f"b{k}_mmdet_{name}"] = np.asarray(theirs[name])
    head_worst = compare_heads(fixture if args.make_fixture else None, failures)
    common.print_summary(worst, TOLERANCES, head_worst, HEAD_TOLERANCES, start)
    meta = {
        "head_batch": HEAD_BATCH,
        "head_state_dict_seed": HEAD_STATE_DICT_SEED,
        "head_fpn_seed": HEAD_FPN_SEED,
        "num_classes": NUM_CLASSES,
        "canvas": CANVAS,
        "mask_slots": MASK_SLOTS,
        "batches": [list(n) for n in BATCHES],
        "seed": SEED,
        "nuclei_image": ours_side.NUCLEI_IMAGE,
        "nuclei_crop": list(ours_side.NUCLEI_CROP),
        "nuclei_masks_sha256": ours_side.masks_checksum(scene("nuclei")[1]),
    }
    common.write_fixture(args.make_fixture, meta, fixture)
    common.verdict(
        failures, "every term and gradient within tolerance (ours at mmdetection's GIoU rule)"
    )


if __name__ == "__main__":
    main()
