"""Loss parity of our SOLO and Decoupled SOLO's training side (methods/solo.py training_outputs
and loss_fn, model.mask_branch vanilla and decoupled) with mmdetection 3.3's
SOLOHead.loss_by_feat and DecoupledSOLOHead.loss_by_feat (issue 31 item 1; `make peer-mmdet`).

    .venv-mmdet/bin/python experiments/parity/solo_loss.py
    .venv-mmdet/bin/python experiments/parity/solo_loss.py --make-fixture \
        tests/fixtures/mmdet_solo_loss_tiny.npz                       # the CI test's data

Our SOLO recipes (experiments/solo_r50_fpn_coco_1x.py, solo_decoupled_r50_fpn_coco_1x.py) are
mmdetection 3.x's configs/solo/solo_r50_fpn_1x_coco.py and decoupled-solo_r50_fpn_1x_coco.py:
mmdetection is the reference here (WXinlong/SOLO, the original, is cited where the two agree).

Environment: experiments/parity/solov2_loss.py's (mmcv's lite build, mmcv.ops stubbed by
mmdet_shim; the two heads' loss_by_feat call no stubbed op: targets by mmcv.imrescale (OpenCV),
FocalLoss's pure-PyTorch path on CPU tensors, DiceLoss pure PyTorch). No random draw on either
side: mmdetection trains every positive cell, ours too (its slot budget, 1024, is never full).

Inputs: seeded head outputs (weights/mmdet_solo_loss.py random_head_outputs; the fixture keeps
their SHA-256, the CI test draws them again): category logits and, per level at its mask stride,
vanilla: the upsampled mask tower map [B, E, h, w] and the 1x1 predictor (kernel [S^2, E], bias
[S^2]), from which this script forms mmdetection's mask predictions [B, S^2, h, w] in torch
(conv_mask_list's 1x1 conv: our SOLO applies that predictor per cell instead, methods/solo.py
"vanilla masks"), so the gradients of both sides reach the same three inputs; decoupled: X and Y
logits [B, S_l, h, w]. Ground truth: solov2_loss.py's scenes on the 128 x 128 canvas (few,
crowded: twelve discs sharing cells, empty; and nuclei: two 128-pixel crops of one DSB 2018
stage1_train image, read from ../shared/data here and in the CI test, which checks their
SHA-256), stride-4 masks repeated 4 x 4 to full resolution for mmdetection, whose targets shrink
them with mmcv.imrescale to each level's mask stride (4, 4, 8, 16, 16); boxes and mass centres
as mmdetection computes them (integer pixel indices: see solov2_loss.py on that convention).

Checks, per branch and batch: cell labels and positive cells (exact), the trained mask targets
(ours rescaled from the stride-4 masks, methods/solo.py's declared deviation, theirs from full
resolution: the pixels that differ, reported), loss_cls and loss_mask (relative difference),
the gradient of loss_cls with respect to the logits and of loss_mask with respect to every mask
input (relative norm of the difference). Both divide the dice sum by the positive cells (one
mask target per cell: mmdet/models/dense_heads/solo_head.py:291-301 num_pos, :846-864 num_pos
+= num_masks; ours by the trained slots), and the focal loss by positive cells + 1
(solo_head.py:307-308, :870-871).

Head parameters (weights/mmdet_solo_loss.py head_config, conversion_table): per branch, two more
batches (few+crowded, and the nuclei crops) run mmdetection's whole SOLOHead / DecoupledSOLOHead
(one conv per tower of 32 channels, GroupNorm of 32 groups at torch's epsilon, as ours) with a
seeded state dict (`random_state_dict`, loaded strictly) on seeded FPN maps P2..P6 of 16
channels (mmdet_solov2_head.random_fpn_maps), ours SOLO.heads with the same numbers through
`convert_head`: resize_feats (P2 halved, P6 to P5's size), CoordConv on every level (x and y for
vanilla, one of them per decoupled tower), the towers, 2x bilinear upsampling, the predictors
and the category branch. Compared: the head outputs (category logits; vanilla's S^2 mask
logits, ours formed from the tower map and the 1x1 predictor; decoupled's X and Y logits), the
cell labels, both terms, and the gradient of their sum with respect to every parameter, by
mmdetection key. The fixture keeps mmdetection's logits, terms, labels and gradients, and the
SHA-256 of the state dicts and maps (the CI test draws them again).

Found: no disagreement (figures in experiments/benchmarks/RESULTS.md).
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
# SOLOv2's parity script: its scenes and mmdetection's InstanceData of them.
solov2_parity = importlib.import_module("solov2_loss")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmdet.models.dense_heads import DecoupledSOLOHead, SOLOHead  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from instseg_jax.weights import mmdet_loss_parity  # noqa: E402
from instseg_jax.weights import mmdet_solo_loss as parity  # noqa: E402
from instseg_jax.weights import mmdet_solov2_head as head_parity  # noqa: E402

CANVAS = solov2_parity.CANVAS
STRIDE = solov2_parity.STRIDE
NUM_CLASSES = 3
HEAD_CHANNELS = 4  # E: the vanilla tower map's channels
MAX_INSTANCES = 24  # the nuclei crops hold 20 and 22
BATCHES = (("few", "crowded"), ("crowded", "empty"), ("empty", "empty"), ("nuclei_0", "nuclei_1"))
BRANCHES = ("vanilla", "decoupled")
SEED = 31  # + 10 x the branch's index + the batch's index
TOLERANCES = {"loss": 1e-5, "grad": 1e-5}  # relative; float32 on both sides
# The whole heads: outputs and parameter gradients pass through convolutions and GroupNorm.
HEAD_TOLERANCES = {"output": 1e-5, "loss": 1e-5, "grad": 2e-5}
HEAD_BATCHES = (("few", "crowded"), ("nuclei_0", "nuclei_1"))
HEAD_STATE_DICT_SEED = 131  # + the branch's index
HEAD_FPN_SEED = 1313  # + 10 x the branch's index + the batch's index
MASK_INPUTS = {"vanilla": ("maps", "kernels", "biases"), "decoupled": ("x", "y")}


def make_head(cfg, norm_groups: int = 1):
    """mmdetection's head of cfg's branch at cfg's widths with configs/solo's losses (DiceLoss
    weight 3, for Decoupled SOLO activate=False: it takes the product of sigmoids; FocalLoss
    gamma 2 alpha 0.25), GroupNorm of norm_groups groups at torch's epsilon 1e-5 (ours: min(32,
    C) groups, nn/layers.py)."""
    register_all_modules()
    decoupled = cfg.mask_branch == "decoupled"
    head_class = DecoupledSOLOHead if decoupled else SOLOHead
    dice = dict(type="DiceLoss", use_sigmoid=True, loss_weight=cfg.mask_loss_weight)
    if decoupled:
        dice["activate"] = False
    return head_class(
        num_classes=cfg.num_classes,
        in_channels=cfg.fpn_channels,
        feat_channels=cfg.head_channels,
        stacked_convs=cfg.head_convs,
        strides=list(cfg.level_strides),
        scale_ranges=cfg.scale_ranges,
        pos_scale=cfg.center_scale,
        num_grids=list(cfg.num_grids),
        cls_down_index=0,
        loss_mask=dice,
        loss_cls=dict(
            type="FocalLoss",
            use_sigmoid=True,
            gamma=cfg.focal_gamma,
            alpha=cfg.focal_alpha,
            loss_weight=1.0,
        ),
        norm_cfg=dict(type="GN", num_groups=norm_groups, requires_grad=True, eps=1e-5),
    )


def to_torch_nchw(x):
    return torch.tensor(
        np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)), requires_grad=True
    )


def run_mmdet(head, outputs, images, cfg):
    """mmdetection's terms, their gradients in our layouts, its targets."""
    grids = [(g, g) for g in cfg.num_grids]
    cls_t = [
        torch.tensor(x, requires_grad=True) for x in common.split_levels(outputs["logits"], grids)
    ]
    names = MASK_INPUTS[cfg.mask_branch]
    if cfg.mask_branch == "vanilla":
        leaves = {
            "maps": [to_torch_nchw(m) for m in outputs["maps"]],
            "kernels": [torch.tensor(k, requires_grad=True) for k in outputs["kernels"]],
            "biases": [torch.tensor(b, requires_grad=True) for b in outputs["biases"]],
        }
        # conv_mask_list[l]: a 1x1 conv of the tower map to S_l^2 channels.
        mask_preds = [
            torch.einsum("behw,es->bshw", m, k) + b[None, :, None, None]
            for m, k, b in zip(leaves["maps"], leaves["kernels"], leaves["biases"], strict=True)
        ]
        preds = (mask_preds,)
    else:
        leaves = {n: [to_torch_nchw(m) for m in outputs[n]] for n in ("x", "y")}
        preds = (leaves["x"], leaves["y"])
    instances = solov2_parity.mmdet_instances(images)
    metas = [dict(img_shape=(CANVAS, CANVAS), pad_shape=(CANVAS, CANVAS))] * len(images)
    losses = head.loss_by_feat(*preds, cls_t, instances, metas)
    grad_cls = torch.autograd.grad(losses["loss_cls"], cls_t, retain_graph=True)
    flat = [t for n in names for t in leaves[n]]
    grad_mask = torch.autograd.grad(losses["loss_mask"], flat, allow_unused=True)
    grad_mask = [
        torch.zeros_like(x) if g is None else g for g, x in zip(grad_mask, flat, strict=True)
    ]
    grads, i = {}, 0
    for n in names:
        level_grads = []
        for _ in leaves[n]:
            g = grad_mask[i].numpy()
            level_grads.append(g.transpose(0, 2, 3, 1) if g.ndim == 4 else g)
            i += 1
        grads[f"grad_{n}"] = level_grads
    sizes = [tuple(p.shape[-2:]) for p in preds[0]]
    return {
        "loss_cls": float(losses["loss_cls"].detach()),
        "loss_mask": float(losses["loss_mask"].detach()),
        "grad_logits": common.join_levels([g.numpy() for g in grad_cls]),
        **grads,
        **mmdet_targets(head, instances, sizes),
    }


