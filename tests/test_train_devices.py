"""The trainer over several devices and processes: 8 fake CPU devices against 1 (and the
8-device step's collectives), jax.distributed with 2 processes (slow tier). Split from
test_train.py so that the test runner's two workers can each take one of the long files."""

import os
import socket
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from instseg_jax import hlo_collectives
from tests.test_sharding_collectives import crossings, params_bytes
from tests.test_train import finish, run_driver

# Steps the sharding-equality tests compare. At step 3 of the smoke run a RoI-sampling decision
# flips on float32 reduction-order noise between 1 and 8 devices on some CPUs (loss_cls 1.19859
# against 1.19920 on an AMD EPYC, at commit 7640677 already): parameters then differ by 2%,
# which says nothing of the sharding. Two steps still compare two updates' worth of gradients.
EQUALITY_STEPS = 2


def worst_parameter_difference(path_a, path_b) -> float:
    """The largest difference between two runs' parameters, each array's relative to its own
    largest magnitude, floored at 1e-3: zero-initialised biases that two warmup steps moved to
    about 1e-7 (the mask head's) would otherwise turn float32 reduction-order noise of 1e-11
    into a relative 1e-4."""
    a, b = np.load(path_a), np.load(path_b)
    return max(
        float(np.abs(a[k] - b[k]).max() / max(float(np.abs(a[k]).max()), 1e-3)) for k in a.files
    )


def compiled_step_hlo(dump_dir: Path) -> str:
    """The optimised HLO text of the training step (jit of train.step_fn) XLA dumped there."""
    found = sorted(dump_dir.glob("*jit_step_fn*after_optimizations.txt"))
    assert found, f"no training step in XLA's dump: {sorted(p.name for p in dump_dir.iterdir())}"
    return found[-1].read_text()


def test_eight_devices_equal_one(tmp_path):
    """2 steps at global batch 8: 8 fake CPU devices vs 1 device (relative difference <= 1e-5);
    and the 8-device step's HLO holds no collective but the all-reduces of the gradients and a
    few scalars (DESIGN "Only gradients cross chips", checked on the program this run compiled,
    XLA's dump, rather than on a second compile: test_sharding_collectives.py does the other
    methods in the slow tier). Before the per-image RoIAlign tables the step held 16
    all-gathers, 10 all-to-alls and 54 collective-permutes."""
    overrides = ["--config.input.global_batch=8"]
    one = run_driver(tmp_path / "one", EQUALITY_STEPS, tmp_path / "one.npz", *overrides)
    finish(one)
    dump = tmp_path / "hlo"
    eight = run_driver(
        tmp_path / "eight",
        EQUALITY_STEPS,
        tmp_path / "eight.npz",
        *overrides,
        env={
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
            "--xla_force_host_platform_device_count=8 "
            f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step_fn",
            # A step loaded from the persistent cache is not compiled, so not dumped.
            "JAX_ENABLE_COMPILATION_CACHE": "false",
        },
    )
    output = finish(eight)
    worst = worst_parameter_difference(tmp_path / "one.npz", tmp_path / "eight.npz")
    assert worst <= 1e-5, (worst, output[-2000:])
    params = np.load(tmp_path / "one.npz")
    report = hlo_collectives.step_report(
        compiled_step_hlo(dump), [params[k].size for k in params.files], params_bytes(params)
    )
    # The dump is the sharded training step: its gradients cross chips, nothing else does.
    assert report["all_reduce"]["gradient_bytes"] > params_bytes(params) / 2, report
    assert not crossings(report), crossings(report)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, out_stem, timeout: int) -> bool:
    """Both processes of a 2-process run finished (True) or one was still running after
    `timeout` seconds (False: both are killed, none is left behind)."""
    port = free_port()
    processes = [
        run_driver(
            workdir,
            3,
            f"{out_stem}{i}.npz",
            env={
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
                # Two processes writing one persistent cache at once is one suspect of the
                # rare hang below; each compiles its own program.
                "JAX_ENABLE_COMPILATION_CACHE": "false",
            },
        )
        for i in range(2)
    ]
    try:
        for process in processes:
            finish(process, timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.communicate()
        return False


# Slow tier: about 130 s of the fast suite's 22 minutes (three training subprocesses), and the
# 8-devices-equal-1 test above already holds the sharded step's numbers in CI.
@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """jax.distributed with 2 CPU processes (gloo), global batch 2 split between them.

    About 1 run in 10 of this test has hung in the first step, both processes waiting in XLA's
    CPU (gloo) collective of the step (py-spy: both in device_get of the step's metrics, no
    CPU). Each attempt is bounded and a hung one is retried once on a fresh port and workdir:
    two hangs in a row, or different parameters, still fail."""
    finished = run_two_processes(tmp_path / "multi", tmp_path / "multi", timeout=300)
    if not finished:
        warnings.warn("2-process training hung in its first attempt; retried once", stacklevel=1)
        assert run_two_processes(tmp_path / "retry", tmp_path / "multi", timeout=300), (
            "2-process training hung twice"
        )
    finish(run_driver(tmp_path / "single", 3, tmp_path / "single.npz"))
    worst = worst_parameter_difference(tmp_path / "single.npz", tmp_path / "multi0.npz")
    assert worst <= 1e-5, worst
