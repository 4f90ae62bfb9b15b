"""Loss parity of our PointRend's mask branch (methods/pointrend.py training_points_and_targets
and point_losses) with mmdetection 3.x's PointRendRoIHead (issue 29 item 4; `make peer-mmdet`).

    .venv-mmdet/bin/python experiments/parity/pointrend_loss.py
    .venv-mmdet/bin/python experiments/parity/pointrend_loss.py --make-fixture \
        tests/fixtures/mmdet_pointrend_loss_tiny.npz                 # the CI test's data

What runs on mmdetection's side: PointRendRoIHead.mask_loss's sequence (mmdet 3.3
mmdet/models/roi_heads/point_rend_roi_head.py:31-76) without its networks, whose outputs are
given: CoarseMaskHead.loss_and_target (FCNMaskHead's: mask_target's 7 x 7 targets of the
positive RoIs, mask_cross_entropy), MaskPointHead.get_roi_rel_points_train (mmdet/models/utils/
point_sample.py get_uncertain_point_coords_with_randomness on the coarse logits of the ground-
truth class) and MaskPointHead.loss_and_target (get_targets: point_sample of the full-resolution
gt masks at the points; mask_cross_entropy on the point logits of the gt class). Box and RPN
losses are Mask R-CNN's, checked against torchvision (experiments/parity/torchvision_losses.py).

Environment: mmcv's lite build (no compiled ops); `mmdet_shim` (this folder) stubs mmcv.ops
(every stub raises if called) but loads the real plain-PyTorch mmcv/ops/point_sample.py. The one
compiled op this loss calls, RoIAlign in BitmapMasks.crop_and_resize (the coarse targets:
roi_align(masks, rois, 7, 1.0, 0, 'avg', aligned=True)), is replaced here by torchvision.ops.
roi_align with the same arguments (sampling_ratio 0: ceil(RoI side / 7) samples per bin axis;
aligned): the same Caffe2 RoIAlign algorithm on CPU.

Inputs: no network runs. Positive RoIs (per instance its tight box and a jittered one, inside
the canvas), random coarse logits [K, C, 7, 7] and point logits [K, C, 196] (a fixed seed) go to
both sides, and the same uniform draws: PointRend's importance sampling draws 588 candidates and
49 fill points per RoI with torch.rand, which this script patches to return the draws it made
(numpy) and which ours takes as `uncertain_points`' draws argument. The kept candidates must
be the same; two may swap places within them (uncertainties equal up to float32 rounding: 2
points in the first batch), so our labels are put in mmdetection's point order (point_order)
before the terms on our own targets are compared (a point's logit is the one at its place).
Scenes on a 128 x 128 canvas: few (four ellipses, 10 to 62 px), crowded (twelve overlapping
ellipses), empty, and nuclei (12 nuclei of a crop of one DSB 2018 image, read from the shared
set; the fixture keeps the masks' checksum, not the masks).

Checks: (1) the loss rules: each term and the gradient of their sum with respect to both head
outputs, with mmdetection's targets given to ours (float32 noise: tolerance 1e-5); (2) the
targets: ours come from each instance's box crop at input.mask_size (224, the COCO recipe's;
the pipeline's gt_masks) where mmdetection and detectron2 read the full-resolution mask: coarse
target cells that differ, point labels' largest and mean difference, and the terms on our own
targets. This check found two rules of ours off and they were fixed (methods/pointrend.py
point_labels, ops/masks.py mask_targets sampling_ratio 0): labels were bilinear samples of the
crop (0.03-0.06 mean, 0.5 largest difference), coarse targets 2 samples per bin (3-5% of the
cells). Left: 0-2 coarse cells of ~1500 (a crop cell is the mask's thresholded bilinear
surface, not its pixels), the tolerance the test keeps.

Where mmdetection deviates from detectron2 (the COCO recipe's reference, projects/PointRend),
ours keeps detectron2's rule:
- training boxes: detectron2 trains the mask branch on the box head's predictions for the gt
  class (Base-PointRend-RCNN-FPN.yaml ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES), mmdetection on the
  sampled proposals (point_rend_roi_head.py:61 pos_bboxes, fcn_mask_head.py:169 pos_priors).
  Upstream of this loss, which both sides get the same RoIs for; ours: train_on_pred_boxes.
- no positive RoI in the whole batch: detectron2's mask_rcnn_loss and roi_mask_point_loss
  return logits.sum() * 0; mmdetection's point branch asserts non-empty RoIs (point_rend_roi_
  head.py:146) and mask_cross_entropy would average an empty tensor (NaN). Ours returns 0 with
  zero gradients, checked here on an all-empty batch on our side only.
Otherwise the two agree: detectron2's BitMasks.crop_and_resize (ROIAlign sampling 0, aligned,
>= 0.5), its point_sample of the bitmask at points / image size, and its mean BCE of the
gt-class logits are mmdetection's rules above.

Head parameters (weights/mmdet_pointrend_head.py): per batch, mmdetection's CoarseMaskHead and
MaskPointHead with a seeded state dict (`random_state_dict`, loaded strictly) run on seeded RoI
features and fine-grained point features (`random_features`, in place of RoIAlign and
point_sample of P2: the heads alone): CoarseMaskHead forward and loss_and_target, then
PointRendRoIHead._mask_point_loss itself on a stand-in roi head whose
_get_fine_grained_point_feats returns the given features (torch.rand serves the batch's
draws, as above). Ours runs the state dict through `convert_heads` (PointRend.coarse_head,
point_head_logits), selects its points from its own coarse logits and the same draws (checked:
mmdetection's set), and runs the point head on mmdetection's points with its targets. Compared:
both heads' outputs, both terms and the gradient of their sum with respect to every parameter
(by mmdetection key). Neither features nor state dict are stored: the CI test draws both again
and checks the SHA-256 sums the fixture holds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

# This folder holds torchvision.py, which would shadow the package: import it without the folder.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import torchvision  # noqa: E402

sys.path.insert(0, str(HERE))
common = importlib.import_module("mmdet_common")  # before mmdet: it stubs mmcv.ops

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmdet.models.roi_heads import PointRendRoIHead  # noqa: E402
from mmdet.models.roi_heads.mask_heads import CoarseMaskHead, MaskPointHead  # noqa: E402
from mmdet.models.task_modules.assigners import AssignResult  # noqa: E402
from mmdet.models.task_modules.samplers import SamplingResult  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmdet.structures.mask import structures as mask_structures  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from instseg_jax.weights import mmdet_loss_parity  # noqa: E402
from instseg_jax.weights import mmdet_pointrend_head as head_parity  # noqa: E402
from instseg_jax.weights import mmdet_pointrend_loss as parity  # noqa: E402

SHARED_NUCLEI = common.SHARED_NUCLEI
BATCHES = (("few", "crowded"), ("crowded", "empty"), ("nuclei", "few"))
TOLERANCES = {"loss": 1e-5, "grad": 1e-5}  # relative, with mmdetection's targets; float32
# The heads themselves (weights/mmdet_pointrend_head.py): outputs, terms and each parameter's
# gradient, relative; float32 matmuls of a few hundred terms on both sides.
HEAD_TOLERANCES = {"output": 1e-5, "loss": 1e-5, "grad": 2e-5}
HEAD_STATE_DICT_SEED = 29
HEAD_FEATURE_SEED = 2929  # + the batch's index


def roi_align_torchvision(
    masks, rois, out_shape, spatial_scale, sampling_ratio, pool_mode, aligned
):
    """mmcv.ops.roi_align's signature on torchvision's kernel (the same algorithm)."""
    if pool_mode != "avg":
        raise ValueError(f"only avg pooling has a torchvision equivalent, got {pool_mode}")
    return torchvision.ops.roi_align(
        masks, rois, out_shape, spatial_scale, sampling_ratio, aligned=aligned
    )


mask_structures.roi_align = roi_align_torchvision


@contextmanager
def served_rand(draws):
    """torch.rand returns `draws` in order (each checked against the requested shape)."""
    queue = list(draws)
    original = torch.rand

    def rand(*size, **kwargs):
        value = queue.pop(0)
        if tuple(value.shape) != tuple(size):
            raise AssertionError(f"torch.rand{size} asked, the next draw is {value.shape}")
        return torch.tensor(value)

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = original
    if queue:
        raise AssertionError(f"{len(queue)} draws were not used")


def make_heads(cfg):
    """mmdetection's heads at the tiny config with the losses of configs/point_rend/
    point-rend_r50-caffe_fpn_ms-1x_coco.py (CrossEntropyLoss use_mask, weight 1, both)."""
    register_all_modules()
    loss = dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0)
    coarse = CoarseMaskHead(
        num_fcs=2,
        in_channels=8,
        conv_out_channels=8,
        fc_out_channels=16,
        num_classes=cfg.num_classes,
        roi_feat_size=2 * cfg.coarse_side,
        loss_mask=loss,
    )
    point = MaskPointHead(
        num_classes=cfg.num_classes, in_channels=8, fc_channels=16, loss_point=loss
    )
    train_cfg = ConfigDict(
        mask_size=cfg.coarse_side,
        num_points=cfg.train_num_points,
        oversample_ratio=cfg.oversample_ratio,
        importance_sample_ratio=cfg.importance_sample_ratio,
    )
    return coarse, point, train_cfg


def make_rois(images, rng):
    """Our RoI slots: per instance its tight box and a jittered one (within 15% of the box's
    sides, clipped to the canvas), matched to it, the positives first."""
    b, f = len(images), parity.ROI_SLOTS
    rois = {
        "boxes": np.zeros((b, f, 4), np.float32),
        "classes": np.zeros((b, f), np.int32),
        "gt_index": np.zeros((b, f), np.int32),
        "foreground": np.zeros((b, f), bool),
    }
    for i, (classes, masks) in enumerate(images):
        boxes = parity.tight_boxes(masks)
        slot = 0
        for j, box in enumerate(boxes):
            size = np.concatenate([box[2:] - box[:2]] * 2)
            jittered = box + rng.uniform(-0.15, 0.15, 4) * size
            jittered = np.clip(jittered, 0, parity.CANVAS)
            for roi in (box, jittered):
                rois["boxes"][i, slot] = roi
                rois["classes"][i, slot] = classes[j]
                rois["gt_index"][i, slot] = j
                rois["foreground"][i, slot] = True
                slot += 1
    return rois


def run_mmdet(heads, images, rois, coarse_logits, point_logits, draws):
    """mmdetection's terms, the gradients of their sum (our layouts) and its points/targets."""
    coarse_head, point_head, train_cfg = heads
    valid = rois["foreground"]
    coarse_t = torch.tensor(
        np.ascontiguousarray(coarse_logits[valid].transpose(0, 3, 1, 2)), requires_grad=True
    )
    point_t = torch.tensor(
        np.ascontiguousarray(point_logits[valid].transpose(0, 2, 1)), requires_grad=True
    )
    sampling_results, gt_instances = mmdet_batch(images, rois)
    coarse = coarse_head.loss_and_target(coarse_t, sampling_results, gt_instances, train_cfg)
    pos_labels = torch.cat([res.pos_gt_labels for res in sampling_results])
    drawn, fill = (d.reshape(valid.shape + d.shape[1:])[valid] for d in draws)
    with served_rand([drawn, fill]):
        points = point_head.get_roi_rel_points_train(coarse_t, pos_labels, cfg=train_cfg)
    point = point_head.loss_and_target(point_t, points, sampling_results, gt_instances, train_cfg)
    loss_mask, loss_point = coarse["loss_mask"]["loss_mask"], point["loss_point"]
    grad_coarse, grad_point = torch.autograd.grad(
        loss_mask.sum() + loss_point.sum(), [coarse_t, point_t]
    )
    return {
        "loss_mask": float(loss_mask.detach()),
        "loss_mask_point": float(loss_point.detach()),
        "grad_coarse_logits": parity.to_slots(grad_coarse.numpy().transpose(0, 2, 3, 1), valid),
        "grad_point_logits": parity.to_slots(grad_point.numpy().transpose(0, 2, 1), valid),
        "points": parity.to_slots(points.numpy(), valid),
        "mask_targets": parity.to_slots(coarse["mask_targets"].numpy(), valid),
        "point_labels": parity.to_slots(point["point_target"].numpy(), valid),
    }


