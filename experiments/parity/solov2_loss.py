"""Loss parity of our SOLOv2's training side (methods/solov2.py grid_targets and loss_fn) with
mmdetection 3.x's SOLOV2Head.loss_by_feat (issue 29 item 4; `make peer-mmdet`).

    .venv-mmdet/bin/python experiments/parity/solov2_loss.py
    .venv-mmdet/bin/python experiments/parity/solov2_loss.py --make-fixture \
        tests/fixtures/mmdet_solov2_loss_tiny.npz                    # the CI test's data

Environment: mmcv 2.1 is built without its compiled ops (MMCV_WITH_OPS=0, the lite build:
`make peer-mmdet`), and mmdet imports mmcv.ops names at import time in modules this loss never
calls, so `mmdet_shim` (this folder) stubs mmcv.ops first: every stubbed name raises if it is
ever called. SOLOV2Head.loss_by_feat calls none (its targets use mmcv.imrescale, which is
OpenCV; its FocalLoss takes the pure-PyTorch path on CPU tensors, mmdet/models/losses/
focal_loss.py FocalLoss.forward; DiceLoss is pure PyTorch).

Inputs: no network runs. The head outputs, random with a fixed seed, go to both sides: per
level category logits [B, C, g, g] and kernels [B, E, g, g] (ours flattened to [B, S, C] and
[B, S, E], cells level by level, row-major) and the mask feature map [B, E, h, w] at stride 4
(ours [B, h, w, E]). Ground truth on a 128 x 128 canvas: `few` (four objects of three classes
across the levels), `crowded` (twelve discs packed so that centre regions share cells) and
`empty`, drawn at stride 4 and upsampled 4x (nearest) to full resolution for mmdetection,
whose target builder shrinks it back with mmcv.imrescale (checked to return the stride-4 masks
exactly). Boxes are the masks' pixel-edge extents. Each batch is one mmdetection GPU's (two
images; ours: one loss normaliser group) and every image fills the canvas, so the grids span
the canvas on both sides (model.grid_extent "image"; mmdetection's padded batch).

Mass centres: mmdetection's center_of_mass averages integer pixel indices (mmdet/models/utils/
misc.py center_of_mass); ours averages pixel centres, half a pixel later (a declared deviation
in methods/solov2.py). Ours gets mmdetection's centres for the parity proper; a second pass
with our own convention reports how many cell labels that changes.

Checks: cell labels (exact), loss_cls and loss_mask (relative difference) and the gradient of
each with respect to the head outputs (relative norm of the difference).

Known difference (reported, not hidden): mmdetection divides the summed dice loss by its
GPU's positive *cells* (mmdet 3.3 mmdet/models/dense_heads/solov2_head.py:569-587: num_pos
counts pos_masks, one per cell, while loss_mask holds one row per (cell, instance) pair; the
same in solo_head.py:291-301), where WXinlong/SOLO and ours average over the (cell, instance)
pairs (WXinlong/SOLO solov2_head.py loss: torch.cat(loss_ins).mean()). They differ where two
instances share a cell (the crowded scene: 22 cells, 51 pairs, mmdetection's mask term 2.3x
ours); the script reports the raw difference and the one left after rescaling ours by
pairs / cells, which is what the tolerance applies to.

Head parameters (weights/mmdet_solov2_head.py): two more batches run mmdetection's whole
SOLOV2Head (kernel and category towers with GroupNorm, conv_kernel / conv_cls, the
MaskFeatModule) with a seeded state dict (`random_state_dict`, loaded strictly) on seeded FPN
maps P2..P6 (`random_fpn_maps`, [B, 16, 32..2, 32..2]); ours runs SOLOv2.heads with the same
numbers through `convert_head`. Neither is stored: the CI test draws both again and checks
them against the SHA-256 sums the fixture holds. Compared: the head outputs (category logits, kernels, mask features), the cell
labels, both terms and the gradient of the total loss with respect to every parameter, by
mmdetection key (ours mapped back through the converter; the mask term rescaled as above). Our
heads do what mmdetection's forward does: P2 halved and P6 brought to P5's size (resize_feats),
CoordConv channels over the resized level, both resized bilinearly to the grid, the category
branch without the coordinates; CoordConv on P5 in the mask branch. Found and fixed: our head's
GroupNorms ran with flax's epsilon 1e-6 where mmdetection's (and WXinlong/SOLO's) take torch's
1e-5 (mmcv/cnn/bricks/norm.py build_norm_layer); nn/layers.py GN_EPSILON is 1e-5 now, and
the script still reports how far 1e-6 moves mmdetection's outputs (`gn_eps_1e-6_moves_*`:
above the output tolerance, so the check sees such a difference).
Batches: `few` + `crowded`, and `nuclei`: the 128-pixel top-left and bottom-right crops of one
DSB 2018 stage1_train image (mmdet_solov2_head.NUCLEI_IMAGE; 20 and 22 nuclei), read from
../shared/data here and in the CI test (the fixture stores the masks' SHA-256 only).
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

import mmcv  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmdet.models.dense_heads import SOLOV2Head  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from instseg_jax.weights import mmdet_loss_parity as parity  # noqa: E402
from instseg_jax.weights import mmdet_solov2_head as head_parity  # noqa: E402

CANVAS = 128
STRIDE = 4
NUM_CLASSES = 3
MASK_CHANNELS = 8
MAX_INSTANCES = 12
BATCHES = (("few", "crowded"), ("crowded", "empty"), ("empty", "empty"))
TOLERANCES = {"loss": 1e-5, "grad": 1e-5}  # relative; float32 on both sides
# The whole head: outputs and parameter gradients pass through convolutions and GroupNorm
# (float32 sums of a few thousand terms); measured 5.4e-7 (outputs) and 1.4e-6 (the worst
# parameter's gradient), so 1e-5 and 2e-5. A GroupNorm epsilon of 1e-6 instead of torch's
# 1e-5 moves the outputs by 1.8e-5 to 3.6e-5: above the output tolerance.
HEAD_TOLERANCES = {"output": 1e-5, "loss": 1e-5, "grad": 2e-5}
HEAD_BATCHES = (("few", "crowded"), ("nuclei_0", "nuclei_1"))
HEAD_MAX_INSTANCES = 24
HEAD_STATE_DICT_SEED = 29
HEAD_FPN_SEED = 2929  # + the batch's index
NUCLEI_SOURCE = common.SHARED_NUCLEI


def ellipse(cy, cx, ry, rx, size=CANVAS // STRIDE):
    """bool[size, size] at stride 4: the cells whose centres fall inside the ellipse."""
    y, x = np.mgrid[:size, :size] + 0.5
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def scene(name: str):
    """(classes int[N], masks bool[N, 32, 32] at stride 4)."""
    if name.startswith("nuclei_"):
        top, left = head_parity.NUCLEI_CROPS[int(name[len("nuclei_") :])]
        classes, masks, _ = head_parity.nuclei_scene(
            NUCLEI_SOURCE, head_parity.NUCLEI_IMAGE, top, left, CANVAS, STRIDE
        )
        return classes, masks
    if name == "empty":
        return np.zeros((0,), np.int64), np.zeros((0, CANVAS // STRIDE, CANVAS // STRIDE), bool)
    if name == "few":
        shapes = [(5, 5, 2, 2, 0), (10, 22, 4, 6, 1), (20, 10, 8, 6, 2), (16, 16, 14, 13, 0)]
    else:  # crowded: twelve overlapping discs 8 px apart (level-0 cells are 10.7 px): cells
        # shared by two or three instances, on two levels (24 px discs: both 1-32 and 16-64)
        shapes = [(9 + 2 * (i // 4), 9 + 2 * (i % 4) + (i // 4), 3, 3, i % 3) for i in range(12)]
    masks = np.stack([ellipse(cy, cx, ry, rx) for cy, cx, ry, rx, _ in shapes])
    return np.array([s[4] for s in shapes], np.int64), masks


def full_resolution(masks):
    return masks.repeat(STRIDE, axis=1).repeat(STRIDE, axis=2)


def boxes_of(full_masks):
    boxes = []
    for m in full_masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.array(boxes, np.float32).reshape(-1, 4)


def mmdet_centres(full_masks, offset=0.0):
    """float32[N, 2] (x, y): mmdetection's center_of_mass (integer pixel indices) + offset."""
    centres = []
    for m in full_masks:
        ys, xs = np.nonzero(m)
        centres.append([xs.mean() + offset, ys.mean() + offset])
    return np.array(centres, np.float32).reshape(-1, 2)


