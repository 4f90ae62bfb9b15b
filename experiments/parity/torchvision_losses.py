"""Loss parity with torchvision's Mask R-CNN, FCOS and Keypoint R-CNN in training mode
(`make peer` env).

    .venv-peer/bin/python experiments/parity/torchvision_losses.py            # compare, print
    .venv-peer/bin/python experiments/parity/torchvision_losses.py --record   # + RESULTS.md
    .venv-peer/bin/python experiments/parity/torchvision_losses.py --models fcos
    .venv-peer/bin/python experiments/parity/torchvision_losses.py --make-fixtures tests/fixtures

The loss mode beside the output mode of torchvision.py, fcos.py and keypoint_rcnn.py: their
tiny seeded models (random frozen-BN statistics, the weights of their output fixtures),
converted by instseg_jax.weights.torchvision*, trained one step on the same synthetic scenes
(one ordinary, one crowded, one without instances, each alone and then all three in one
batch; 128 x 160, a size torchvision's resize keeps; Keypoint R-CNN: one class with 17 random
keypoints per instance) under the torchvision presets. Mask R-CNN and FCOS also train on a
real nuclei image alone (NUCLEI: a crop of a DSB 2018 fluorescence image resized to 128 x 160,
its 45 nuclei of 2 to 126 px^2 as ground truth, one class; read from ../shared/data, skipped
when missing; the fixtures keep the crop and a digest of the scene, not its pixels). Keypoint
R-CNN has no nuclei case: the data set has no keypoints. torchvision returns its loss dict in
training mode and its head gradients by backward(); ours come from
instseg_jax.weights.loss_parity (the methods' loss_fn, jax.grad with respect to the heads).

Sampling: torchvision's BalancedPositiveNegativeSampler draws at random (RPN anchors and RoIs);
this script patches the draw to a rule both sides share instead of injecting indices: the
samplers' batch_size_per_image is raised beyond every candidate count and positive_fraction
set to 1, so every positive and every negative is kept on both sides (ours: loss_parity's
`loss_overrides`). Losses, their normalisers (torchvision divides by the sampled count), the
matching and the targets stay each side's own. Both sides keep --proposals proposals per
level before NMS and in all after it in training (torchvision: rpn._pre_nms_top_n and
_post_nms_top_n), so that the crowded image's RoIs stay few. FCOS samples nothing.

Figures: each loss term's relative error, each head's gradient relative error (norm of the
difference over torchvision's), the training proposals of both sides (same set to 1e-3 px).
Tolerances in loss_parity (1e-4; the Mask R-CNN mask targets' declared difference its own,
and the mask term and mask-head gradient with torchvision's targets given to ours at 1e-4).
"""

from __future__ import annotations

import dataclasses
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
from instseg_jax.weights.loss_parity import NucleiCrop  # noqa: E402


