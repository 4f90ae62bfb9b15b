"""Predictions -> COCO results -> COCOeval (bbox, then segm, then keypoints).

    instseg-jax eval --results preds.json --annotations gt.json [--max-dets 300]
    instseg-jax eval --workdir DIR [--checkpoint STEP] [--max-dets 300]
        [--evaluator pycocotools]

Metrics, RLE and areas are pycocotools', never re-implemented: this module runs a model over a
split (instseg_jax.detections turns its Detections into COCO results at the original pixels)
and calls COCOeval. Any source evaluates: a COCO split through its annotation file, the
synthetic scenes through their exact masks, turned into a COCO ground truth in memory.

COCOeval is hotcoco's by default (EVALUATORS; eval.evaluator, --evaluator): a Rust port whose
precision, recall and 12 stats are pycocotools' bit for bit (tests/test_fast_eval.py), over
100x faster on a COCO-val-sized set (experiments/benchmarks/coco_eval_speed.py); pycocotools'
own COCOeval is kept as "pycocotools". The ground truth stays a pycocotools COCO either way.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg_jax import builders, detections, inference, structures
from instseg_jax import workdir as workdir_lib
from instseg_jax.config import COCO_EVALUATORS, UserError
from instseg_jax.input.coco import mask_annotation

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


KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


# COCOeval implementations: the first is the default (config eval.evaluator, eval --evaluator).
EVALUATORS = COCO_EVALUATORS


def check_evaluator(name: str, where: str = "eval.evaluator") -> str:
    if name not in EVALUATORS:
        raise UserError(
            f"{where} {name!r}: choose one of {', '.join(EVALUATORS)} (hotcoco, the default, "
            "gives pycocotools' stats bit for bit, faster)"
        )
    return name


def coco_evaluate(
    annotations: str | Path | COCO,
    results: list[dict] | str | Path,
    iou_types=None,
    print_tables: bool = True,
    max_detections: int = 100,
    keypoint_sigmas=None,
    evaluator: str = EVALUATORS[0],
    class_agnostic: bool = False,
) -> dict[str, list[float]]:
    """pycocotools' 12 stats per IoU type, bbox then segm, with maxDets (1, 10, 100), and its
    10 keypoint stats (OKS, maxDets 20 as COCO's keypoint tables) for "keypoints".

    iou_types default from the results: bbox only when they carry no segmentation, keypoints
    when they all carry keypoints. max_detections D above 100 adds a fourth maxDets to bbox
    and segm: the 12 stats stay COCO's (at 100) and three more follow, AP, AP50 and AR at D
    (pycocotools' own precision and recall arrays). keypoint_sigmas: the OKS sigma of each
    keypoint (input/keypoints.py); None keeps pycocotools' 17 COCO person sigmas.
    evaluator: whose COCOeval computes them (EVALUATORS); the numbers are the same.
    class_agnostic: useCats 0 (any detection matches any ground truth; no per-category table).
    """
    check_evaluator(evaluator, "evaluator")
    if max_detections < 100:
        raise UserError(
            f"maxDets {max_detections}: COCO's tables are at maxDets 100; give 100 or more "
            "(eval.max_detections or --max-dets)"
        )
    gt = annotations if isinstance(annotations, COCO) else _load_coco(annotations)
    results_file = None  # results read from a file: errors in them are the user's
    if isinstance(results, str | Path):
        results_file = results
        try:
            results = json.loads(Path(results_file).read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{results_file}: not a JSON list of COCO results ({error})") from error
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise UserError(
                f"{results_file}: expected a JSON list of COCO results (objects with image_id, "
                f"category_id, score and bbox or segmentation), got a {type(results).__name__}"
            )
    if iou_types is None:
        has_masks = bool(results) and all("segmentation" in r for r in results)
        iou_types = ("bbox", "segm") if has_masks else ("bbox",)
        if results and all("keypoints" in r for r in results):
            iou_types += ("keypoints",)
    _check_result_images(results, gt, results_file, evaluator)
    extra = max_detections > 100
    fast_gt = fast_detections = None
    if evaluator == "hotcoco":
        import hotcoco

        fast_gt = hotcoco.COCO(gt.dataset)  # copied into hotcoco's own structures
    stats = {}
    for iou_type in iou_types:
        keypoints = iou_type == "keypoints"
        # loadRes cannot take an empty list: no detections are scored as an empty result set,
        # for pycocotools' own values (0 where there is ground truth, -1 where there is none).
        if evaluator == "hotcoco":
            if fast_detections is None and not results:
                fast_detections = hotcoco.COCO(_no_detections(gt).dataset)
            elif fast_detections is None:  # hotcoco's load_res copies: one serves all IoU types
                fast_detections = _read_results(
                    lambda: fast_gt.load_res([dict(r) for r in results]), results_file, evaluator
                )
            run = hotcoco.COCOeval(fast_gt, fast_detections, iou_type)
            # pycocotools' images (gt.imgs: a subset when the caller narrowed it) and categories
            run.params.imgIds = sorted(gt.getImgIds())
            run.params.catIds = sorted(gt.getCatIds())
        else:
            if results:
                detections_coco = _read_results(
                    lambda: _quiet(gt.loadRes, [dict(r) for r in results]), results_file, evaluator
                )
            else:
                detections_coco = _no_detections(gt)
            run = COCOeval(gt, detections_coco, iou_type)
        if class_agnostic:
            run.params.useCats = 0
        if keypoints:
            if keypoint_sigmas is not None:
                run.params.kpt_oks_sigmas = np.asarray(keypoint_sigmas, np.float64)
        else:
            run.params.maxDets = [1, 10, 100, max_detections] if extra else [1, 10, 100]
        with _maybe_quiet(not print_tables), warnings.catch_warnings():
            # hotcoco warns that sigmas other than COCO's 17 are not COCO keypoint AP: they are
            # the dataset's own (input/keypoints.py), chosen on purpose.
            warnings.filterwarnings("ignore", "hotcoco: kpt_oks_sigmas", UserWarning)
            run.evaluate()
            run.accumulate()
            if print_tables:
                print(f"-- {iou_type} --")
            if extra and not keypoints and evaluator == "hotcoco":
                # hotcoco summarises at the last maxDets; pycocotools' 12 stats are at 100,
                # whose column of the accumulated arrays is the same for either list
                run.params.maxDets = [1, 10, 100]
            run.summarize()
            if extra and not keypoints:
                run.params.maxDets = [1, 10, 100, max_detections]
        if print_tables and not class_agnostic:
            print(per_category_table(run, gt, iou_type))
        values = [float(v) for v in run.stats]
        if extra and not keypoints:
            values += _at_max_detections(run)
            if print_tables:
                ap, ap50, ar = values[12:]
                print(
                    f" at maxDets={max_detections}: AP {ap:.3f}  AP50 {ap50:.3f}  AR {ar:.3f}"
                    " (the table above is COCO's maxDets=100)"
                )
        stats[iou_type] = values
    return stats


def _check_result_images(results: list[dict], gt: COCO, results_file, evaluator: str) -> None:
    """pycocotools' loadRes refuses results of images outside the ground truth (gt.imgs);
    hotcoco only warns and leaves them unmatched. Both refuse here, in the same words."""
    images = gt.imgs
    stranger = next((r.get("image_id") for r in results if r.get("image_id") not in images), None)
    if stranger is None:
        return
    if results_file is None:
        raise ValueError(f"results of image_id {stranger!r}, not an image of the ground truth")
    raise UserError(
        f"{results_file}: {evaluator} cannot read these results against the annotations (image_id "
        f"{stranger!r} is not one of their {len(images)} images); each needs an image_id of the "
        "annotation file, category_id, score, and bbox or segmentation"
    )


def _read_results(load, results_file, evaluator: str):
    """load() of the results; what it raises on a results file is the user's error."""
    try:
        return load()
    except (KeyError, AssertionError, TypeError, ValueError, IndexError) as error:
        if results_file is None:
            raise
        raise UserError(
            f"{results_file}: {evaluator} cannot read these results against the annotations "
            f"({type(error).__name__}: {error}); each needs an image_id of the annotation file, "
            "category_id, score, and bbox or segmentation"
        ) from error


def per_category_ap(evaluator: COCOeval) -> dict[int, float]:
    """AP (IoU 0.50:0.95, area "all", maxDets 100, or the keypoints' 20) of each category id
    from accumulate()'s precision array [T, R, K, A, M]; NaN for a category without ground
    truth (pycocotools' -1 everywhere)."""
    precision = evaluator.eval["precision"]  # pycocotools' or hotcoco's: the same arrays
    max_dets = list(evaluator.params.maxDets)
    column = max_dets.index(100) if 100 in max_dets else len(max_dets) - 1
    values = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        scored = precision[:, :, k, 0, column]
        scored = scored[scored > -1]
        values[int(category_id)] = float(scored.mean()) if scored.size else float("nan")
    return values


def per_category_table(evaluator: COCOeval, gt: COCO, iou_type: str, columns: int = 3) -> str:
    """detectron2's per-category AP table (in percent, three categories to a row; "-" for a
    category without ground truth)."""
    cells = [
        (str(gt.cats.get(i, {}).get("name", i)), "-" if np.isnan(ap) else f"{100 * ap:.1f}")
        for i, ap in per_category_ap(evaluator).items()
    ]
    if not cells:
        return ""
    name_width = max(8, *(len(n) for n, _ in cells))
    header = " | ".join(f"{'category':<{name_width}} | {'AP':>5}" for _ in range(columns))
    rows = [f"per-category {iou_type} AP:", header, "-" * len(header)]
    for start in range(0, len(cells), columns):
        rows.append(
            " | ".join(f"{n:<{name_width}} | {ap:>5}" for n, ap in cells[start : start + columns])
        )
    return "\n".join(rows)


def _at_max_detections(evaluator: COCOeval) -> list[float]:
    """AP, AP50 and AR over all areas at the last maxDets, from accumulate()'s arrays."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [T, R, K] area "all", last maxDets
    recall = evaluator.eval["recall"][:, :, 0, -1]  # [T, K]

    def mean(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else -1.0

    iou50 = int(np.argmin(np.abs(np.asarray(evaluator.params.iouThrs) - 0.5)))
    return [mean(precision), mean(precision[iou50]), mean(recall)]


def _no_detections(gt: COCO) -> COCO:
    """An empty result set over gt's images and categories."""
    empty = COCO()
    empty.dataset = {
        "images": list(gt.dataset.get("images", [])),
        "categories": list(gt.dataset.get("categories", [])),
        "annotations": [],
    }
    _quiet(empty.createIndex)
    return empty


def _load_coco(path) -> COCO:
    try:
        return _quiet(COCO, str(path))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as error:
        raise UserError(f"{path}: not a COCO annotation file ({error!r})") from error


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _maybe_quiet(quiet: bool):
    return contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()


def named(stats: list[float], max_detections: int = 100) -> dict[str, float]:
    if len(stats) == len(KEYPOINT_STAT_NAMES):
        return dict(zip(KEYPOINT_STAT_NAMES, stats, strict=True))
    names = STAT_NAMES
    if len(stats) == 15:
        names += tuple(f"{n}@{max_detections}" for n in ("AP", "AP50", "AR"))
    return dict(zip(names, stats, strict=True))


def main_results(
    results_file: str,
    annotations_file: str,
    max_detections: int = 100,
    evaluator: str = EVALUATORS[0],
) -> dict:
    for path, flag in ((results_file, "--results"), (annotations_file, "--annotations")):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: file not found")
    stats = coco_evaluate(
        annotations_file, results_file, max_detections=max_detections, evaluator=evaluator
    )
    return {k: named(v, max_detections) for k, v in stats.items()}


def ground_truth(source, image_ids=None) -> COCO:
    """pycocotools' COCO of an evaluation source: its annotation file when it has one, else its
    masks RLE-encoded in memory: a source's own `instance_ground_truth(index)` (COCO panoptic:
    from the PNGs, no image decoded) or its decoded examples (synthetic scenes: exact masks).
    image_ids: only these images (sources that list theirs). Images whose annotations cannot
    be read are left out, counted in a warning."""
    annotation_file = getattr(source, "annotation_file", None)
    if annotation_file is not None:
        gt = _load_coco(annotation_file)
        selected = getattr(source, "selected_image_ids", None)
        if selected is not None:  # input.eval_fraction's part of the file: COCOeval scores
            gt.imgs = {i: gt.imgs[i] for i in selected}  # the images of gt.imgs only
        return gt
    from instseg_jax.input.images import UnusableExample

    indices = range(len(source))
    if image_ids is not None and hasattr(source, "image_ids"):
        wanted = set(image_ids)
        indices = [k for k, i in enumerate(source.image_ids()) if i in wanted]
    read = getattr(source, "instance_ground_truth", None) or source.load
    images, annotations, unreadable = [], [], []
    for index in indices:
        try:
            example = read(index)
        except UnusableExample as error:
            unreadable.append(str(error))
            continue
        if "image" in example:
            height, width = example["image"].shape[:2]
        else:
            height, width = example["height"], example["width"]
        image_id = int(example["image_id"])
        images.append({"id": image_id, "height": height, "width": width})
        category_ids = source.category_id(example["classes"])
        points = example.get("keypoints")
        for i, (mask, category, crowd) in enumerate(
            zip(example["masks"], category_ids, example["iscrowd"], strict=True)
        ):
            annotations.append(
                mask_annotation(
                    mask,
                    len(annotations) + 1,
                    image_id,
                    category,
                    crowd,
                    keypoints=None if points is None else points[i],
                )
            )
    if unreadable:
        log.warning(
            "%d evaluation image(s) left out of the ground truth, their annotations unreadable: %s",
            len(unreadable),
            "; ".join(unreadable[:3]),
        )
    ids, names = builders.source_class_map(source)
    categories = [{"id": i, "name": n} for i, n in zip(ids, names, strict=True)]
    keypoint_names = getattr(source, "keypoint_names", None)
    if keypoint_names:
        for category in categories:
            category["keypoints"] = list(keypoint_names)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
    _quiet(gt.createIndex)
    return gt


# (iou type, stat, colour) of each AP-versus-step series; PQ is drawn as PQ / 100.
AP_SERIES = (
    ("bbox", "AP", "#0a5ac8"),
    ("bbox", "AP50", "#78aae6"),
    ("segm", "AP", "#c82828"),
    ("segm", "AP50", "#f09696"),
    ("keypoints", "AP", "#1e963c"),
    ("keypoints", "AP50", "#8cd296"),
    ("panoptic", "PQ", "#963caa"),
)


def plot_ap(workdir: str | Path) -> Path:
    """workdir/ap_vs_step.png: bbox, segm and keypoint AP and AP50 (and PQ / 100) of every
    eval_<step>.json against the training step, titled with the run's name (the workdir's);
    matplotlib on its Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    workdir = Path(workdir)
    reports = sorted(
        (json.loads(p.read_text()) for p in workdir.glob("eval_*.json")), key=lambda r: r["step"]
    )
    figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    top = 0.0
    for iou_type, stat, colour in AP_SERIES:
        points = [(r["step"], r[iou_type][stat]) for r in reports if iou_type in r]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        scale = 0.01 if iou_type == "panoptic" else 1.0  # PQ is in percent, as panopticapi's
        values = [scale * v for v in values]
        label = "PQ / 100" if iou_type == "panoptic" else f"{iou_type} {stat}"
        axes.plot(steps, values, marker="o", markersize=3, color=colour, label=label)
        top = max(top, *values)
    title = f"{workdir.resolve().name}: evaluation AP versus training step"
    axes.set_title(title)
    axes.set_xlabel("training step")
    axes.set_ylabel("AP (IoU 0.50:0.95; AP50 at 0.50)")
    axes.set_ylim(0.0, min(1.0, max(0.05, 1.1 * top)))
    axes.set_xlim(left=0)
    axes.grid(True, alpha=0.3)
    if axes.lines:
        axes.legend(loc="lower right", fontsize="small")
    path = workdir / "ap_vs_step.png"
    figure.savefig(path, metadata={"Title": title})
    return path


def evaluate_model(
    config,
    variables,
    workdir: str | Path | None = None,
    step: int = 0,
    print_tables: bool = True,
    max_batches: int | None = None,
    class_map=None,
    report_name: str | None = None,
) -> dict:
    """Run the model over the eval split at the test size, evaluate bbox (and segm when the
    method makes masks) with COCOeval, write workdir/eval_<step>.json (or report_name); returns
    {iou_type: {stat: value}, "timing": {...}}. class_map: (category ids, names) of the
    model's classes (default: the workdir's, else the config's or the eval data's)."""
    source = builders.build_source(config.input, train=False, seed=config.seed)
    if class_map is None:
        class_map = (
            workdir_lib.read_class_map(workdir, config)
            if workdir is not None
            else builders.class_map(config, source)
        )
    category_ids = class_map[0]
    model_cfg = builders.model_config(config, len(category_ids))
    paste = builders.mask_paste(model_cfg)
    max_detections = int(config.eval.get("max_detections", 100))
    results, has_masks, has_keypoints = [], False, False
    panoptic_evaluation = None  # Panoptic FPN: its panoptic maps scored batch by batch
    seconds = {"input_s": 0.0, "device_s": 0.0, "paste_rle_s": 0.0}
    for batch, found, (input_s, device_s) in inference.run_inference(
        config, variables, source, len(category_ids), max_batches
    ):
        slots = found["valid"].shape[1]
        if not results and max_detections > slots:
            log.warning(
                "maxDets %d is above the model's %d detection slots: AP at %d equals AP at %d",
                max_detections, slots, max_detections, slots,
            )  # fmt: skip
        seconds["input_s"] += input_s
        seconds["device_s"] += device_s
        if "semantic_classes" in found and panoptic_evaluation is None:
            panoptic_evaluation = PanopticEvaluation(source, category_ids, model_cfg)
        for b, image_id, geometry in detections.batch_examples(batch):
            start = time.perf_counter()
            instances = detections.image_instances(found, b, geometry, paste)
            results += detections.image_results(instances, image_id, geometry.orig_hw, category_ids)
            seconds["paste_rle_s"] += time.perf_counter() - start
            if panoptic_evaluation is not None:  # the same pasted instances, not a second paste
                start = time.perf_counter()
                panoptic_evaluation.add_image(
                    image_id, instances, found["semantic_classes"][b], geometry
                )
                seconds["panoptic_s"] = seconds.get("panoptic_s", 0.0) + time.perf_counter() - start
        has_masks = structures.mask_payload(found) is not None
        has_keypoints = "keypoint_heatmaps" in found
    start = time.perf_counter()
    seen = None
    if max_batches is not None:  # evaluate only the images that were run
        seen = sorted({r["image_id"] for r in results})
    gt = ground_truth(source, seen)
    seconds["ground_truth_s"] = time.perf_counter() - start
    if seen is not None:
        gt.imgs = {i: gt.imgs[i] for i in seen if i in gt.imgs}
    iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    sigmas = None
    if has_keypoints:
        from instseg_jax.input.keypoints import keypoint_set

        iou_types += ("keypoints",)
        sigmas = keypoint_set(config.input.get("keypoints", "coco_person")).sigmas
    if not results:  # said, or all-zero tables look like a broken evaluation
        threshold = config.model.get("score_threshold")
        log.warning(
            "no detections%s on %d images: the tables are pycocotools' for no detections (0, "
            "-1 where the ground truth has no object of a size)",
            "" if threshold is None else f" above model.score_threshold={threshold}",
            len(gt.imgs),
        )
    start = time.perf_counter()
    evaluator = check_evaluator(config.eval.get("evaluator", EVALUATORS[0]))
    stats = coco_evaluate(
        gt,
        results,
        iou_types,
        print_tables,
        max_detections,
        sigmas,
        evaluator,
        bool(config.eval.get("class_agnostic", False)),
    )
    seconds["cocoeval_s"] = time.perf_counter() - start
    report = {k: named(v, max_detections) for k, v in stats.items()}
    if panoptic_evaluation is not None:
        report["panoptic"] = panoptic_evaluation.finish(max_batches is not None, print_tables)
    report["timing"] = {k: round(v, 3) for k, v in seconds.items()}
    if print_tables:
        print("time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in seconds.items()))
    if workdir is not None:
        path = Path(workdir) / (report_name or f"eval_{step}.json")
        path.write_text(json.dumps({"step": step, **report}, indent=2) + "\n")
        if print_tables:  # under the tables: where all of it went (and the timings)
            print(f"wrote {path}")
        else:
            log.info("wrote %s", path)
    return report


class PanopticEvaluation:
    """Panoptic quality of a model's panoptic maps against a panoptic source, image by image
    as batches arrive (no map is kept): PQ, SQ, RQ over all categories, things and stuff.

    Source images without a prediction (skipped as unusable by the pipeline) count with an
    empty prediction, so their segments are false negatives, unless `finish` is told the run
    covered a subset (max_batches); their number is reported."""

    def __init__(self, source, category_ids, cfg):
        from instseg_jax import panoptic

        self.source, self.category_ids, self.cfg = source, list(category_ids), cfg
        self.stuff_ids = _stuff_ids(source, cfg)
        categories = {int(c): True for c in self.category_ids}
        categories.update({int(c): False for c in self.stuff_ids})
        self.quality = panoptic.PanopticQuality(categories)
        self.index_of = {int(i): k for k, i in enumerate(source.image_ids())}
        self.seen: set[int] = set()

    def add_image(self, image_id: int, instances, semantic_classes, geometry) -> None:
        """Combine one image's instances (detections.image_instances, any score: those below
        cfg.combine_score are left out here) with its semantic classes and score the map."""
        from instseg_jax import panoptic

        kept = [i for i in instances if i["score"] >= self.cfg.combine_score]
        predicted = panoptic.predicted_map(
            kept, semantic_classes, geometry, self.category_ids, self.stuff_ids, self.cfg
        )
        _, gt, gt_segments = self.source.panoptic_ground_truth(self.index_of[int(image_id)])
        self.quality.add(gt, gt_segments, *predicted)
        self.seen.add(int(image_id))

    def finish(self, subset: bool = False, print_table: bool = True) -> dict:
        """eval_<step>.json's "panoptic" entry (panoptic.report_of), with the number of images
        scored and of those without a prediction (counted as empty unless subset)."""
        from instseg_jax import panoptic
        from instseg_jax.input.images import DataError

        missing = [i for i in self.index_of if i not in self.seen]
        unreadable = 0
        if not subset:
            for image_id in missing:
                try:
                    _, gt, segments = self.source.panoptic_ground_truth(self.index_of[image_id])
                except DataError:  # no ground truth to miss either; counted below
                    unreadable += 1
                    continue
                self.quality.add(gt, segments, np.zeros_like(gt), [])
        report = panoptic.report_of(self.quality.summary())
        report["images"] = len(self.seen) + (0 if subset else len(missing) - unreadable)
        report["images_without_prediction"] = 0 if subset else len(missing)
        report["images_without_ground_truth"] = unreadable
        if missing and not subset:
            log.warning(
                "%d evaluation image(s) had no prediction (skipped as unusable): their "
                "segments count as missed in PQ",
                len(missing),
            )
        if print_table:
            print("-- panoptic --")
            print(f"{'':8}{'PQ':>8}{'SQ':>8}{'RQ':>8}{'N':>6}")
            for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
                values = "".join(f"{report[s + suffix]:8.1f}" for s in ("PQ", "SQ", "RQ"))
                print(f"{name:8}{values}{report['n' + suffix]:6d}")
        return report


def _stuff_ids(source, cfg) -> list[int]:
    ids = list(getattr(source, "stuff_category_ids", ()))
    if not ids:
        raise UserError(
            f"{type(source).__name__}: the model predicts stuff classes but the evaluation data "
            "has none; evaluate Panoptic FPN on panoptic data (input.source 'coco_panoptic', "
            "or synthetic scenes with input.synthetic_stuff)"
        )
    if len(ids) != cfg.num_stuff_classes:
        raise UserError(
            f"the evaluation data has {len(ids)} stuff categories but the model predicts "
            f"model.num_stuff_classes = {cfg.num_stuff_classes}; evaluate on the panoptic data "
            "the model was trained for"
        )
    return ids


def evaluation_data(config) -> str:
    """Where a config's evaluation ground truth comes from, in words."""
    kind = config.input.get("eval_source") or config.input.source
    fraction = float(config.input.get("eval_fraction", 0.0) or 0.0)
    if kind == "coco" and fraction:
        split = config.input.train_split
        return (
            f"the {fraction:.0%} of {split.annotations} held out by input.eval_fraction (seed "
            f"{config.seed}; images in {split.images})"
        )
    if kind == "coco":
        split = config.input.eval_split
        return f"{split.annotations} (images in {split.images})"
    return f"{kind} scenes generated in memory"