def make_head(cfg, tower_gn=None, mask_gn=None) -> SOLOV2Head:
    """mmdetection's SOLOv2 head at the tiny config (configs/solov2/solov2_r50_fpn_1x_coco.py's
    losses: DiceLoss weight 3, FocalLoss gamma 2 alpha 0.25); its layers at cfg's widths, its
    norms tower_gn and mask_gn (GroupNorm configs; 4 groups when left out, where only
    loss_by_feat runs)."""
    register_all_modules()
    gn = dict(type="GN", num_groups=4, requires_grad=True)
    return SOLOV2Head(
        num_classes=cfg.num_classes,
        in_channels=cfg.fpn_channels,
        feat_channels=cfg.head_channels,
        stacked_convs=cfg.head_convs,
        strides=list(cfg.level_strides),
        scale_ranges=cfg.scale_ranges,
        pos_scale=cfg.center_scale,
        num_grids=list(cfg.num_grids),
        cls_down_index=0,
        norm_cfg=tower_gn or gn,
        mask_feature_head=dict(
            feat_channels=cfg.mask_feature_channels,
            start_level=0,
            end_level=3,
            out_channels=cfg.mask_channels,
            mask_stride=STRIDE,
            norm_cfg=mask_gn or gn,
        ),
        loss_mask=dict(type="DiceLoss", use_sigmoid=True, loss_weight=cfg.mask_loss_weight),
        loss_cls=dict(
            type="FocalLoss",
            use_sigmoid=True,
            gamma=cfg.focal_gamma,
            alpha=cfg.focal_alpha,
            loss_weight=1.0,
        ),
    )


