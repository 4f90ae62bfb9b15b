"""Ahead-of-time compilation of an experiment's steps for an accelerator this host lacks.

    instseg-jax compile --config experiments/maskrcnn_nuclei.py --target v5e:2x2 \
        --per-chip-batch 4 [--eval] [--num-classes 1] [--out report.json] [--config.a.b=v ...]

The training step is built as `instseg-jax train` builds it (train.step_function around the
method's model and loss, the optimizer of train.optimizer, the state of train.init_state_fn,
replicated state and a batch sharded over the `data` axis of a mesh of every chip), lowered
from ShapeDtypeStructs and compiled for the target's devices: nothing is run and no parameter
is allocated (shapes come from jax.eval_shape). `--eval` adds the evaluation step: the model's
one-program forward (train=False) at the test-time input shapes; methods whose inference runs
as two programs on the host (Mask R-CNN's `make_inference`) compile here as one.

Targets:
- `v5e:2x2`, `v4:2x2x1`, `v5p:2x2x1`, `v6e:4x4`, ...: a TPU slice described by libtpu
  (`jax.experimental.topologies.get_topology_desc(platform="tpu")`). Needs libtpu, which only
  the separate environment of `make tpu-env` (.venv-tpu) has; no TPU is needed.
- `h100:N`: N H100 GPUs through jax's deviceless CUDA target (a topology made from the target
  description below, jax-ml/jax#23971): needs jax[cuda12] at the package's jax version in an
  environment of its own (`make cuda-env`: .venv-cuda); no GPU or driver is needed
  (JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 is set for it).
- `cpu:N`: N host CPU devices (the mesh of the 8-device tests, for CI). JAX must start with N
  CPU devices: the CLI sets `jax_num_cpu_devices` itself when it is first in its process; a
  process whose JAX already runs with fewer devices is told to set XLA_FLAGS.

Batch shapes come from the config alone (the training data need not exist on this host): the
padded example of the training (or test-time) transform, at per_chip_batch x chips images.
The number of classes, a shape of every head: --num-classes, else the config's class map
(input.category_ids), else the synthetic source's classes, else COCO's 80. Model fields that a
method chooses from the training data (Mask R-CNN's model.mask_fg_per_image = -1) are chosen as
if every image held input.max_instances instances: their largest value, so the memory figure
is an upper bound.

Every figure is per chip, from XLA: memory_analysis() of the SPMD program each chip runs
(peak, arguments, outputs, temporaries) against the chip's HBM, cost_analysis()'s FLOPs and
bytes accessed per step, every collective of the compiled HLO with its bytes and the op_name
that caused it (hlo_collectives), and counts of the gathers, scatters, sorts and while loops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np

from instseg_jax import builders, compilation, hlo_collectives, rng, sharding
from instseg_jax import config as config_lib
from instseg_jax import workdir as workdir_lib
from instseg_jax.config import UserError
from instseg_jax.input.pipeline import padding_example

GiB = 1 << 30
# High-bandwidth memory per chip (per GPU) of the chips a target names, in bytes.
CHIP_MEMORY = {
    # A v4 chip holds 32 GiB for its two TensorCores; libtpu's "v4:AxBxC" topology here gives
    # one device per TensorCore (8 for 2x2x1), and XLA offered each 15.25 GB.
    "v4": 16 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
    "h100": 80 * GiB,
}
# Published dense bfloat16 peak FLOP/s per chip (per GPU): Google Cloud's TPU v4, v5e, v5p and
# v6e (Trillium) pages, NVIDIA's H100 SXM datasheet (without sparsity). A step's XLA FLOPs
# against these give an upper bound on images per second, never a measurement.
CHIP_BF16_PEAK_FLOPS = {
    "v4": 275e12,
    "v5e": 197e12,
    "v5p": 459e12,
    "v6e": 918e12,
    "h100": 989e12,
}


def flop_bound(chip: str, per_chip_batch: int, flops: float | None) -> float | None:
    """Training images per second per chip at the chip's published bfloat16 peak over XLA's
    FLOPs per step: an upper bound, never a measurement (None without a peak or a count)."""
    peak = CHIP_BF16_PEAK_FLOPS.get(chip)
    return peak * per_chip_batch / flops if peak and flops else None


# libtpu's names of a few chips that users also write otherwise.
CHIP_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e"}
# HLO opcodes counted in every program (each may hide per-element or sequential work).
COUNTED_OPS = ("gather", "scatter", "sort", "while")
COCO_CLASSES = 80
CPU_FLAGS_HINT = "XLA_FLAGS=--xla_force_host_platform_device_count={n}"
# What XLA's GPU compiler needs to know of an H100 SXM (80 GB HBM3) to compile for it without
# one: a GpuTargetConfigProto in text form with the device properties CUDA reports for that card
# (the figures of XLA's own h100_sxm target description; the fields jax 0.10's plugin reads).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 1 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: its name as given, the platform, the chip, its devices."""

    name: str
    platform: str  # "tpu", "cuda" or "cpu"
    chip: str  # "v5e", "v4", ..., or "cpu"
    devices: tuple

    @property
    def memory_bytes(self) -> int | None:
        return CHIP_MEMORY.get(self.chip)


