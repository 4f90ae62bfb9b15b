"""Loss parity of our YOLACT's training side (methods/yolact.py anchor_targets and loss_fn) with
mmdetection 3.3's YOLACTHead.loss_by_feat (OHEM softmax classification, smooth-L1 boxes) and
YOLACTProtonet.loss_by_feat (cropped mask BCE normalised by box area; the semantic BCE of its
SegmentationModule, mmdetection 2.x's YOLACTSegmHead) (issue 29 item 4; `make peer-mmdet`).

    .venv-mmdet/bin/python experiments/parity/yolact_loss.py
    .venv-mmdet/bin/python experiments/parity/yolact_loss.py \
        --make-fixture tests/fixtures/mmdet_yolact_loss_tiny.npz \
        --make-head-fixture tests/fixtures/mmdet_yolact_head_tiny.npz  # the CI tests' data

Environment: mmcv 2.1's lite build (no compiled ops), mmdet's mmcv.ops imports stubbed by
`mmdet_shim` (this folder; every stub raises if called). These losses call none: the
MaxIoUAssigner's IoU is mmdet's own bbox_overlaps (PyTorch), PseudoSampler, CrossEntropyLoss and
SmoothL1Loss are PyTorch.

Inputs: no network runs. The head outputs, random with a fixed seed, go to both sides: class
logits [B, T, C + 1], box deltas [B, T, 4] and tanh'd coefficients [B, T, K] (mmdetection's
per-level [B, A x ., h, w], anchors (y, x, ratio)), prototypes [B, 32, 32, K] at stride 4 and
semantic logits [B, 16, 16, C] at stride 8 (theirs channel-first). The protonet's convolutions
and the semantic 1x1 convolution are replaced by the given tensors (YOLACTProtonet.protonet by
an identity on the prototypes, segm_branch by a module returning the semantic logits), so
mmdetection's own forward combines prototypes and coefficients (sigmoid(P @ c)) and crops.

Anchors: mmdetection's AnchorGenerator as configs/yolact/yolact_r50_1xb8-55e_coco.py builds it
(octave_base_scale 3, ratios 0.5 1 2, stride = image side / feature side, centres at half a
stride) with the smoke base sizes 4 .. 64 on the 128 x 128 canvas: equal to ours (checked, max
|difference| printed). At the COCO recipe's size, mmdetection's own config (strides 550 / (69,
35, 18, 9, 5) on its 550 x 550 image) against ours on the 640 canvas with
model.anchor_extent_hw (550, 550): checked too (6e-5 px; the canvas grid, strides 8 .. 128,
would be 81 px off), and three cells per level of theirs go into the fixture.

Found and fixed in methods/yolact.py (each cited there): (1) the mask BCE's gradient at a logit
of exactly 0 (all prototypes 0 at a cell, which ReLU'd prototypes reach): JAX differentiated
max(x, 0) - x t + log1p(exp(-|x|)) to -t there, not s(0) - t = 1/2 - t (the prototype gradient
1.4e-3 off, relative, on few+crowded); now the log-sigmoid form. It never reached a parameter (the
protonet's last ReLU passes no gradient at 0). (2) The COCO anchors above (anchor_extent_hw).
(3) Ground truth the size filter leaves out also leaves the semantic targets (the reference's
FilterAnnotations removes it from the image); at scale 1 no such box (<= 4 px) can cover 3 of
a stride-8 cell's 4 stride-4 cells, so these scenes do not show it. Declared, not visible on a
canvas the image fills: at 550 px the reference's prototype and semantic grids are 138 and 69
cells (3.986 and 7.97 px a cell), ours 4 and 8 px (methods/yolact.py docstring).

Ground truth on the canvas: `few` (four objects, three classes), `crowded` (twelve discs whose
boxes share anchors), `empty`, each drawn at stride 4 and upsampled 4x (nearest) for
mmdetection (its bilinear 4x reduction gives back the stride-4 masks exactly, and its stride-8
semantic targets are ours: more than half of the 2 x 2 stride-4 cells), boxes the masks'
extents; and `nuclei`, a 128 x 128 crop of a DSB 2018 training image read from the shared data
(weights/mmdet_yolact_loss.py nuclei_ground_truth: real boxes, stride-4 masks by mmdetection's
own rule, checked here against its interpolation of the real masks). mmdetection's pipeline
runs FilterAnnotations(min_gt_bbox_wh=(4, 4)) before the head: applied here (its transform) to
its ground truth; ours gets every nucleus and leaves the two slivers out itself
(model.min_gt_box_size).

Random draws: an image with more positives than max_masks_to_train (16 here) trains a random
subset (YOLACTProtonet._get_targets_single: torch.randperm); torch.randperm is wrapped to
record mmdetection's draw, and that draw is injected into ours (the trained mask slots).

Semantic classes: mmdetection 3.3 writes instance i's semantic target into channel
labels[i] - 1 (yolact_head.py _get_targets_single), one class off (class 0 lands in the last
channel); dbolya/yolact (layers/modules/multibox_loss.py semantic_segmentation_loss) uses
the class itself, and so do we (a declared difference in methods/yolact.py). The parity gives
mmdetection's protonet labels + 1, which undoes the shift; its unshifted semantic term is
reported beside.

Checks: anchors, anchor labels (classes of positives, ignored anchors; exact), each term
(relative difference) and the gradient of the total loss with respect to each head output
(relative norm of the difference).

Head parameters (the stretch check): mmdetection's YOLACTHead and a YOLACTProtonet with its own
layers ((16, 3) x 3, bilinear x 2, (16, 3), (8, 1), ReLUs, and the semantic 1x1 convolution),
Xavier-initialised by their init_weights plus random biases, converted to our params
(weights/mmdet_yolact_loss.py convert_mmdet_heads); random FPN features P3..P7 into both; each
term and the gradient of the total with respect to every parameter tensor (relative norm).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
common = importlib.import_module("mmdet_common")  # before mmdet: it stubs mmcv.ops

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mmdet.datasets.transforms import FilterAnnotations  # noqa: E402
from mmdet.models.dense_heads import YOLACTHead, YOLACTProtonet  # noqa: E402
from mmdet.structures.bbox import HorizontalBoxes  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from instseg_jax.weights import mmdet_yolact_loss as parity  # noqa: E402

NUCLEI = common.SHARED_NUCLEI
CANVAS = 128
STRIDE = 4
NUM_CLASSES = 3
NUM_PROTOS = 8
MASKS_PER_IMAGE = 16
MAX_INSTANCES = 32
BASE_SIZES = (4, 8, 16, 32, 64)  # x octave_base_scale 3: our smoke anchor sizes 12 .. 192
FEATURE_SIDES = tuple(CANVAS // s for s in (8, 16, 32, 64, 128))
RATIOS = 3
LEVEL_SHAPES = tuple((side, side) for side in FEATURE_SIDES)
BATCHES = (("few", "crowded"), ("nuclei", "empty"), ("empty", "empty"))
TOLERANCES = {"loss": 1e-5, "grad": 1e-5}  # relative; float32 on both sides


def ellipse(cy, cx, ry, rx, size=CANVAS // STRIDE):
    """bool[size, size] at stride 4: the cells whose centres fall inside the ellipse."""
    y, x = np.mgrid[:size, :size] + 0.5
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def full_resolution(masks):
    return masks.repeat(STRIDE, axis=1).repeat(STRIDE, axis=2)


def boxes_of(full_masks):
    boxes = np.zeros((len(full_masks), 4), np.float32)
    for i, m in enumerate(full_masks):
        ys, xs = np.nonzero(m)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


def scene(name: str) -> dict:
    """classes int32[N], masks bool[N, 32, 32] (stride 4), boxes float32[N, 4] and the
    full-resolution masks mmdetection gets (nearest 4x upsampling of the stride-4 masks)."""
    if name == "nuclei":
        gt = parity.nuclei_ground_truth(NUCLEI, CANVAS, STRIDE)
        real = torch.tensor(gt["full_masks"], dtype=torch.float32)[None]
        theirs = F.interpolate(real, (CANVAS // STRIDE,) * 2, mode="bilinear").gt(0.5)[0]
        assert np.array_equal(theirs.numpy(), gt["masks"]), "stride-4 nuclei masks differ"
        gt["mmdet_masks"] = full_resolution(gt["masks"])
        return gt
    if name == "empty":
        masks = np.zeros((0, CANVAS // STRIDE, CANVAS // STRIDE), bool)
        classes = np.zeros((0,), np.int32)
    else:
        if name == "few":
            shapes = [(5, 5, 2, 2, 0), (10, 22, 4, 6, 1), (20, 10, 8, 6, 2), (16, 16, 14, 13, 0)]
        else:  # crowded: twelve 6-cell discs 2 cells apart, boxes sharing anchors
            shapes = [
                (9 + 2 * (i // 4), 9 + 2 * (i % 4) + (i // 4), 3, 3, i % 3) for i in range(12)
            ]
        masks = np.stack([ellipse(cy, cx, ry, rx) for cy, cx, ry, rx, _ in shapes])
        classes = np.array([s[4] for s in shapes], np.int32)
    full = full_resolution(masks)
    return {"classes": classes, "masks": masks, "boxes": boxes_of(full), "mmdet_masks": full}


def make_heads():
    """mmdetection's YOLACT heads at the tiny config (configs/yolact/yolact_r50_1xb8-55e_coco.py
    but for sizes: anchors, train_cfg, losses and their weights as there)."""
    register_all_modules()
    train_cfg = ConfigDict(
        assigner=dict(
            type="MaxIoUAssigner",
            pos_iou_thr=0.5,
            neg_iou_thr=0.4,
            min_pos_iou=0.0,
            ignore_iof_thr=-1,
            gt_max_assign_all=False,
        ),
        sampler=dict(type="PseudoSampler"),
        allowed_border=-1,
        pos_weight=-1,
        neg_pos_ratio=3,
        debug=False,
    )
    head = YOLACTHead(
        num_classes=NUM_CLASSES,
        in_channels=16,
        feat_channels=16,
        anchor_generator=dict(
            type="AnchorGenerator",
            octave_base_scale=3,
            scales_per_octave=1,
            base_sizes=list(BASE_SIZES),
            ratios=[0.5, 1.0, 2.0],
            strides=[CANVAS / x for x in FEATURE_SIDES],
            centers=[(CANVAS * 0.5 / x, CANVAS * 0.5 / x) for x in FEATURE_SIDES],
        ),
        bbox_coder=dict(
            type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]
        ),
        loss_cls=dict(
            type="CrossEntropyLoss", use_sigmoid=False, reduction="none", loss_weight=1.0
        ),
        loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.5),
        num_head_convs=1,
        num_protos=NUM_PROTOS,
        use_ohem=True,
        train_cfg=train_cfg,
    )
    protonet = YOLACTProtonet(
        num_classes=NUM_CLASSES,
        in_channels=NUM_PROTOS,
        num_protos=NUM_PROTOS,
        max_masks_to_train=MASKS_PER_IMAGE,
        loss_mask_weight=6.125,
        with_seg_branch=True,
        loss_segm=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    )
    protonet.protonet = torch.nn.Identity()  # the given prototypes are the protonet's output
    protonet.train()
    return head, protonet


class GivenSemantic(torch.nn.Module):
    """Stands in for SegmentationModule: returns the given semantic logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