def run_mmdet(head, logits, kernels, features, images, cfg):
    """mmdetection's terms, their gradients in our layouts and its targets."""
    grids = [(g, g) for g in cfg.num_grids]
    cls_t = [torch.tensor(x, requires_grad=True) for x in common.split_levels(logits, grids)]
    ker_t = [torch.tensor(x, requires_grad=True) for x in common.split_levels(kernels, grids)]
    feat_t = torch.tensor(np.ascontiguousarray(features.transpose(0, 3, 1, 2)), requires_grad=True)
    instances = mmdet_instances(images)
    metas = [dict(img_shape=(CANVAS, CANVAS), pad_shape=(CANVAS, CANVAS))] * len(images)
    losses = head.loss_by_feat(ker_t, cls_t, feat_t, instances, metas)
    grad_cls = torch.autograd.grad(losses["loss_cls"], cls_t, retain_graph=True)
    mask_inputs = [*ker_t, feat_t]
    grad_mask = torch.autograd.grad(losses["loss_mask"], mask_inputs, allow_unused=True)
    grad_mask = [
        torch.zeros_like(x) if g is None else g for g, x in zip(grad_mask, mask_inputs, strict=True)
    ]
    return {
        "loss_cls": float(losses["loss_cls"]),
        "loss_mask": float(losses["loss_mask"]),
        "grad_cls_logits": common.join_levels([g.numpy() for g in grad_cls]),
        "grad_mask_kernels": common.join_levels([g.numpy() for g in grad_mask[:-1]]),
        "grad_mask_features": grad_mask[-1].numpy().transpose(0, 2, 3, 1),
        **mmdet_targets(head, instances, feat_t.shape[-2:]),
    }


def mmdet_instances(images):
    """mmdetection's InstanceData per image: full-resolution masks, their boxes, the classes."""
    instances = []
    for classes, masks in images:
        full = full_resolution(masks).astype(np.uint8)
        shrunk = np.stack([mmcv.imrescale(m, 1.0 / STRIDE) for m in full]) if len(full) else masks
        assert np.array_equal(shrunk.astype(bool), masks), "imrescale changed a stride-4 mask"
        instances.append(
            InstanceData(
                bboxes=torch.tensor(boxes_of(full)),
                labels=torch.tensor(classes),
                masks=BitmapMasks(full, CANVAS, CANVAS),
            )
        )
    return instances


