"""Each method's COCO-scale experiment at its real input size on this machine: compile time and
training step time (DESIGN "How a method earns its row", step 4).

    python experiments/benchmarks/coco_step.py [--methods mask_rcnn,solov2] [--rounds 3]

One training step (gradient, update, non-finite guard) of the experiment's model at batch 2
(Mask2Former: 1, see BATCHES) on its canvas (1344x1344 for the COCO 1x files, 1408x1408 for
PANet's, 640x640 for YOLACT's 550), 80 classes, on a padding batch with concrete initial weights; the first call's compilation is timed with JAX's persistent cache off, then
the median of `rounds` steps. tests/methods/test_*.py run `run_one` with one round (slow tier).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
from common import append_results, machine_line, markdown_table
from compile_and_step import step_program

EXPERIMENTS = {
    "mask_rcnn": "maskrcnn_r50_fpn_coco_1x.py",
    "solov2": "solov2_r50_fpn_coco_1x.py",
    "solo": "solo_r50_fpn_coco_1x.py",
    "solo_decoupled": "solo_decoupled_r50_fpn_coco_1x.py",
    "yolact": "yolact_r50_coco.py",
    "yolact_plus": "yolact_plus_r50_coco.py",
    "fcos": "fcos_r50_fpn_coco_1x.py",
    "condinst": "condinst_r50_fpn_coco_1x.py",
    "blendmask": "blendmask_r50_fpn_coco_1x.py",
    "polarmask": "polarmask_r50_fpn_coco_1x.py",
    "mask2former": "mask2former_r50_coco_50ep.py",
    "pointrend": "pointrend_r50_fpn_coco_1x.py",
    "panet": "panet_r50_fpn_coco_2x.py",
    "ms_rcnn": "ms_rcnn_r50_fpn_coco_1x.py",
    "keypoint_rcnn": "keypoint_rcnn_r50_fpn_coco_1x.py",
    "panoptic_fpn": "panoptic_fpn_r50_coco_1x.py",
    "instancefcn": "instancefcn_r50_coco.py",
    "deepmask": "deepmask_r50_coco.py",
    "fcis": "fcis_r101_coco.py",
    "rdsnet": "rdsnet_r50_fpn_coco_1x.py",
}
BATCH = 2
# Mask2Former at batch 2 on 1024 x 1024 peaks at the 24 GB of this machine (measured 24.3 GB
# once, killed by the kernel once): batch 1 (the reference's per-GPU batch is 2) fits.
BATCHES = {"mask2former": 1}


def run_one(method: str, rounds: int = 3) -> dict:
    """{canvas, compile_s, step_s (median), loss (first step)} of a method's COCO experiment."""
    fn, (state, batch) = step_program(
        EXPERIMENTS[method], BATCHES.get(method, BATCH), True, concrete=True
    )
    canvas = "x".join(str(n) for n in batch["image"].shape[1:3])
    start = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    times, loss = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        loss = float(metrics["loss"]) if loss is None else loss
    return {
        "canvas": canvas,
        "batch": int(batch["image"].shape[0]),
        "compile_s": compile_s,
        "step_s": statistics.median(times),
        "loss": loss,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(EXPERIMENTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    rows = []
    for method in args.methods.split(","):
        result = run_one(method, args.rounds)
        rows.append(
            [
                f"{method} (`experiments/{EXPERIMENTS[method]}`)",
                str(result["batch"]),
                result["canvas"],
                f"{result['compile_s']:.1f}",
                f"{result['step_s']:.2f}",
                f"{result['loss']:.3f}",
            ]
        )
        print(rows[-1], flush=True)
    table = markdown_table(
        rows, ["experiment", "batch", "canvas", "compile s", "median step s", "first loss"]
    )
    print(table)
    if not args.no_append:
        append_results(
            "COCO-scale training step of each method "
            "(`python experiments/benchmarks/coco_step.py`)",
            machine_line({"rounds": str(args.rounds)}),
            table,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
