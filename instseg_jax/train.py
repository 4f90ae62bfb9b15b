"""The trainer: mesh, data, init, one jitted step, loop, checkpoints, metrics.

    instseg-jax train --config experiments/maskrcnn_nuclei.py[:arg] --workdir DIR \
        [--config.optim.lr=0.01 ...]

A run started on a workdir that holds checkpoints resumes from the latest one: parameters,
optimizer state, step and the input stream's position, so it continues as if never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from instseg_jax import builders, compilation, evaluate, finetune, rng, sharding
from instseg_jax import config as config_lib
from instseg_jax import workdir as workdir_lib
from instseg_jax.backbones.resnet import frozen_prefixes
from instseg_jax.builders import device_fields
from instseg_jax.checkpoint import Checkpointer, abstract, leaf_shapes
from instseg_jax.input import report as input_report
from instseg_jax.input.pipeline import InputPipeline, padding_example
from instseg_jax.metrics import MetricsWriter
from instseg_jax.weights.resnet import (
    BackboneWeightsError,
    backbone_weights_loader,
    require_pretrained_frozen_bn,
)

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training stopped after too many non-finite losses in a row."""


# ----------------------------------------------------------------------------- optimizer


def learning_rate(config) -> optax.Schedule:
    """Linear warmup from lr * warmup_factor, then step decay or cosine to the end."""
    s, lr = config.schedule, config.optim.lr
    if s.decay == "step":
        boundaries = {int(b): s.gamma for b in s.steps}
        after = optax.piecewise_constant_schedule(lr, boundaries)
    elif s.decay == "cosine":
        after = optax.cosine_decay_schedule(lr, max(s.total_steps, 1))
    else:
        raise config_lib.ConfigValueError(
            f"schedule.decay must be 'step' or 'cosine', got {s.decay!r}"
        )
    if s.warmup_steps <= 0:
        return after

    def schedule(step):
        warm = lr * (s.warmup_factor + (1 - s.warmup_factor) * step / s.warmup_steps)
        return jnp.where(step < s.warmup_steps, warm, after(step))

    return schedule


