"""Where a training step's time goes: a profile of the compiled step by op category and by
model part, with its achieved GFLOP/s against this machine's measured peaks.

    python experiments/benchmarks/profile_step.py [--experiment maskrcnn_nuclei.py] [--batch 4]
        [--steps 5] [--no-append]

The step is the one `instseg-jax train` compiles (experiments/<experiment>, the CPU compile
option of instseg_jax.compilation) on a padding batch. JAX's profiler records one event per
executed XLA thunk; each event is matched by name to its HLO instruction in the compiled
program, which gives

- the op category: what the instruction computes (a fusion is named after the heaviest op it
  holds: convolution > matmul > gather > scatter > sort > reduce-window > reduce > copy or
  transpose > elementwise);
- the model part: the Flax module path in the instruction's metadata (backbone, fpn, rpn_head,
  box_head, mask_head; anything outside a module, i.e. proposals, sampling, targets, losses and
  the optimizer update, is "outside modules"), and forward or backward (`transpose(` in the
  path is JAX's backward pass).

The profiler times every synchronous thunk; a while loop's event spans its body's thunks,
which are counted themselves, so loops are left out. Convolutions are the exception: XLA:CPU
runs them asynchronously on Eigen's thread pool and their events time only the dispatch, so
their row is the step's wall time minus every other op's time (an estimate: other thunks of
one step may overlap on the cores, which makes it a lower bound).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    append_results,
    markdown_table,
    measure_ceilings,
    step_run_line,
    step_run_title,
    time_interleaved,
)
from compile_and_step import step_program

from instseg_jax import compilation

# Heaviest first: a fusion is counted under the first of these it contains.
CATEGORIES = [
    ("convolution", {"convolution"}),
    ("matmul", {"dot"}),
    ("gather", {"gather", "dynamic-slice"}),
    ("scatter", {"scatter", "dynamic-update-slice"}),
    ("sort / top-k", {"sort", "topk"}),
    ("reduce-window / select-and-scatter", {"reduce-window", "select-and-scatter"}),
    ("reduce", {"reduce"}),
    ("copy / transpose / pad / concat", {"copy", "transpose", "pad", "concatenate", "slice"}),
]
MODULES = ("backbone", "fpn", "rpn_head", "box_head", "mask_head")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \S.*? ([\w\-]+)\(")


def parse_hlo(text: str):
    """{instruction name: (opcode, called computations, op_name)} and {computation: [names]}."""
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        if line.startswith("%") and line.rstrip().endswith("{"):
            current = line[1:].split(" ", 1)[0]
            computations[current] = []
            continue
        if line.startswith("ENTRY"):
            current = line.split()[1].lstrip("%")
            computations[current] = []
            continue
        match = INSTRUCTION.match(line)
        if not match or current is None:
            continue
        name, opcode = match.groups()
        called = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        if "__ynn_fusion" in line:
            opcode = "ynn-fusion"
        instructions[name] = (opcode, called, op_name.group(1) if op_name else "")
        computations[current].append(name)
    return instructions, computations


def opcodes_inside(name, instructions, computations, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    opcode, called, _ = instructions[name]
    found = {opcode}
    for computation in called:
        if computation in seen:
            continue
        seen.add(computation)
        for inner in computations.get(computation, []):
            found |= opcodes_inside(inner, instructions, computations, seen)
    return found


def category(name, instructions, computations) -> str:
    opcodes = opcodes_inside(name, instructions, computations)
    label = next((label for label, ops in CATEGORIES if opcodes & ops), "elementwise / other")
    if "ynn-fusion" in opcodes and not label.startswith("convolution"):
        label += " (YNNPACK)"
    return label


def op_name_of(name, instructions, computations) -> str:
    """The instruction's JAX op path, or the first one found among the ops a fusion holds."""
    _, called, op_name = instructions[name]
    for computation in called:
        for inner in computations.get(computation, []):
            if op_name:
                return op_name
            op_name = op_name_of(inner, instructions, computations)
    return op_name


def model_part(op_name: str) -> str:
    """A module of MODULES, else a model method outside them (e.g. `MaskRCNN.pool`, the
    RoIAlign), else the loss and update code; forward or backward."""
    if not op_name:
        return "no JAX op path (layout copies XLA inserted)"
    direction = "backward" if "transpose(" in op_name else "forward"
    parts = op_name.split("/")
    module = next((p for p in parts if p in MODULES), None)
    if module is None:
        module = next((p for p in parts if re.fullmatch(r"[A-Z]\w*\.\w+", p)), None)
    if module is None:
        return f"no module: anchor and RoI targets, sampling, losses, update {direction}"
    return f"{module} {direction}"