class RecordedRandperm:
    """torch.randperm from a seeded generator, each draw recorded (mmdetection's choice of the
    trained masks, injected into ours)."""

    def __init__(self, seed: int):
        self.original = torch.randperm
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = []

    def __call__(self, n, *args, **kwargs):
        perm = self.original(n, generator=self.generator)
        self.draws.append(perm.clone())
        return perm

    def __enter__(self):
        torch.randperm = self
        return self

    def __exit__(self, *exc):
        torch.randperm = self.original


def mmdet_terms(box_losses, mask_losses) -> dict:
    """Our four terms from YOLACTHead's and YOLACTProtonet's loss_by_feat answers (per-level or
    per-image lists summed)."""
    return {
        "loss_cls": sum(box_losses["loss_cls"]),
        "loss_box_reg": sum(box_losses["loss_bbox"]),
        "loss_mask": sum(mask_losses["loss_mask"]),
        "loss_semantic": sum(mask_losses["loss_segm"]),
    }


def mmdet_instances(images):
    """Per image: the head's ground truth after FilterAnnotations(min_gt_bbox_wh=(4, 4)) (the
    recipe's first training transform) and the protonet's copy with labels + 1 (the semantic
    class shift undone; the script docstring)."""
    keep_filter = FilterAnnotations(min_gt_bbox_wh=(4.0, 4.0), keep_empty=False)
    head_gt, proto_gt, proto_gt_raw = [], [], []
    for image in images:
        results = {
            "gt_bboxes": HorizontalBoxes(torch.tensor(image["boxes"]).reshape(-1, 4)),
            "gt_bboxes_labels": np.asarray(image["classes"], np.int64),
            "gt_masks": BitmapMasks(image["mmdet_masks"].astype(np.uint8), CANVAS, CANVAS),
        }
        results = keep_filter(results)
        boxes = results["gt_bboxes"].tensor.float()
        labels = torch.tensor(results["gt_bboxes_labels"])
        masks = results["gt_masks"]
        head_gt.append(InstanceData(bboxes=boxes, labels=labels, masks=masks))
        proto_gt.append(InstanceData(bboxes=boxes, labels=labels + 1, masks=masks))
        proto_gt_raw.append(InstanceData(bboxes=boxes, labels=labels, masks=masks))
    return head_gt, proto_gt, proto_gt_raw


