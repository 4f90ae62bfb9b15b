"""Predictions -> COCO results -> pycocotools COCOeval (bbox, then segm).

    instseg-jax eval --results preds.json --annotations gt.json
    instseg-jax eval --workdir DIR [--checkpoint STEP]

Metrics, RLE and areas are pycocotools', never re-implemented: this module only turns
detections into COCO results (boxes as xywh in original pixels, masks pasted at the original
resolution and RLE-encoded) and calls COCOeval.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
from pathlib import Path

import jax
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg_jax import ops

log = logging.getLogger(__name__)

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


@jax.jit
def _paste_one(masks, boxes, hw_dummy):
    return ops.paste_masks(masks, boxes, hw_dummy.shape)


def paste(masks: np.ndarray, boxes: np.ndarray, image_hw, method: str = "detectron2") -> np.ndarray:
    """bool[K, H, W] of RoI mask probabilities [K, M, M] in boxes [K, 4] (original pixels),
    thresholded at 0.5; method "torchvision" pastes as torchvision's paste_masks_in_image."""
    if method == "torchvision":
        from instseg_jax.weights import torchvision as tv

        return tv.paste_masks(masks, boxes, image_hw) > 0.5
    dummy = np.zeros(tuple(int(v) for v in image_hw), np.bool_)
    return np.asarray(_paste_one(masks, boxes, dummy))


