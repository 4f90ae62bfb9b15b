"""The exponential moving average of the weights (optim.ema_decay): its schedule and update
against a float64 NumPy encoding of mmdetection's rule, a non-finite step, a tiny Mask R-CNN
run's checkpoints (the recurrence, bitwise replay, exact resume), evaluation and restore with
the average, and the refused resume across EMA on and off.

The rule, as written in the reference's files: mmdetection's ExpMomentumEMA.avg_func
(mmdet/models/layers/ema.py) moves the average to the parameters by
    m = (1 - momentum) * exp(-(1 + steps) / gamma) + momentum   (defaults 0.0002 and 2000),
    averaged.lerp_(source, m),
and mmengine's BaseAveragedModel.update_parameters (mmengine/model/averaged_model.py), called
once per iteration after the optimizer, copies the parameters when its counter `steps` is 0,
calls avg_func(.., steps) otherwise, then adds 1 to `steps`.
"""

import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from instseg_jax import config as config_lib
from instseg_jax import evaluate
from instseg_jax import train as train_lib
from instseg_jax import workdir as workdir_lib
from instseg_jax.checkpoint import Checkpointer, leaf_shapes

SMOKE = "experiments/maskrcnn_nuclei.py:smoke"
# A short warmup and a low decay, so that 4 steps give an average far from the parameters.
EMA = ["--config.optim.ema_decay=0.6", "--config.optim.ema_warmup_steps=3"]


def reference_momentum(steps: int, momentum: float, gamma: float) -> float:
    """mmengine's counter `steps` -> the lerp weight: ExpMomentumEMA.avg_func's formula, and 1
    (a copy) at steps 0, as update_parameters does."""
    if steps == 0:
        return 1.0
    return (1.0 - momentum) * math.exp(-float(1 + steps) / gamma) + momentum


def reference_average(params_per_step: list, momentum: float, gamma: float) -> np.ndarray:
    """The float64 average after the last of the parameters given, one entry per update
    (mmengine's steps 0, 1, ...)."""
    average = None
    for steps, params in enumerate(params_per_step):
        params = np.asarray(params, np.float64)
        weight = reference_momentum(steps, momentum, gamma)
        average = params.copy() if steps == 0 else (1 - weight) * average + weight * params
    return average


def ema_config(decay=0.9998, warmup=2000):
    config = config_lib.base()
    config.optim.ema_decay = decay
    config.optim.ema_warmup_steps = warmup
    return config


def test_schedule_is_mmdetections_exp_momentum():
    schedule = jax.jit(train_lib.ema_momentum(ema_config()))
    for step in (0, 1, 2, 10, 1999, 2000, 20_000, 10**6):
        got = float(schedule(jnp.asarray(step, jnp.int32)))
        assert got == pytest.approx(reference_momentum(step, 0.0002, 2000), rel=1e-6), step
    assert train_lib.ema_momentum(config_lib.base()) is None  # off by default


def test_update_follows_the_numpy_recurrence_and_keeps_still_parameters_exact():
    config = ema_config(decay=0.9, warmup=4)
    momentum = train_lib.ema_momentum(config)
    update = jax.jit(lambda e, p, s: train_lib.ema_update(e, p, s, momentum))
    generator = np.random.default_rng(0)
    still = generator.normal(size=(3, 5)).astype(np.float32)  # a frozen stage: never moves
    moving = [generator.normal(size=(7,)).astype(np.float32) for _ in range(12)]
    average = {"moving": jnp.asarray(moving[0]) * 0 + 5.0, "still": jnp.asarray(still)}
    for step, params in enumerate(moving):
        average = update(average, {"moving": params, "still": still}, jnp.int32(step))
    want = reference_average(moving, momentum=0.1, gamma=4)
    np.testing.assert_allclose(np.asarray(average["moving"]), want, rtol=2e-6, atol=1e-6)
    assert np.abs(want - moving[-1]).max() > 0.1  # far from the last parameters: it averages
    np.testing.assert_array_equal(np.asarray(average["still"]), still)


class _Scale:
    """A one-parameter model for the step: outputs w * x."""

    def apply(self, variables, batch, train, key):
        del train, key
        return variables["params"]["w"] * batch["x"]


def _square_loss(outputs, batch, cfg):
    del batch, cfg
    total = jnp.sum(outputs**2)
    return total, {"loss_square": total}