def _script(name: str):
    """Another parity script of this folder as a module (its file names are not importable)."""
    spec = importlib.util.spec_from_file_location(f"{name}_parity", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


output_parity = _script("torchvision")
fcos_parity = _script("fcos")
keypoint_parity = _script("keypoint_rcnn")

HEAD_PREFIXES = ("rpn.head.", "roi_heads.box_head.", "roi_heads.box_predictor.")
MASK_PREFIXES = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")
KEEP_ALL = 10**9  # a sampling budget beyond any candidate count
SHARED_NUCLEI = ROOT.parent / "shared" / "data" / "dsb2018_nuclei" / "stage1_train"
# The nuclei case: 45 small nuclei (median 27 px^2 on the canvas), some touching, some cut by
# the crop (2 px^2 slivers), on a dark fluorescence background.
NUCLEI = NucleiCrop(
    "1c681dfa5cf7e413305d2e90ee47553a46e29cce4f6ed034c8297e511714f867",
    (16, 16, 192, 240),
    (128, 160),
)


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


def nuclei_case(arrays: dict, model: str, compare) -> tuple[list[dict], list]:
    """The nuclei crop alone through compare, as run_cases' cases; its crop and digest go into
    `arrays` ("nuclei/spec", "nuclei/digest"), never its pixels or masks. No rows where the
    shared data is missing."""
    if not SHARED_NUCLEI.is_dir():
        print(f"no {SHARED_NUCLEI}: the nuclei case is skipped", flush=True)
        return [], []
    scene = loss_parity.nuclei_scene(SHARED_NUCLEI, NUCLEI)
    arrays["nuclei/spec"] = np.asarray(NUCLEI.as_json())
    arrays["nuclei/digest"] = np.asarray(loss_parity.scene_digest(scene))
    rows, failed = [], []
    start = time.perf_counter()
    figures, theirs = compare([scene])
    report(f"nuclei: {len(scene.boxes)} instances", figures, start, rows, failed, model)
    arrays.update(case_arrays("nuclei/", theirs))
    return rows, failed


def keep_every_candidate(model) -> None:
    """The shared sampling rule: both samplers keep every positive and every negative."""
    for sampler in (model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler):
        sampler.batch_size_per_image = KEEP_ALL
        sampler.positive_fraction = 1.0


def torchvision_losses(model, scenes: list) -> dict:
    """torchvision's Mask R-CNN loss terms, head gradients {state_dict key: array}, each
    image's training proposals and the mask loss's foreground RoIs and targets per image."""
    recorded = {"mask_rois": [], "mask_targets": []}
    project = tv_roi_heads.project_masks_on_boxes

    def recording_project(gt_masks, boxes, matched_idxs, size):  # called image by image
        targets = project(gt_masks, boxes, matched_idxs, size)
        recorded["mask_rois"].append(boxes.detach().numpy().copy())
        recorded["mask_targets"].append(targets.detach().numpy().copy())
        return targets

    tv_roi_heads.project_masks_on_boxes = recording_project
    try:
        out = torch_training_step(model, scenes, HEAD_PREFIXES + MASK_PREFIXES)
    finally:
        tv_roi_heads.project_masks_on_boxes = project
    return {**out, **recorded}


def torch_training_step(model, scenes: list, prefixes) -> dict:
    """torchvision's loss dict on a batch of scenes in training mode and the gradients of its
    sum with respect to the parameters named with ``prefixes`` (and a two-stage model's
    training proposals, per image)."""
    model.train()
    model.zero_grad()
    recorded = {}
    if hasattr(model, "rpn"):  # a two-stage model: record its training proposals
        filter_proposals = model.rpn.filter_proposals

        def recording_filter(*args, **kwargs):
            boxes, scores = filter_proposals(*args, **kwargs)
            recorded["proposals"] = [b.detach().numpy().copy() for b in boxes]
            return boxes, scores

        model.rpn.filter_proposals = recording_filter
    images, targets = [], []
    for scene in scenes:
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255.0)
        target = {
            "boxes": torch.from_numpy(scene.boxes),
            "labels": torch.from_numpy(scene.classes + 1),
            "masks": torch.from_numpy(scene.masks.astype(np.uint8)),
        }
        if scene.keypoints is not None:
            target["keypoints"] = torch.from_numpy(scene.keypoints)
        targets.append(target)
    try:
        losses = model(images, targets)
    finally:
        if hasattr(model, "rpn"):
            del model.rpn.filter_proposals
    sum(losses.values()).backward()
    grads = {
        name: p.grad.numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32)
        for name, p in model.named_parameters()
        if name.startswith(prefixes)
    }
    return {"losses": {k: v.item() for k, v in losses.items()}, "torch_grads": grads, **recorded}


def cases(scene_list: list) -> list[tuple[str, str, list]]:
    """(fixture prefix, label, scenes): each scene alone, then all of them in one batch (the
    normalisers over a batch, an empty image beside others)."""
    out = [
        (f"scene{i}/", f"{s.name}: {len(s.boxes)} instances", [s]) for i, s in enumerate(scene_list)
    ]
    out.append(("batch/", f"batch of all {len(scene_list)}", scene_list))
    return out


PER_IMAGE = ("proposals", "mask_rois", "mask_targets")  # lists, one array per image


