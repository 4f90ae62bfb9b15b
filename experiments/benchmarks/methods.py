"""The methods side by side on the nuclei set: training step, inference images/s and compile
times of each method's nuclei experiment (same ResNet-18 GN backbone, 128-channel FPN, 256x256
canvas), measured in one process, interleaved, medians.

    python experiments/benchmarks/methods.py [--workdir METHOD=WORKDIR ...] [--rounds 10]

- training step: one jitted step (gradient, update, non-finite guard) at the experiment's batch
  (4) on one real batch of the train split;
- inference: the evaluation's path on one real batch of the val split at the test size
  (eval.global_batch = 8): the method's inference function (evaluate and predict use the same),
  the device-to-host copy, and the host conversion of every valid detection into an RLE at
  the original size (`detections.detections_to_results`); images/s = 8 / median seconds;
- compile: seconds to lower and compile the training step and the inference program(s) on the
  first call, with JAX's persistent cache off.

Inference time depends on how many detections are valid, so give each method its trained
nuclei workdir (`--workdir solov2=runs/solov2_nuclei`): its latest checkpoint is used. A method
without one runs with its initial weights, and the table says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, machine_line, markdown_table, time_interleaved

from instseg_jax import builders, detections, sharding
from instseg_jax import config as config_lib
from instseg_jax import inference as inference_lib
from instseg_jax import train as train_lib
from instseg_jax import workdir as workdir_lib
from instseg_jax.input.pipeline import InputPipeline

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = {
    "mask_rcnn": "maskrcnn_nuclei.py",
    "solov2": "solov2_nuclei.py",
    "yolact": "yolact_nuclei.py",
    "fcos": "fcos_nuclei.py",
    "condinst": "condinst_nuclei.py",
    "blendmask": "blendmask_nuclei.py",
    "polarmask": "polarmask_nuclei.py",
    "mask2former": "mask2former_nuclei.py",
    "pointrend": "pointrend_nuclei.py",
    "panet": "panet_nuclei.py",
}


def first_batch(config, source, train: bool):
    pipeline = InputPipeline(
        source,
        builders.transform_config(config, train),
        config.input.global_batch if train else config.eval.global_batch,
        seed=config.seed,
        num_workers=0,
        process_index=0,
        process_count=1,
    )
    try:
        return next(pipeline)
    finally:
        pipeline.close()


def setup(name: str, workdir: str | None):
    """Everything one method's rows need: its step and inference callables and compile times."""
    config = config_lib.load(str(REPO / "experiments" / EXPERIMENTS[name]))
    config.unlock()
    # Paths in the experiment are relative to the repository root.
    for split in (config.input.train_split, config.input.eval_split):
        for key in ("annotations", "images"):
            split[key] = str(REPO / split[key])
    train_source = builders.build_source(config.input, train=True)
    eval_source = builders.build_source(config.input, train=False)
    num_classes = train_source.num_classes
    builders.defaults_from_data(config, train_source)
    method, cfg, model = builders.build_model(config, num_classes)
    train_batch = builders.device_fields(first_batch(config, train_source, True))
    eval_batch = first_batch(config, eval_source, False)
    category_ids, _ = builders.source_class_map(eval_source)

    variables = jax.jit(
        lambda b: model.init(jax.random.key(0), b, train=True, key=jax.random.key(1))
    )(train_batch)
    weights = "initial weights"
    if workdir:
        _, variables, step = workdir_lib.restore_variables(workdir)
        weights = f"{Path(workdir).name} step {step}"
    tx = train_lib.optimizer(config, variables["params"])
    state = train_lib.state_from_variables(variables, tx, config)
    mesh = sharding.make_mesh()
    step_fn = jax.jit(
        train_lib.step_function(model, method.loss_fn, tx, cfg),
        in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)),
        out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
    )
    start = time.perf_counter()
    jax.block_until_ready(step_fn(state, train_batch))
    compile_train = time.perf_counter() - start
    infer = inference_lib.inference_fn(config, num_classes)
    device_batch = builders.device_fields(eval_batch)
    start = time.perf_counter()
    jax.block_until_ready(infer(variables, device_batch))
    compile_infer = time.perf_counter() - start

    def device():
        return jax.device_get(infer(variables, device_batch))

    def to_results(found):
        return detections.detections_to_results(
            found, eval_batch, category_ids, builders.mask_paste(cfg)
        )

    found = device()

    def host():
        return to_results(found)

    def inference():
        return to_results(device())

    count = len(inference())
    parts = {"device": device, "host": host}
    if hasattr(model, "predict"):  # the network alone, before selection and mask assembly
        network = jax.jit(lambda v, image: model.apply(v, image, method=type(model).predict))
        jax.block_until_ready(network(variables, device_batch["image"]))
        parts["network"] = lambda: jax.block_until_ready(network(variables, device_batch["image"]))
    return {
        "step": lambda: jax.block_until_ready(step_fn(state, train_batch)),
        "inference": inference,
        "parts": parts,
        "compile_train": compile_train,
        "compile_infer": compile_infer,
        "weights": weights,
        "detections": count / config.eval.global_batch,
        "eval_batch": config.eval.global_batch,
        "train_batch": config.input.global_batch,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", action="append", default=[], help="METHOD=WORKDIR")
    parser.add_argument("--methods", default=",".join(EXPERIMENTS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    workdirs = dict(item.split("=", 1) for item in args.workdir)
    names = args.methods.split(",")
    unknown = (set(workdirs) | set(names)) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {sorted(EXPERIMENTS)}")
    methods = {name: setup(name, workdirs.get(name)) for name in names}
    candidates = {}
    for name, m in methods.items():
        candidates[f"{name} step"] = m["step"]
        candidates[f"{name} inference"] = m["inference"]
        for part, fn in m["parts"].items():
            candidates[f"{name} {part}"] = fn
    medians = time_interleaved(candidates, args.rounds)
    rows = []
    for name, m in methods.items():
        rows.append(
            [
                name,
                m["weights"],
                f"{medians[f'{name} step']:.3f}",
                f"{m['train_batch'] / medians[f'{name} step']:.2f}",
                f"{m['eval_batch'] / medians[f'{name} inference']:.2f}",
                f"{m['detections']:.1f}",
                f"{m['compile_train']:.1f}",
                f"{m['compile_infer']:.1f}",
            ]
        )
    columns = [
        "method",
        "weights",
        "train step s (batch 4)",
        "train img/s",
        "inference img/s (batch 8, to RLE)",
        "valid detections / image",
        "compile train s",
        "compile inference s",
    ]
    table = markdown_table(rows, columns)
    # Where inference time goes (per image, ms): the device program(s) with the copy to the
    # host, the host's RLE conversion, and (methods with a `predict`) the network alone
    # (backbone, pyramid, heads) as a program of its own: it returns every per-anchor or
    # per-cell output, so it is not a subtractable part of the device time.
    part_rows = []
    for name, m in methods.items():
        per_image = {p: 1000 * medians[f"{name} {p}"] / m["eval_batch"] for p in m["parts"]}
        network = per_image.get("network")
        part_rows.append(
            [
                name,
                f"{per_image['device']:.1f}",
                f"{per_image['host']:.1f}",
                "-" if network is None else f"{network:.1f}",
            ]
        )
    table += "\n\n" + markdown_table(
        part_rows,
        [
            "method",
            "device ms / image (inference program(s) + copy)",
            "host RLE ms / image",
            "network alone ms / image (its own program)",
        ],
    )
    print(table)
    if not args.no_append:
        append_results(
            "Methods on the nuclei set (`python experiments/benchmarks/methods.py`)",
            machine_line({"rounds": str(args.rounds)}),
            table,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