def mmdet_batch(images, rois):
    """mmdetection's SamplingResult and gt InstanceData per image for our RoI slots."""
    valid = rois["foreground"]
    sampling_results, gt_instances = [], []
    for i, (classes, masks) in enumerate(images):
        k = int(valid[i].sum())
        boxes = torch.tensor(rois["boxes"][i, :k])
        gt_boxes = torch.tensor(parity.tight_boxes(masks))
        assign = AssignResult(
            len(classes),
            torch.tensor(rois["gt_index"][i, :k], dtype=torch.long) + 1,
            torch.ones(k),
            torch.tensor(rois["classes"][i, :k], dtype=torch.long),
        )
        sampling_results.append(
            SamplingResult(
                torch.arange(k),
                torch.zeros(0, dtype=torch.long),
                boxes,
                gt_boxes,
                assign,
                torch.zeros(k, dtype=torch.uint8),
            )
        )
        gt_instances.append(
            InstanceData(
                bboxes=gt_boxes,
                labels=torch.tensor(classes),
                masks=BitmapMasks(masks.astype(np.uint8), parity.CANVAS, parity.CANVAS),
            )
        )
    return sampling_results, gt_instances


def head_outputs(rois, cfg, rng):
    """Random coarse logits, point logits and uniform draws of the positive RoIs, [K, ...]
    rows (the fixture's compact form; head_inputs puts them in our slots)."""
    k = int(rois["foreground"].sum())
    side, c, p = cfg.coarse_side, cfg.num_classes, cfg.train_num_points
    num_uncertain = int(cfg.importance_sample_ratio * p)
    return {
        "coarse_logits": (2.0 * rng.normal(size=(k, side, side, c))).astype(np.float32),
        "point_logits": rng.normal(size=(k, p, c)).astype(np.float32),
        "draw_candidates": rng.uniform(size=(k, int(p * cfg.oversample_ratio), 2)).astype(
            np.float32
        ),
        "draw_fill": rng.uniform(size=(k, p - num_uncertain, 2)).astype(np.float32),
    }