def parse_target(name: str) -> tuple[str, str, str]:
    """(platform, chip, shape) of a target name: "cpu:8" -> ("cpu", "cpu", "8"),
    "v5e:2x2" -> ("tpu", "v5e", "2x2"), "h100:8" -> ("cuda", "h100", "8")."""
    chip, sep, shape = name.partition(":")
    chip = CHIP_ALIASES.get(chip.lower(), chip.lower())
    if not sep or not shape:
        raise UserError(
            f"--target {name!r}: expected CHIP:SHAPE, e.g. v5e:2x2, v4:2x2x1, h100:8 or cpu:8"
        )
    if chip in ("cpu", "h100"):
        if not shape.isdigit() or int(shape) < 1:
            raise UserError(f"--target {name!r}: {chip}:N needs a count N >= 1, e.g. {chip}:8")
        return ("cpu" if chip == "cpu" else "cuda"), chip, shape
    if chip not in CHIP_MEMORY:
        known = ", ".join(c for c in CHIP_MEMORY if c != "h100")
        raise UserError(
            f"--target {name!r}: unknown chip {chip!r}; TPU chips: {known}; or h100:N, cpu:N"
        )
    if not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise UserError(f"--target {name!r}: the slice shape must look like 2x2 or 2x2x1")
    return "tpu", chip, shape


def prepare_host(name: str) -> None:
    """Settings JAX reads when it starts its backends, made before it does (the CLI calls this
    first): a TPU or GPU target compiles from the CPU backend (so that JAX does not look for a
    TPU or a GPU driver); cpu:N asks for N host devices. A JAX already started keeps its
    settings."""
    platform, _, shape = parse_target(name)
    from jax._src import xla_bridge

    if platform == "cuda":  # read when the CUDA plugin loads: no driver or GPU to check here
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if platform == "tpu":
        # libtpu takes a host-wide lock (/tmp/libtpu_lockfile) that keeps two processes off one
        # TPU. A compile opens no chip, so two compiles (or a compile beside a probe) may run.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    if xla_bridge.backends_are_initialized():
        return
    jax.config.update("jax_platforms", "cpu")
    if platform == "cpu":
        jax.config.update("jax_num_cpu_devices", int(shape))