def case_arrays(prefix: str, theirs: dict) -> dict:
    """torchvision's loss terms, head gradients and per-image records of a case, for a
    fixture (a per-image list `key` as key0, key1, ...)."""
    arrays = {prefix + f"loss/{k}": np.float64(v) for k, v in theirs["losses"].items()}
    arrays.update({prefix + f"grad/{k}": v for k, v in theirs["torch_grads"].items()})
    for key in PER_IMAGE:
        for i, value in enumerate(theirs.get(key, [])):
            arrays[f"{prefix}{key}{i}"] = value
    return arrays


def report(label: str, figures: dict, start: float, rows: list, failed: list, model: str):
    figures["scene"] = label
    figures["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(figures, default=str), flush=True)
    rows.append(figures)
    failed += [f"{model} {label}: {f}" for f in figures["failures"]]


def numpy_state_dict(model) -> dict:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def run_cases(scene_list: list, arrays: dict, model: str, compare) -> tuple[list[dict], list]:
    """Every case of the scenes through compare(batch) -> (figures, theirs): (per-case figures,
    failures), each case reported as it ends; the scenes' inputs and torchvision's side of each
    case go into `arrays` (the fixture)."""
    rows, failed = [], []
    for index, scene in enumerate(scene_list):
        arrays.update(scene_arrays(index, scene))
    for prefix, label, batch in cases(scene_list):
        start = time.perf_counter()
        figures, theirs = compare(batch)
        report(label, figures, start, rows, failed, model)
        arrays.update(case_arrays(prefix, theirs))
    return rows, failed


def run_fcos(seed: int) -> tuple[list[dict], list, dict]:
    """FCOS: (per-case figures, failures, the fixture's arrays). No sampling to share: every
    location takes part in both sides' losses."""
    model = fcos_parity.tiny_model(seed, 0.2)
    state_dict = numpy_state_dict(model)
    variables, arch = loss_parity.torchvision_fcos.convert(state_dict, "seeded tiny FCOS")
    arrays = weights_reference(state_dict, "torchvision_fcos_tiny.npz")

    def compare(batch):
        theirs = torch_training_step(model, batch, ("head.",))
        theirs["grads"] = loss_parity.fcos_head_gradients_from_torch(
            state_dict, theirs["torch_grads"], "torchvision gradients"
        )
        ours = loss_parity.fcos_losses(variables, arch, batch)
        figures = loss_parity.compare_losses(ours, theirs)
        figures["positives"] = ours["positives"]
        return figures, theirs

    rows, failed = run_cases(scenes(seed), arrays, "FCOS", compare)
    nuclei_rows, nuclei_failed = nuclei_case(arrays, "FCOS", compare)
    return rows + nuclei_rows, failed + nuclei_failed, arrays


def weights_reference(state_dict: dict, output_fixture: str) -> dict:
    """The fixture's weights: the name and digest of the output fixture that holds the same
    state_dict (tiny_model under the same seed), or the state_dict itself where it differs."""
    digest = loss_parity.state_dict_digest(state_dict)
    path = ROOT / "tests" / "fixtures" / output_fixture
    if path.exists():
        with np.load(path) as f:
            stored = {k.removeprefix("sd/"): f[k] for k in f.files if k.startswith("sd/")}
        if loss_parity.state_dict_digest(stored) == digest:
            return {"weights_fixture": np.asarray(output_fixture), "weights_digest": digest}
    print(f"{output_fixture} holds other weights: the state_dict is stored here", flush=True)
    return {f"sd/{k}": v for k, v in state_dict.items()}


def with_keypoints(scene: loss_parity.Scene, seed: int, count: int = 17) -> loss_parity.Scene:
    """The scene as one class (person) with `count` keypoints per instance: uniform in the box
    grown by a quarter on each side (some fall outside the RoIs: no target), visibility 0, 1
    or 2 at random, and the first keypoint exactly on the box's far corner (x1, y1), where
    the heatmap rule puts it in the last cell."""
    rng = np.random.default_rng([seed, len(scene.boxes)])
    n = len(scene.boxes)
    keypoints = np.zeros((n, count, 3), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(scene.boxes):
        w, h = x1 - x0, y1 - y0
        keypoints[i, :, 0] = rng.uniform(x0 - w / 4, x1 + w / 4, count)
        keypoints[i, :, 1] = rng.uniform(y0 - h / 4, y1 + h / 4, count)
        keypoints[i, :, 2] = rng.choice([0, 1, 2], count, p=[0.2, 0.3, 0.5])
        keypoints[i, 0] = (x1, y1, 2)
    return dataclasses.replace(scene, classes=np.zeros(n, np.int64), keypoints=keypoints)


def two_stage_model(model, proposals: int):
    """A tiny two-stage model set up for the loss mode: torchvision's resize keeping the
    128 x 160 scenes, `proposals` training proposals, samplers keeping every candidate."""
    model.transform.min_size = (128,)
    model.transform.max_size = 160
    model.rpn._pre_nms_top_n["training"] = proposals
    model.rpn._post_nms_top_n["training"] = proposals
    keep_every_candidate(model)
    return model


def run_keypoint(seed: int, proposals: int) -> tuple[list[dict], list, dict]:
    """Keypoint R-CNN: (per-case figures, failures, the fixture's arrays), samplers as for
    Mask R-CNN."""
    model = keypoint_parity.seeded_model(seed, 0.0, tiny=True, cls_std=0.5)
    model = two_stage_model(model, proposals)
    state_dict = numpy_state_dict(model)
    variables, arch = loss_parity.torchvision_keypoint.convert(state_dict, "seeded tiny model")
    arrays = weights_reference(state_dict, "torchvision_keypoint_tiny.npz")
    arrays["proposals_per_level"] = np.int64(proposals)
    prefixes = HEAD_PREFIXES + ("roi_heads.keypoint_head.", "roi_heads.keypoint_predictor.")

    def compare(batch):
        theirs = torch_training_step(model, batch, prefixes)
        theirs["grads"] = loss_parity.keypoint_head_gradients_from_torch(
            state_dict, theirs["torch_grads"], "torchvision gradients"
        )
        ours = loss_parity.keypoint_rcnn_losses(variables, arch, batch, proposals)
        figures = loss_parity.compare_losses(ours, theirs)
        figures["keypoint_targets"] = ours["keypoint_targets"]
        return figures, theirs

    scene_list = [with_keypoints(scene, seed) for scene in scenes(seed)]
    rows, failed = run_cases(scene_list, arrays, "Keypoint R-CNN", compare)
    return rows, failed, arrays


def scene_arrays(index: int, scene: loss_parity.Scene) -> dict:
    """A scene's inputs, for a fixture."""
    prefix = f"scene{index}/"
    arrays = {
        prefix + "name": np.asarray(scene.name),
        prefix + "image": scene.image,
        prefix + "boxes": scene.boxes,
        prefix + "classes": scene.classes,
        prefix + "masks": np.packbits(scene.masks, axis=-1),
    }
    if scene.keypoints is not None:
        arrays[prefix + "keypoints"] = scene.keypoints
    return arrays


def run(seed: int, proposals: int) -> tuple[list[dict], list, dict]:
    """Mask R-CNN: (per-case figures, failures, the fixture's arrays)."""
    model = output_parity.seeded_model(seed, 0.0, tiny=True, cls_std=0.5)
    model = two_stage_model(model, proposals)
    state_dict = numpy_state_dict(model)
    variables, arch = tv.convert(state_dict, "seeded tiny MaskRCNN")
    arrays = weights_reference(state_dict, "torchvision_tiny.npz")
    arrays["proposals_per_level"] = np.int64(proposals)

    def compare(batch):
        theirs = torchvision_losses(model, batch)
        theirs["grads"] = loss_parity.head_gradients_from_torch(
            state_dict, theirs["torch_grads"], "torchvision gradients"
        )
        ours = loss_parity.mask_rcnn_losses(variables, arch, batch, proposals)
        given = loss_parity.mask_rcnn_losses(
            variables, arch, batch, proposals,
            given_mask_targets=list(zip(theirs["mask_rois"], theirs["mask_targets"], strict=True)),
            ours=ours,
        )  # fmt: skip
        figures = loss_parity.compare_losses(ours, theirs, given)
        figures["mask_rois"] = sum(len(r) for r in theirs["mask_rois"])
        return figures, theirs

    rows, failed = run_cases(scenes(seed), arrays, "Mask R-CNN", compare)
    nuclei_rows, nuclei_failed = nuclei_case(arrays, "Mask R-CNN", compare)
    return rows + nuclei_rows, failed + nuclei_failed, arrays


def record(results: dict, args) -> None:
    """One RESULTS.md section: a row per model and scene with every term's and every head
    gradient's relative error."""
    import common

    names = {"mask_rcnn": "Mask R-CNN", "fcos": "FCOS", "keypoint_rcnn": "Keypoint R-CNN"}
    rows = []
    for model, model_rows in results.items():
        for r in model_rows:
            rows.append(
                [
                    names[model],
                    r["scene"],
                    ", ".join(f"{t} {e:.1e}" for t, e in r["terms"].items()),
                    ", ".join(f"{h} {e:.1e}" for h, e in r["grads"].items()),
                    f"{r['proposals']['max_px']:.1e}" if "proposals" in r else "-",
                    "pass" if not r["failures"] else "; ".join(r["failures"]),
                ]
            )
    table = common.markdown_table(
        rows,
        [
            "model",
            "scene",
            "loss terms: relative error",
            "head gradients: relative error",
            "proposals max px",
            "verdict",
        ],
    )
    common.append_results(
        "torchvision loss parity (issue 29): `.venv-peer/bin/python "
        "experiments/parity/torchvision_losses.py --record` (in `make parity`)",
        common.machine_line({"torch": torch.__version__, "torchvision": torchvision.__version__})
        + f"; the tiny seeded models of the output fixtures (seed {args.seed}), 128 x 160 "
        f"synthetic scenes and (Mask R-CNN, FCOS) a nuclei crop ({NUCLEI.image_id[:8]}, "
        f"{NUCLEI.crop} resized to 128 x 160), {args.proposals} training proposals",
        table,
        "Relative error |ours - torchvision| / |torchvision| of each loss term, and norm of the "
        "difference over torchvision's norm for the gradient of the total loss with respect to "
        f"each head's parameters (tolerance {loss_parity.LOSS_TOLERANCE:.0e} for both); every "
        "candidate sampled on both sides (torchvision's samplers patched to a budget beyond "
        "every candidate, positive fraction 1). " + loss_parity.MASK_TARGET_NOTE,
    )


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proposals", type=int, default=100)
    parser.add_argument(
        "--make-fixtures",
        type=Path,
        help="write the CI tests' data into this folder (torchvision_losses_tiny.npz, "
        "torchvision_fcos_losses_tiny.npz)",
    )
    parser.add_argument("--models", default="mask_rcnn,fcos,keypoint_rcnn", help="comma-separated")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args(argv)
    runs = {
        "mask_rcnn": (lambda: run(args.seed, args.proposals), "torchvision_losses_tiny.npz"),
        "fcos": (lambda: run_fcos(args.seed), "torchvision_fcos_losses_tiny.npz"),
        "keypoint_rcnn": (
            lambda: run_keypoint(args.seed, args.proposals),
            "torchvision_keypoint_losses_tiny.npz",
        ),
    }
    failed, results = [], {}
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        rows, model_failed, arrays = runs[name][0]()
        results[name] = rows
        failed += model_failed
        if args.make_fixtures:
            path = args.make_fixtures / runs[name][1]
            np.savez_compressed(path, **arrays)
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    if args.record:
        record(results, args)
    if failed:
        print("LOSS PARITY FAILED:\n  " + "\n  ".join(failed))
        return 1
    count = len(scenes(args.seed))
    print(f"loss parity holds for {', '.join(results)} on {count} scenes each and their batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