def mmdet_targets(head, instances, featmap):
    """mmdetection's cell labels [B, S], positive cells [B] and (cell, instance) pairs [B]."""
    labels, cells, pairs = [], [], []
    for inst in instances:
        targets, level_labels, pos_masks, _ = head._get_targets_single(inst, featmap_sizes=featmap)
        labels.append(torch.cat([lv.flatten() for lv in level_labels]).numpy())
        cells.append(int(sum(int(m.sum()) for m in pos_masks)))
        pairs.append(int(sum(len(t) for t in targets)))
    return {
        "cell_labels": np.stack(labels).astype(np.int32),
        "positive_cells": np.array(cells),
        "pairs": np.array(pairs),
    }


def make_full_head(cfg, eps):
    """mmdetection's SOLOV2Head at head_parity's widths, GroupNorm epsilon eps, our groups."""
    tower_gn, mask_gn = (
        dict(type="GN", num_groups=head_parity.norm_groups(c), requires_grad=True, eps=eps)
        for c in (cfg.head_channels, cfg.mask_feature_channels)
    )
    return make_head(cfg, tower_gn, mask_gn)


def run_mmdet_head(head, state_dict, fpn, images, cfg):
    """mmdetection's head outputs (our layouts), terms, the gradient of their sum with respect
    to every parameter (by key, torch layouts) and its targets."""
    head.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
    head.zero_grad()
    maps = [torch.tensor(np.ascontiguousarray(f.transpose(0, 3, 1, 2))) for f in fpn]
    kernels, logits, mask_features = head(maps)
    instances = mmdet_instances(images)
    metas = [dict(img_shape=(CANVAS, CANVAS), pad_shape=(CANVAS, CANVAS))] * len(images)
    losses = head.loss_by_feat(kernels, logits, mask_features, instances, metas)
    named = list(head.named_parameters())
    grads = torch.autograd.grad(
        losses["loss_cls"] + losses["loss_mask"], [p for _, p in named], allow_unused=True
    )
    return {
        "category_logits": common.join_levels([x.detach().numpy() for x in logits]),
        "kernels": common.join_levels([x.detach().numpy() for x in kernels]),
        "mask_features": mask_features.detach().numpy().transpose(0, 2, 3, 1),
        "loss_cls": float(losses["loss_cls"].detach()),
        "loss_mask": float(losses["loss_mask"].detach()),
        "grads": {
            name: (torch.zeros_like(p) if g is None else g).numpy()
            for (name, p), g in zip(named, grads, strict=True)
        },
        **mmdet_targets(head, instances, mask_features.shape[-2:]),
    }


HEAD_OUTPUTS = ("category_logits", "kernels", "mask_features")