def target_devices(name: str) -> Target:
    """The devices of a target (compile-only devices for a TPU slice)."""
    platform, chip, shape = parse_target(name)
    if platform == "cpu":
        wanted = int(shape)
        devices = jax.devices("cpu")
        if len(devices) < wanted:
            raise UserError(
                f"--target {name}: this process's JAX has {len(devices)} CPU device(s); run "
                f"the command in a new process, or with {CPU_FLAGS_HINT.format(n=wanted)}"
            )
        return Target(name, "cpu", "cpu", tuple(devices[:wanted]))
    from jax.experimental import topologies

    if platform == "cuda":
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        try:
            topology = topologies.get_topology_desc(
                topology_name="",
                platform="cuda",
                target_config=H100_TARGET_CONFIG,
                topology=f"1x1x{shape}",  # one host, one slice, N GPUs
            )
        except (NotImplementedError, RuntimeError) as error:
            raise UserError(
                f"--target {name}: no CUDA compiler in this environment "
                f"({str(error).splitlines()[0]}); `make cuda-env` creates .venv-cuda with "
                "jax[cuda12] (run .venv-cuda/bin/instseg-jax compile ...)"
            ) from None
        return Target(name, "cuda", chip, tuple(topology.devices))

    dims = [int(d) for d in shape.split("x")]
    # A host holds a 2x2 block of chips (2x4 for the 8-chip slices of v5e and v6e), the layout
    # MaxText's accelerator table gives libtpu.
    per_host = (2, 4, 1) if dims in ([2, 4], [4, 2]) else (2, 2, 1)
    try:
        topology = topologies.get_topology_desc(
            topology_name=f"{chip}:{shape}",
            platform="tpu",
            chip_config_name="default",
            chips_per_host_bounds=per_host,
            num_slices=1,
            wrap=(False, False, False),
        )
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        installed = importlib.util.find_spec("libtpu") is not None
        if installed and "libtpu" in first.lower():
            # Without ALLOW_MULTIPLE_LIBTPU_LOAD (prepare_host sets it unless the user chose
            # otherwise) a second libtpu process on the host fails to start.
            raise UserError(
                f"--target {name}: libtpu could not start ({first}); if another process on "
                "this host holds libtpu's lock (/tmp/libtpu_lockfile) and "
                "ALLOW_MULTIPLE_LIBTPU_LOAD=0 is set, unset it or wait for that process "
                "(a compile opens no chip)"
            ) from None
        if "TPU support not installed" in first or "libtpu" in first.lower():
            raise UserError(
                f"--target {name}: libtpu is not installed in this environment; `make tpu-env` "
                "creates .venv-tpu with it (run .venv-tpu/bin/instseg-jax compile ...)"
            ) from None
        raise UserError(f"--target {name}: libtpu refused the topology: {first}") from None
    return Target(name, "tpu", chip, tuple(topology.devices))


def number_of_classes(config, given: int | None) -> tuple[int, str]:
    """(classes, where the number came from); see the module docstring for the order."""
    if given is not None:
        if given < 1:
            raise UserError(f"--num-classes {given}: give at least 1")
        return given, "--num-classes"
    ids = tuple(config.input.get("category_ids", ()) or ())
    if ids:
        return len(ids), "input.category_ids"
    if config.input.source == "synthetic":
        from instseg_jax.input.synthetic import SyntheticSource

        return len(SyntheticSource.class_names), "the synthetic scenes"
    return COCO_CLASSES, "COCO's, as the config names no class map; --num-classes N otherwise"


def data_defaults(config) -> list[str]:
    """Fill the model fields a method chooses from the training data (the method interface's
    `defaults_from_data`) as if every image held input.max_instances instances."""
    hook = getattr(builders.method(config), "defaults_from_data", None)
    if hook is None:
        return []
    largest = np.full(1, int(config.input.max_instances))
    return [
        f"{line} [as if every image held input.max_instances]" for line in hook(config, largest)
    ]


def batch_structs(config, train: bool, global_batch: int, batch_sharding) -> dict:
    """ShapeDtypeStructs of a device batch: the transform's padded example, global_batch deep."""
    example = builders.device_fields(padding_example(builders.transform_config(config, train)))
    return {
        k: jax.ShapeDtypeStruct(
            (global_batch, *np.shape(v)), np.asarray(v).dtype, sharding=batch_sharding
        )
        for k, v in example.items()
    }