def _path_names(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _clip_trainable(max_norm: float, labels) -> optax.GradientTransformation:
    """Scale every gradient by min(1, max_norm / global norm of the trained ones): the global
    norm leaves the frozen parameters out, and spans all the learning-rate groups at once (the
    reference's "full model" clipping)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        pairs = zip(
            jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(labels), strict=True
        )
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g, label in pairs if label != "frozen"))
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
        return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def optimizer(config, params) -> optax.GradientTransformation:
    """SGD with momentum (or AdamW); no weight decay on norm parameters and embeddings; frozen
    stages fixed; the backbone's learning rate x optim.backbone_lr_multiplier (its own group);
    the other conv and dense biases (not the norms') at the learning rate x
    optim.bias_lr_multiplier and the weight decay x optim.bias_weight_decay_multiplier (their
    own group, when either is not 1: mmdetection's paramwise_options bias_lr_mult and
    bias_decay_mult); optional clipping at a global norm over every trained parameter."""
    o = config.optim
    schedule = learning_rate(config)
    multiplier = float(o.get("backbone_lr_multiplier", 1.0))
    # Workdirs written before the bias group existed get none.
    bias_lr = float(o.get("bias_lr_multiplier", 1.0))
    bias_decay = float(o.get("bias_weight_decay_multiplier", 1.0))
    bias_group = bias_lr != 1.0 or bias_decay != 1.0
    frozen = frozen_prefixes(config.model.get("freeze_at", 0))

    def label(path, _):
        names = _path_names(path)
        parts = names.split("/")
        if parts[0] == "backbone" and any(p.startswith(frozen) for p in parts[1:2]) and frozen:
            return "frozen"
        if parts[0] == "backbone" and multiplier != 1.0:
            return "backbone"
        if bias_group and parts[-1] == "bias" and not any("norm" in p or p == "gn" for p in parts):
            return "bias"
        return "train"

    def decays(params_tree):
        def decayed(path, _):
            parts = _path_names(path).split("/")
            return not (any("norm" in p or p == "gn" for p in parts) or parts[-1] == "embedding")

        return jax.tree_util.tree_map_with_path(decayed, params_tree)

    def group(lr, weight_decay=o.weight_decay):
        if o.name == "sgd":
            return optax.chain(
                optax.add_decayed_weights(weight_decay, mask=decays),
                optax.sgd(lr, momentum=o.momentum),
            )
        if o.name == "adamw":
            return optax.adamw(lr, weight_decay=weight_decay, mask=decays)
        raise config_lib.ConfigValueError(f"optim.name must be 'sgd' or 'adamw', got {o.name!r}")

    labels = jax.tree_util.tree_map_with_path(label, params)
    groups = {"train": group(schedule), "frozen": optax.set_to_zero()}
    if multiplier != 1.0:
        groups["backbone"] = group(lambda step: multiplier * schedule(step))
    if bias_group:
        groups["bias"] = group(lambda step: bias_lr * schedule(step), bias_decay * o.weight_decay)
    transform = optax.multi_transform(groups, labels)
    if o.clip_norm > 0:
        transform = optax.chain(_clip_trainable(o.clip_norm, labels), transform)
    return transform


# ----------------------------------------------------------------------------- weight averaging


def ema_momentum(config):
    """The schedule of the parameters' exponential moving average, step -> the weight m the
    average gives the parameters that train step `step` (0, 1, ...) produced, or None when
    optim.ema_decay is 0 (off).

    mmdetection's ExpMomentumEMA (mmdet/models/layers/ema.py, avg_func) under mmengine's
    BaseAveragedModel.update_parameters (mmengine/model/averaged_model.py), called once per
    iteration after the optimizer: its first call (steps = 0) copies the parameters, and call
    `steps` then moves the average by m = (1 - momentum) * exp(-(1 + steps) / gamma) +
    momentum. Here momentum = 1 - optim.ema_decay, gamma = optim.ema_warmup_steps, and
    mmengine's `steps` is the train step's index (one update per step)."""
    decay = float(config.optim.get("ema_decay", 0.0))
    if decay == 0.0:
        return None
    momentum = 1.0 - decay
    gamma = float(config.optim.get("ema_warmup_steps", 2000))

    def schedule(step):
        since = (1.0 + jnp.asarray(step, jnp.float32)) / gamma
        return jnp.where(step == 0, 1.0, (1.0 - momentum) * jnp.exp(-since) + momentum)

    return schedule


def ema_update(ema_params, params, step, momentum):
    """The average after train step `step` moved towards `params` by momentum(step). Written
    as ema + m * (params - ema) (mmdetection's lerp_): a parameter that does not move (a
    frozen stage) keeps its average exactly; the first step copies the parameters exactly."""
    m = momentum(step)

    def move(average, param):
        param = param.astype(jnp.float32)
        return jnp.where(step == 0, param, average + m * (param - average))

    return jax.tree.map(move, ema_params, params)


# ----------------------------------------------------------------------------- state and step


def init_variables_fn(model, batch_shapes, config):
    """seed key -> model variables, from zero batches of batch_shapes (shapes only matter)."""

    def init(seed_key):
        dummy = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch_shapes)
        return model.init(seed_key, dummy, train=True, key=rng.stream(config.seed, "sampling"))

    return init


def init_state_fn(model, tx, batch_shapes, config):
    """(seed key, optional pretrained variables, optional loaded leaves) -> the train state:
    params, frozen statistics, optimizer state, counters. Pretrained variables {collection:
    {submodule: tree}} (the method's load_backbone_weights of model.backbone_weights) replace
    the initialised submodules they name; loaded leaves (finetune.loaded_variables of
    model.init_from) replace the initialised leaves they hold."""
    init_variables = init_variables_fn(model, batch_shapes, config)

    def init(seed_key, pretrained=None, loaded=None):
        variables = init_variables(seed_key)
        if pretrained is not None:
            variables = with_pretrained(variables, pretrained)
        if loaded is not None:
            variables = finetune.with_loaded(variables, loaded)
        return state_from_variables(variables, tx, config)

    return init


def with_pretrained(variables: dict, pretrained: dict) -> dict:
    """variables with the submodules `pretrained` names ({collection: {submodule: tree}})
    replaced. The shapes must agree leaf by leaf."""
    out = dict(variables)
    for collection, submodules in pretrained.items():
        for module, loaded in submodules.items():
            initialised = variables.get(collection, {}).get(module)
            if initialised is None:
                raise BackboneWeightsError(
                    f"model.backbone_weights: the model has no {module} {collection} to replace"
                )
            want = jax.tree_util.tree_flatten_with_path(initialised)[0]
            have = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
            for path, leaf in want:
                if path not in have or np.shape(have[path]) != np.shape(leaf):
                    name = "/".join(str(getattr(k, "key", k)) for k in path)
                    got = np.shape(have[path]) if path in have else "nothing"
                    raise BackboneWeightsError(
                        f"model.backbone_weights: {module} {collection} {name} needs shape "
                        f"{np.shape(leaf)}, the file gives {got}"
                    )
            out[collection] = {**out[collection], module: loaded}
    return out


def state_from_variables(variables: dict, tx, config) -> dict:
    """The train state at step 0 around given variables (fresh or imported); with
    optim.ema_decay set, "ema_params" too: the parameters' average (float32, a copy of them at
    step 0). Without, the state has no such leaf (checkpoints of runs without EMA unchanged)."""
    params = variables["params"]
    state = {
        "params": params,
        "frozen": variables.get("frozen", {}),
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "nonfinite_run": jnp.zeros((), jnp.int32),
        "sampling_key": jax.random.key_data(rng.stream(config.seed, "sampling")),
    }
    if ema_momentum(config) is not None:
        state["ema_params"] = jax.tree.map(lambda p: jnp.array(p, jnp.float32), params)
    return state


def step_function(model, loss_fn, tx, cfg, ema=None):
    """The training step (state, batch) -> (state, metrics) of a model and its method's
    loss_fn, before jit (make_train_step compiles it). ema: ema_momentum(config), which a state
    with "ema_params" needs."""

    def step_fn(state, batch):
        key = rng.step_key(jax.random.wrap_key_data(state["sampling_key"]), state["step"])

        def loss(params):
            outputs = model.apply(
                {"params": params, "frozen": state["frozen"]}, batch, train=True, key=key
            )
            return loss_fn(outputs, batch, cfg)

        (total, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
        finite = jnp.isfinite(total) & jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A non-finite loss or gradient leaves parameters and optimizer state as they were.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = dict(
            state,
            params=keep(params, state["params"]),
            opt_state=keep(opt_state, state["opt_state"]),
            step=state["step"] + 1,
            # Counted on device every step, read by the host at logging steps.
            nonfinite_run=jnp.where(finite, 0, state["nonfinite_run"] + 1),
        )
        if "ema_params" in state:
            if ema is None:
                raise ValueError(
                    "the train state holds ema_params but the step was built without their "
                    "schedule: pass ema=ema_momentum(config) (optim.ema_decay)"
                )
            averaged = ema_update(state["ema_params"], params, state["step"], ema)
            new_state["ema_params"] = keep(averaged, state["ema_params"])
        metrics = dict(
            metrics,
            nonfinite_run=new_state["nonfinite_run"],
            loss=total,
            nonfinite=1.0 - finite.astype(jnp.float32),
            grad_norm=optax.tree.norm(grads),
        )
        return new_state, metrics

    return step_fn


def make_train_step(model, loss_fn, tx, cfg, mesh, state_sharding, ema=None):
    """The jitted, state-donating training step on the `data` mesh."""
    return compilation.jit(
        step_function(model, loss_fn, tx, cfg, ema),
        in_shardings=(state_sharding, sharding.data_sharded(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )


# ----------------------------------------------------------------------------- loop


class TrainingStopped(Exception):
    """Training ended early on SIGINT or SIGTERM, after writing a checkpoint."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name


class StopRequests:
    """SIGINT and SIGTERM ask the training loop to stop after its current step (it then writes
    a checkpoint and shuts the loader down); a second SIGINT stops at once. The previous
    handlers come back on exit. Outside the main thread (no signals there) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signal.Signals(signum).name
        log.warning(
            "%s received: stopping after the step under way (and the one queued behind it) "
            "and writing a checkpoint (Ctrl-C again to stop at once)",
            self.received,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def startup_summary(config, source, class_names, param_shapes, mesh, workdir, resumed, total):
    """What a run is about to do, printed before its step compiles."""
    data = builders.source_summary(source)
    names = ", ".join(class_names[:10]) + (
        f", ... ({len(class_names)})" if len(class_names) > 10 else ""
    )
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes))
    canvas = tuple(config.input.canvas_hw)
    ema = (
        f", EMA of the weights (optim.ema_decay={config.optim.ema_decay:g}, warmup "
        f"{config.optim.ema_warmup_steps} steps) evaluated instead of them"
        if ema_momentum(config) is not None
        else ""
    )
    return [
        f"data: {data}",
        f"classes ({len(class_names)}): {names}",
        f"input: canvas {canvas[0]}x{canvas[1]}, global batch {config.input.global_batch}, "
        f"up to {config.input.max_instances} instances per image",
        f"model: {config.method}, {params / 1e6:.2f} M trainable parameters{ema}",
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), {jax.process_count()} process(es), mesh "
        f"{dict(mesh.shape)}",
        f"workdir: {workdir}; "
        + (f"resuming from step {resumed}" if resumed is not None else "starting at step 0")
        + f", training to step {total}",
    ]


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    max_steps: int | None = None,
    progress: bool = True,
    experiment_file: str | None = None,
) -> dict:
    """Train until config.schedule.total_steps (or max_steps, for tests); returns the state.
    experiment_file (the `--config` given) goes into workdir/provenance.json beside the code's
    checkout and commit.

    A run that fails before writing its first checkpoint removes the workdir it created (a
    misspelt model field, an unreadable weights file, an interrupted compilation): nothing was
    trained, and a half-made workdir would make the next attempt resume from nothing."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise config_lib.ConfigValueError(
            f"--workdir {workdir} is a file; give a folder (new, or a training workdir to resume)"
        )
    created = not workdir.exists()
    try:
        return _train(config, workdir, max_steps, progress, experiment_file)
    except BaseException:
        if created and jax.process_index() == 0 and not _has_checkpoint(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def _has_checkpoint(workdir: Path) -> bool:
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _train(config, workdir: Path, max_steps, progress, experiment_file=None) -> dict:
    if not _has_checkpoint(workdir):  # before the data loads: refused in a second
        require_pretrained_frozen_bn(config.model)
        finetune.check_source(config)
    sharding.maybe_initialize_distributed(config.mesh)
    mesh = sharding.make_mesh()
    sharding.check_global_batch(config.input.global_batch, mesh)
    source, source_names, data_notes = _training_source(config, workdir)
    tconfig = builders.transform_config(config, train=True)
    pipeline = InputPipeline(
        source,
        tconfig,
        config.input.global_batch,
        seed=config.seed,
        num_workers=config.input.num_workers,
        repeat_factor_threshold=float(config.input.get("repeat_factor_threshold", 0.0)),
    )
    method, cfg, model = builders.build_model(config, source.num_classes)

    example = device_fields(padding_example(tconfig))
    batch_shapes = {
        k: jax.ShapeDtypeStruct((config.input.global_batch, *np.shape(v)), np.asarray(v).dtype)
        for k, v in example.items()
    }
    params_key = rng.stream(config.seed, "params")
    param_shapes = jax.eval_shape(init_variables_fn(model, batch_shapes, config), params_key)[
        "params"
    ]
    tx = optimizer(config, param_shapes)
    init_state = init_state_fn(model, tx, batch_shapes, config)
    state_sharding = sharding.replicated(mesh)

    ckpt = Checkpointer(
        workdir, config.checkpoint.every_steps, config.checkpoint.keep, config.checkpoint.use_async
    )
    latest = ckpt.latest_step()
    state = _initial_state(
        config,
        init_state,
        params_key,
        state_sharding,
        ckpt,
        latest,
        pipeline,
        data_notes,
        variable_shapes=variable_shapes_fn(batch_shapes),
    )
    # Only now, with the checkpoint known to fit the config, is the workdir's record rewritten:
    # a failed resume leaves a trained workdir as it was.
    _record_run(config, workdir, source, experiment_file)
    start = int(state["step"])
    total = int(max_steps if max_steps is not None else config.schedule.total_steps)
    if jax.process_index() == 0:
        summary = startup_summary(
            config, source, source_names, param_shapes, mesh, workdir, latest, total
        )
        for line in summary + data_notes:
            log.info("%s", line)
    step_fn = make_train_step(
        model, method.loss_fn, tx, cfg, mesh, state_sharding, ema=ema_momentum(config)
    )
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    bar = tqdm(
        total=total,
        initial=start,
        disable=not progress or jax.process_index() != 0,
        desc="train",
        unit="step",
    )
    try:
        state, stopped = _run_steps(
            config, state, step_fn, pipeline, mesh, ckpt, writer, bar, workdir, total
        )
    finally:
        bar.close()
        ckpt.close()
        writer.close()
        pipeline.close()
    if stopped is not None:
        stopped_at, signal_name = stopped
        raise TrainingStopped(
            f"stopped at step {stopped_at} on {signal_name}; checkpoint written in "
            f"{ckpt.directory}: run the same command to resume",
            signal_name,
        )
    return state


def _initial_state(
    config,
    init_state,
    params_key,
    state_sharding,
    ckpt,
    latest,
    pipeline,
    data_notes,
    variable_shapes=None,
) -> dict:
    """The state of checkpoint `latest` with the pipeline moved to its position, or, when
    there is none, a new state (with the weights model.init_from or model.backbone_weights
    names; init_from first, as it holds the backbone too). variable_shapes(config, num_classes):
    the variable shapes of config's model at num_classes (init_from's class-specific leaves)."""
    if latest is not None:  # restore into shapes only: no parameters are initialised for nothing
        shapes = jax.eval_shape(init_state, params_key)
        workdir_lib.check_resumable(config, ckpt, latest, leaf_shapes(shapes))
        state, data_state = ckpt.restore(latest, abstract(shapes, state_sharding))
        pipeline.set_state(data_state)
        log.info("resumed from step %d in %s", latest, ckpt.directory)
        return state
    pretrained = loaded = None
    if config.model.get("init_from"):
        loaded = finetune.loaded_variables(config, variable_shapes, data_notes)
    elif config.model.get("backbone_weights"):
        load = backbone_weights_loader(builders.method(config))  # the method's, else ResNet's
        pretrained, description = load(config.model.backbone_weights, config.model)
        data_notes.append(f"backbone initialised from {description}")
    # Created directly in the replicated sharding.
    return jax.jit(init_state, out_shardings=state_sharding)(params_key, pretrained, loaded)


def variable_shapes_fn(batch_shapes):
    """(config, num_classes) -> the variable shapes of config's model with num_classes thing
    classes, from batches of batch_shapes (traced: nothing is computed)."""

    def shapes(config, num_classes):
        _, _, model = builders.build_model(config, num_classes)
        init = init_variables_fn(model, batch_shapes, config)
        return jax.eval_shape(init, rng.stream(config.seed, "params"))

    return shapes


def _training_source(config, workdir: Path):
    """(source, class names, notes) of the training split; the class map and the values chosen
    from the data go into config (_record_run writes it to the workdir once the run starts)."""
    source = builders.build_source(config.input, train=True, seed=config.seed)
    data_notes = builders.defaults_from_data(config, source)
    category_ids, _ = builders.class_map(config, source)
    source_ids, source_names = builders.source_class_map(source)
    if category_ids != source_ids:
        raise config_lib.ConfigValueError(
            f"input.category_ids {category_ids[:5]}... differ from the training data's categories "
            f"{source_ids[:5]}...: training uses the dataset's class map; clear "
            "input.category_ids and input.class_names"
        )
    with config.unlocked() if config.is_locked else contextlib.nullcontext():
        # config.json records the class map the run used, not the empty "from the data".
        config.input.category_ids = tuple(source_ids)
        config.input.class_names = tuple(source_names)
    builders.check_eval_split(config, source_ids)
    return source, source_names, data_notes


def _record_run(config, workdir: Path, source, experiment_file=None) -> None:
    """workdir/config.json (with the values chosen from the data), classes.json and this
    start's entry in provenance.json (the code's checkout, commit and uncommitted files, logged
    too), from process 0."""
    if jax.process_index() == 0:
        provenance = workdir_lib.code_provenance(experiment_file)
        workdir_lib.append_provenance(workdir, provenance)
        info, warnings = workdir_lib.provenance_lines(provenance)
        for line in info:
            log.info("%s", line)
        for line in warnings:
            log.warning("%s", line)
        workdir_lib.save_config(config, workdir)
        workdir_lib.write_class_map(
            workdir,
            config.input.category_ids,
            config.input.class_names,
            builders.source_stuff_map(source),
        )


class StepTimer:
    """Seconds per training step between two logged steps, without the time spent saving
    checkpoints and evaluating in between: images/s then measures training alone, however
    often those run."""

    def __init__(self, step: int, clock=time.perf_counter):
        self.clock = clock
        self.step = step
        self.since = clock()
        self.paused = 0.0

    @contextlib.contextmanager
    def pause(self, state):
        """Leave the enclosed block out of the step time. The steps dispatched before it are
        waited for first: their device time is training time."""
        jax.block_until_ready(state)
        began = self.clock()
        try:
            yield
        finally:
            self.paused += self.clock() - began

    def lap(self, step: int) -> float:
        """Mean seconds per step from the previous lap (or the start) to `step`."""
        now = self.clock()
        seconds = (now - self.since - self.paused) / max(step - self.step, 1)
        self.step, self.since, self.paused = step, now, 0.0
        return seconds


def _run_steps(config, state, step_fn, pipeline, mesh, ckpt, writer, bar, workdir, total):
    """Steps from state["step"] to total with logging, checkpoints and periodic evaluation;
    (state, None), or (state, (step, signal name)) when a signal stopped it early."""
    schedule = learning_rate(config)
    best = _best_so_far(workdir)
    first = int(state["step"])
    timer = StepTimer(first)
    compile_times = CompileTimes(config)
    previous = None  # the step before's metrics: waited for (never read) to move the bar
    with StopRequests() as stops, _logs_above_the_bar():
        _warn_about_warmup(config, first, total)
        if first < total:
            log.info("%s", compile_times.message())
        for step in range(first, total):
            batch = sharding.global_batch(device_fields(next(pipeline)), mesh)
            began = time.perf_counter()
            state, metrics = step_fn(state, batch)
            if step == first:  # the call compiles (or loads) the step; running it is async
                compile_times.record(time.perf_counter() - began)
            step_done = step + 1
            if previous is not None:
                # One step behind: the bar counts finished steps while the current one runs,
                # and the host never gets further ahead of the device than that.
                jax.block_until_ready(previous)
                bar.update(step - bar.n)
            previous = metrics
            if step_done % config.log_every == 0 or step_done == total:
                record = {k: float(v) for k, v in jax.device_get(metrics).items()}
                # Before the lap: the schedule's first evaluation compiles its ops (about a
                # second here), which belongs with step 1's compilation, not with step 2.
                record["lr"] = float(schedule(step))
                step_time = timer.lap(step_done)
                record.update(
                    step_time=step_time,
                    images_per_second=config.input.global_batch / max(step_time, 1e-9),
                )
                _log_step(config, record, step_done, writer, bar, ckpt)
            stopping = stops.received is not None
            force = step_done == total or stopping
            # The pipeline's position is read only for a checkpoint that will be written.
            if force or ckpt.manager.should_save(step_done):
                with timer.pause(state):
                    ckpt.save(step_done, state, pipeline.get_state(), force=True)
            if stopping:
                bar.update(step_done - bar.n)
                return state, (step_done, stops.received)
            every = config.eval.every_steps
            if every > 0 and (step_done % every == 0 or step_done == total):
                with timer.pause(state):
                    best = periodic_eval(config, state, workdir, step_done, best, pipeline)
        if first < total:
            log.info("input over the run: %s", input_report.summary(pipeline.total_counts))
    return state, None


@contextlib.contextmanager
def _logs_above_the_bar():
    """The package's log lines printed above the progress bar, not glued to its line (where the
    CLI set up a console handler)."""
    package = logging.getLogger("instseg_jax")
    if not any(isinstance(h, logging.StreamHandler) for h in package.handlers):
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[package], tqdm_class=tqdm):
        yield


def _warn_about_warmup(config, start: int, total: int) -> None:
    """A recipe's warmup carried into a shorter run: the learning rate never reaches
    optim.lr."""
    warmup = int(config.schedule.warmup_steps)
    if start < total and warmup >= total:
        log.warning(
            "schedule.warmup_steps=%d is not below the run's %d steps: the learning rate never "
            "reaches optim.lr=%g; set --config.schedule.warmup_steps=%d (a tenth of the run) or "
            "lower",
            warmup,
            total,
            config.optim.lr,
            max(total // 10, 1),
        )


class CompileTimes:
    """Seconds the first training step of a setting (method, canvas, batch, devices) took to
    compile, the longest seen, kept beside JAX's persistent compilation cache (when it is on)
    so that a run can say how long the wait on a cold cache is."""

    FILE = "instseg_jax_compile_seconds.json"

    def __init__(self, config):
        directory = jax.config.jax_compilation_cache_dir
        local = directory and "://" not in str(directory)  # not a gs:// cache
        self.path = Path(directory) / self.FILE if local else None
        canvas = "x".join(str(int(v)) for v in config.input.canvas_hw)
        self.key = (
            f"{config.method} canvas {canvas} batch {config.input.global_batch} "
            f"{jax.device_count()}x{jax.devices()[0].device_kind}"
        )

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def message(self) -> str:
        seconds = self._read().get(self.key) if self.path else None
        if seconds is None:
            wait = "this can take minutes on a CPU"
        else:
            wait = f"first run: about {seconds:.0f} s"
        cached = "; cached afterwards" if self.path else "; the compilation cache is off"
        return f"compiling the training step ({wait}{cached})"

    def record(self, seconds: float) -> None:
        if self.path is None or jax.process_index() != 0:
            return
        times = self._read()
        if seconds <= times.get(self.key, 0.0):
            return
        times[self.key] = round(seconds, 1)
        with contextlib.suppress(OSError):  # a read-only cache: no figure next time, no error
            partial = self.path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")
            os.replace(partial, self.path)


def _log_step(config, record: dict, step: int, writer, bar, ckpt) -> None:
    """Write a logged step's metrics, move the progress bar, and warn about (or stop after
    too many) non-finite losses."""
    writer.write(step, record)
    bar.update(step - bar.n)  # finished: its metrics are on the host
    bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_second']:.1f}")
    nonfinite_run = int(record["nonfinite_run"])
    if nonfinite_run:
        log.warning("step %d: non-finite loss, updates skipped (%d in a row)", step, nonfinite_run)
    if nonfinite_run >= config.max_nonfinite_in_a_row:
        raise NonFiniteLoss(
            f"{nonfinite_run} non-finite losses in a row up to step {step}; stopped. The last "
            f"good checkpoint in {ckpt.directory} is intact: lower optim.lr or raise "
            "optim.clip_norm and resume"
        )


def _best_so_far(workdir: Path) -> dict:
    path = workdir / "best.json"
    return json.loads(path.read_text()) if path.exists() else {"step": None, "AP": -1.0}


def periodic_eval(config, state, workdir: Path, step: int, best: dict, pipeline) -> dict:
    """Evaluate the current parameters (their EMA, with optim.ema_decay set) on the eval split;
    keep the best checkpoint by its main figure (PQ, keypoint AP, mask AP or box AP) in
    workdir/best and redraw the AP-versus-step plot."""
    if jax.process_count() > 1:
        log.warning("periodic evaluation runs in single-process training only; skipped")
        return best
    params = state.get("ema_params", state["params"])
    variables = {"params": params, "frozen": state["frozen"]}
    report = evaluate.evaluate_model(config, variables, workdir, step, print_tables=True)
    evaluate.plot_ap(workdir)
    # The model's main output decides the best checkpoint: the panoptic map's PQ (in [0, 1]
    # here), else keypoints, else masks, else boxes.
    if "panoptic" in report:
        key, ap = "panoptic", report["panoptic"]["PQ"] / 100.0
    else:
        key = next(k for k in ("keypoints", "segm", "bbox") if k in report)
        ap = report[key]["AP"]
    if best.get("iou_type", key) != key:  # a best of another kind (an older workdir)
        log.warning(
            "step %d: best.json holds %s AP %.4f, not %s: the best is kept by %s from now on",
            step, best["iou_type"], best["AP"], key, key,
        )  # fmt: skip
        best = {"step": None, "AP": -1.0}
    log.info(
        "step %d: %s %s %.4f (best %.4f)",
        step,
        key,
        "PQ" if key == "panoptic" else "AP",
        ap,
        best["AP"],
    )
    if ap > best["AP"]:
        best = {"step": step, "AP": ap, "iou_type": key}
        keeper = Checkpointer(workdir / "best", every_steps=1, keep=1, use_async=False)
        keeper.save(step, state, pipeline.get_state(), force=True)
        keeper.close()
        (workdir / "best.json").write_text(json.dumps(best) + "\n")
    return best


def main(args) -> int:
    config = config_lib.load(
        args.config, args.overrides, complete_record=workdir_lib.add_new_model_fields
    )
    try:
        train(config, args.workdir, max_steps=args.max_steps, experiment_file=args.config)
    except TrainingStopped as stopped:
        print(f"instseg-jax train: {stopped}", file=sys.stderr)
        return 130 if stopped.signal_name == "SIGINT" else 143
    return 0
