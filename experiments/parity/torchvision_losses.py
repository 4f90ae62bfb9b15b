"""Loss parity with torchvision's Mask R-CNN in training mode (`make peer` env).

    .venv-peer/bin/python experiments/parity/torchvision_losses.py            # compare, print
    .venv-peer/bin/python experiments/parity/torchvision_losses.py --record   # + RESULTS.md
    .venv-peer/bin/python experiments/parity/torchvision_losses.py --make-fixture \
        tests/fixtures/torchvision_losses_tiny.npz                             # the CI test's data

The loss mode beside experiments/parity/torchvision.py's output mode: the same tiny seeded
torchvision MaskRCNN (its `tiny_model`, random frozen-BN statistics), converted by
instseg_jax.weights.torchvision, trained one step on the same synthetic scenes (one ordinary,
one crowded, one without instances; 128 x 160, a size torchvision's resize keeps) under the
torchvision preset. torchvision returns its loss dict in training mode and its head gradients
by backward(); ours come from instseg_jax.weights.loss_parity (mask_rcnn.loss_fn, jax.grad).

Sampling: torchvision's BalancedPositiveNegativeSampler draws at random (RPN anchors and RoIs);
this script patches the draw to a rule both sides share instead of injecting indices: the
samplers' batch_size_per_image is raised beyond every candidate count and positive_fraction
set to 1, so every positive and every negative is kept on both sides (ours: loss_parity's
`loss_overrides`). Losses, their normalisers (torchvision divides by the sampled count), the
matching and the targets stay each side's own. Both sides keep --proposals proposals per
level before NMS and in all after it in training (torchvision: rpn._pre_nms_top_n and
_post_nms_top_n), so that the crowded image's RoIs stay few.

Figures: each loss term's relative error, each head's gradient relative error (norm of the
difference over torchvision's), the training proposals of both sides (same set to 1e-3 px).
Tolerances in loss_parity (1e-4; the mask term's declared target difference its own).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

# This folder holds torchvision.py, which would shadow the package: drop it from the path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.models.detection import roi_heads as tv_roi_heads  # noqa: E402

ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments" / "benchmarks"))

from instseg_jax.input.synthetic import SyntheticSource  # noqa: E402
from instseg_jax.weights import loss_parity  # noqa: E402
from instseg_jax.weights import torchvision as tv  # noqa: E402

SPEC = importlib.util.spec_from_file_location("tv_output_parity", HERE / "torchvision.py")
output_parity = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(output_parity)

HEAD_PREFIXES = ("rpn.head.", "roi_heads.box_head.", "roi_heads.box_predictor.")
MASK_PREFIXES = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")
KEEP_ALL = 10**9  # a sampling budget beyond any candidate count


def scenes(seed: int) -> list[loss_parity.Scene]:
    """An ordinary synthetic scene, a crowded one (up to 14 shapes), one without instances."""
    out = []
    for name, max_shapes in (("synthetic", 4), ("crowded", 14)):
        record = SyntheticSource(1, (128, 160), seed=seed, max_shapes=max_shapes).load(0)
        out.append(
            loss_parity.Scene(
                name,
                record["image"],
                record["boxes"].astype(np.float32),
                record["classes"].astype(np.int64),
                record["masks"],
            )
        )
    # A textured background with nothing on it.
    empty = SyntheticSource(1, (128, 160), seed=seed).load(0)["image"]
    empty[:] = empty.min(axis=(0, 1)) + np.random.default_rng(seed).integers(0, 20, (128, 160, 1))
    out.append(
        loss_parity.Scene(
            "empty", empty, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
            np.zeros((0, 128, 160), bool),
        )
    )  # fmt: skip
    return out


def keep_every_candidate(model) -> None:
    """The shared sampling rule: both samplers keep every positive and every negative."""
    for sampler in (model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler):
        sampler.batch_size_per_image = KEEP_ALL
        sampler.positive_fraction = 1.0


def torchvision_losses(model, scene: loss_parity.Scene) -> dict:
    """torchvision's loss terms, head gradients {state_dict key: array}, training proposals
    and the mask loss's RoIs and targets, on one scene."""
    model.train()
    model.zero_grad()
    recorded = {}
    filter_proposals = model.rpn.filter_proposals

    def recording_filter(*args, **kwargs):
        boxes, scores = filter_proposals(*args, **kwargs)
        recorded["proposals"] = boxes[0].detach().numpy().copy()
        return boxes, scores

    project = tv_roi_heads.project_masks_on_boxes

    def recording_project(gt_masks, boxes, matched_idxs, size):
        targets = project(gt_masks, boxes, matched_idxs, size)
        recorded["mask_rois"] = boxes.detach().numpy().copy()
        recorded["mask_targets"] = targets.detach().numpy().copy()
        return targets

    model.rpn.filter_proposals = recording_filter
    tv_roi_heads.project_masks_on_boxes = recording_project
    try:
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255.0
        target = {
            "boxes": torch.from_numpy(scene.boxes),
            "labels": torch.from_numpy(scene.classes + 1),
            "masks": torch.from_numpy(scene.masks.astype(np.uint8)),
        }
        losses = model([image], [target])
        sum(losses.values()).backward()
    finally:
        del model.rpn.filter_proposals
        tv_roi_heads.project_masks_on_boxes = project
    grads = {
        name: p.grad.numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32)
        for name, p in model.named_parameters()
        if name.startswith(HEAD_PREFIXES + MASK_PREFIXES)
    }
    recorded.setdefault("mask_rois", np.zeros((0, 4), np.float32))
    recorded.setdefault("mask_targets", np.zeros((0, 28, 28), np.float32))
    return {"losses": {k: v.item() for k, v in losses.items()}, "torch_grads": grads, **recorded}