def main(args) -> int:
    max_detections = args.max_dets
    if max_detections is not None and max_detections < 100:
        raise UserError(f"--max-dets {max_detections}: give 100 (COCO's) or more")
    overrides = list(getattr(args, "overrides", ()) or ())
    if args.results:
        if not args.annotations:
            raise UserError("--results needs --annotations (the ground-truth COCO JSON)")
        if overrides:
            raise UserError(
                f"{overrides[0]}: --config. overrides change a workdir's config; --results "
                "has none (give --workdir DIR to evaluate a model)"
            )
        print(f"evaluating {args.results} against {args.annotations}", flush=True)
        evaluator = check_evaluator(
            getattr(args, "evaluator", None) or EVALUATORS[0], "--evaluator"
        )
        report = main_results(args.results, args.annotations, max_detections or 100, evaluator)
        out = getattr(args, "out", None)
        if out:
            Path(out).write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {out}")
    else:
        if not args.workdir:
            raise UserError(
                "give --workdir DIR [--checkpoint STEP], or --results and --annotations"
            )
        raw_weights = bool(getattr(args, "raw_weights", False))
        config, variables, step = workdir_lib.restore_variables(
            args.workdir, args.checkpoint, overrides, raw_weights=raw_weights
        )
        print(
            f"evaluating {Path(args.workdir) / 'checkpoints' / str(step)} on "
            f"{evaluation_data(config)}",
            flush=True,
        )
        if max_detections is not None:
            with config.unlocked() if config.is_locked else contextlib.nullcontext():
                config.eval.max_detections = max_detections
        if getattr(args, "evaluator", None):  # else the config's eval.evaluator, else hotcoco
            with config.unlocked() if config.is_locked else contextlib.nullcontext():
                config.eval.evaluator = check_evaluator(args.evaluator, "--evaluator")
        # Raw weights of an EMA run get their own report: eval_<step>.json stays the EMA's.
        name = f"eval_{step}_raw.json" if raw_weights else None
        evaluate_model(config, variables, args.workdir, step, report_name=name)  # prints tables
    return 0