def with_sharding(tree, sharding_):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree)


def compiler_options(target: Target) -> dict | None:
    """The options train's steps compile with on this target (compilation.py): the CPU's for
    a CPU target (checked against this jax), the GPU's for an H100 target, none for a TPU."""
    if target.platform == "cpu":
        return compilation.compiler_options() or None
    return compilation.platform_options(target.platform) or None


def lower_steps(config, target: Target, per_chip_batch: int, evaluation: bool, num_classes: int):
    """({program name: jax Lowered} of the training step (and the evaluation step), the bytes
    of the trained parameters)."""
    from instseg_jax import train

    mesh = jax.sharding.Mesh(np.asarray(target.devices), ("data",))
    replicated, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    global_batch = per_chip_batch * len(target.devices)
    method, cfg, model = builders.build_model(config, num_classes)
    train_batch = batch_structs(config, True, global_batch, data)
    plain_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in train_batch.items()}
    params_key = rng.stream(config.seed, "params")
    init_variables = train.init_variables_fn(model, plain_batch, config)
    param_shapes = jax.eval_shape(init_variables, params_key)["params"]
    tx = train.optimizer(config, param_shapes)
    state = jax.eval_shape(train.init_state_fn(model, tx, plain_batch, config), params_key)
    state = with_sharding(state, replicated)
    options = compiler_options(target)
    # train.make_train_step's jit, with the target's compiler options instead of the host's.
    step = jax.jit(
        train.step_function(model, method.loss_fn, tx, cfg, train.ema_momentum(config)),
        in_shardings=(replicated, data),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=options,
    )
    lowered = {"train_step": step.lower(state, train_batch)}
    parameter_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(param_shapes))
    if evaluation:
        variables = {"params": state["params"], "frozen": state["frozen"]}
        forward = jax.jit(
            lambda v, b: model.apply(v, b, train=False)["detections"],
            in_shardings=(replicated, data),
            out_shardings=data,
            compiler_options=options,
        )
        lowered["eval_step"] = forward.lower(
            variables, batch_structs(config, False, global_batch, data)
        )
    return lowered, parameter_bytes