def build_model(seed: int, proposals: int):
    model = output_parity.seeded_model(seed, 0.0, tiny=True, cls_std=0.5)
    model.transform.min_size = (128,)
    model.transform.max_size = 160
    model.rpn._pre_nms_top_n["training"] = proposals
    model.rpn._post_nms_top_n["training"] = proposals
    keep_every_candidate(model)
    return model


def run(seed: int, proposals: int) -> tuple[list[dict], list, dict]:
    """(per-scene figures, failures, the fixture's arrays)."""
    model = build_model(seed, proposals)
    state_dict = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    variables, arch = tv.convert(state_dict, "seeded tiny MaskRCNN")
    arrays = {f"sd/{k}": v for k, v in state_dict.items()}
    arrays["proposals_per_level"] = np.int64(proposals)
    rows, failed = [], []
    for index, scene in enumerate(scenes(seed)):
        start = time.perf_counter()
        theirs = torchvision_losses(model, scene)
        theirs["grads"] = loss_parity.head_gradients_from_torch(
            state_dict, theirs["torch_grads"], "torchvision gradients"
        )
        ours = loss_parity.mask_rcnn_losses(variables, arch, scene, proposals)
        given = loss_parity.mask_rcnn_losses(
            variables, arch, scene, proposals,
            given_mask_targets=(theirs["mask_rois"], theirs["mask_targets"]),
        )  # fmt: skip
        figures = loss_parity.compare_losses(ours, theirs, given)
        figures["scene"] = f"{scene.name}: {len(scene.boxes)} instances"
        figures["mask_rois"] = len(theirs["mask_rois"])
        figures["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(figures, default=str), flush=True)
        rows.append(figures)
        failed += [f"{scene.name}: {f}" for f in figures["failures"]]
        prefix = f"scene{index}/"
        arrays.update(
            {
                prefix + "name": np.asarray(scene.name),
                prefix + "image": scene.image,
                prefix + "boxes": scene.boxes,
                prefix + "classes": scene.classes,
                prefix + "masks": np.packbits(scene.masks, axis=-1),
                prefix + "proposals": theirs["proposals"],
                prefix + "mask_rois": theirs["mask_rois"],
                prefix + "mask_targets": theirs["mask_targets"],
            }
        )
        arrays.update({prefix + f"loss/{k}": np.float64(v) for k, v in theirs["losses"].items()})
        arrays.update({prefix + f"grad/{k}": v for k, v in theirs["torch_grads"].items()})
    return rows, failed, arrays


def record(rows: list[dict], args) -> None:
    import common

    terms = [*loss_parity.MASK_RCNN_TERMS, loss_parity.TV_TARGETS]
    heads = [*loss_parity.HEADS, loss_parity.TV_TARGETS]
    table = common.markdown_table(
        [
            [r["scene"], str(r["mask_rois"])]
            + [f"{r['terms'][t]:.1e}" for t in terms]
            + [f"{r['grads'][h]:.1e}" for h in heads]
            + ["pass" if not r["failures"] else "; ".join(r["failures"])]
            for r in rows
        ],
        ["scene", "mask RoIs"] + terms + [f"grad {h}" for h in heads] + ["verdict"],
    )
    common.append_results(
        "torchvision Mask R-CNN loss parity: `.venv-peer/bin/python "
        "experiments/parity/torchvision_losses.py --record`",
        common.machine_line({"torch": torch.__version__, "torchvision": torchvision.__version__})
        + f"; tiny seeded MaskRCNN (seed {args.seed}), {args.proposals} training proposals",
        table,
        "Relative error of each loss term and of each head's gradient of the total loss "
        f"(tolerance {loss_parity.LOSS_TOLERANCE:.0e}); every candidate sampled on both sides. "
        + loss_parity.MASK_TARGET_NOTE,
    )


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proposals", type=int, default=100)
    parser.add_argument("--make-fixture", type=Path)
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rows, failed, arrays = run(args.seed, args.proposals)
    if args.make_fixture:
        np.savez_compressed(args.make_fixture, **arrays)
        print(f"wrote {args.make_fixture} ({args.make_fixture.stat().st_size / 1024:.0f} KiB)")
    if args.record:
        record(rows, args)
    if failed:
        print("LOSS PARITY FAILED:\n  " + "\n  ".join(failed))
        return 1
    print(f"loss parity holds on {len(rows)} scenes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