def run_mmdet(head, protonet, outputs, images, seed):
    """mmdetection's terms, the gradient of their sum in our layouts, its anchor labels and its
    trained mask slots (anchor indices, padded to MASKS_PER_IMAGE)."""
    logits, deltas, coefficients, protos, semantic = outputs
    b = logits.shape[0]
    cls_t = [
        torch.tensor(x, requires_grad=True)
        for x in common.split_levels(logits, LEVEL_SHAPES, RATIOS)
    ]
    box_t = [
        torch.tensor(x, requires_grad=True)
        for x in common.split_levels(deltas, LEVEL_SHAPES, RATIOS)
    ]
    coeff_t = [
        torch.tensor(x, requires_grad=True)
        for x in common.split_levels(coefficients, LEVEL_SHAPES, RATIOS)
    ]
    protos_t = torch.tensor(np.ascontiguousarray(protos.transpose(0, 3, 1, 2)), requires_grad=True)
    semantic_t = torch.tensor(
        np.ascontiguousarray(semantic.transpose(0, 3, 1, 2)), requires_grad=True
    )
    head_gt, proto_gt, proto_gt_raw = mmdet_instances(images)
    metas = [
        dict(
            img_shape=(CANVAS, CANVAS), pad_shape=(CANVAS, CANVAS), batch_input_shape=(CANVAS,) * 2
        )
    ] * b
    head._raw_positive_infos = dict()
    box_losses = head.loss_by_feat(cls_t, box_t, coeff_t, head_gt, metas)
    positive_infos = head.get_positive_infos()
    protonet.segm_branch = GivenSemantic(semantic_t)
    with RecordedRandperm(seed) as randperm:
        mask_preds, segm_preds = protonet.forward((protos_t,), positive_infos)
        mask_losses = protonet.loss_by_feat(mask_preds, segm_preds, proto_gt, metas, positive_infos)
    with RecordedRandperm(seed):
        raw = protonet.loss_by_feat(mask_preds, segm_preds, proto_gt_raw, metas, positive_infos)
    terms = mmdet_terms(box_losses, mask_losses)
    inputs = [*cls_t, *box_t, *coeff_t, protos_t, semantic_t]
    grads = torch.autograd.grad(sum(terms.values()), inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
    grads = [g.numpy() for g in grads]
    n = len(FEATURE_SIDES)
    answer = {name: float(value) for name, value in terms.items()}
    answer["loss_semantic_unshifted"] = float(sum(raw["loss_segm"]))
    answer["grad_class_logits"] = common.join_levels(grads[:n], RATIOS)
    answer["grad_box_deltas"] = common.join_levels(grads[n : 2 * n], RATIOS)
    answer["grad_coefficients"] = common.join_levels(grads[2 * n : 3 * n], RATIOS)
    answer["grad_prototypes"] = grads[-2].transpose(0, 2, 3, 1)
    answer["grad_semantic_logits"] = grads[-1].transpose(0, 2, 3, 1)
    answer.update(assignment(head, randperm.draws, b, logits.shape[1]))
    return answer


def assignment(head, draws, b, t) -> dict:
    """mmdetection's anchor labels (the class of positives, NUM_CLASSES elsewhere; ignored:
    neither positive nor negative) and trained mask slots (anchor indices, padded to
    MASKS_PER_IMAGE) from its last loss_by_feat and the protonet's randperm draws."""
    classes = np.full((b, t), NUM_CLASSES, np.int32)
    ignored = np.ones((b, t), bool)
    positives = []
    for i, result in enumerate(head._raw_positive_infos["sampling_results"]):
        pos, neg = result.pos_inds.numpy(), result.neg_inds.numpy()
        classes[i, pos] = result.pos_gt_labels.numpy()
        ignored[i, pos] = ignored[i, neg] = False
        positives.append(pos)
    # The protonet's randperm, drawn in image order.
    slot_anchor, slot_valid = common.mask_slots(positives, draws, MASKS_PER_IMAGE)
    return {
        "classes": classes,
        "ignored": ignored,
        "positives": (classes < NUM_CLASSES).sum(1),
        "slot_anchor": slot_anchor,
        "slot_valid": slot_valid,
    }


HEAD_CHANNELS = 16  # the FPN features' and the protonet's width
HEAD_BATCHES = (("few", "crowded"), ("nuclei", "empty"))


def make_real_heads(seed: int):
    """mmdetection's YOLACTHead and YOLACTProtonet with their own layers (the protonet's
    (C, 3) x 3, bilinear x 2, (C, 3), (K, 1) and the semantic 1x1 convolution), initialised by
    their init_weights and given random biases (their init's are 0), so that the conversion
    of every bias is tested."""
    head, _ = make_heads()
    protonet = YOLACTProtonet(
        num_classes=NUM_CLASSES,
        in_channels=HEAD_CHANNELS,
        proto_channels=(HEAD_CHANNELS,) * 3 + (None, HEAD_CHANNELS, NUM_PROTOS),
        num_protos=NUM_PROTOS,
        max_masks_to_train=MASKS_PER_IMAGE,
        loss_mask_weight=6.125,
        with_seg_branch=True,
        loss_segm=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    )
    torch.manual_seed(seed)
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights lists every tensor
    head.init_weights()
    protonet.init_weights()
    with torch.no_grad():
        for module in (head, protonet):
            for name, param in module.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.1)
    protonet.train()
    return head, protonet