def profile_events(run_step, steps: int) -> dict[str, float]:
    """Summed microseconds per thunk name over `steps` runs of run_step."""
    folder = tempfile.mkdtemp(prefix="profile_step_")
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(steps):
            run_step()
    (path,) = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event.get("dur", 0.0)
    return totals


def conv_peak(options) -> float:
    """FLOP/s of a ResNet-sized 3x3 convolution (batch 2, 100x100, 256->256) forward, the
    faster of XLA's default path and the compile option's."""
    x = jnp.ones((2, 100, 100, 256), jnp.float32)
    w = jnp.ones((3, 3, 256, 256), jnp.float32) * 0.01

    def conv(a, b):
        return jax.lax.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    variants = {"default": jax.jit(conv), "option": jax.jit(conv, compiler_options=options)}
    t = time_interleaved(
        {k: (lambda f=f: jax.block_until_ready(f(x, w))) for k, f in variants.items()}, 7
    )
    return 2 * 2 * 100 * 100 * 256 * 256 * 9 / min(t.values())


CONTAINERS = {"while", "conditional", "call"}
ASYNC_CONV = "convolution (asynchronous: wall time minus the other ops)"


def share_table(per_step: dict[str, float], wall: float, title: str) -> str:
    rows = [
        [label, f"{seconds:.3f}", f"{100 * seconds / wall:.1f}%"]
        for label, seconds in sorted(per_step.items(), key=lambda kv: -kv[1])
    ]
    return markdown_table(rows, [title, "s per step", "share of the step"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="maskrcnn_nuclei.py")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. --config.input.canvas_hw='(800, 800)'"
    )
    args = parser.parse_args(argv)
    options = compilation.compiler_options()
    fn, (state, batch) = step_program(
        args.experiment, args.batch, True, options, concrete=True, overrides=args.overrides
    )
    compiled = fn.lower(state, batch).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    flops = float(analysis.get("flops", float("nan")))
    instructions, computations = parse_hlo(compiled.as_text())
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    run_step()  # warm
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    totals = profile_events(run_step, args.steps)

    by_category: dict[str, float] = collections.defaultdict(float)
    by_part: dict[str, float] = collections.defaultdict(float)
    for name, micros in totals.items():
        if name not in instructions or instructions[name][0] in CONTAINERS:
            continue
        label = category(name, instructions, computations)
        if label.startswith("convolution"):
            continue  # only its dispatch is timed (module docstring)
        seconds = micros / 1e6 / args.steps
        by_category[label] += seconds
        by_part[model_part(op_name_of(name, instructions, computations))] += seconds
    synchronous = sum(by_category.values())
    by_category[ASYNC_CONV] = max(step_s - synchronous, 0.0)
    by_part["convolutions of every part (asynchronous)"] = by_category[ASYNC_CONV]
    ceilings = measure_ceilings()
    peak_conv = conv_peak(options or None)
    achieved = flops / step_s
    header = f"{step_run_line(args)}, option {options or 'not accepted by this jax'}"
    summary = (
        f"Median step {step_s:.3f} s over {args.steps} steps; XLA counts {flops / 1e9:.1f} GFLOP "
        f"per step, so {achieved / 1e9:.1f} GFLOP/s achieved: "
        f"{100 * achieved / peak_conv:.0f}% of the measured 3x3-convolution peak "
        f"({peak_conv / 1e9:.1f} GFLOP/s, batch 2, 100x100, 256->256) and "
        f"{100 * achieved / ceilings['matmul_flops']:.0f}% of the 2048^2 float32 matmul peak "
        f"({ceilings['matmul_flops'] / 1e9:.1f} GFLOP/s). Synchronous ops timed one by one: "
        f"{synchronous:.3f} s per step."
    )
    tables = (
        share_table(by_category, step_s, "op category")
        + "\n\n"
        + share_table(by_part, step_s, "model part (convolutions apart)")
    )
    print(header)
    print(summary)
    print(tables)
    if not args.no_append:
        append_results(
            step_run_title("Training step profile", "profile_step.py", args),
            header,
            tables,
            summary,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
