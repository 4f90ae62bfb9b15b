"""Compile times (cold and from JAX's persistent cache) and the training step with and without
the CPU compile option (instseg_jax.compilation), in one process.

    python experiments/benchmarks/compile_and_step.py [--rounds 10] [--no-append]

Programs: the nuclei training step (experiments/maskrcnn_nuclei.py, batch 4 at 256x256), the
COCO 1x training step (experiments/maskrcnn_r50_fpn_coco_1x.py, ResNet-50 FrozenBN, batch 2 on
its 1344x1344 canvas) and the nuclei evaluation step (batch 8). Cold: compiled with an empty
cache folder; cached: the same program compiled again after jax.clear_caches(), read from the
persistent cache. Step times: medians of interleaved rounds of the nuclei training step
compiled with XLA's defaults (convolutions inside YNNPACK fusions) and with the option.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, machine_line, markdown_table, time_interleaved

from instseg_jax import builders, compilation, sharding
from instseg_jax import config as config_lib
from instseg_jax import train as train_lib
from instseg_jax.input.pipeline import padding_example

REPO = Path(__file__).resolve().parents[2]


def step_program(
    experiment: str,
    batch_size: int,
    train: bool,
    options: dict | None = None,
    concrete=False,
    overrides=(),
):
    """(jitted function, its arguments) of an experiment's training or evaluation step on a
    padding batch; the state is shapes only unless concrete (compilation needs no values)."""
    config = config_lib.load(str(REPO / "experiments" / experiment), list(overrides))
    # Nuclei and COCO person keypoints have one class; the COCO instance files 80.
    one_class = "nuclei" in experiment or "keypoint" in experiment
    method, cfg, model = builders.build_model(config, 1 if one_class else 80)
    tconfig = builders.transform_config(config, train)
    example = builders.device_fields(padding_example(tconfig))
    batch = {k: np.stack([v] * batch_size) for k, v in example.items()}
    if not train:
        fn = jax.jit(
            lambda v, b: model.apply(v, b, train=False)["detections"], compiler_options=options
        )
        variables = jax.eval_shape(
            lambda: model.init(jax.random.key(0), batch, train=True, key=jax.random.key(1))
        )
        return fn, (variables, batch)

    def init_state():
        variables = model.init(jax.random.key(0), batch, train=True, key=jax.random.key(1))
        return train_lib.state_from_variables(variables, tx, config)

    param_shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), batch, train=True, key=jax.random.key(1))
    )["params"]
    tx = train_lib.optimizer(config, param_shapes)
    state = jax.jit(init_state)() if concrete else jax.eval_shape(init_state)
    mesh = sharding.make_mesh()
    replicated = sharding.replicated(mesh)
    step = jax.jit(
        train_lib.step_function(model, method.loss_fn, tx, cfg),
        in_shardings=(replicated, sharding.data_sharded(mesh)),
        out_shardings=(replicated, replicated),
        compiler_options=options,
    )
    return step, (state, batch)


def compile_seconds(fn, args) -> float:
    start = time.perf_counter()
    fn.lower(*args).compile()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    options = compilation.compiler_options()
    cache = tempfile.mkdtemp(prefix="jax_cache_")
    compilation.enable_persistent_cache(cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    rows = []
    programs = {
        "nuclei training step (batch 4, 256x256)": ("maskrcnn_nuclei.py", 4, True),
        "COCO 1x training step (R50, batch 2, 1344x1344)": ("maskrcnn_r50_fpn_coco_1x.py", 2, True),
        "nuclei evaluation step (batch 8)": ("maskrcnn_nuclei.py", 8, False),
    }
    for name, (experiment, batch_size, train) in programs.items():
        fn, fn_args = step_program(experiment, batch_size, train, options or None)
        cold = compile_seconds(fn, fn_args)
        jax.clear_caches()
        fn, fn_args = step_program(experiment, batch_size, train, options or None)
        cached = compile_seconds(fn, fn_args)
        rows.append([name, f"{cold:.1f}", f"{cached:.1f}"])
        print(rows[-1], flush=True)
    table = markdown_table(rows, ["program", "cold compile s", "from the persistent cache s"])

    # The nuclei training step with XLA's defaults and with the option, interleaved.
    state_key = {}
    steps = {}
    for label, opts in (("XLA defaults", None), ("compile option", options or None)):
        fn, (state, batch) = step_program("maskrcnn_nuclei.py", 4, True, opts, concrete=True)
        compiled = fn.lower(state, batch).compile()
        state_key[label] = state
        steps[label] = (compiled, batch)

    def run(label):
        compiled, batch = steps[label]
        new_state, metrics = compiled(state_key[label], batch)
        jax.block_until_ready(metrics)
        state_key[label] = new_state

    medians = time_interleaved({k: (lambda k=k: run(k)) for k in steps}, args.rounds)
    base, new = medians["XLA defaults"], medians["compile option"]
    step_rows = [[k, f"{v:.3f}"] for k, v in medians.items()]
    step_rows.append(["speed-up", f"{base / new:.2f}x"])
    step_table = markdown_table(step_rows, ["nuclei training step (batch 4)", "median s"])
    header = f"{machine_line()}; option {options or 'not accepted by this jax'}"
    print(header)
    print(table)
    print(step_table)
    if not args.no_append:
        append_results(
            "Compile times and the CPU compile option "
            "(`python experiments/benchmarks/compile_and_step.py`)",
            header,
            table + "\n\n" + step_table,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