def run_mmdet_heads(head, protonet, features, images, seed):
    """mmdetection's heads on given FPN features (per level [B, C, s, s]): the four terms, the
    gradient of their sum with respect to every head parameter (detector state-dict names),
    the parameters themselves and its mask slots."""
    feats = [torch.tensor(f) for f in features]
    head_gt, proto_gt, _ = mmdet_instances(images)
    b = len(images)
    metas = [
        dict(
            img_shape=(CANVAS, CANVAS), pad_shape=(CANVAS, CANVAS), batch_input_shape=(CANVAS,) * 2
        )
    ] * b
    head._raw_positive_infos = dict()
    cls, box, coeff = head.forward(tuple(feats))
    box_losses = head.loss_by_feat(cls, box, coeff, head_gt, metas)
    positive_infos = head.get_positive_infos()
    with RecordedRandperm(seed) as randperm:
        mask_preds, segm_preds = protonet.forward((feats[0],), positive_infos)
        mask_losses = protonet.loss_by_feat(mask_preds, segm_preds, proto_gt, metas, positive_infos)
    terms = mmdet_terms(box_losses, mask_losses)
    named = [(f"bbox_head.{n}", p) for n, p in head.named_parameters()]
    named += [(f"mask_head.{n}", p) for n, p in protonet.named_parameters()]
    grads = torch.autograd.grad(sum(terms.values()), [p for _, p in named], allow_unused=True)
    answer = {name: float(value.detach()) for name, value in terms.items()}
    answer["state"] = {n: p.detach().numpy().copy() for n, p in named}
    answer["grads"] = {
        n: (np.zeros(p.shape, np.float32) if g is None else g.numpy())
        for (n, p), g in zip(named, grads, strict=True)
    }
    anchors = sum(c.shape[1] // (NUM_CLASSES + 1) * c.shape[2] * c.shape[3] for c in cls)
    answer.update(assignment(head, randperm.draws, b, anchors))
    return answer


def head_parameter_parity(rng, failures) -> dict:
    """The stretch check: mmdetection's head weights converted to ours
    (weights/mmdet_yolact_loss.convert_mmdet_heads), random FPN features into both heads, the
    same losses; each term and every parameter's gradient compared. Returns the fixture's
    entries."""
    cfg = parity.yolact_config(NUM_CLASSES, CANVAS, NUM_PROTOS, MASKS_PER_IMAGE)
    head, protonet = make_real_heads(seed=29)
    fixture = {}
    for k, names in enumerate(HEAD_BATCHES):
        images = [scene(n) for n in names]
        features = [
            rng.normal(size=(len(images), HEAD_CHANNELS, s, s)).astype(np.float32)
            for s in FEATURE_SIDES
        ]
        theirs = run_mmdet_heads(head, protonet, features, images, seed=100 + k)
        params = parity.convert_mmdet_heads(theirs["state"])
        ours_nhwc = [f.transpose(0, 2, 3, 1) for f in features]
        slots = (theirs["slot_anchor"], theirs["slot_valid"])
        ours, our_grads = parity.yolact_head_losses(
            params, ours_nhwc, our_ground_truth(images), cfg, HEAD_CHANNELS, slots
        )
        their_grads = parity.convert_mmdet_heads(theirs["grads"])
        report = {"head_batch": "+".join(names), "positives": theirs["positives"].tolist()}
        for term in parity.TERMS:
            report[f"rel_{term}"] = parity.relative_difference(ours[term], theirs[term])
        leaves = jax_leaves(our_grads, their_grads)
        report["rel_param_grads_max"] = max(leaves.values())
        report["rel_param_grads_worst"] = max(leaves, key=leaves.get)
        print(json.dumps(report))
        if max(report[f"rel_{t}"] for t in parity.TERMS) > TOLERANCES["loss"]:
            failures.append(f"head {report['head_batch']}: a term")
        if report["rel_param_grads_max"] > TOLERANCES["grad"]:
            failures.append(f"head {report['head_batch']}: parameter gradients")
        fixture.update({f"h{k}_p{i + 3}": f for i, f in enumerate(ours_nhwc)})
        if "nuclei" not in names:
            fixture.update({f"h{k}_gt_{n}": v for n, v in our_ground_truth(images).items()})
        fixture.update({f"h{k}_mmdet_{t}": np.float64(theirs[t]) for t in parity.TERMS})
        fixture.update({f"h{k}_mmdet_grad_{n}": g for n, g in theirs["grads"].items()})
        fixture.update({f"h{k}_mmdet_{n}": theirs[n] for n in ("slot_anchor", "slot_valid")})
    fixture.update({f"state_{n}": v for n, v in theirs["state"].items()})
    return fixture


def jax_leaves(ours: dict, theirs: dict, path: str = "") -> dict:
    """{parameter path: relative difference} over two parameter trees of one structure."""
    out = {}
    for key, value in ours.items():
        if isinstance(value, dict):
            out.update(jax_leaves(value, theirs[key], f"{path}{key}/"))
        else:
            out[f"{path}{key}"] = parity.relative_difference(value, theirs[key])
    return out


def our_ground_truth(images) -> dict:
    """Our padded ground truth arrays for one batch (every instance, filtered or not)."""
    return parity.padded_ground_truth(images, MAX_INSTANCES, CANVAS // STRIDE)


def head_outputs(rng, b, t, side):
    """Random head outputs in our layouts."""
    return (
        (rng.normal(size=(b, t, NUM_CLASSES + 1))).astype(np.float32),
        (0.8 * rng.normal(size=(b, t, 4))).astype(np.float32),
        np.tanh(rng.normal(size=(b, t, NUM_PROTOS))).astype(np.float32),
        np.maximum(rng.normal(size=(b, side, side, NUM_PROTOS)), 0.0).astype(np.float32),
        rng.normal(size=(b, side // 2, side // 2, NUM_CLASSES)).astype(np.float32),
    )


GRADS = tuple(f"grad_{name}" for name in parity.INPUTS)
MMDET_KEYS = (*parity.TERMS, "loss_semantic_unshifted", *GRADS, "classes", "ignored")
MMDET_KEYS += ("positives", "slot_anchor", "slot_valid")


COCO_SIDES = (69, 35, 18, 9, 5)  # the 550 x 550 image's feature sides (yolact_r50 config)


def coco_anchor_check() -> tuple[dict, dict]:
    """mmdetection's anchors as yolact_r50_1xb8-55e_coco.py makes them (550 x 550 image) against
    ours under the COCO recipe (640 x 640 canvas, model.anchor_extent_hw (550, 550)) and without
    it (the canvas grid): ({name: max |difference|}, a sample of theirs for the fixture: three
    cells per level)."""
    from mmdet.models.task_modules.prior_generators import AnchorGenerator

    from instseg_jax.methods import yolact

    generator = AnchorGenerator(
        octave_base_scale=3,
        scales_per_octave=1,
        base_sizes=[8, 16, 32, 64, 128],
        ratios=[0.5, 1.0, 2.0],
        strides=[550.0 / x for x in COCO_SIDES],
        centers=[(550 * 0.5 / x, 550 * 0.5 / x) for x in COCO_SIDES],
    )
    theirs = generator.grid_priors([(x, x) for x in COCO_SIDES], device="cpu")
    gaps, sample = {}, {"level": [], "cell_yx": [], "anchors": []}
    for extent in ((550, 550), ()):
        cfg = yolact.YOLACTConfig(num_classes=80, anchor_extent_hw=extent)
        worst = 0.0
        for level, (ours, their, side) in enumerate(
            zip(cfg.anchors(), theirs, COCO_SIDES, strict=True)
        ):
            grid = np.asarray(ours).reshape(640 // (8 << level), -1, RATIOS, 4)  # the canvas grid
            their = their.numpy().reshape(side, side, RATIOS, 4)
            worst = max(worst, float(np.abs(grid[:side, :side] - their).max()))
            if extent:
                for cell in ((0, 0), (side // 2, 1), (side - 1, side - 1)):
                    sample["level"].append(level)
                    sample["cell_yx"].append(cell)
                    sample["anchors"].append(their[cell])
        gaps["canvas_grid" if not extent else "anchor_extent_550"] = worst
    return gaps, {name: np.asarray(v) for name, v in sample.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-fixture", type=Path, help="write the CI test's npz here")
    parser.add_argument(
        "--make-head-fixture", type=Path, help="write the head-parameter test's npz here"
    )
    args = parser.parse_args()
    start = time.time()
    cfg = parity.yolact_config(NUM_CLASSES, CANVAS, NUM_PROTOS, MASKS_PER_IMAGE)
    head, protonet = make_heads()
    theirs_anchors = torch.cat(
        head.prior_generator.grid_priors([(s, s) for s in FEATURE_SIDES], device="cpu")
    )
    anchor_gap = float(np.abs(parity.anchors(cfg) - theirs_anchors.numpy()).max())
    print(json.dumps({"anchors": len(theirs_anchors), "max_abs_anchor_difference": anchor_gap}))
    failures = [] if anchor_gap < 1e-4 else [f"anchors differ by {anchor_gap}"]
    coco_gaps, coco_sample = coco_anchor_check()
    print(json.dumps({"coco_recipe_max_abs_anchor_difference": coco_gaps}))
    if coco_gaps["anchor_extent_550"] > 1e-3:
        failures.append(f"COCO anchors differ by {coco_gaps['anchor_extent_550']}")
    rng = np.random.default_rng(29)
    fixture, worst, checksum = {}, {"loss": 0.0, "grad": 0.0}, None
    for k, names in enumerate(BATCHES):
        images = [scene(n) for n in names]
        if "nuclei" in names:
            checksum = images[names.index("nuclei")]["checksum"]
        outputs = head_outputs(rng, len(images), len(theirs_anchors), CANVAS // STRIDE)
        theirs = run_mmdet(head, protonet, outputs, images, seed=k)
        gt = our_ground_truth(images)
        slots = (theirs["slot_anchor"], theirs["slot_valid"])
        ours, targets = parity.yolact_losses(outputs, gt, cfg, slots)
        report = {"batch": "+".join(names), "positives": theirs["positives"].tolist()}
        report["class_mismatches"] = int((targets["classes"] != theirs["classes"]).sum())
        report["ignored_mismatches"] = int((targets["ignored"] != theirs["ignored"]).sum())
        if report["class_mismatches"] or report["ignored_mismatches"]:
            failures.append(f"{report['batch']}: anchor labels differ")
        for term in parity.TERMS:
            report[term] = (ours[term], theirs[term])
            report[f"rel_{term}"] = parity.relative_difference(ours[term], theirs[term])
        report["loss_semantic_unshifted"] = theirs["loss_semantic_unshifted"]
        for g in GRADS:
            report[f"rel_{g}"] = parity.relative_difference(ours[g], theirs[g])
        checks = {
            "loss": [report[f"rel_{t}"] for t in parity.TERMS],
            "grad": [report[f"rel_{g}"] for g in GRADS],
        }
        common.check_tolerances(f"{report['batch']}:", checks, TOLERANCES, worst, failures)
        print(json.dumps(report))
        fixture.update({f"b{k}_{name}": x for name, x in zip(parity.INPUTS, outputs, strict=True)})
        if "nuclei" not in names:  # the nuclei ground truth is re-read from the shared data
            fixture.update({f"b{k}_gt_{name}": v for name, v in gt.items()})
        fixture.update({f"b{k}_mmdet_{name}": np.asarray(theirs[name]) for name in MMDET_KEYS})
    head_fixture = head_parameter_parity(rng, failures)
    head_meta = {"channels": HEAD_CHANNELS, "batches": [list(n) for n in HEAD_BATCHES]}
    common.write_fixture(args.make_head_fixture, head_meta, head_fixture)
    summary = {"worst_relative": worst, "tolerances": TOLERANCES}
    print(json.dumps({**summary, "seconds": round(time.time() - start, 1)}))
    meta = {
        "num_classes": NUM_CLASSES,
        "canvas": CANVAS,
        "stride": STRIDE,
        "num_protos": NUM_PROTOS,
        "masks_per_image": MASKS_PER_IMAGE,
        "max_instances": MAX_INSTANCES,
        "batches": [list(n) for n in BATCHES],
        "nuclei_checksum": checksum,
    }
    fixture.update({f"coco_anchors_{name}": v for name, v in coco_sample.items()})
    common.write_fixture(args.make_fixture, meta, fixture)
    common.verdict(failures, "anchors, anchor labels and every term and gradient within tolerance")


if __name__ == "__main__":
    main()