def test_step_updates_the_average_and_a_nonfinite_step_leaves_it():
    config = ema_config(decay=0.5, warmup=2)
    config.seed = 0
    tx = optax.sgd(0.1)
    state = train_lib.state_from_variables({"params": {"w": jnp.ones(3)}}, tx, config)
    np.testing.assert_array_equal(np.asarray(state["ema_params"]["w"]), np.ones(3))
    step = jax.jit(
        train_lib.step_function(_Scale(), _square_loss, tx, None, train_lib.ema_momentum(config))
    )
    seen = []
    for x in (1.0, 2.0, np.nan, 0.5):
        before = jax.tree.map(np.asarray, state)
        state, metrics = step(state, {"x": jnp.full(3, x, jnp.float32)})
        if np.isnan(x):
            assert float(metrics["nonfinite"]) == 1.0
            for name in ("params", "ema_params"):
                np.testing.assert_array_equal(np.asarray(state[name]["w"]), before[name]["w"])
        else:
            seen.append(np.asarray(state["params"]["w"]))
    # Steps 0, 1 and 3 updated it: mmengine's counter counts iterations, the skipped one too.
    weights = [reference_momentum(s, 0.5, 2) for s in (0, 1, 3)]
    want = np.asarray(seen[0], np.float64)
    for weight, params in zip(weights[1:], seen[1:], strict=True):
        want = (1 - weight) * want + weight * params
    np.testing.assert_allclose(np.asarray(state["ema_params"]["w"]), want, rtol=1e-6)
    with pytest.raises(ValueError, match="ema_momentum"):
        jax.jit(train_lib.step_function(_Scale(), _square_loss, tx, None))(
            state, {"x": jnp.ones(3)}
        )


def restore(workdir, step: int) -> dict:
    import orbax.checkpoint as ocp

    checkpointer = Checkpointer(workdir, 1, 10, use_async=False)
    restored = checkpointer.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
    )
    checkpointer.close()
    return jax.tree.map(np.asarray, restored["state"])


def leaves(tree) -> dict:
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def smoke(*overrides):
    # Every step checkpointed, none dropped; no warmup, so that the parameters move.
    common = [
        "--config.checkpoint.every_steps=1",
        "--config.checkpoint.keep=10",
        "--config.checkpoint.use_async=False",
        "--config.schedule.warmup_steps=0",
    ]
    return config_lib.load(SMOKE, [*common, *EMA, *overrides])


def fake_workdir(path: Path, with_ema: bool):
    """A workdir of checkpoint 4 of a one-parameter "model", with or without an average, and
    the config that trains it (its optim.ema_decay matching)."""
    config = config_lib.base()
    config.method = "mask_rcnn"
    config.input.category_ids, config.input.class_names = (1,), ("nucleus",)
    config.optim.ema_decay = 0.6 if with_ema else 0.0
    workdir_lib.save_config(config, path)
    workdir_lib.write_class_map(path, [1], ["nucleus"])
    state = {
        "params": {"w": np.arange(3, dtype=np.float32)},
        "frozen": {"mean": np.zeros(2, np.float32)},
        "step": np.asarray(4, np.int32),
    }
    if with_ema:
        state["ema_params"] = {"w": np.full(3, 7.0, np.float32)}
    checkpointer = Checkpointer(path, 1, 10, use_async=False)
    checkpointer.save(4, state, {"position": 4}, force=True)
    checkpointer.close()
    return config, state


def test_restore_variables_gives_the_average_when_the_run_kept_one(tmp_path, caplog):
    caplog.set_level("INFO", logger="instseg_jax")
    fake_workdir(tmp_path / "on", with_ema=True)
    fake_workdir(tmp_path / "off", with_ema=False)
    _, variables, step = workdir_lib.restore_variables(tmp_path / "on")
    assert step == 4
    np.testing.assert_array_equal(np.asarray(variables["params"]["w"]), np.full(3, 7.0))
    np.testing.assert_array_equal(np.asarray(variables["frozen"]["mean"]), np.zeros(2))
    assert "holds an EMA of the weights (optim.ema_decay=0.6)" in caplog.text
    # `eval --raw-weights`: the run's own weights instead of their average.
    _, variables, _ = workdir_lib.restore_variables(tmp_path / "on", raw_weights=True)
    np.testing.assert_array_equal(np.asarray(variables["params"]["w"]), np.arange(3))
    caplog.clear()
    _, variables, _ = workdir_lib.restore_variables(tmp_path / "off")
    np.testing.assert_array_equal(np.asarray(variables["params"]["w"]), np.arange(3))
    assert "EMA" not in caplog.text


def snapshot(workdir: Path) -> dict:
    return {
        str(p.relative_to(workdir)): p.read_bytes() if p.is_file() else None
        for p in sorted(workdir.rglob("*"))
    }


