"""`instseg-jax compile` (instseg_jax/aot.py): an experiment's steps compiled ahead of time for a
target's devices, nothing run. CI compiles the toy method on 8 host CPU devices; the TPU test
runs in the environment of `make tpu-env` (`make test-tpu`) and is skipped elsewhere."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from instseg_jax import aot, cli

from .conftest import REPO

TOY = "tests/methods/toy_canvas.py:smoke"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def jax_started():
    """JAX's backends started as the other tests have them (one CPU device), so that the CLI
    called in this process leaves the device count alone."""
    return jax.devices()


def check_program(program: dict, chip_memory) -> None:
    """The figures every compiled program reports, with sane values."""
    memory = program["memory_bytes"]
    assert program["compile_seconds"] > 0
    assert memory["peak"] > 0 and memory["argument"] > 0 and memory["temporary"] >= 0
    assert memory["total"] >= memory["argument"]
    assert program["flops"] > 0 and program["bytes_accessed"] > 0
    assert set(program["hlo_ops"]) == {"gather", "scatter", "sort", "while"}
    assert program["chip_memory_bytes"] == chip_memory
    if chip_memory is None:  # a CPU target: no chip to fill
        assert program["chip_memory_fraction"] is None
    for found in program["collectives"]:
        assert set(found) == {"kind", "bytes", "op_name", "shapes", "source"}
        assert found["bytes"] > 0
    counted = sum(v["count"] for v in program["collectives_by_kind"].values())
    assert counted == len(program["collectives"])


def test_compile_on_eight_cpu_devices(tmp_path):
    # A process of its own, without XLA_FLAGS: the CLI asks JAX for the 8 devices itself.
    out = tmp_path / "toy.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    argv = ["compile", "--config", TOY, "--target", "cpu:8", "--per-chip-batch", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "instseg_jax.cli", *argv, "--eval", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train_step" in done.stdout and "eval_step" in done.stdout, done.stdout
    report = json.loads(out.read_text())
    assert (report["target"], report["platform"], report["chips"]) == ("cpu:8", "cpu", 8)
    assert (report["per_chip_batch"], report["global_batch"]) == (1, 8)
    assert report["num_classes"] == 3  # the synthetic scenes' classes, from the config alone
    assert set(report["programs"]) == {"train_step", "eval_step"}
    for program in report["programs"].values():
        check_program(program, None)
    train = report["programs"]["train_step"]
    # The batch is split over the 8 devices: each holds its image, the replicated state and
    # the gradients' all-reduce (the toy's only collectives: gradients and the loss).
    assert train["memory_bytes"]["argument"] >= report["parameter_bytes"]
    assert set(train["collectives_by_kind"]) == {"all-reduce"}
    assert report["parameter_bytes"] <= train["collectives_by_kind"]["all-reduce"]["bytes"]
    assert train["collectives_by_kind"]["all-reduce"]["bytes"] <= report["parameter_bytes"] + 64
    assert report["flop_bound_images_per_second_per_chip"] is None  # a CPU has no peak here
    # The toy computes in float32: its gradients are all-reduced as f32 (the loss too).
    by_type = train["all_reduce_bytes_by_type"]
    assert set(by_type) == {"f32"} and by_type["f32"] >= report["parameter_bytes"]


@pytest.mark.parametrize(
    "target, message",
    [
        ("v9x:2x2", "unknown chip 'v9x'"),
        ("v5e", "expected CHIP:SHAPE"),
        ("v5e:2by2", "must look like 2x2"),
        ("cpu:0", "N >= 1"),
        # This process's JAX already runs on one CPU device (conftest).
        ("cpu:64", "XLA_FLAGS=--xla_force_host_platform_device_count=64"),
    ],
)
def test_compile_target_mistakes_are_one_line(target, message, capsys, jax_started):
    argv = ["compile", "--config", TOY, "--target", target, "--per-chip-batch", "1"]
    assert cli.main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("instseg-jax compile: --target") and message in line, line


@pytest.mark.parametrize(
    "target, installed, environment",
    [("v5e:2x2", HAS_LIBTPU, "make tpu-env"), ("h100:8", HAS_CUDA_PLUGIN, "make cuda-env")],
)
def test_a_target_without_its_compiler_names_its_environment(
    target, installed, environment, capsys, jax_started
):
    if installed:
        pytest.skip(f"the compiler for {target} is installed here")
    argv = ["compile", "--config", TOY, "--target", target, "--per-chip-batch", "1"]
    assert cli.main(argv) == 2
    assert environment in one_line(capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.tpu
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: make tpu-env, then make test-tpu")
def test_tpu_compile_of_the_nuclei_mask_rcnn_smoke_step():
    """The nuclei Mask R-CNN's smoke training and evaluation steps on a v5e 2x2 slice (about
    two minutes on 2 cores)."""
    report = aot.compile_experiment(
        "experiments/maskrcnn_nuclei.py:smoke", "v5e:2x2", 2, evaluation=True
    )
    assert (report["platform"], report["chip"], report["chips"]) == ("tpu", "v5e", 4)
    assert "TPU v5" in report["device_kind"]
    for program in report["programs"].values():
        check_program(program, 16 << 30)
        assert 0 < program["chip_memory_fraction"] < 1
    # Only gradients (and a few scalars) cross chips on the TPU's own partitioner too: the
    # training step all-reduces and nothing else, the evaluation step exchanges no activations.
    assert set(report["programs"]["train_step"]["collectives_by_kind"]) == {"all-reduce"}
    assert report["programs"]["train_step"]["collectives_by_kind"]["all-reduce"]["count"] > 0
    for name, program in report["programs"].items():
        moved = set(program["collectives_by_kind"]) - {"all-reduce"}
        assert not moved, f"{name}: {sorted(moved)} cross chips"
    # v5e's 197 TFLOP/s over XLA's FLOPs per image of the step: an upper bound.
    train = report["programs"]["train_step"]
    assert report["flop_bound_images_per_second_per_chip"] == pytest.approx(
        197e12 * 2 / train["flops"]
    )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax[cuda12]: make cuda-env")
def test_deviceless_h100_compile_of_the_toy_step():
    """8 H100s through jax's deviceless CUDA target (run in .venv-cuda; no GPU needed)."""
    report = aot.compile_experiment(TOY, "h100:8", 1, evaluation=True)
    assert (report["platform"], report["chip"], report["chips"]) == ("cuda", "h100", 8)
    assert "H100" in report["device_kind"]
    train = report["programs"]["train_step"]
    assert train["chip_memory_bytes"] == 80 << 30 and train["memory_bytes"]["total"] > 0
    assert set(train["collectives_by_kind"]) == {"all-reduce"}


