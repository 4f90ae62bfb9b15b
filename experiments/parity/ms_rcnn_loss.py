"""Loss parity of our Mask Scoring R-CNN's MaskIoU head (methods/ms_rcnn.py MaskIoUHead,
area_ratios, maskiou_targets, mask_scoring_losses) with mmdetection 3.3's (`make peer-mmdet`).

    .venv-mmdet/bin/python experiments/parity/ms_rcnn_loss.py
    .venv-mmdet/bin/python experiments/parity/ms_rcnn_loss.py --make-fixture \
        tests/fixtures/mmdet_ms_rcnn_loss_tiny.npz                  # the CI test's data

What runs on mmdetection's side: the MaskIoU part of MaskScoringRoIHead.mask_loss
(mmdet/models/roi_heads/mask_scoring_roi_head.py:121-132) on given RoI features and mask
logits in place of the RoI extractor and FCNMaskHead: the mask targets of the positive RoIs
(mask_target: BitmapMasks.crop_and_resize at 28 x 28, whose compiled RoIAlign is replaced by
torchvision's with the same arguments, as PointRend's parity does), MaskIoUHead.forward on the
features and the gt class's logits, its output of the gt class, and MaskIoUHead.loss_and_target
(get_targets with _get_area_ratio on the full-resolution BitmapMasks, mask_thr_binary 0.5 on
the logits, MSELoss weight 0.5 over the RoIs of positive target). The head is MaskIoUHead at 16
conv and 32 FC channels (4 convs, 2 FCs, roi_feat_size 14, 8 input channels, 3 classes) with a
seeded state dict (weights/mmdet_ms_rcnn_loss.py random_state_dict, loaded strictly); ours
runs it converted (`convert_head`). mmdetection does not detach the mask logits from the head's
input: the loss's gradient reaches them, on both sides.

Inputs: PointRend's parity scenes, RoIs and ground truth (weights/mmdet_pointrend_loss.py; per
instance its tight box and a jittered one): few+crowded, crowded+empty, nuclei+few on a 128 x
128 canvas, the nuclei read from the shared DSB 2018 set (the fixture keeps the masks'
checksums), and seeded RoI features and mask logits (`random_inputs`; the fixture keeps their
checksum, the CI test draws them again).

Checks: (1) the rules: with mmdetection's mask targets and area ratios given to ours, the IoU
targets, the RoIs trained, the head's output, the loss and its gradient with respect to every
parameter, the features and the logits (float32 noise); (2) our own targets, from each
instance's box crop at the COCO recipe's 112 cells: mask target cells and area ratios that
differ, the IoU targets' largest difference and the loss on them (reported; the CI test keeps
bounds at the measured figures).
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
# PointRend's parity script: its RoIs, its mmdetection batch and its RoIAlign replacement.
pointrend_parity = importlib.import_module("pointrend_loss")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmdet.models.roi_heads.mask_heads import MaskIoUHead  # noqa: E402
from mmdet.structures.mask import mask_target  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402

from instseg_jax.weights import mmdet_loss_parity  # noqa: E402
from instseg_jax.weights import mmdet_ms_rcnn_loss as parity  # noqa: E402
from instseg_jax.weights import mmdet_pointrend_loss as scenes  # noqa: E402

BATCHES = (("few", "crowded"), ("crowded", "empty"), ("nuclei", "few"))
TOLERANCES = {"output": 1e-5, "loss": 1e-5, "grad": 2e-5}  # relative, float32
STATE_DICT_SEED = 31
INPUT_SEED = 3131  # + the batch's index
RCNN_TRAIN_CFG = ConfigDict(mask_size=parity.MASK_SIDE, mask_thr_binary=0.5)


def make_head(cfg, state_dict) -> MaskIoUHead:
    head = MaskIoUHead(
        num_convs=cfg.maskiou_num_convs,
        num_fcs=cfg.maskiou_num_fcs,
        roi_feat_size=cfg.mask_pool_size,
        in_channels=parity.ROI_FEATURE_CHANNELS,
        conv_out_channels=cfg.maskiou_conv_dim,
        fc_out_channels=cfg.maskiou_fc_dim,
        num_classes=cfg.num_classes,
    )
    head.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
    return head


def run_mmdet(head, images, rois, features, logits) -> dict:
    """mmdetection's answers on the batch's positives (rows [K, ...], image by image)."""
    sampling_results, gt_instances = pointrend_parity.mmdet_batch(images, rois)
    valid = rois["foreground"]
    feats = torch.tensor(features[valid].transpose(0, 3, 1, 2), requires_grad=True)
    mask_logits = torch.tensor(logits[valid].transpose(0, 3, 1, 2), requires_grad=True)
    mask_targets = mask_target(
        [r.pos_priors for r in sampling_results],
        [r.pos_assigned_gt_inds for r in sampling_results],
        [g.masks for g in gt_instances],
        RCNN_TRAIN_CFG,
    )
    # MaskScoringRoIHead.mask_loss, the MaskIoU part.
    pos_labels = torch.cat([r.pos_gt_labels for r in sampling_results])
    rows = torch.arange(mask_logits.size(0))
    pos_mask_pred = mask_logits[rows, pos_labels]
    mask_iou_pred = head(feats, pos_mask_pred)
    pos_mask_iou_pred = mask_iou_pred[rows, pos_labels]
    loss = head.loss_and_target(
        pos_mask_iou_pred,
        pos_mask_pred,
        mask_targets,
        sampling_results,
        gt_instances,
        RCNN_TRAIN_CFG,
    )["loss_mask_iou"]
    head.zero_grad()
    loss.backward()
    with torch.no_grad():
        iou_targets = head.get_targets(
            sampling_results, gt_instances, pos_mask_pred, mask_targets, RCNN_TRAIN_CFG
        )
        ratios = torch.cat(
            [
                head._get_area_ratio(r.pos_priors, r.pos_assigned_gt_inds, g.masks)
                for r, g in zip(sampling_results, gt_instances, strict=True)
            ]
        )
    return {
        "loss_mask_iou": float(loss.detach()),
        "mask_iou": mask_iou_pred.detach().numpy(),
        "grad_features": feats.grad.numpy().transpose(0, 2, 3, 1),
        "grad_logits": mask_logits.grad.numpy().transpose(0, 2, 3, 1),
        "grad_params": {k: p.grad.numpy().copy() for k, p in head.named_parameters()},
        "mask_targets": mask_targets.numpy(),
        "area_ratios": ratios.numpy(),
        "iou_targets": np.nan_to_num(iou_targets.numpy(), nan=0.0),
        "trained": (iou_targets > 0).numpy(),
    }


def compare(ours: dict, theirs: dict, valid, cfg) -> dict:
    """Relative differences: the head's output, the loss, the worst parameter's gradient, the
    features' and the logits' gradients (ours in mmdetection's rows)."""
    grads = parity.to_state_dict_layout(ours["grad_params"], cfg)
    worst_key = max(
        grads,
        key=lambda k: mmdet_loss_parity.relative_difference(grads[k], theirs["grad_params"][k]),
    )
    rel = mmdet_loss_parity.relative_difference
    return {
        "output": [rel(ours["mask_iou"][valid], theirs["mask_iou"])],
        "loss": [rel(ours["loss_mask_iou"], theirs["loss_mask_iou"])],
        "grad": [
            rel(grads[worst_key], theirs["grad_params"][worst_key]),
            rel(ours["grad_features"][valid], theirs["grad_features"]),
            rel(ours["grad_logits"][valid], theirs["grad_logits"]),
        ],
        "worst_parameter": worst_key,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-fixture", type=Path, help="write the CI test's npz here")
    args = parser.parse_args()
    start = time.time()
    cfg = parity.ms_rcnn_config()
    state_dict = parity.random_state_dict(cfg, STATE_DICT_SEED)
    head = make_head(cfg, state_dict)
    params = parity.convert_head(state_dict, cfg)
    rng = np.random.default_rng(31)
    fixture, checksums, input_checksums = {}, {}, []
    worst, own_worst, failures = {}, {}, []
    for k, names in enumerate(BATCHES):
        images = [scenes.scene(n, common.SHARED_NUCLEI) for n in names]
        for name, (_, masks) in zip(names, images, strict=True):
            checksums[name] = scenes.checksum(masks)
        rois = pointrend_parity.make_rois(images, rng)
        features, logits = parity.random_inputs(cfg, len(images), INPUT_SEED + k)
        input_checksums.append(mmdet_loss_parity.checksum([features, logits]))
        valid = rois["foreground"]
        theirs = run_mmdet(head, images, rois, features, logits)
        gt = scenes.ground_truth(images, parity.CROP_SIZE)
        given = {
            "mask_targets": scenes.to_slots(theirs["mask_targets"], valid),
            "area_ratios": scenes.to_slots(theirs["area_ratios"], valid),
        }
        ours, own, own_targets = parity.maskiou_terms(
            rois, features, logits, params, gt, cfg, given
        )
        checks = compare(ours, theirs, valid, cfg)
        worst_parameter = checks.pop("worst_parameter")
        label = "+".join(names)
        common.check_tolerances(label, checks, TOLERANCES, worst, failures)
        if not np.array_equal(ours["trained"][valid], theirs["trained"]):
            failures.append(f"{label}: the RoIs trained differ on mmdetection's targets")
        target_diff = np.abs(ours["iou_targets"][valid] - theirs["iou_targets"])
        if target_diff.max(initial=0.0) > 1e-6:
            failures.append(f"{label}: IoU targets differ by {target_diff.max():.2e}")
        own_checks = compare(own, theirs, valid, cfg)
        own_checks.pop("worst_parameter")
        for kind, values in own_checks.items():
            own_worst[kind] = max(own_worst.get(kind, 0.0), *values)
        report = {
            "batch": label,
            "positive_rois": [int(v) for v in valid.sum(1)],
            "trained_rois": int(theirs["trained"].sum()),
            "loss_mask_iou": (ours["loss_mask_iou"], theirs["loss_mask_iou"]),
            **{f"rel_{kind}": max(values) for kind, values in checks.items()},
            "worst_parameter": worst_parameter,
            "iou_targets_max_abs_difference": float(target_diff.max(initial=0.0)),
            "own_mask_target_cells_differing": int(
                (own_targets["mask_targets"][valid] != theirs["mask_targets"]).sum()
            ),
            "mask_target_cells": int(valid.sum()) * parity.MASK_SIDE**2,
            "own_area_ratios_max_abs_difference": float(
                np.abs(own_targets["area_ratios"][valid] - theirs["area_ratios"]).max()
            ),
            "own_iou_targets_max_abs_difference": float(
                np.abs(own["iou_targets"][valid] - theirs["iou_targets"]).max()
            ),
            "own_trained_differing": int((own["trained"][valid] != theirs["trained"]).sum()),
            "own_targets_rel_loss": own_checks["loss"][0],
        }
        print(json.dumps(report))
        if args.make_fixture:
            fixture.update({f"b{k}_{n}": v for n, v in rois.items()})
            for name, value in theirs.items():
                if name == "grad_params":
                    fixture.update({f"b{k}_mmdet_grad.{p}": g for p, g in value.items()})
                else:
                    fixture[f"b{k}_mmdet_{name}"] = np.asarray(value)
    print(
        json.dumps(
            {
                "worst_relative": worst,
                "tolerances": TOLERANCES,
                "own_targets": own_worst,
                "seconds": round(time.time() - start, 1),
            }
        )
    )
    meta = {
        "batches": ["+".join(n) for n in BATCHES],
        "checksums": checksums,
        "state_dict_seed": STATE_DICT_SEED,
        "state_dict_sha256": mmdet_loss_parity.checksum(state_dict),
        "input_seed": INPUT_SEED,
        "inputs_sha256": input_checksums,
    }
    common.write_fixture(args.make_fixture, meta, fixture)
    common.verdict(failures, "MaskIoU head, targets, loss and gradients within tolerance")


if __name__ == "__main__":
    main()
