"""COCOeval time of pycocotools against the fast evaluators on a synthetic COCO-val-sized set.

    .venv/bin/python experiments/benchmarks/coco_eval_speed.py [--images 5000] [--detections 100]
        [--rounds 3] [--pycocotools-rounds 1] [--no-write]

The set: `--images` images of 640 x 480 or 480 x 640 with 80 categories, about 7 objects each
(COCO val2017 has 7.3) drawn as random star-shaped polygons over COCO's small, medium and large
sizes, 1 in 100 a crowd region (an uncompressed-then-compressed RLE, as COCO stores crowds), and
`--detections` detections per image: jittered copies of the objects (some with the wrong class)
and random false positives, masks as compressed RLE strings (what `instseg-jax eval` writes);
every 50th image has no detection. Timed per evaluator and IoU type (bbox, segm):
- eval: COCOeval evaluate() + accumulate() + summarize(), the figure the issue asks for;
- load: building the evaluator's ground truth from the in-memory dataset and loadRes() of the
  results, which instseg_jax.evaluate.coco_evaluate also pays once per IoU type.
Medians of `--rounds` runs (pycocotools: `--pycocotools-rounds`, its segm run takes minutes),
each evaluator's 12 stats checked equal to pycocotools'. faster-coco-eval and
ultrafast-pycocotools are timed when importable (not dependencies: `pip install --no-deps
--target DIR` and PYTHONPATH=DIR put them beside the venv for the comparison). Prints one table and the load average and appends
it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, machine_line, markdown_table

CATEGORIES = 80


def star_polygon(rng, cx, cy, radius, vertices):
    """A closed star-shaped polygon around (cx, cy): vertices at sorted angles, radii jittered."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    radii = radius * rng.uniform(0.6, 1.0, vertices)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).ravel()


def rle_of(polygon, height, width):
    """A polygon rasterised by pycocotools as a compressed RLE with string counts (JSON form)."""
    (rle,) = mask_utils.frPyObjects([polygon.tolist()], height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def synthetic_val(images: int, detections: int, seed: int = 0):
    """(ground-truth dataset dict, results list) of the set described in the module docstring."""
    rng = np.random.default_rng(seed)
    dataset = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": f"class{i + 1}"} for i in range(CATEGORIES)],
    }
    results = []
    for image_id in range(1, images + 1):
        height, width = (480, 640) if image_id % 3 else (640, 480)
        dataset["images"].append({"id": image_id, "height": height, "width": width})
        objects = []
        for _ in range(max(1, rng.poisson(7))):
            # radius log-uniform from 4 to 160 pixels: areas across COCO's three sizes
            radius = float(np.exp(rng.uniform(np.log(4), np.log(160))))
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            polygon = star_polygon(rng, cx, cy, radius, int(rng.integers(6, 16)))
            category = int(rng.integers(1, CATEGORIES + 1))
            crowd = rng.uniform() < 0.01
            rle = rle_of(polygon, height, width)
            segmentation = rle if crowd else [polygon.round(2).tolist()]
            dataset["annotations"].append(
                {
                    "id": len(dataset["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": segmentation,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": int(crowd),
                }
            )
            objects.append((cx, cy, radius, category))
        if image_id % 50 == 0:
            continue  # an image without detections
        for d in range(detections):
            if d < 2 * len(objects):  # two jittered copies of each object
                cx, cy, radius, category = objects[d % len(objects)]
                cx, cy = cx + rng.normal(0, 0.1 * radius), cy + rng.normal(0, 0.1 * radius)
                radius *= float(np.exp(rng.normal(0, 0.15)))
                if rng.uniform() < 0.1:
                    category = int(rng.integers(1, CATEGORIES + 1))
                score = float(rng.uniform(0.3, 1.0))
            else:  # false positives, mostly low-scored
                radius = float(np.exp(rng.uniform(np.log(4), np.log(120))))
                cx, cy = rng.uniform(0, width), rng.uniform(0, height)
                category = int(rng.integers(1, CATEGORIES + 1))
                score = float(rng.uniform(0.0, 0.6))
            rle = rle_of(star_polygon(rng, cx, cy, radius, 12), height, width)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [round(v, 2) for v in mask_utils.toBbox(rle).tolist()],
                    "score": round(score, 5),
                    "segmentation": rle,
                }
            )
    return dataset, results