def test_compile_in_process_takes_config_overrides(tmp_path, capsys, jax_started):
    """cpu:1 in the test process itself; --config. overrides reach the compiled model."""
    out = tmp_path / "narrow.json"
    argv = ["compile", "--config", TOY, "--target", "cpu:1", "--per-chip-batch", "2"]
    assert cli.main([*argv, "--out", str(out), "--config.model.width=8"]) == 0
    assert "train_step" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["overrides"] == ["--config.model.width=8"]
    assert (report["chips"], report["global_batch"]) == (1, 2)
    # The toy's convolutions at width 8: 3x3x3x8 + 2 x 3x3x8x8 + 8x3 weights, 8+8+8+3 biases.
    assert report["parameter_bytes"] == 4 * (216 + 2 * 576 + 24 + 27)
    check_program(report["programs"]["train_step"], None)
    assert report["programs"]["train_step"]["collectives"] == []  # one device: nothing to send
    assert jax.config.jax_enable_compilation_cache  # off for the compile only


# The nuclei Mask R-CNN's and SOLOv2's smoke training steps compiled for one H100 in a process of
# their own: XLA's GPU compiler aborted the process on both (triton_tiling_propagation.cc:627, an
# abort rather than an exception; experiments/repro/xla_gpu_triton_tiling_abort.py), so an abort
# must fail the test rather than end pytest. "triton_gemm_on" compiles without the package's GPU
# option (compilation.platform_options): layers.subsample alone must keep the abort away.
H100_SMOKE = """
import sys
from instseg_jax import aot, compilation
if sys.argv[1] == "triton_gemm_on":
    compilation.platform_options = lambda platform: {}
aot.prepare_host("h100:1")
report = aot.compile_experiment(sys.argv[2], "h100:1", 2)
train = report["programs"]["train_step"]
print("compiled", report["device_kind"], train["memory_bytes"]["total"], train["collectives"])
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax[cuda12]: make cuda-env")
@pytest.mark.parametrize("options", ["as_the_cli", "triton_gemm_on"])
@pytest.mark.parametrize(
    "experiment", ["experiments/maskrcnn_nuclei.py:smoke", "experiments/solov2_nuclei.py:smoke"]
)
def test_deviceless_h100_compile_of_the_nuclei_smoke_steps(experiment, options):
    done = subprocess.run(
        [sys.executable, "-c", H100_SMOKE, options, experiment],
        cwd=REPO,
        env={**os.environ, "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-3000:]}"
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("compiled NVIDIA H100") and line.endswith(" []"), line


def test_an_h100_target_compiles_with_the_packages_gpu_options():
    """The compile tool compiles for H100s as `instseg-jax train` does on a GPU: matmuls
    outside Triton GEMM fusions (compilation.platform_options); a TPU target takes none."""
    h100 = aot.Target("h100:8", "cuda", "h100", ())
    assert aot.compiler_options(h100) == {"xla_gpu_enable_triton_gemm": False}
    assert aot.compiler_options(aot.Target("v5e:2x2", "tpu", "v5e", ())) is None


class _TooLargeForTheChip:
    """A lowered program whose compile fails as XLA's TPU compiler failed on Mask2Former's
    COCO step at 2 images per v5e chip (RESULTS.md, "TPU compiles of the COCO recipes")."""

    def compile(self):
        raise RuntimeError(
            "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
            "temporaries (17.69G) exceeds available HBM (15.75G).\nmore detail"
        )


def test_a_program_larger_than_the_chip_is_reported_not_raised(capsys):
    target = aot.Target("v5e:2x2", "tpu", "v5e", ())
    program = aot.program_report(_TooLargeForTheChip(), target, 1.0)
    assert program["fits"] is False and program["chip_memory_bytes"] == 16 << 30
    assert program["out_of_memory"].startswith("Ran out of memory on HBM")
    assert "(17.69G) exceeds available HBM (15.75G)." in program["out_of_memory"]
    report = {
        "config": "x.py", "target": "v5e:2x2", "chips": 4, "device_kind": "TPU v5 lite",
        "per_chip_batch": 2, "global_batch": 8, "canvas_hw": [64, 64], "compute_dtype": "bfloat16",
        "num_classes": 80, "num_classes_from": "COCO", "notes": [],
        "programs": {"train_step": program},
    }  # fmt: skip
    text = aot.format_report(report)
    assert "train_step  does not fit: Ran out of memory on HBM" in text
    assert "--per-chip-batch" in text and "v5p: 95 GiB" in text and "v4" not in text


def test_another_compile_error_is_not_taken_for_memory():
    class Broken:
        def compile(self):
            raise RuntimeError("INTERNAL: something else")

    with pytest.raises(RuntimeError, match="INTERNAL"):
        aot.program_report(Broken(), aot.Target("v5e:2x2", "tpu", "v5e", ()), 1.0)


def test_libtpu_held_by_another_process_is_said_so(monkeypatch):
    """libtpu starts in one process per host unless ALLOW_MULTIPLE_LIBTPU_LOAD is set (the tool
    sets it: a compile opens no chip): a second compile while one ran failed with "libtpu is
    not installed", which sent the user to reinstall what was there."""
    import importlib.util

    from jax.experimental import topologies

    def busy(**kwargs):
        raise RuntimeError(
            "Unable to initialize backend 'tpu': libtpu is in use by another process"
        )

    monkeypatch.setattr(topologies, "get_topology_desc", busy)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "libtpu" else real_find_spec(name, *a),
    )
    with pytest.raises(aot.UserError) as caught:
        aot.target_devices("v4:2x2x1")
    message = str(caught.value)
    assert "another process" in message and "/tmp/libtpu_lockfile" in message
    assert "ALLOW_MULTIPLE_LIBTPU_LOAD" in message
    assert "not installed" not in message


def test_tpu_compiles_may_share_a_host(monkeypatch):
    """Two compiles ran side by side on this host once ALLOW_MULTIPLE_LIBTPU_LOAD was set;
    the tool sets it for TPU targets, and leaves a user's own choice alone."""
    monkeypatch.delenv("ALLOW_MULTIPLE_LIBTPU_LOAD", raising=False)
    aot.prepare_host("v5e:2x2")
    assert os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1"
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "0")
    aot.prepare_host("v5e:2x2")
    assert os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "0"