def mmdet_targets(head, instances, featmap_sizes):
    """mmdetection's cell labels [B, S], positive cells [B] and, per image and level, the
    positive cells' mask targets in cell order (SOLOHead._get_targets_single: the Decoupled
    head's calls it too)."""
    labels, cells, mask_targets = [], [], []
    for inst in instances:
        targets, level_labels, pos_masks = SOLOHead._get_targets_single(
            head, inst, featmap_sizes=featmap_sizes
        )
        labels.append(torch.cat([lv.flatten() for lv in level_labels]).numpy())
        cells.append(int(sum(int(m.sum()) for m in pos_masks)))
        mask_targets.append([t.numpy() for t in targets])
    return {
        "cell_labels": np.stack(labels).astype(np.int32),
        "positive_cells": np.array(cells),
        "mask_targets": mask_targets,
    }


def our_mask_targets(images, cfg):
    """Ours per image and level: the trained slots' mask targets in cell order."""
    import jax.numpy as jnp

    from instseg_jax.methods import solo

    out = []
    gt = head_parity.ground_truth_arrays(images, MAX_INSTANCES, STRIDE)
    for i in range(len(images)):
        per_level = []
        # Ours: the instance each positive cell takes, its stride-4 mask rescaled.
        labels, _ = solo_cell_instances(gt, i, cfg)
        for level, stride in enumerate(cfg.mask_strides()):
            lo, g = cfg.cell_offsets()[level], cfg.num_grids[level]
            cells = [c for c in sorted(labels) if lo <= c < lo + g * g]
            shrunk = np.asarray(
                solo.rescaled_targets(jnp.asarray(gt["masks"][i]).astype(jnp.uint8), stride // 4)
            )
            per_level.append(
                np.stack([shrunk[labels[c]] for c in cells]).astype(np.uint8)
                if cells
                else np.zeros((0, *shrunk.shape[1:]), np.uint8)
            )
        out.append(per_level)
    return out


def solo_cell_instances(gt, i, cfg):
    """{positive cell: its instance} of image i by our target builder (solo.cell_targets)."""
    import jax
    import jax.numpy as jnp

    from instseg_jax.methods import solo

    t = solo.cell_targets(
        jnp.asarray(gt["boxes"][i]),
        jnp.asarray(gt["classes"][i]),
        jnp.asarray(gt["valid"][i]),
        jnp.asarray(gt["centers"][i]),
        jnp.asarray(gt["masks"][i]).any(axis=(1, 2)),
        cfg,
        jax.random.key(0),
        extent_hw=jnp.asarray(cfg.canvas_hw, jnp.float32),
    )
    valid = np.asarray(t["slot_valid"])
    cells = np.asarray(t["slot_cell"])[valid]
    return dict(zip(cells.tolist(), np.asarray(t["slot_instance"])[valid].tolist(), strict=True)), t


def compare(ours, theirs, names) -> dict:
    rel = mmdet_loss_parity.relative_difference
    checks = {
        "loss": [
            rel(ours["loss_cls"], theirs["loss_cls"]),
            rel(ours["loss_mask"], theirs["loss_mask"]),
        ],
        "grad": [rel(ours["grad_logits"], theirs["grad_logits"])],
    }
    for n in names:
        checks["grad"].append(
            rel(
                np.concatenate([g.ravel() for g in ours[f"grad_{n}"]]),
                np.concatenate([g.ravel() for g in theirs[f"grad_{n}"]]),
            )
        )
    return checks


def run_mmdet_head(head, state_dict, fpn, images, cfg):
    """mmdetection's whole head on FPN maps: its outputs (our layouts), terms, the gradient of
    their sum with respect to every parameter (by key, torch layouts) and its targets."""
    head.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
    head.train()
    head.zero_grad()
    maps = [torch.tensor(np.ascontiguousarray(f.transpose(0, 3, 1, 2))) for f in fpn]
    preds = head(maps)
    instances = solov2_parity.mmdet_instances(images)
    metas = [dict(img_shape=(CANVAS, CANVAS), pad_shape=(CANVAS, CANVAS))] * len(images)
    losses = head.loss_by_feat(*preds, instances, metas)
    named = list(head.named_parameters())
    grads = torch.autograd.grad(
        losses["loss_cls"] + losses["loss_mask"], [p for _, p in named], allow_unused=True
    )
    outputs = {"logits": common.join_levels([x.detach().numpy() for x in preds[-1]])}
    mask_names = ("mask",) if cfg.mask_branch == "vanilla" else ("x", "y")
    for name, levels in zip(mask_names, preds[:-1], strict=True):
        for level, x in enumerate(levels):
            outputs[f"{name}_{level}"] = x.detach().numpy().transpose(0, 2, 3, 1)
    return {
        "outputs": outputs,
        "loss_cls": float(losses["loss_cls"].detach()),
        "loss_mask": float(losses["loss_mask"].detach()),
        "grads": {
            name: (torch.zeros_like(p) if g is None else g).numpy()
            for (name, p), g in zip(named, grads, strict=True)
        },
        **mmdet_targets(head, instances, [tuple(x.shape[-2:]) for x in preds[0]]),
    }


def compare_heads(fixture, failures):
    """Both branches' whole heads (weights/mmdet_solo_loss.py head_config) with one seeded
    state dict each on seeded FPN maps; their records go into fixture (when not None)."""
    worst = {}
    meta = {
        "head_batches": ["+".join(n) for n in HEAD_BATCHES],
        "head_state_dict_seed": HEAD_STATE_DICT_SEED,
        "head_fpn_seed": HEAD_FPN_SEED,
        "head_sha256": {},
    }
    rel = mmdet_loss_parity.relative_difference
    for bi, branch in enumerate(BRANCHES):
        cfg = parity.head_config(NUM_CLASSES, CANVAS, branch)
        head = make_head(cfg, min(32, cfg.head_channels))
        state_dict = parity.random_state_dict(cfg, HEAD_STATE_DICT_SEED + bi)
        meta["head_sha256"][f"{branch}_state_dict"] = mmdet_loss_parity.checksum(state_dict)
        for k, names in enumerate(HEAD_BATCHES):
            images = [solov2_parity.scene(n) for n in names]
            fpn = head_parity.random_fpn_maps(cfg, len(images), HEAD_FPN_SEED + 10 * bi + k)
            meta["head_sha256"][f"{branch}_fpn_{k}"] = mmdet_loss_parity.checksum(fpn)
            theirs = run_mmdet_head(head, state_dict, fpn, images, cfg)
            gt = head_parity.ground_truth_arrays(images, MAX_INSTANCES, STRIDE)
            outputs, terms, grads, targets = parity.head_losses(state_dict, fpn, gt, cfg)
            label = f"{branch} head {'+'.join(names)}"
            per_param = {key: rel(grads[key], g) for key, g in theirs["grads"].items()}
            checks = {
                "output": [rel(outputs[n], theirs["outputs"][n]) for n in theirs["outputs"]],
                "loss": [rel(terms[t], theirs[t]) for t in ("loss_cls", "loss_mask")],
                "grad": list(per_param.values()),
            }
            common.check_tolerances(label, checks, HEAD_TOLERANCES, worst, failures)
            if (targets["cell_labels"] != theirs["cell_labels"]).any():
                failures.append(f"{label}: cell labels differ")
            report = {
                "head_batch": label,
                "positive_cells": [int(c) for c in theirs["positive_cells"]],
                "rel_outputs_worst": max(checks["output"]),
                "rel_loss_cls": checks["loss"][0],
                "rel_loss_mask": checks["loss"][1],
                "rel_grad_worst_parameter": max(per_param.items(), key=lambda kv: kv[1]),
                "rel_grad_all_parameters": rel(
                    np.concatenate([grads[key].ravel() for key in theirs["grads"]]),
                    np.concatenate([g.ravel() for g in theirs["grads"].values()]),
                ),
            }
            print(json.dumps(report))
            if fixture is not None:
                prefix = f"{branch}_h{k}_mmdet_"
                for n in ("loss_cls", "loss_mask", "cell_labels", "positive_cells"):
                    fixture[prefix + n] = np.asarray(theirs[n])
                fixture[prefix + "logits"] = theirs["outputs"]["logits"]
                fixture.update({f"{prefix}grad.{key}": g for key, g in theirs["grads"].items()})
    return worst, meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-fixture", type=Path, help="write the CI test's npz here")
    args = parser.parse_args()
    start = time.time()
    fixture, failures, worst = {}, [], {}
    checksums = {}
    for bi, branch in enumerate(BRANCHES):
        cfg = parity.solo_config(NUM_CLASSES, CANVAS, branch, HEAD_CHANNELS)
        head = make_head(cfg)
        names = MASK_INPUTS[branch]
        for k, batch_names in enumerate(BATCHES):
            images = [solov2_parity.scene(n) for n in batch_names]
            label = f"{branch} {'+'.join(batch_names)}"
            seed = SEED + 10 * bi + k
            outputs = parity.random_head_outputs(cfg, len(images), seed)
            checksums[f"{branch}_{k}"] = mmdet_loss_parity.checksum(parity.flat_arrays(outputs))
            gt = head_parity.ground_truth_arrays(images, MAX_INSTANCES, STRIDE)
            theirs = run_mmdet(head, outputs, images, cfg)
            ours, targets = parity.solo_losses(outputs, gt, cfg)
            ours_targets = our_mask_targets(images, cfg)
            differing = sum(
                int((o != t.astype(np.uint8)).sum())
                for oi, ti in zip(ours_targets, theirs["mask_targets"], strict=True)
                for o, t in zip(oi, ti, strict=True)
            )
            target_pixels = sum(t.size for ti in theirs["mask_targets"] for t in ti)
            checks = compare(ours, theirs, names)
            common.check_tolerances(label, checks, TOLERANCES, worst, failures)
            labels_differ = int((targets["cell_labels"] != theirs["cell_labels"]).sum())
            if labels_differ:
                failures.append(f"{label}: {labels_differ} cell labels differ")
            if not np.array_equal(targets["positive_cells"], theirs["positive_cells"]):
                failures.append(f"{label}: positive cells differ")
            if differing:
                failures.append(f"{label}: {differing} mask target pixels differ")
            report = {
                "batch": label,
                "instances": [len(c) for c, _ in images],
                "positive_cells": [int(c) for c in theirs["positive_cells"]],
                "ours_trained": [int(c) for c in targets["trained"]],
                "cell_label_mismatches": labels_differ,
                "mask_target_pixels_differing": [differing, target_pixels],
                "loss_cls": (ours["loss_cls"], theirs["loss_cls"]),
                "loss_mask": (ours["loss_mask"], theirs["loss_mask"]),
                "rel_loss_cls": checks["loss"][0],
                "rel_loss_mask": checks["loss"][1],
                "rel_grad_logits": checks["grad"][0],
                **{f"rel_grad_{n}": v for n, v in zip(names, checks["grad"][1:], strict=True)},
            }
            print(json.dumps(report))
            if args.make_fixture:
                prefix = f"{branch}{k}_"
                if not batch_names[0].startswith("nuclei"):  # nuclei: re-read from shared data
                    fixture.update({f"{prefix}gt_{n}": v for n, v in gt.items()})
                for n in ("loss_cls", "loss_mask", "grad_logits", "cell_labels", "positive_cells"):
                    fixture[f"{prefix}mmdet_{n}"] = np.asarray(theirs[n])
                for n in names:
                    for level, g in enumerate(theirs[f"grad_{n}"]):
                        fixture[f"{prefix}mmdet_grad_{n}{level}"] = g
    head_worst, head_meta = compare_heads(fixture if args.make_fixture else None, failures)
    common.print_summary(worst, TOLERANCES, head_worst, HEAD_TOLERANCES, start)
    nuclei = [
        head_parity.nuclei_scene(
            common.SHARED_NUCLEI, head_parity.NUCLEI_IMAGE, top, left, CANVAS, STRIDE
        )[2]
        for top, left in head_parity.NUCLEI_CROPS
    ]
    meta = {
        "num_classes": NUM_CLASSES,
        "canvas": CANVAS,
        "head_channels": HEAD_CHANNELS,
        "max_instances": MAX_INSTANCES,
        "branches": list(BRANCHES),
        "batches": ["+".join(n) for n in BATCHES],
        "seed": SEED,
        "inputs_sha256": checksums,
        "nuclei_image": head_parity.NUCLEI_IMAGE,
        "nuclei_crops": [list(c) for c in head_parity.NUCLEI_CROPS],
        "nuclei_masks_sha256": nuclei,
        **head_meta,
    }
    common.write_fixture(args.make_fixture, meta, fixture)
    common.verdict(failures, "SOLO and Decoupled SOLO: every term and gradient within tolerance")


if __name__ == "__main__":
    main()
