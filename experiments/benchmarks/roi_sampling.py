"""What detectron2's adaptive RoIAlign sampling (model.sampling_ratio 0) costs against the fixed
2 x 2 samples per bin, in one process: the op alone and a whole training step.

    python experiments/benchmarks/roi_sampling.py [--experiment maskrcnn_r50_fpn_coco_1x.py]
        [--batch 1] [--rounds 3] [--no-step] [--op-dtypes float32,bfloat16] [--no-append]
        [overrides ...]

Op: RoIAlign forward and backward of the box pooler (512 RoIs per image, 7x7, 256 channels)
and of the mask pooler (128 RoIs per image, 14x14) on a COCO-size pyramid (1344 canvas, P2-P5),
RoIs of COCO-like sizes and aspect ratios, sampling_ratio 2 against sampling_ratio 0 with the
recipe's slots (model.adaptive_sampling_max_side 42: 6 per bin axis at 7x7, 3 at 14x14).
Step: the experiment's training step at the given batch on a padding batch with concrete
initial weights (experiments/benchmarks/compile_and_step.py `step_program`), once with
--config.model.sampling_ratio=2 and once with 0 (the other overrides apply to both). Reported:
XLA's compiled cost_analysis (flops, bytes accessed) and memory_analysis (temporaries), and the
median and minimum times of interleaved rounds (2, 0, 2, 0, ...): on a machine others load
too, only the interleaved pair is comparable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, markdown_table, step_run_line, step_run_title
from compile_and_step import step_program

from instseg_jax import compilation, ops
from instseg_jax.methods import roi_heads

CANVAS = 1344
CHANNELS = 256
MAX_SIDE = 42  # model.adaptive_sampling_max_side of the recipes


def cost_row(compiled) -> tuple[float, float, float]:
    """(GFLOP, GB accessed, GB of temporaries) that XLA reports for a compiled program."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", float("nan")) if memory else float("nan")
    return (
        float(analysis.get("flops", float("nan"))) / 1e9,
        float(analysis.get("bytes accessed", float("nan"))) / 1e9,
        float(temp) / 1e9,
    )


def coco_like_boxes(rng, batch: int, count: int) -> np.ndarray:
    """Boxes with sqrt(area) log-uniform in [16, 800] px and aspect ratios in [1/3, 3]."""
    size = np.exp(rng.uniform(np.log(16), np.log(800), (batch, count)))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), (batch, count)))
    w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
    x0 = rng.uniform(0, CANVAS - np.minimum(w, CANVAS - 1))
    y0 = rng.uniform(0, CANVAS - np.minimum(h, CANVAS - 1))
    return np.stack([x0, y0, np.minimum(x0 + w, CANVAS), np.minimum(y0 + h, CANVAS)], -1)


def interleaved_times(candidates: dict, rounds: int) -> dict:
    """{name: [seconds of each round]} of zero-argument blocking callables run in turn, after one
    warm-up call each (the minimum is the figure least disturbed by other jobs on the cores)."""
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def op_programs(batch: int, dtype: str):
    """{name: (compiled fwd+bwd program, args)} of the box and mask poolers, fixed vs adaptive,
    on features of dtype (the COCO recipes compute in bfloat16)."""
    rng = np.random.default_rng(0)
    levels = [
        jnp.asarray(rng.normal(size=(batch, CANVAS >> lv, CANVAS >> lv, CHANNELS)), dtype)
        for lv in range(2, 6)
    ]
    programs = {}
    for head, count, size in (("box", 512, 7), ("mask", 128, 14)):
        boxes = jnp.asarray(coco_like_boxes(rng, batch, count), jnp.float32)
        for ratio in (2, 0):
            slots = roi_heads.adaptive_sampling_slots(MAX_SIDE, size) if ratio == 0 else 0

            def loss(features, b=boxes, s=size, r=ratio, m=slots):
                pooled = ops.multilevel_roi_align(
                    features, b, s, sampling_ratio=r, sampling_ratio_max=m
                )
                return jnp.sum(pooled.astype(jnp.float32) ** 2)

            fn = jax.jit(jax.value_and_grad(loss))
            compiled = fn.lower(levels).compile()
            name = f"{head} pooler {size}x{size}, {count} RoIs/img, {dtype}, sampling_ratio {ratio}"
            programs[name] = (
                compiled,
                (levels,),
            )
    return programs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="maskrcnn_r50_fpn_coco_1x.py")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-step", action="store_true")
    parser.add_argument("--op-dtypes", default="float32,bfloat16")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides for both step programs")
    args = parser.parse_args(argv)
    rows = []

    programs = {}
    for dtype in args.op_dtypes.split(","):
        programs.update(op_programs(args.batch, dtype))
    callables = {
        name: (lambda c=c, a=a: jax.block_until_ready(c(*a))) for name, (c, a) in programs.items()
    }
    times = interleaved_times(callables, max(args.rounds, 5))
    for name, (compiled, _) in programs.items():
        gflop, gb, temp = cost_row(compiled)
        rows.append(
            [
                f"op: {name}",
                f"{gflop:.2f}",
                f"{gb:.2f}",
                f"{temp:.2f}",
                "-",
                f"{statistics.median(times[name]):.3f}",
                f"{min(times[name]):.3f}",
            ]
        )
        print(rows[-1], flush=True)

    if not args.no_step:
        options = compilation.compiler_options()
        steps = {}
        for ratio in (2, 0):
            overrides = list(args.overrides) + [f"--config.model.sampling_ratio={ratio}"]
            fn, (state, batch) = step_program(
                args.experiment, args.batch, True, options, concrete=True, overrides=overrides
            )
            start = time.perf_counter()
            compiled = fn.lower(state, batch).compile()
            steps[ratio] = (compiled, state, batch, time.perf_counter() - start)

        def runner(ratio):
            compiled, state, batch, _ = steps[ratio]
            return lambda: jax.block_until_ready(compiled(state, batch)[1])

        times = interleaved_times({r: runner(r) for r in steps}, args.rounds)
        for ratio, (compiled, _, _, compile_s) in steps.items():
            gflop, gb, temp = cost_row(compiled)
            rows.append(
                [
                    f"training step, sampling_ratio {ratio}",
                    f"{gflop:.1f}",
                    f"{gb:.1f}",
                    f"{temp:.2f}",
                    f"{compile_s:.1f}",
                    f"{statistics.median(times[ratio]):.2f}",
                    f"{min(times[ratio]):.2f}",
                ]
            )
            print(f"sampling_ratio {ratio} step times: {times[ratio]}", flush=True)
            print(rows[-1], flush=True)

    columns = [
        "program",
        "GFLOP (XLA)",
        "GB accessed (XLA)",
        "temp GB",
        "compile s",
        "median s",
        "min s",
    ]
    table = markdown_table(rows, columns)
    header = f"{step_run_line(args)}, {args.rounds} interleaved rounds (ops: {max(args.rounds, 5)})"
    print(header)
    print(table)
    if not args.no_append:
        append_results(
            step_run_title("Adaptive RoIAlign sampling against 2 x 2", "roi_sampling.py", args),
            header,
            table,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