def hlo_op_counts(hlo_text: str) -> dict[str, int]:
    """How many instructions of each COUNTED_OPS opcode the HLO text holds (fused computations
    included; a loop body counts once)."""
    counts = Counter()
    for line in hlo_text.splitlines():
        match = hlo_collectives.INSTRUCTION.match(line)
        if match is not None and match["opcode"] in COUNTED_OPS:
            counts[match["opcode"]] += 1
    return {op: counts[op] for op in COUNTED_OPS}


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def program_report(lowered, target: Target, lower_seconds: float) -> dict:
    """Compile one lowered program and read XLA's figures per chip."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as error:  # XLA refuses a program larger than the chip: that is the answer
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {
            "fits": False,
            "lower_seconds": round(lower_seconds, 2),
            "compile_seconds": round(time.perf_counter() - start, 2),
            "chip_memory_bytes": target.memory_bytes,
            # XLA's own words, e.g. "Ran out of memory on HBM, the total memory required for
            # HLO temporaries (17.69G) exceeds available HBM (15.75G)."
            "out_of_memory": next(
                (
                    line.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
                    for line in str(error).splitlines()
                    if "RESOURCE_EXHAUSTED" in line
                ),
                str(error).splitlines()[0],
            ),
        }
    compile_seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    memory = {
        name: int(getattr(stats, f"{field}_in_bytes", 0) or 0)
        for name, field in (
            ("argument", "argument_size"),
            ("output", "output_size"),
            ("alias", "alias_size"),
            ("temporary", "temp_size"),
            ("generated_code", "generated_code_size"),
            ("peak", "peak_memory"),
        )
    }
    # Every buffer of one execution at once. XLA's peak has come out below the temporaries
    # alone (CPU and TPU here), so the report keeps both and sizes the chip by the larger.
    memory["total"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temporary"]
    if memory["peak"] <= 0:  # a backend that reports no peak
        memory["peak"] = memory["total"]
    cost = _cost(compiled)
    text = compiled.as_text()
    found = hlo_collectives.collectives(text, details=True)
    hbm = target.memory_bytes
    report = {
        "fits": True,
        "lower_seconds": round(lower_seconds, 2),
        "compile_seconds": round(compile_seconds, 2),
        "memory_bytes": memory,
        "chip_memory_bytes": hbm,
        # The larger of XLA's peak and the total: what the chip must hold for one step.
        "chip_memory_fraction": (max(memory["peak"], memory["total"]) / hbm) if hbm else None,
        # None where the backend has no cost model for the program (jax 0.10's GPU compiler).
        "flops": float(cost["flops"]) if "flops" in cost else None,
        "bytes_accessed": float(cost["bytes accessed"]) if "bytes accessed" in cost else None,
        "collectives_by_kind": {
            kind: value for kind, value in hlo_collectives.summary(found).items() if value["count"]
        },
        # The precision gradients cross chips in (a bfloat16 step's may all-reduce in bf16).
        "all_reduce_bytes_by_type": hlo_collectives.bytes_by_element_type(found),
        "collectives": found,
        "hlo_ops": hlo_op_counts(text),
    }
    if "optimal_seconds" in cost:
        # XLA's cost model; it has given negative times for TPU programs (kept as reported).
        report["xla_optimal_seconds"] = float(cost["optimal_seconds"])
    return report


def compile_experiment(
    spec: str,
    target_name: str,
    per_chip_batch: int,
    evaluation: bool = False,
    num_classes: int | None = None,
    overrides=(),
) -> dict:
    """The compile report of an experiment on a target (see the module docstring)."""
    if per_chip_batch < 1:
        raise UserError(f"--per-chip-batch {per_chip_batch}: give at least 1")
    config = config_lib.load(
        spec, list(overrides), complete_record=workdir_lib.add_new_model_fields
    )
    target = target_devices(target_name)
    classes, classes_from = number_of_classes(config, num_classes)
    chips = len(target.devices)
    with config.unlocked() if config.is_locked else contextlib.nullcontext():
        config.input.global_batch = per_chip_batch * chips
    notes = data_defaults(config)
    # Compile seconds measure a compilation, never a load from JAX's persistent cache (turned
    # back on afterwards for whatever else the process compiles).
    cache_was_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        start = time.perf_counter()
        lowered, parameter_bytes = lower_steps(config, target, per_chip_batch, evaluation, classes)
        lower_seconds = time.perf_counter() - start
        programs = {
            name: program_report(program, target, lower_seconds / len(lowered))
            for name, program in lowered.items()
        }
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was_on)
    return {
        "config": spec,
        "overrides": list(overrides),
        "target": target.name,
        "platform": target.platform,
        "chip": target.chip,
        "device_kind": target.devices[0].device_kind,
        "chips": chips,
        "per_chip_batch": per_chip_batch,
        "global_batch": per_chip_batch * chips,
        "canvas_hw": list(config.input.canvas_hw),
        "compute_dtype": str(config.model.get("compute_dtype", "float32")),
        "num_classes": classes,
        "num_classes_from": classes_from,
        # What a training step must all-reduce at least (its gradients), DESIGN "Only
        # gradients cross chips".
        "parameter_bytes": int(parameter_bytes),
        "flop_bound_images_per_second_per_chip": flop_bound(
            target.chip, per_chip_batch, programs["train_step"].get("flops")
        ),
        "jax_version": jax.__version__,
        "notes": notes,
        "programs": programs,
    }


def _gib(n) -> str:
    return f"{n / GiB:.3f}"


def _scaled(value, unit: float, digits: int) -> str:
    return "-" if value is None else f"{value / unit:.{digits}f}"


def format_report(report: dict, top: int = 8) -> str:
    """The report as a short table: one row per program, then its collectives."""
    lines = [
        f"{report['config']} on {report['target']} ({report['chips']} x "
        f"{report['device_kind']}), {report['per_chip_batch']} image(s) per chip "
        f"(global {report['global_batch']}), canvas {report['canvas_hw'][0]}x"
        f"{report['canvas_hw'][1]}, {report['compute_dtype']}, {report['num_classes']} classes "
        f"({report['num_classes_from']})",
        *report["notes"],
        f"{'program':<11} {'compile s':>9} {'peak GiB':>9} {'total GiB':>9} {'of chip':>8} "
        f"{'args GiB':>9} "
        f"{'temp GiB':>9} {'GFLOP':>10} {'GB moved':>9} {'gathers':>8} {'scatters':>8} "
        f"{'sorts':>6} {'whiles':>6}",
    ]
    for name, p in report["programs"].items():
        if not p["fits"]:
            larger = ", ".join(
                f"{chip}: {size // GiB} GiB"
                for chip, size in sorted(CHIP_MEMORY.items(), key=lambda item: item[1])
                if size > (p["chip_memory_bytes"] or 0)
            )
            lines.append(
                f"{name:<11} does not fit: {p['out_of_memory']} Give a smaller --per-chip-batch, "
                f"or a chip with more memory ({larger})"
            )
            continue
        m, ops = p["memory_bytes"], p["hlo_ops"]
        share = p["chip_memory_fraction"]
        lines.append(
            f"{name:<11} {p['compile_seconds']:>9.1f} {_gib(m['peak']):>9} {_gib(m['total']):>9} "
            f"{(f'{share:.0%}' if share is not None else '-'):>8} {_gib(m['argument']):>9} "
            f"{_gib(m['temporary']):>9} {_scaled(p['flops'], 1e9, 1):>10} "
            f"{_scaled(p['bytes_accessed'], 1e9, 2):>9} {ops['gather']:>8} {ops['scatter']:>8} "
            f"{ops['sort']:>6} {ops['while']:>6}"
        )
    lines += [
        "per chip: memory_analysis() (total = arguments + outputs - aliased + temporaries; 'of "
        "chip' = the larger of peak and total",
        "against the chip's memory), GFLOP and GB moved per step from cost_analysis() (- where "
        "the backend has none); collectives",
        "(count, bytes per step, what caused the largest):",
    ]
    for name, p in report["programs"].items():
        if not p["fits"]:
            continue
        kinds = p["collectives_by_kind"]
        summary = ", ".join(
            f"{kind} {v['count']} ({v['bytes'] / 1e6:.2f} MB)" for kind, v in kinds.items()
        )
        by_type = ", ".join(
            f"{t} {b / 1e6:.2f} MB" for t, b in p.get("all_reduce_bytes_by_type", {}).items()
        )
        lines.append(
            f"  {name}: {summary or 'none'}" + (f"; all-reduced as {by_type}" if by_type else "")
        )
        largest = sorted(
            (c for c in p["collectives"] if c["kind"] != "all-reduce"),
            key=lambda c: -c["bytes"],
        )[:top]
        for c in largest:
            lines.append(f"    {c['kind']:<18} {c['bytes'] / 1e6:>9.3f} MB  {c['op_name'] or '?'}")
    bound = report.get("flop_bound_images_per_second_per_chip")
    if bound:
        peak = CHIP_BF16_PEAK_FLOPS[report["chip"]] / 1e12
        lines.append(
            f"FLOP-bound upper bound (not a measurement): {bound:.1f} training images/s per chip "
            f"at the chip's published {peak:.0f} TFLOP/s bfloat16 peak"
        )
    return "\n".join(lines)


def main(args) -> int:
    report = compile_experiment(
        args.config,
        args.target,
        args.per_chip_batch,
        evaluation=args.eval,
        num_classes=args.num_classes,
        overrides=args.overrides,
    )
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    # Status 1: a program does not fit the chip (the report says which and by how much).
    return 0 if all(p["fits"] for p in report["programs"].values()) else 1