def compare(ours, theirs, names):
    return {n: mmdet_loss_parity.relative_difference(ours[n], theirs[n]) for n in names}


TERMS = ("loss_mask", "loss_mask_point")
GRADS = ("grad_coarse_logits", "grad_point_logits")
HEAD_OUTPUTS = ("coarse_logits", "point_logits")


def make_full_heads(cfg):
    """mmdetection's CoarseMaskHead and MaskPointHead at head_parity's widths (make_heads'
    losses and training config)."""
    _, _, train_cfg = make_heads(cfg)
    loss = dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0)
    coarse = CoarseMaskHead(
        num_fcs=cfg.coarse_num_fc,
        in_channels=head_parity.ROI_FEATURE_CHANNELS,
        conv_out_channels=cfg.coarse_conv_dim,
        fc_out_channels=cfg.coarse_fc_dim,
        num_classes=cfg.num_classes,
        roi_feat_size=cfg.mask_pool_size,
        loss_mask=loss,
    )
    point = MaskPointHead(
        num_classes=cfg.num_classes,
        num_fcs=cfg.point_num_fc,
        in_channels=head_parity.ROI_FEATURE_CHANNELS,
        fc_channels=cfg.point_fc_dim,
        loss_point=loss,
    )
    return coarse, point, train_cfg


