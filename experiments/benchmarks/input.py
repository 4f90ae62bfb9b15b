"""Images/s of the nuclei training pipeline: 512x512 canvas, box-crop mask targets, 2 workers.

    make data && .venv/bin/python experiments/benchmarks/input.py [--workers 2] [--batches 60]

Target: >= 20 images/s on a 2-core CPU, so the loader never starves a CPU training step.
Prints one table and appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, machine_line, markdown_table

from instseg_jax.input.coco import CocoSource
from instseg_jax.input.pipeline import InputPipeline
from instseg_jax.input.transforms import TransformConfig

NUCLEI = Path(__file__).resolve().parents[2] / "data" / "nuclei"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
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
    rows = []
    for workers in sorted({0, args.workers}):
        pipeline = InputPipeline(
            source,
            config,
            args.batch,
            seed=0,
            num_workers=workers,
            process_index=0,
            process_count=1,
        )
        next(pipeline)  # start-up (worker spawn) is not throughput
        times = []
        start = time.perf_counter()
        for _ in range(args.batches):
            t = time.perf_counter()
            next(pipeline)
            times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        pipeline.close()
        rate = args.batches * args.batch / elapsed
        median = args.batch / statistics.median(times)
        rows.append([str(workers), f"{rate:.1f}", f"{median:.1f}"])
        print(f"workers {workers}: {rate:.1f} images/s overall, {median:.1f} median", flush=True)
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