def compare_heads(fixture, failures):
    """The head-parameter batches: mmdetection's SOLOV2Head against ours on random FPN maps
    with one seeded state dict; their records go into fixture (when not None)."""
    cfg = head_parity.head_config(NUM_CLASSES, CANVAS)
    head = make_full_head(cfg, 1e-5)  # mmcv's default, the COCO config's
    head_flax_eps = make_full_head(cfg, 1e-6)  # what our head ran with before (docstring)
    state_dict = head_parity.random_state_dict(cfg, seed=HEAD_STATE_DICT_SEED)
    worst = {"output": 0.0, "loss": 0.0, "grad": 0.0}
    fpn_checksums = []
    nuclei_checksums = [
        head_parity.nuclei_scene(
            NUCLEI_SOURCE, head_parity.NUCLEI_IMAGE, top, left, CANVAS, STRIDE
        )[2]
        for top, left in head_parity.NUCLEI_CROPS
    ]
    for k, names in enumerate(HEAD_BATCHES):
        images = [scene(n) for n in names]
        b = len(images)
        fpn = head_parity.random_fpn_maps(cfg, b, seed=HEAD_FPN_SEED + k)
        fpn_checksums.append(parity.checksum(fpn))
        theirs = run_mmdet_head(head, state_dict, fpn, images, cfg)
        pairs, cells = theirs["pairs"].sum(), theirs["positive_cells"].sum()
        rescale = float(pairs / cells) if cells else 1.0
        gt = ground_truth(images, max_instances=HEAD_MAX_INSTANCES)
        # The CI test rebuilds the nuclei batch's arrays with the library's copy of this.
        shared = head_parity.ground_truth_arrays(images, HEAD_MAX_INSTANCES, STRIDE)
        assert all(np.array_equal(gt[n], shared[n]) for n in gt), "ground_truth_arrays differs"
        outputs, terms, grads, targets = head_parity.head_losses(state_dict, fpn, gt, cfg, rescale)
        eps_moved = run_mmdet_head(head_flax_eps, state_dict, fpn, images, cfg)
        report = {
            "head_batch": "+".join(names),
            "instances": [len(c) for c, _ in images],
            "cell_label_mismatches": int((targets["cell_labels"] != theirs["cell_labels"]).sum()),
            "positive_cells": [int(c) for c in theirs["positive_cells"]],
            "pairs": [int(p) for p in theirs["pairs"]],
        }
        for name in HEAD_OUTPUTS:
            report[f"rel_{name}"] = parity.relative_difference(outputs[name], theirs[name])
            report[f"gn_eps_1e-6_moves_{name}"] = parity.relative_difference(
                eps_moved[name], theirs[name]
            )
        report["rel_loss_cls"] = parity.relative_difference(terms["loss_cls"], theirs["loss_cls"])
        report["rel_loss_mask_rescaled"] = parity.relative_difference(
            terms["loss_mask"] * rescale, theirs["loss_mask"]
        )
        per_param = {
            key: parity.relative_difference(grads[key], g) for key, g in theirs["grads"].items()
        }
        report["rel_grad_worst_parameter"] = max(per_param.items(), key=lambda kv: kv[1])
        report["rel_grad_all_parameters"] = parity.relative_difference(
            np.concatenate([grads[key].ravel() for key in theirs["grads"]]),
            np.concatenate([g.ravel() for g in theirs["grads"].values()]),
        )
        checks = {
            "output": [report[f"rel_{name}"] for name in HEAD_OUTPUTS],
            "loss": [report["rel_loss_cls"], report["rel_loss_mask_rescaled"]],
            "grad": list(per_param.values()),
        }
        common.check_tolerances(
            f"{report['head_batch']}: head", checks, HEAD_TOLERANCES, worst, failures
        )
        if report["cell_label_mismatches"]:
            failures.append(f"{report['head_batch']}: cell labels differ")
        print(json.dumps(report))
        if fixture is not None:
            if not names[0].startswith("nuclei"):  # nuclei: re-read from the shared data
                fixture.update({f"h{k}_gt_{name}": v for name, v in gt.items()})
            for name in (
                *HEAD_OUTPUTS,
                "loss_cls",
                "loss_mask",
                "cell_labels",
                "positive_cells",
                "pairs",
            ):
                fixture[f"h{k}_mmdet_{name}"] = np.asarray(theirs[name])
            fixture.update({f"h{k}_mmdet_grad.{key}": g for key, g in theirs["grads"].items()})
    return worst, {
        "head_batches": ["+".join(n) for n in HEAD_BATCHES],
        "head_state_dict_seed": HEAD_STATE_DICT_SEED,
        "head_state_dict_sha256": parity.checksum(state_dict),
        "head_fpn_seed": HEAD_FPN_SEED,
        "head_fpn_sha256": fpn_checksums,
        "head_max_instances": HEAD_MAX_INSTANCES,
        "nuclei_image": head_parity.NUCLEI_IMAGE,
        "nuclei_crops": [list(c) for c in head_parity.NUCLEI_CROPS],
        "nuclei_masks_sha256": nuclei_checksums,
    }