def evaluators():
    """name -> (ground truth from a dataset dict, loadRes, COCOeval class) of each importable:
    pycocotools and hotcoco (dependencies), faster-coco-eval and ultrafast-pycocotools (if
    installed)."""
    from importlib.metadata import version

    import hotcoco
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def pycocotools_gt(dataset):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        return gt

    found = {
        "pycocotools": (pycocotools_gt, lambda gt, r: gt.loadRes(r), COCOeval),
        f"hotcoco {hotcoco.__version__}": (
            hotcoco.COCO,
            lambda gt, r: gt.load_res(r),
            hotcoco.COCOeval,
        ),
    }
    with contextlib.suppress(ImportError):
        import faster_coco_eval

        found[f"faster-coco-eval {faster_coco_eval.__version__}"] = (
            faster_coco_eval.COCO,
            lambda gt, r: gt.loadRes(r),
            faster_coco_eval.COCOeval_faster,
        )
    with contextlib.suppress(ImportError):
        import ultrafast_pycocotools as ultrafast

        found[f"ultrafast-pycocotools {version('ultrafast-pycocotools')}"] = (
            ultrafast.COCO,
            lambda gt, r: gt.loadRes(r),
            ultrafast.COCOeval,
        )
    return found


def copy_dataset(dataset):
    """A fresh copy of the parts evaluators write into (annotation and image dicts)."""
    return {
        "images": [dict(i) for i in dataset["images"]],
        "annotations": [dict(a) for a in dataset["annotations"]],
        "categories": [dict(c) for c in dataset["categories"]],
    }


def run_once(evaluator, dataset, results, iou_type):
    """(load seconds, eval seconds, stats) of one evaluation, its printing swallowed."""
    make_gt, load_results, cocoeval = evaluator
    dataset = copy_dataset(dataset)
    results = [dict(r) for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        gt = make_gt(dataset)
        dt = load_results(gt, results)
        loaded = time.perf_counter()
        run = cocoeval(gt, dt, iou_type)
        run.evaluate()
        run.accumulate()
        run.summarize()
        done = time.perf_counter()
    return loaded - start, done - loaded, np.asarray(run.stats, np.float64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each fast evaluator")
    parser.add_argument("--pycocotools-rounds", type=int, default=1)
    parser.add_argument("--iou-types", default="bbox,segm")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
    start = time.perf_counter()
    dataset, results = synthetic_val(args.images, args.detections)
    print(
        f"synthetic val: {args.images} images, {len(dataset['annotations'])} objects "
        f"({sum(a['iscrowd'] for a in dataset['annotations'])} crowd), {len(results)} detections; "
        f"made in {time.perf_counter() - start:.0f} s; load average {load_before[0]:.2f}",
        flush=True,
    )
    found = evaluators()
    rows, reference, seconds, loads = [], {}, {}, []
    for iou_type in args.iou_types.split(","):
        for name, evaluator in found.items():
            rounds = args.pycocotools_rounds if name == "pycocotools" else args.rounds
            runs = [run_once(evaluator, dataset, results, iou_type) for _ in range(rounds)]
            load_s = statistics.median(r[0] for r in runs)
            eval_s = statistics.median(r[1] for r in runs)
            stats = runs[0][2]
            if name == "pycocotools":
                reference[iou_type] = stats
                same = "reference"
            else:
                difference = float(np.abs(stats - reference[iou_type]).max())
                same = "identical" if difference == 0 else f"differ by up to {difference:.1e}"
            seconds[name, iou_type] = eval_s
            speedup = seconds["pycocotools", iou_type] / eval_s
            rows.append(
                [
                    iou_type,
                    name,
                    str(rounds),
                    f"{eval_s:.2f}",
                    f"{speedup:.1f}x",
                    f"{load_s:.2f}",
                    f"{stats[0]:.4f}",
                    same,
                ]
            )
            loads.append(f"{os.getloadavg()[0]:.1f}")
            print(
                f"{iou_type:5} {name:28} eval {eval_s:8.2f} s ({speedup:6.1f}x)  load {load_s:6.2f}"
                f" s  AP {stats[0]:.4f}  12 stats vs pycocotools: {same}  "
                f"(load average {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    load_after = os.getloadavg()
    columns = [
        "IoU type",
        "evaluator",
        "runs",
        "eval s (median)",
        "vs pycocotools",
        "load s",
        "AP",
        "12 stats",
    ]
    table = markdown_table(rows, columns)
    print(table)
    if not args.no_write:
        command = "experiments/benchmarks/coco_eval_speed.py"
        if (args.images, args.detections) != (5000, 100):
            command += f" --images {args.images} --detections {args.detections}"
        header = (
            f"{machine_line()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} "
            f"after (1-minute). {args.images} images, {len(dataset['annotations'])} objects, "
            f"{len(results)} detections. eval: evaluate + accumulate + summarize; load: the "
            "evaluator's ground truth from the dataset dict plus loadRes."
        )
        notes = (
            "The equality proof beyond these 12 numbers (precision and recall arrays, crowd regions, "
            "maxDets 200, images without detections, keypoints with their own sigmas, the nuclei "
            "val set, the CLI): `.venv/bin/pytest -q tests/test_fast_eval.py`. "
            f"Load average during the runs: {', '.join(loads)}."
        )
        append_results(f"COCO evaluation time: `.venv/bin/python {command}`", header, table, notes)


if __name__ == "__main__":
    main()