def run_mmdet_heads(heads, state_dict, roi_features, fine, images, rois, draws):
    """mmdetection's head outputs (our layouts, positive RoIs' rows), terms, training points,
    point labels and the gradient of the terms' sum with respect to every parameter (by
    key, torch layouts): CoarseMaskHead on the RoI features (StandardRoIHead._mask_forward's
    mask_head call), its loss_and_target, then PointRendRoIHead._mask_point_loss itself with
    _get_fine_grained_point_feats answering the given fine features."""
    coarse_head, point_head, train_cfg = heads
    for prefix, head in (("mask_head.", coarse_head), ("point_head.", point_head)):
        part = {
            k[len(prefix) :]: torch.tensor(v) for k, v in state_dict.items() if k.startswith(prefix)
        }
        head.load_state_dict(part, strict=True)
    valid = rois["foreground"]
    roi_t = torch.tensor(np.ascontiguousarray(roi_features[valid].transpose(0, 3, 1, 2)))
    fine_t = torch.tensor(np.ascontiguousarray(fine[valid].transpose(0, 2, 1)))  # [K, D, P]
    sampling_results, gt_instances = mmdet_batch(images, rois)
    mask_preds = coarse_head(roi_t)
    coarse = coarse_head.loss_and_target(mask_preds, sampling_results, gt_instances, train_cfg)
    seen = {}

    def fine_grained(x, rois, rel_roi_points):
        seen["points"] = rel_roi_points
        return fine_t

    hook = point_head.register_forward_hook(lambda m, i, out: seen.update(point_logits=out))
    roi_head = SimpleNamespace(
        point_head=point_head, train_cfg=train_cfg, _get_fine_grained_point_feats=fine_grained
    )
    drawn, fill = (d.reshape(valid.shape + d.shape[1:])[valid] for d in draws)
    with served_rand([drawn, fill]):
        point = PointRendRoIHead._mask_point_loss(
            roi_head,
            x=None,
            sampling_results=sampling_results,
            mask_preds=mask_preds,
            batch_gt_instances=gt_instances,
        )
    hook.remove()
    loss_mask, loss_point = coarse["loss_mask"]["loss_mask"], point["loss_point"]
    named = [
        (prefix + name, p)
        for prefix, head in (("mask_head.", coarse_head), ("point_head.", point_head))
        for name, p in head.named_parameters()
    ]
    grads = torch.autograd.grad(loss_mask + loss_point, [p for _, p in named])
    return {
        "coarse_logits": mask_preds.detach().numpy().transpose(0, 2, 3, 1),
        "point_logits": seen["point_logits"].detach().numpy().transpose(0, 2, 1),
        "points": seen["points"].numpy(),
        "point_labels": point["point_target"].numpy(),
        "loss_mask": float(loss_mask.detach()),
        "loss_mask_point": float(loss_point.detach()),
        "grads": {name: g.numpy() for (name, _), g in zip(named, grads, strict=True)},
    }