def ground_truth(images, centre_offset=0.0, max_instances=MAX_INSTANCES):
    """Our padded ground truth arrays for one batch."""
    b, n = len(images), max_instances
    gt = {
        "boxes": np.zeros((b, n, 4), np.float32),
        "classes": np.zeros((b, n), np.int32),
        "valid": np.zeros((b, n), bool),
        "centers": np.zeros((b, n, 2), np.float32),
        "masks": np.zeros((b, n, CANVAS // STRIDE, CANVAS // STRIDE), bool),
    }
    for i, (classes, masks) in enumerate(images):
        n = len(classes)
        full = full_resolution(masks)
        gt["boxes"][i, :n] = boxes_of(full)
        gt["classes"][i, :n] = classes
        gt["valid"][i, :n] = True
        gt["centers"][i, :n] = mmdet_centres(full, centre_offset)
        gt["masks"][i, :n] = masks
    return gt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-fixture", type=Path, help="write the CI test's npz here")
    args = parser.parse_args()
    start = time.time()
    cfg = parity.solov2_config(NUM_CLASSES, CANVAS, MASK_CHANNELS)
    head = make_head(cfg)
    rng = np.random.default_rng(29)
    fixture = {}
    worst = {"loss": 0.0, "grad": 0.0}
    failures = []
    for k, names in enumerate(BATCHES):
        images = [scene(n) for n in names]
        b, s, h = len(images), cfg.num_cells, CANVAS // STRIDE
        logits = (rng.normal(size=(b, s, NUM_CLASSES)) - 2.0).astype(np.float32)
        kernels = (0.5 * rng.normal(size=(b, s, MASK_CHANNELS))).astype(np.float32)
        features = rng.normal(size=(b, h, h, MASK_CHANNELS)).astype(np.float32)
        theirs = run_mmdet(head, logits, kernels, features, images, cfg)
        gt = ground_truth(images)
        ours, our_targets = parity.solov2_losses(logits, kernels, features, gt, cfg)
        label_mismatch = int((our_targets["cell_labels"] != theirs["cell_labels"]).sum())
        # mmdetection's dice normaliser is positive cells, ours (cell, instance) pairs.
        pairs, cells = theirs["pairs"].sum(), theirs["positive_cells"].sum()
        rescale = pairs / cells if cells else 1.0
        report = {
            "batch": "+".join(names),
            "cell_label_mismatches": label_mismatch,
            "positive_cells": [int(c) for c in theirs["positive_cells"]],
            "pairs": [int(p) for p in theirs["pairs"]],
            "ours_pairs": [int(p) for p in our_targets["pairs"]],
        }
        for term in ("loss_cls", "loss_mask"):
            report[term] = (ours[term], theirs[term])
            report[f"rel_{term}"] = parity.relative_difference(ours[term], theirs[term])
        report["rel_loss_mask_rescaled"] = parity.relative_difference(
            ours["loss_mask"] * rescale, theirs["loss_mask"]
        )
        for g in ("grad_cls_logits", "grad_mask_kernels", "grad_mask_features"):
            scale = rescale if g.startswith("grad_mask") else 1.0
            report[f"rel_{g}"] = parity.relative_difference(ours[g] * scale, theirs[g])
        checks = {
            "loss": [report["rel_loss_cls"], report["rel_loss_mask_rescaled"]],
            "grad": [
                report[f"rel_{g}"]
                for g in ("grad_cls_logits", "grad_mask_kernels", "grad_mask_features")
            ],
        }
        common.check_tolerances(f"{report['batch']}:", checks, TOLERANCES, worst, failures)
        if label_mismatch:
            failures.append(f"{report['batch']}: {label_mismatch} cell labels differ")
        # Our own centre convention (pixel centres): how many cell labels move.
        _, own = parity.solov2_losses(logits, kernels, features, ground_truth(images, 0.5), cfg)
        report["cell_labels_moved_by_our_centre_convention"] = int(
            (own["cell_labels"] != theirs["cell_labels"]).sum()
        )
        print(json.dumps(report))
        if args.make_fixture:
            fixture.update(
                {f"b{k}_logits": logits, f"b{k}_kernels": kernels, f"b{k}_features": features}
            )
            fixture.update({f"b{k}_gt_{name}": v for name, v in gt.items()})
            for name in (
                "loss_cls",
                "loss_mask",
                "grad_cls_logits",
                "grad_mask_kernels",
                "grad_mask_features",
                "cell_labels",
                "positive_cells",
                "pairs",
            ):
                fixture[f"b{k}_mmdet_{name}"] = np.asarray(theirs[name])
    head_worst, head_meta = compare_heads(fixture if args.make_fixture else None, failures)
    common.print_summary(worst, TOLERANCES, head_worst, HEAD_TOLERANCES, start)
    meta = {
        "num_classes": NUM_CLASSES,
        "canvas": CANVAS,
        "mask_channels": MASK_CHANNELS,
        "batches": ["+".join(n) for n in BATCHES],
        **head_meta,
    }
    common.write_fixture(args.make_fixture, meta, fixture)
    common.verdict(
        failures, "every term within tolerance (dice normaliser rescaled, see the docstring)"
    )


if __name__ == "__main__":
    main()
