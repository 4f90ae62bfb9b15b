"""Images/s of the nuclei training pipeline: 512x512 canvas, box-crop mask targets, 2 workers.

    make data && .venv/bin/python experiments/benchmarks/input.py [--workers 2] [--batches 60]

    .venv/bin/python experiments/benchmarks/input.py --recipe experiments/maskrcnn_r50_fpn_coco_1x.py
    .venv/bin/python experiments/benchmarks/input.py --recipe experiments/yolact_r50_coco.py \
        --workers 0 --compare-augment

A COCO recipe's training transform instead (what one loader worker of a pod host delivers):
COCO-like photos written here (640x480 JPEGs at quality 90, the synthetic scenes' 4-8
instances per image as RLE, COCO's own mean is 7.3), read by CocoSource and mapped through the
recipe's own transform settings (decode, multi-scale resize, flip, padding to the canvas, the
method's mask targets); workers 0 is one worker's rate (the loop runs in the main process).
--compare-augment also times the recipe with its SSD-style augmentation (YOLACT's expand,
min-IoU crop and photometric distortion, input/ssd_augment.py) off.

Target: >= 20 images/s on a 2-core CPU, so the loader never starves a CPU training step.
Prints one table and appends it to RESULTS.md.

    .venv/bin/python experiments/benchmarks/input.py --memory

Peak memory of one crowded example instead: a 1024x1024 COCO image with 1000 polygon
instances, read by CocoSource and turned into the COCO configs' targets (canvas 1344, short side
800, N=100, box crops 112x112; then also stride-4 full masks and mass centres), each in a fresh
process: peak traced allocations (tracemalloc: NumPy's arrays and Python objects) and growth of
the peak resident set (Linux's VmHWM, reset after the imports), which also sees what C libraries
allocate (PIL, pycocotools). Before and after a change, in one run:

    git archive <commit> instseg_jax | tar -x -C /tmp/before
    .venv/bin/python experiments/benchmarks/input.py --memory --before /tmp/before
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, machine_line, markdown_table

from instseg_jax.input.coco import CocoSource
from instseg_jax.input.pipeline import InputPipeline
from instseg_jax.input.transforms import TransformConfig

REPO = Path(__file__).resolve().parents[2]
NUCLEI = REPO / "data" / "nuclei"


def crowded_coco(folder: Path, count: int = 1000, side: int = 1024, seed: int = 0) -> Path:
    """A side x side PNG with `count` octagon instances of 8..128 px (COCO JSON, polygons)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(folder / "crowd.png")
    angles = np.linspace(0, 2 * np.pi, 9)[:-1]
    anns = []
    for i in range(count):
        w, h = rng.integers(8, 129, 2)
        x0, y0 = rng.integers(0, side - 128, 2)
        cx, cy = x0 + w / 2, y0 + h / 2
        polygon = np.stack([cx + w / 2 * np.cos(angles), cy + h / 2 * np.sin(angles)], 1)
        anns.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [float(x0), float(y0), float(w), float(h)],
                "segmentation": [polygon.ravel().round(2).tolist()],
            }
        )
    document = {
        "images": [{"id": 1, "file_name": "crowd.png", "height": side, "width": side}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = folder / "crowd.json"
    path.write_text(json.dumps(document))
    return path


# One example, loaded and transformed in a fresh process: its peak memory and time.
_MEMORY_CHILD = textwrap.dedent("""
    import json, sys, time, tracemalloc
    import numpy as np
    import instseg_jax
    from instseg_jax.input import report
    from instseg_jax.input.coco import CocoSource
    from instseg_jax.input.transforms import TransformConfig, transform

    annotations, settings, traced = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
    source = CocoSource(annotations, annotations.rsplit("/", 1)[0])
    config = TransformConfig(**settings)
    def status(field):  # bytes
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set (VmHWM) restarts from here: imports peak higher
    before = status("VmRSS")
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    counts = report.new_counts()
    out = transform(source.load(0, counts), config, np.random.default_rng(0), counts)
    seconds = time.perf_counter() - start
    traced_peak = tracemalloc.get_traced_memory()[1] if traced else 0
    peak = status("VmHWM")
    print(json.dumps({
        "package": instseg_jax.__file__, "seconds": seconds, "traced_peak": traced_peak,
        "rss_growth": peak - before, "instances": int(out["gt_valid"].sum()),
    }))
""")

MEMORY_TARGETS = {
    "box crops 112x112 (Mask R-CNN)": {},
    "box crops + stride-4 masks + centres": {"full_mask_stride": 4, "centers": True},
}


def measure_memory(
    count: int = 1000, side: int = 1024, before: str | None = None, write: bool = True
) -> None:
    """Peak memory of one `count`-instance side x side example (see the module docstring), for
    this tree's package and, given `before` (a folder holding an older instseg_jax/), that
    one's, in turn."""
    base = {
        "canvas_hw": [1344, 1344],
        "short_side": [800],
        "max_long_side": 1333,
        "max_instances": 100,
        "mask_size": 112,
    }
    trees = {"before": before} if before else {}
    trees["after" if before else "this tree"] = str(REPO)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        annotations = crowded_coco(Path(folder), count, side)
        for name, extra in MEMORY_TARGETS.items():
            settings = json.dumps({**base, **extra})
            for label, tree in trees.items():
                found = {}
                for traced in ("0", "1"):  # tracemalloc's bookkeeping stays out of the RSS run
                    result = subprocess.run(
                        [sys.executable, "-c", _MEMORY_CHILD, str(annotations), settings, traced],
                        capture_output=True,
                        text=True,
                        cwd=folder,  # not the repository: PYTHONPATH picks the package
                        env={**os.environ, "PYTHONPATH": tree},
                        check=True,
                    )
                    found[traced] = json.loads(result.stdout.splitlines()[-1])
                package = str(Path(found["0"]["package"]).parents[1])
                if package != str(Path(tree).resolve()):
                    raise SystemExit(f"measured {package}, not {tree}")
                rows.append(
                    [
                        name,
                        f"{label} ({package})",
                        f"{found['1']['traced_peak'] / 2**20:.1f}",
                        f"{found['0']['rss_growth'] / 2**20:.1f}",
                        f"{found['0']['seconds']:.2f}",
                    ]
                )
                print(rows[-1], flush=True)
    columns = ["targets", "code", "peak traced MiB", "peak RSS growth MiB", "load+transform s"]
    table = markdown_table(rows, columns)
    header = machine_line() + (
        f"; one {side}x{side} COCO image with {count} polygon instances (8-128 px), canvas "
        "1344, short side 800, N=100, each figure from a fresh process"
    )
    print(header)
    print(table)
    if write:
        append_results(
            "Input memory of a crowded example (`experiments/benchmarks/input.py --memory`)",
            header,
            table,
        )


def coco_like_split(folder: Path, count: int = 64) -> tuple[Path, Path]:
    """`count` 640x480 JPEG photos of synthetic scenes with their instances (COCO JSON, RLE)."""
    from instseg_jax.input.coco import mask_annotation
    from instseg_jax.input.synthetic import CLASS_NAMES, SyntheticSource

    scenes = SyntheticSource(count, (480, 640), seed=7)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        example = scenes.load(index)
        name = f"{index:06d}.jpg"
        Image.fromarray(example["image"]).save(folder / "images" / name, quality=90)
        images.append({"id": index + 1, "file_name": name, "height": 480, "width": 640})
        for mask, cls in zip(example["masks"], example["classes"], strict=True):
            annotations.append(mask_annotation(mask, len(annotations) + 1, index + 1, cls + 1))
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    path = folder / "train.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path, folder / "images"


def pipeline_rates(
    source, config, batch: int, batches: int, worker_counts, cpu: bool = False
) -> list[list[str]]:
    """[[workers, images/s over the run, images/s of the median batch], ...]; with `cpu`, also
    images per CPU second of this process (workers 0 only, where it does all the work: the
    rate of one worker with a core to itself, on a machine whose load slows the wall clock)."""
    rows = []
    for workers in worker_counts:
        pipeline = InputPipeline(
            source, config, batch, seed=0, num_workers=workers, process_index=0, process_count=1
        )
        next(pipeline)  # start-up (worker spawn) is not throughput
        times = []
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(batches):
            t = time.perf_counter()
            next(pipeline)
            times.append(time.perf_counter() - t)
        elapsed, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        pipeline.close()
        rate = batches * batch / elapsed
        median = batch / statistics.median(times)
        rows.append([str(workers), f"{rate:.1f}", f"{median:.1f}"])
        if cpu:
            rows[-1].append(f"{batches * batch / cpu_seconds:.1f}" if workers == 0 else "-")
        print(f"workers {workers}: {rate:.1f} images/s overall, {median:.1f} median", flush=True)
    return rows


def without_ssd_augment(settings: TransformConfig) -> TransformConfig:
    """The transform settings with expand, min-IoU crop and photometric distortion off."""
    return dataclasses.replace(
        settings, expand_ratio=(1.0, 1.0), min_iou_crop=(), photometric=False
    )


def resize_words(c: TransformConfig) -> str:
    """The recipe's resize rule as the header states it (a stretch has no short side)."""
    if c.resize == "stretch":
        return f"stretched to {c.stretch_hw[0]}x{c.stretch_hw[1]}"
    return f"short side {tuple(c.short_side)}"


def measure_recipe(
    recipe: str, workers: int, batch: int, batches: int, write: bool, compare: bool = False
) -> None:
    """The recipe's training pipeline rate; with `compare`, also with its SSD-style
    augmentation (input/ssd_augment.py: expand, min-IoU crop, photometric) off."""
    from instseg_jax import builders
    from instseg_jax import config as config_lib

    config = config_lib.load(recipe)
    config_settings = builders.transform_config(config, train=True)
    variants = {"recipe": config_settings}
    if compare:
        variants["expand, crop, photometric off"] = without_ssd_augment(config_settings)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        annotations, images = coco_like_split(Path(folder))
        source = CocoSource(annotations, images, keep_empty=False)
        for name, settings in variants.items():
            print(name, flush=True)
            found = pipeline_rates(source, settings, batch, batches, sorted({0, workers}), cpu=True)
            rows += [[name, *row] for row in found]
    columns = [
        "transform",
        "workers",
        "images/s (whole run)",
        "images/s (median batch)",
        "images per CPU second",
    ]
    table = markdown_table(rows, columns)
    c = config_settings
    augment = (
        f"; expand {tuple(c.expand_ratio)} (p {c.expand_prob}), min-IoU crop "
        f"{tuple(c.min_iou_crop) or 'off'}, photometric {'on' if c.photometric else 'off'}"
    )
    header = machine_line() + (
        f"; `{recipe}` training transform on 64 COCO-like 640x480 JPEGs: canvas "
        f"{c.canvas_hw[0]}x{c.canvas_hw[1]}, {resize_words(c)}, batch {batch}, "
        f"{batches} batches" + augment
    )
    print(header)
    print(table)
    if write:
        append_results(
            "Input pipeline of a COCO recipe (`experiments/benchmarks/input.py --recipe`)",
            header,
            table,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--memory", action="store_true", help="peak memory of one example")
    parser.add_argument("--before", help="with --memory: also measure the package in this folder")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--recipe", help="an experiment file: time its training transform")
    parser.add_argument(
        "--compare-augment",
        action="store_true",
        help="with --recipe: also time it with expand, min-IoU crop and photometric off",
    )
    args = parser.parse_args()
    if args.recipe:
        measure_recipe(
            args.recipe,
            args.workers,
            args.batch,
            args.batches,
            not args.no_write,
            args.compare_augment,
        )
        return
    if args.memory:
        measure_memory(before=args.before, write=not args.no_write)
        return
    annotations = NUCLEI / "annotations" / "train.json"
    if not annotations.exists():
        raise SystemExit(f"{annotations} missing: run `make data` first")
    source = CocoSource(annotations, NUCLEI / "images", keep_empty=False)
    config = TransformConfig(
        canvas_hw=(512, 512),
        short_side=(512,),
        max_long_side=512,
        max_instances=128,
        box_masks=True,
        mask_size=112,
    )
    rows = pipeline_rates(source, config, args.batch, args.batches, sorted({0, args.workers}))
    table = markdown_table(rows, ["workers", "images/s (whole run)", "images/s (median batch)"])
    header = machine_line() + (
        f"; nuclei train split, canvas 512x512, batch {args.batch}, "
        f"{args.batches} batches, box-crop targets 112x112, N=128"
    )
    print(header)
    print(table)
    if not args.no_write:
        append_results("Input pipeline (`experiments/benchmarks/input.py`)", header, table)


if __name__ == "__main__":
    main()