def compare_heads(k, heads, state_dict, images, rois, draws, theirs_targets, failures):
    """Batch k's head-parameter check: mmdetection's heads against ours on seeded features
    (module docstring); returns (report, mmdetection's record for the fixture)."""
    cfg = head_parity.head_config()
    valid = rois["foreground"]
    roi_features, fine = head_parity.random_features(cfg, len(images), HEAD_FEATURE_SEED + k)
    theirs = run_mmdet_heads(heads, state_dict, roi_features, fine, images, rois, draws)
    given = {
        "points": parity.to_slots(theirs["points"], valid),
        "point_labels": parity.to_slots(theirs["point_labels"], valid),
        "mask_targets": theirs_targets["mask_targets"],
    }
    outputs, terms, grads, points = head_parity.head_losses(
        state_dict, roi_features, fine, rois, draws, cfg, given
    )
    order, sets_differing = parity.point_order(points, given["points"], valid)
    per_param = {
        key: mmdet_loss_parity.relative_difference(grads[key], g)
        for key, g in theirs["grads"].items()
    }
    report = {
        "head_batch": k,
        "rows_whose_point_sets_differ": sets_differing,
        "points_in_another_place": int((order != np.arange(order.shape[-1]))[valid].sum()),
        **{
            f"rel_{n}": mmdet_loss_parity.relative_difference(outputs[n][valid], theirs[n])
            for n in HEAD_OUTPUTS
        },
        **{f"rel_{t}": mmdet_loss_parity.relative_difference(terms[t], theirs[t]) for t in TERMS},
        "rel_grad_worst_parameter": max(per_param.items(), key=lambda kv: kv[1]),
        "rel_grad_all_parameters": mmdet_loss_parity.relative_difference(
            np.concatenate([grads[key].ravel() for key in theirs["grads"]]),
            np.concatenate([g.ravel() for g in theirs["grads"].values()]),
        ),
    }
    checks = {
        "output": [report[f"rel_{n}"] for n in HEAD_OUTPUTS],
        "loss": [report[f"rel_{t}"] for t in TERMS],
        "grad": list(per_param.values()),
    }
    worst = {}
    common.check_tolerances(f"head batch {k}:", checks, HEAD_TOLERANCES, worst, failures)
    report.update({f"worst_{kind}": value for kind, value in worst.items()})
    if sets_differing:
        failures.append(f"head batch {k}: {sets_differing} RoIs' training points differ")
    record = {
        **{n: theirs[n] for n in (*HEAD_OUTPUTS, "points", "point_labels", *TERMS)},
        **{f"grad.{key}": g for key, g in theirs["grads"].items()},
    }
    return report, record, mmdet_loss_parity.checksum([roi_features, fine])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-fixture", type=Path, help="write the CI test's npz here")
    args = parser.parse_args()
    start = time.time()
    cfg = parity.pointrend_config()
    heads = make_heads(cfg)
    full_heads = make_full_heads(head_parity.head_config())
    state_dict = head_parity.random_state_dict(head_parity.head_config(), HEAD_STATE_DICT_SEED)
    feature_checksums = []
    rng = np.random.default_rng(29)
    fixture, meta_scenes = {}, {}
    worst = {"loss": 0.0, "grad": 0.0, "own_targets_loss": 0.0, "own_targets_grad": 0.0}
    head_worst = {"output": 0.0, "loss": 0.0, "grad": 0.0}
    failures = []
    for k, names in enumerate(BATCHES):
        images = [parity.scene(n, SHARED_NUCLEI) for n in names]
        for name, (_, masks) in zip(names, images, strict=True):
            meta_scenes[name] = parity.checksum(masks)
        rois = make_rois(images, rng)
        rows = head_outputs(rois, cfg, rng)
        coarse, point_logits, draws = parity.head_inputs(rows, rois["foreground"])
        theirs = run_mmdet(heads, images, rois, coarse, point_logits, draws)
        gt = parity.ground_truth(images)
        given = {"mask_targets": theirs["mask_targets"], "point_labels": theirs["point_labels"]}
        ours, targets = parity.pointrend_losses(rois, coarse, point_logits, draws, gt, cfg, given)
        valid = rois["foreground"]
        order, sets_differing = parity.point_order(targets["points"], theirs["points"], valid)
        swapped = int((order != np.arange(order.shape[-1]))[valid].sum())
        labels = np.take_along_axis(targets["point_labels"], order, axis=-1)
        own, _ = parity.pointrend_losses(
            rois,
            coarse,
            point_logits,
            draws,
            gt,
            cfg,
            {"mask_targets": targets["mask_targets"], "point_labels": labels},
        )
        label_diff = np.abs(labels - theirs["point_labels"])[valid]
        report = {
            "batch": "+".join(names),
            "positive_rois": [int(v) for v in valid.sum(1)],
            "rows_whose_point_sets_differ": sets_differing,
            "points_in_another_place": swapped,
            "coarse_target_cells_differing": int(
                (targets["mask_targets"] != theirs["mask_targets"])[valid].sum()
            ),
            "coarse_target_cells": int(valid.sum()) * cfg.coarse_side**2,
            "point_labels_max_abs_difference": float(label_diff.max()),
            "point_labels_mean_abs_difference": float(label_diff.mean()),
            "point_labels_differing_by_0.01": int((label_diff > 0.01).sum()),
            "points": int(label_diff.size),
            **{t: (ours[t], theirs[t]) for t in TERMS},
            **{f"rel_{n}": v for n, v in compare(ours, theirs, TERMS + GRADS).items()},
            **{f"own_targets_rel_{n}": v for n, v in compare(own, theirs, TERMS + GRADS).items()},
        }
        for kind, group in (("loss", TERMS), ("grad", GRADS)):
            values = [report[f"rel_{n}"] for n in group]
            worst[kind] = max(worst[kind], *values)
            worst[f"own_targets_{kind}"] = max(
                worst[f"own_targets_{kind}"], *(report[f"own_targets_rel_{n}"] for n in group)
            )
            if max(values) > TOLERANCES[kind]:
                failures.append(f"{report['batch']}: {kind} {max(values):.2e}")
        if sets_differing:
            failures.append(f"{report['batch']}: {sets_differing} RoIs' training points differ")
        print(json.dumps(report))
        head_report, head_record, features_sha = compare_heads(
            k, full_heads, state_dict, images, rois, draws, theirs, failures
        )
        feature_checksums.append(features_sha)
        for kind in head_worst:
            head_worst[kind] = max(head_worst[kind], head_report[f"worst_{kind}"])
        print(json.dumps(head_report))
        if args.make_fixture:
            fixture.update({f"h{k}_mmdet_{n}": np.asarray(v) for n, v in head_record.items()})
            fixture.update({f"b{k}_{n}": v for n, v in rois.items()})
            fixture.update({f"b{k}_{n}": v for n, v in rows.items()})
            for name, value in theirs.items():  # arrays: the positive RoIs' rows only
                value = np.asarray(value)
                fixture[f"b{k}_mmdet_{name}"] = value[valid] if value.ndim else value
    # No positive RoI in the batch: detectron2's zero (mmdetection's point branch refuses).
    empty = [parity.scene("empty")] * 2
    rois = make_rois(empty, rng)
    coarse, point_logits, draws = parity.head_inputs(
        head_outputs(rois, cfg, rng), rois["foreground"]
    )
    none, _ = parity.pointrend_losses(
        rois, coarse, point_logits, draws, parity.ground_truth(empty), cfg
    )
    empty_total = abs(none["loss_mask"]) + abs(none["loss_mask_point"])
    empty_grad = max(float(np.abs(none[g]).max()) for g in GRADS)
    print(json.dumps({"batch": "empty+empty (ours only)", "loss": empty_total, "grad": empty_grad}))
    if empty_total or empty_grad:
        failures.append("empty batch: our losses or gradients are not zero")
    common.print_summary(worst, TOLERANCES, head_worst, HEAD_TOLERANCES, start)
    meta = {
        "batches": ["+".join(n) for n in BATCHES],
        "checksums": meta_scenes,
        "head_state_dict_seed": HEAD_STATE_DICT_SEED,
        "head_state_dict_sha256": mmdet_loss_parity.checksum(state_dict),
        "head_feature_seed": HEAD_FEATURE_SEED,
        "head_features_sha256": feature_checksums,
    }
    common.write_fixture(args.make_fixture, meta, fixture)
    common.verdict(
        failures, "terms and gradients within tolerance on mmdetection's targets; ours reported"
    )


if __name__ == "__main__":
    main()