def paste_and_encode(masks: np.ndarray, boxes: np.ndarray, image_hw, method="detectron2"):
    """(bool[K, H, W] pasted masks, their K compressed RLEs with str counts)."""
    pasted = paste(masks, boxes, image_hw, method)
    rles = mask_utils.encode(np.asfortranarray(pasted.transpose(1, 2, 0).astype(np.uint8)))
    return pasted, [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def detections_to_results(
    detections: dict, image_ids, orig_hw, category_ids, paste_method: str = "detectron2"
) -> list[dict]:
    """COCO results of one batch of detections (host arrays); padding never reaches them.

    detections: boxes [B, K, 4] original pixels, scores [B, K], classes [B, K], valid [B, K],
    optional masks [B, K, M, M]. image_ids [B] (-1 or example_valid False: skipped).
    """
    results = []
    for b, image_id in enumerate(np.asarray(image_ids)):
        if image_id < 0:
            continue
        keep = np.flatnonzero(np.asarray(detections["valid"][b]))
        if keep.size == 0:
            continue
        boxes = np.asarray(detections["boxes"][b])[keep]
        scores = np.asarray(detections["scores"][b])[keep]
        classes = np.asarray(detections["classes"][b])[keep]
        rles = None
        if "masks" in detections:
            _, rles = paste_and_encode(
                np.asarray(detections["masks"][b])[keep], boxes, orig_hw[b], paste_method
            )
        for i in range(len(keep)):
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            result = {
                "image_id": int(image_id),
                "category_id": int(category_ids[classes[i]]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(scores[i]),
            }
            if rles is not None:
                result["segmentation"] = rles[i]
            results.append(result)
    return results


def coco_evaluate(
    annotations: str | Path | COCO,
    results: list[dict] | str | Path,
    iou_types=None,
    print_tables: bool = True,
) -> dict[str, list[float]]:
    """pycocotools' 12 stats per IoU type; bbox then segm. iou_types default from the results:
    bbox only when they carry no segmentation."""
    gt = annotations if isinstance(annotations, COCO) else _quiet(COCO, str(annotations))
    if isinstance(results, str | Path):
        results = json.loads(Path(results).read_text())
    if iou_types is None:
        has_masks = bool(results) and all("segmentation" in r for r in results)
        iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    stats = {}
    for iou_type in iou_types:
        if not results:
            stats[iou_type] = [0.0] * 12
            continue
        detections = _quiet(gt.loadRes, [dict(r) for r in results])
        evaluator = COCOeval(gt, detections, iou_type)
        with _maybe_quiet(not print_tables):
            evaluator.evaluate()
            evaluator.accumulate()
            if print_tables:
                print(f"-- {iou_type} --")
            evaluator.summarize()
        stats[iou_type] = [float(v) for v in evaluator.stats]
    return stats


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _maybe_quiet(quiet: bool):
    return contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()


def named(stats: list[float]) -> dict[str, float]:
    return dict(zip(STAT_NAMES, stats, strict=True))


def main_results(results_file: str, annotations_file: str) -> dict:
    stats = coco_evaluate(annotations_file, results_file)
    return {k: named(v) for k, v in stats.items()}


@functools.lru_cache(maxsize=4)
def inference_fn(cfg):
    """The jitted detections function of a model config (compiled once per config)."""
    from instseg_jax.methods import mask_rcnn

    model = mask_rcnn.MaskRCNN(cfg)
    return jax.jit(lambda v, b: model.apply(v, b, train=False)["detections"])


def plot_ap(workdir: str | Path) -> Path:
    """AP-versus-step PNG of every eval_<step>.json in a workdir (bbox and segm AP, AP50)."""
    from PIL import Image, ImageDraw

    workdir = Path(workdir)
    reports = sorted(
        (json.loads(p.read_text()) for p in workdir.glob("eval_*.json")), key=lambda r: r["step"]
    )
    width, height, margin = 640, 400, 48
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.rectangle([margin, margin // 2, width - margin // 2, height - margin], outline="black")
    steps = [r["step"] for r in reports] or [0]
    top_step = max(max(steps), 1)

    def point(step, value):
        x = margin + (width - 1.5 * margin) * step / top_step
        y = (height - margin) - (height - 1.5 * margin) * value
        return x, y

    for value in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = point(0, value)
        draw.text((4, y - 6), f"{value:.2f}", fill="black")
    draw.text((width // 2 - 20, height - margin + 8), f"step (max {top_step})", fill="black")
    series = [
        ("bbox", "AP", (0, 90, 200)),
        ("bbox", "AP50", (120, 170, 230)),
        ("segm", "AP", (200, 40, 40)),
        ("segm", "AP50", (240, 150, 150)),
    ]
    for row, (iou_type, stat, colour) in enumerate(series):
        points = [point(r["step"], r[iou_type][stat]) for r in reports if iou_type in r]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((margin + 8, margin // 2 + 4 + 12 * row), f"{iou_type} {stat}", fill=colour)
    path = workdir / "ap_vs_step.png"
    picture.save(path)
    return path


def evaluate_model(
    config,
    variables,
    workdir: str | Path | None = None,
    step: int = 0,
    print_tables: bool = True,
    max_batches: int | None = None,
) -> dict:
    """Run the model over the eval split (last batch padded and ignored), evaluate bbox and segm
    with COCOeval, write workdir/eval_<step>.json; returns {iou_type: {stat: value}}."""
    from tqdm import tqdm

    from instseg_jax import train as train_lib
    from instseg_jax.input.pipeline import InputPipeline

    source = train_lib.build_source(config.input, train=False)
    tconfig = train_lib.transform_config(config, train=False)
    pipeline = InputPipeline(
        source,
        tconfig,
        config.eval.global_batch,
        seed=config.seed,
        num_workers=0,
        process_index=0,
        process_count=1,
    )
    category_ids, _ = train_lib.class_map(config, source)
    cfg = train_lib.model_config(config, len(category_ids))
    infer = inference_fn(cfg)
    results = []
    total = pipeline.num_batches if max_batches is None else min(max_batches, pipeline.num_batches)
    for index, batch in enumerate(tqdm(pipeline, total=total, desc="eval", unit="batch")):
        if index >= total:
            break
        detections = jax.device_get(infer(variables, train_lib.device_fields(batch)))
        ids = np.where(batch["example_valid"], batch["image_id"], -1)
        results += detections_to_results(
            detections, ids, batch["orig_hw"], category_ids, cfg.mask_paste
        )
    annotations = getattr(source, "annotation_file", None)
    if annotations is None:
        raise ValueError("evaluation needs a COCO source with an annotation file")
    gt = _quiet(COCO, str(annotations))
    if max_batches is not None:  # evaluate only the images that were run
        seen = sorted({r["image_id"] for r in results})
        gt.imgs = {i: gt.imgs[i] for i in seen}
    stats = coco_evaluate(gt, results, ("bbox", "segm") if cfg.mask_on else ("bbox",), print_tables)
    report = {k: named(v) for k, v in stats.items()}
    if workdir is not None:
        path = Path(workdir) / f"eval_{step}.json"
        path.write_text(json.dumps({"step": step, **report}, indent=2) + "\n")
        log.info("wrote %s", path)
    return report


def restore_variables(workdir: str | Path, step: int | None = None):
    """(config, variables, step) of a training workdir's checkpoint (latest by default)."""
    import ml_collections
    import orbax.checkpoint as ocp

    from instseg_jax.checkpoint import Checkpointer

    workdir = Path(workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    checkpointer = Checkpointer(workdir, 1, 10, use_async=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    restored = checkpointer.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
    )
    checkpointer.close()
    state = restored["state"]
    return config, {"params": state["params"], "frozen": state.get("frozen", {})}, step


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.results:
        if not args.annotations:
            raise SystemExit("--results needs --annotations (the ground-truth COCO JSON)")
        report = main_results(args.results, args.annotations)
    else:
        if not args.workdir:
            raise SystemExit(
                "give --workdir DIR [--checkpoint STEP], or --results and --annotations"
            )
        config, variables, step = restore_variables(args.workdir, args.checkpoint)
        report = evaluate_model(config, variables, args.workdir, step)
    print(json.dumps(report, indent=2))
    return 0
