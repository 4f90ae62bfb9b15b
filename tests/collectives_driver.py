"""Compiles methods' smoke training steps on this process's devices and prints, per method, one
JSON line of what crosses chips (used by test_sharding_collectives.py on 8 fake CPU devices).

XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/collectives_driver.py \
    [--verbose] [--hlo-dir=DIR] EXPERIMENT[:ARG] ...

An experiment argument may carry overrides after it in the same (quoted) argument, e.g.
"experiments/solo_nuclei.py:smoke --config.model.mask_branch=decoupled" for a method's variant.

--verbose adds every collective to the line; --hlo-dir writes each step's HLO text there.

Each step is built the way train.py builds it (shapes from jax.eval_shape, replicated state,
batch sharded over "data", global batch = device count) and only lowered and compiled: no
parameter is initialised and no step runs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instseg_jax import builders, hlo_collectives, rng, sharding
from instseg_jax import config as config_lib
from instseg_jax import train as train_lib
from instseg_jax.builders import device_fields
from instseg_jax.input.pipeline import padding_example


def compiled_train_step(spec: str, mesh) -> tuple[str, list]:
    """(HLO text of the compiled training step, its parameters' ShapeDtypeStructs) of an
    experiment on `mesh`, one image per device."""
    experiment, *overrides = spec.split()
    config = config_lib.load(experiment, [*overrides, f"--config.input.global_batch={mesh.size}"])
    source = builders.build_source(config.input, train=True)
    builders.defaults_from_data(config, source)
    method, cfg, model = builders.build_model(config, source.num_classes)
    example = device_fields(padding_example(builders.transform_config(config, train=True)))
    batch_shapes = {
        k: jax.ShapeDtypeStruct((mesh.size, *np.shape(v)), np.asarray(v).dtype)
        for k, v in example.items()
    }
    params_key = rng.stream(config.seed, "params")
    init_variables = train_lib.init_variables_fn(model, batch_shapes, config)
    param_shapes = jax.eval_shape(init_variables, params_key)["params"]
    tx = train_lib.optimizer(config, param_shapes)
    init_state = train_lib.init_state_fn(model, tx, batch_shapes, config)
    state_shapes = jax.eval_shape(init_state, params_key)
    state_sharding = sharding.replicated(mesh)
    step = train_lib.make_train_step(model, method.loss_fn, tx, cfg, mesh, state_sharding)
    hlo = step.lower(state_shapes, batch_shapes).compile().as_text()
    return hlo, jax.tree.leaves(param_shapes)


def report(spec: str, mesh, verbose: bool, hlo_dir: str | None = None) -> dict:
    began = time.perf_counter()
    hlo, params = compiled_train_step(spec, mesh)
    if hlo_dir:
        experiment, *overrides = spec.split()
        name = "_".join(
            [Path(experiment.split(":")[0]).stem, *(o.split("=")[-1] for o in overrides)]
        )
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(hlo_dir) / f"{name}.hlo.txt").write_text(hlo)
    out = {
        "experiment": spec,
        "devices": mesh.size,
        "seconds": round(time.perf_counter() - began, 1),
        **hlo_collectives.step_report(
            hlo,
            [x.size for x in params],
            sum(int(x.size) * x.dtype.itemsize for x in params),
        ),
    }
    if verbose:
        out["collectives"] = hlo_collectives.collectives(hlo, details=True)
    return out


def main(argv: list[str]) -> None:
    verbose = "--verbose" in argv
    hlo_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("--hlo-dir=")), None)
    mesh = sharding.make_mesh()
    for spec in [a for a in argv if not a.startswith("--")]:
        print(json.dumps(report(spec, mesh, verbose, hlo_dir)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