@pytest.mark.parametrize("saved_with_ema", [True, False])
def test_resume_across_ema_on_and_off_is_refused_in_one_line(tmp_path, saved_with_ema):
    config, state = fake_workdir(tmp_path, with_ema=saved_with_ema)
    config.optim.ema_decay = 0.0 if saved_with_ema else 0.6  # the config resuming it
    wanted = {k: v for k, v in state.items() if k != "ema_params"}
    if not saved_with_ema:
        wanted["ema_params"] = state["params"]
    before = snapshot(tmp_path)
    checkpointer = Checkpointer(tmp_path, 1, 10, use_async=False)
    with pytest.raises(config_lib.ConfigValueError) as refused:
        workdir_lib.check_resumable(config, checkpointer, 4, leaf_shapes(wanted))
    checkpointer.close()
    message = str(refused.value)
    held, asked = ("0.6", "0.0") if saved_with_ema else ("0.0", "0.6")
    assert "\n" not in message, message
    assert ("with" if saved_with_ema else "without") + " an EMA of the weights" in message
    assert f"(optim.ema_decay={held}); the config sets optim.ema_decay={asked}" in message
    assert f"--config.optim.ema_decay={held}" in message
    assert snapshot(tmp_path) == before


def test_periodic_eval_evaluates_the_average(tmp_path, monkeypatch):
    evaluated = []

    def fake_evaluate_model(config, variables, workdir, step, print_tables):
        evaluated.append(variables)
        return {"bbox": {"AP": 0.1}}

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate_model)
    monkeypatch.setattr(evaluate, "plot_ap", lambda workdir: None)
    state = {"params": {"w": np.zeros(2)}, "ema_params": {"w": np.ones(2)}, "frozen": {}}
    best = {"step": 1, "AP": 0.5, "iou_type": "bbox"}  # better than 0.1: nothing is saved
    train_lib.periodic_eval(config_lib.base(), state, tmp_path, 2, best, pipeline=None)
    np.testing.assert_array_equal(evaluated[0]["params"]["w"], np.ones(2))


# The tests below train the smoke Mask R-CNN (a training step of its own to compile: about a
# minute on 2 cores with the compilation cache warm, four cold): slow tier.


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """Two smoke runs with EMA on and seed 0: "straight", 4 steps; "resumed", 2 steps, then
    the same command resumed to 4."""
    straight = tmp_path_factory.mktemp("straight")
    train_lib.train(smoke(), straight, max_steps=4, progress=False)
    resumed = tmp_path_factory.mktemp("resumed")
    train_lib.train(smoke(), resumed, max_steps=2, progress=False)
    train_lib.train(smoke(), resumed, max_steps=4, progress=False)
    return straight, resumed


@pytest.mark.slow
def test_checkpointed_average_follows_the_recurrence(ema_runs):
    """The average in checkpoint 4 against the NumPy recurrence over the parameters of
    checkpoints 1-4 (one per step); restore_variables gives it."""
    states = [restore(ema_runs[0], step) for step in (1, 2, 3, 4)]
    np.testing.assert_array_equal(  # mmengine's first update copies
        np.concatenate([v.ravel() for v in leaves(states[0]["ema_params"]).values()]),
        np.concatenate([v.ravel() for v in leaves(states[0]["params"]).values()]),
    )
    per_step = [leaves(s["params"]) for s in states]
    got = leaves(states[-1]["ema_params"])
    assert got.keys() == per_step[0].keys()
    apart = 0.0
    for name, average in got.items():
        assert average.dtype == np.float32, name
        history = [p[name] for p in per_step]
        want = reference_average(history, momentum=0.4, gamma=3)
        scale = max(np.abs(history[-1]).max(), 1e-3)
        np.testing.assert_allclose(average, want, rtol=0, atol=4e-7 * scale, err_msg=name)
        apart = max(apart, np.abs(want - history[-1]).max() / scale)
    assert apart > 1e-4, apart  # the average is measurably not the last parameters
    _, variables, step = workdir_lib.restore_variables(ema_runs[0])
    restored = leaves(variables["params"])
    assert step == 4 and restored.keys() == got.keys()
    for name, average in got.items():
        np.testing.assert_array_equal(restored[name], average, err_msg=name)


@pytest.mark.slow
def test_same_seed_replays_and_resume_is_exact(ema_runs):
    straight, resumed = ema_runs
    for step in (2, 4):  # 2: two straight runs; 4: straight against 2 + resumed to 4
        a, b = leaves(restore(straight, step)), leaves(restore(resumed, step))
        assert a.keys() == b.keys() and any("ema_params" in k for k in a)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step} {key}")


@pytest.mark.slow
def test_train_refuses_to_resume_an_ema_run_without_ema(ema_runs, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(ema_runs[0], workdir)
    before = snapshot(workdir)
    with pytest.raises(config_lib.ConfigValueError, match=r"optim\.ema_decay=0\.6"):
        train_lib.train(smoke("--config.optim.ema_decay=0.0"), workdir, 6, progress=False)
    assert snapshot(workdir) == before
