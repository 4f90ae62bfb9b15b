"""The trainer: determinism, golden losses, sharding over 8 devices and 2 processes, resume
after SIGKILL, and (slow) loss descent. Every run uses experiments/maskrcnn_nuclei.py:smoke."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from instseg_jax import config as config_lib
from instseg_jax import train as train_lib

REPO = Path(__file__).resolve().parent.parent
SMOKE = "experiments/maskrcnn_nuclei.py:smoke"
DRIVER = str(REPO / "tests" / "train_driver.py")
GOLDEN = REPO / "tests" / "fixtures" / "golden_smoke.json"
LOSSES = ("loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")


def flat(state) -> dict:
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(state["params"])
    }


def metrics(workdir) -> list[dict]:
    return [
        json.loads(line)
        for line in (Path(workdir) / "metrics.jsonl").read_text().split("\n")
        if line
    ]


def run_driver(workdir, steps, out, *overrides, env=None):
    command = [sys.executable, DRIVER, SMOKE, str(workdir), str(steps), str(out), *overrides]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process, timeout=600):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def five_steps(tmp_path_factory):
    """Two runs of 5 steps with seed 0 and one with seed 1."""
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        workdir = tmp_path_factory.mktemp(name)
        config = config_lib.load(SMOKE, [f"--config.seed={seed}"])
        runs[name] = (
            flat(train_lib.train(config, workdir, max_steps=5, progress=False)),
            metrics(workdir),
        )
    return runs


def test_same_seed_gives_bitwise_identical_parameters(five_steps):
    a, b, other = five_steps["a"][0], five_steps["b"][0], five_steps["other"][0]
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert any(not np.array_equal(a[k], other[k]) for k in a)


def test_golden_losses(five_steps):
    """Stored losses of the smoke run (steps 1 and 5). A change must be explained in the
    commit that updates tests/fixtures/golden_smoke.json."""
    logged = {m["step"]: m for m in five_steps["a"][1]}
    golden = json.loads(GOLDEN.read_text())
    for step, values in golden.items():
        for name in LOSSES:
            assert logged[int(step)][name] == pytest.approx(values[name], rel=2e-4), (step, name)


def children(pid: int) -> list[int]:
    """Every descendant process of pid (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def kill_when(process, ready, timeout=300):
    start = time.time()
    while not ready():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() - start < timeout, "the run never reached the kill point"
        time.sleep(0.005)  # orbax keeps its temporary folder only while a save runs
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_resume_after_sigkill_and_sigterm(tmp_path):
    """SIGKILL between and during saves loses at most the steps since the last checkpoint;
    SIGTERM stops cleanly with a checkpoint; the resumed run equals a straight one."""
    steps = 14  # checkpoints every 2 steps in the smoke config
    finish(run_driver(tmp_path / "straight", steps, tmp_path / "straight.npz"))
    workdir = tmp_path / "killed"
    checkpoints = workdir / "checkpoints"

    def logged_steps():
        path = workdir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    # Between saves: after step 3 is logged (checkpoint 2 done, 4 not yet).
    kill_when(run_driver(workdir, steps, tmp_path / "x.npz"), lambda: logged_steps() >= 3)

    # During a save: as soon as a temporary checkpoint folder appears.
    def saving():
        return checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())

    kill_when(run_driver(workdir, steps, tmp_path / "x.npz"), saving)

    finish(run_driver(workdir, steps, tmp_path / "resumed.npz"))
    a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # SIGTERM (a preempted TPU VM's signal) on the CLI with two loader workers (a run of its
    # own: the loader's saved position differs in form with and without workers): it stops
    # after its step with a checkpoint of that step, one line and no process left behind.
    # Ctrl-C (SIGINT, the same handler) is test_user_path.py's
    # test_ctrl_c_on_the_photo_dataset_stops_cleanly.
    workdir = tmp_path / "stopped"
    checkpoints = workdir / "checkpoints"
    workers = "--config.input.num_workers=2"
    for sig, status in ((signal.SIGTERM, 143),):
        before = logged_steps()
        cli = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "instseg_jax.cli",
                "train",
                "--config",
                SMOKE,
                "--workdir",
                str(workdir),
                "--max-steps",
                str(steps),
                "--config.input.num_workers=2",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        start = time.time()
        while logged_steps() < before + 1:
            assert cli.poll() is None, cli.communicate()[0][-3000:]
            assert time.time() - start < 300, "the run never logged a step"
            time.sleep(0.01)
        family = children(cli.pid)
        cli.send_signal(sig)
        output, _ = cli.communicate(timeout=60)
        assert cli.returncode == status, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        stopped = int(output.split("stopped at step ")[1].split(" ")[0])
        assert (checkpoints / str(stopped)).is_dir(), sorted(p.name for p in checkpoints.iterdir())
        assert stopped < steps
        deadline = time.time() + 20  # helpers exit once their parent's pipes close
        while time.time() < deadline and [p for p in family if Path(f"/proc/{p}").exists()]:
            time.sleep(0.1)
        left = [p for p in family if Path(f"/proc/{p}").exists()]
        assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left]
    finish(run_driver(workdir, steps, tmp_path / "stopped.npz", workers))
    b = np.load(tmp_path / "stopped.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_hundred_steps_lower_every_loss(tmp_path):
    """Mean of the last 10 steps below the mean of the first 10, for every term.

    detectron2 normalises the box-regression loss by all sampled RoIs, so it first rises as
    proposals improve: real foreground proposals with non-zero targets replace the appended
    ground-truth boxes, whose targets are zero. To see it fall within 100 steps the run uses
    4 repeated scenes, AdamW at 3e-3 and a 256-wide box head (measured: 0.49 -> 0.34).
    """
    config = config_lib.load(
        SMOKE,
        [
            "--config.input.synthetic_length=4",
            "--config.optim.name=adamw",
            "--config.optim.lr=0.003",
            "--config.model.box_fc_dim=256",
        ],
    )
    train_lib.train(config, tmp_path, max_steps=100, progress=False)
    logged = metrics(tmp_path)
    for name in LOSSES:
        first = np.mean([m[name] for m in logged[:10]])
        last = np.mean([m[name] for m in logged[-10:]])
        assert last < first, (name, first, last)


def test_nonfinite_losses_skip_updates_then_stop_with_the_checkpoint_intact(tmp_path):
    import orbax.checkpoint as ocp

    from instseg_jax.checkpoint import Checkpointer

    config = config_lib.load(
        SMOKE,
        [
            "--config.optim.lr=1e12",
            "--config.schedule.warmup_steps=0",
            "--config.max_nonfinite_in_a_row=2",
        ],
    )
    with pytest.raises(train_lib.NonFiniteLoss, match="non-finite losses in a row"):
        train_lib.train(config, tmp_path, max_steps=40, progress=False)
    logged = metrics(tmp_path)
    assert logged[-1]["nonfinite"] == 1.0 and logged[-2]["nonfinite"] == 1.0
    checkpointer = Checkpointer(tmp_path, 2, 2)
    step = checkpointer.latest_step()
    assert step is not None and step < logged[-1]["step"]
    restored = checkpointer.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
    )
    leaves = jax.tree.leaves(restored["state"]["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    checkpointer.close()


# Slow tier since the COCO recipes became bfloat16: tests/test_bfloat16.py checks their dtype
# in the fast tier and every recipe's first step against float32 in the slow one.
@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters_and_close_losses(tmp_path):
    config = config_lib.load(SMOKE, ["--config.model.compute_dtype=bfloat16"])
    state = train_lib.train(config, tmp_path, max_steps=1, progress=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(state["params"])} == {np.dtype("float32")}
    golden = json.loads(GOLDEN.read_text())["1"]
    first = metrics(tmp_path)[0]
    for name in LOSSES:  # bfloat16 activations: within a few percent of the float32 run
        assert first[name] == pytest.approx(golden[name], rel=0.05, abs=0.01), name


# Slow tier since 2026-12-06 (about 30 s of training), to keep `make test` under 20 minutes.
@pytest.mark.slow
def test_step_time_leaves_out_checkpoints_and_evaluation(tmp_path, monkeypatch):
    """Checkpoints and evaluations take PAUSE seconds each here (steps take a fraction of
    it): the logged step time, and so images/s, holds neither; the pipeline's position is
    read for the checkpoints written, not at every step."""
    from instseg_jax.checkpoint import Checkpointer
    from instseg_jax.input.pipeline import InputPipeline

    pause = 2.0
    saved, positions_read = [], []
    real_save, real_get_state = Checkpointer.save, InputPipeline.get_state

    def slow_save(self, step, state, data_state, force=False):
        time.sleep(pause)
        if real_save(self, step, state, data_state, force=force):
            saved.append(step)

    def slow_eval(config, state, workdir, step, best, pipeline):
        time.sleep(pause)
        return best

    def counted_get_state(self):
        positions_read.append(self.step)
        return real_get_state(self)

    monkeypatch.setattr(Checkpointer, "save", slow_save)
    monkeypatch.setattr(InputPipeline, "get_state", counted_get_state)
    monkeypatch.setattr(train_lib, "periodic_eval", slow_eval)
    # The smoke config logs every step and checkpoints every 2.
    config = config_lib.load(SMOKE, ["--config.eval.every_steps=2"])
    train_lib.train(config, tmp_path, max_steps=5, progress=False)
    logged = metrics(tmp_path)
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5]
    assert 5 in saved and len(positions_read) == len(saved) < 5, (saved, positions_read)
    # Step 1 holds the compilation; the others follow a checkpoint or an evaluation.
    step_times = [m["step_time"] for m in logged[1:]]
    assert max(step_times) < pause, step_times
    for m in logged:
        assert m["images_per_second"] == pytest.approx(2 / m["step_time"])


def test_step_timer_counts_steps_since_the_last_lap_without_pauses():
    now = [100.0]
    timer = train_lib.StepTimer(step=7, clock=lambda: now[0])
    now[0] += 3.0  # steps 8..10
    with timer.pause({}):
        now[0] += 50.0  # a checkpoint
    assert timer.lap(10) == pytest.approx(1.0)
    now[0] += 0.5  # step 11, the last one of the run
    assert timer.lap(11) == pytest.approx(0.5)
