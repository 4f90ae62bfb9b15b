"""A run's workdir files, read and written in one place: config.json (the config the run used),
classes.json (its class map), provenance.json (the code each training start ran: its checkout,
commit and uncommitted files), and the checkpoint that evaluation and prediction restore.

train writes a workdir and checks, before resuming, that its checkpoint fits the config;
evaluate, predict and demo read one back; import-weights writes one a training run never made.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path

import ml_collections

from instseg_jax import builders
from instseg_jax import config as config_lib
from instseg_jax.config import ConfigValueError, UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.json"
PROVENANCE_FILE = "provenance.json"


def save_config(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Record the config a run used as workdir/config.json (`--config WORKDIR` trains from it)."""
    path = Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json(indent=2, sort_keys=True) + "\n")
    return path


def write_class_map(workdir, category_ids, class_names, stuff_map=((), ())) -> Path:
    """Record a workdir's class map (and its stuff classes, when it has some), so eval and
    predict need neither the data nor the paths it was trained with."""
    path = Path(workdir) / CLASSES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"category_ids": [int(i) for i in category_ids], "class_names": list(class_names)}
    if stuff_map[0]:
        document["stuff_category_ids"] = [int(i) for i in stuff_map[0]]
        document["stuff_names"] = list(stuff_map[1])
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def read_class_map(workdir, config) -> tuple[list[int], list[str]]:
    """The class map a workdir was trained (or imported) with; workdirs older than classes.json
    fall back to the config's explicit map or its evaluation data."""
    path = Path(workdir) / CLASSES_FILE
    if path.exists():
        document = json.loads(path.read_text())
        return [int(i) for i in document["category_ids"]], list(document["class_names"])
    if config.input.get("category_ids"):
        return builders.class_map(config)
    return builders.class_map(
        config, builders.build_source(config.input, train=False, seed=config.seed)
    )


def read_stuff_map(workdir) -> tuple[list[int], list[str]]:
    """The stuff classes a workdir was trained with (classes.json); empty without."""
    path = Path(workdir) / CLASSES_FILE
    document = json.loads(path.read_text()) if path.exists() else {}
    return list(document.get("stuff_category_ids", [])), list(document.get("stuff_names", []))


def restore_variables(
    workdir: str | Path, step: int | None = None, overrides=(), raw_weights: bool = False
):
    """(config, variables, step) of a training workdir's checkpoint (latest by default), the
    config being workdir/config.json with `--config.a.b=value` overrides applied (eval and
    predict: e.g. model.score_threshold). A run trained with optim.ema_decay gives its
    parameters' moving average as "params", the weights it evaluated."""
    # Imported here, not above: `eval --results` and the writers above never restore, and
    # orbax is slow to import.
    import orbax.checkpoint as ocp

    from instseg_jax.checkpoint import Checkpointer

    workdir = Path(workdir)
    if not (workdir / CONFIG_FILE).is_file():
        raise UserError(
            f"{workdir}: no config.json; give a workdir written by `instseg-jax train` or "
            "`instseg-jax import-weights`"
        )
    config = config_lib.from_record(workdir / CONFIG_FILE, add_new_model_fields, lock=False)
    for override in overrides:
        config_lib.apply_override(config, override)
    if overrides:  # checked as train checks its own
        config_lib.validate(config, f"{workdir / CONFIG_FILE} with {' '.join(overrides)}")
    checkpointer = Checkpointer(workdir, 1, 10, use_async=False)
    available = checkpointer.manager.all_steps()
    step = checkpointer.latest_step() if step is None else step
    if step is None or step not in available:
        checkpointer.close()
        raise UserError(
            f"{workdir}/checkpoints: no checkpoint {'' if step is None else step} "
            f"(available steps: {sorted(available) or 'none'})"
        )
    restored = checkpointer.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
    )
    checkpointer.close()
    state = restored["state"]
    params = state["params"]
    if "ema_params" in state and raw_weights:
        log.info("%s: checkpoint %d: the raw weights, not their EMA", workdir, step)
    elif "ema_params" in state:
        params = state["ema_params"]
        log.info(
            "%s: checkpoint %d holds an EMA of the weights (optim.ema_decay=%s): using it, not "
            "the raw weights",
            workdir,
            step,
            config.optim.get("ema_decay", "?"),
        )
    return config, {"params": params, "frozen": state.get("frozen", {})}, step


def add_new_model_fields(config: ml_collections.ConfigDict, source) -> list[str]:
    """Give a config.json written before its method gained a model field (FCIS's
    model.test_mask_voting) that field's default, the value the method's Config takes for it
    anyway, so that `--config.model.FIELD=VALUE` can override it; the fields added, logged."""
    added = []
    if config.get("model") is None or not config.get("method"):  # nothing to complete
        return added
    for field in dataclasses.fields(builders.method(config).Config):
        known = field.name in config.model or field.name in ("num_classes", "canvas_hw")
        if not known and field.default is not dataclasses.MISSING:
            config.model[field.name] = field.default
            added.append(field.name)
    if added:
        log.info("%s predates model fields %s: their defaults apply", source, ", ".join(added))
    return added


def check_resumable(config, ckpt, step: int, config_shapes: dict) -> None:
    """Refuse, in one line and before anything in the workdir changes, to resume checkpoint
    `step` into a model it does not fit: weights written by import-weights (no optimizer state,
    no input position), another method, another class map (from the workdir's config.json and
    classes.json), or arrays of other shapes (a model or optim field changed). config_shapes:
    checkpoint.leaf_shapes of the state the config builds."""
    workdir = ckpt.directory.parent
    fix = "use a new --workdir (this one is left as it was)"
    data_state = ckpt.data_state(step)
    if "imported_from" in data_state:
        raise ConfigValueError(
            f"{workdir} holds weights imported by import-weights (from "
            f"{data_state['imported_from']}), not a training run to resume: {fix}"
        )
    saved = _read_json(workdir / CONFIG_FILE)
    saved_method = saved.get("method", "?")
    # classes.json, else the class map config.json recorded; neither in the oldest workdirs.
    recorded = _read_json(workdir / CLASSES_FILE) or saved.get("input", {})
    saved_ids = [int(i) for i in recorded.get("category_ids") or ()] or None
    saved_names = [str(n) for n in recorded.get("class_names") or ()]
    classes = "" if saved_ids is None else f"{len(saved_ids)}-class "
    if saved:
        held = f"{workdir} holds a {classes}{saved_method} checkpoint (step {step})"
    else:  # a checkpoint without its config.json (written by hand, or the file was lost)
        held = f"{workdir} holds a checkpoint (step {step}) without its config.json"
    if saved and saved_method != config.method:
        raise ConfigValueError(f"{held}; the config asks for {config.method}: {fix}")
    ids, names = list(config.input.category_ids), list(config.input.class_names)
    if saved_ids is not None and len(saved_ids) != len(ids):
        raise ConfigValueError(f"{held}; the config asks for {len(ids)} classes: {fix}")
    if saved_ids is not None and (saved_ids, saved_names) != (ids, names):
        raise ConfigValueError(
            f"{held} of classes {_some(saved_names)}; the training data's are {_some(names)} "
            f"(category ids {_some(saved_ids)} and {_some(ids)}): {fix}"
        )
    have, want = ckpt.state_shapes(step), config_shapes
    has_ema, wants_ema = (any(k.startswith("ema_params/") for k in t) for t in (have, want))
    if has_ema != wants_ema:
        saved_decay = saved.get("optim", {}).get("ema_decay", 0.0)
        raise ConfigValueError(
            f"{held} {'with' if has_ema else 'without'} an EMA of the weights "
            f"(optim.ema_decay={saved_decay}); the config sets optim.ema_decay="
            f"{config.optim.get('ema_decay', 0.0)}: resume with "
            f"--config.optim.ema_decay={saved_decay}, or {fix}"
        )
    differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if differ:
        first = differ[0]
        raise ConfigValueError(
            f"{held} whose arrays do not fit the config's model and optimizer ({len(differ)} "
            f"differ; {first}: {have.get(first, 'absent')} in the checkpoint, "
            f"{want.get(first, 'absent')} for the config): a model or optim field changed; "
            f"resume with --config {workdir / CONFIG_FILE}, or {fix}"
        )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _some(values, shown: int = 5) -> str:
    """[a, b, c, ...] of a long list, for messages."""
    head = ", ".join(str(v) for v in values[:shown])
    return f"[{head}{', ...' if len(values) > shown else ''}]"


def write_imported_workdir(out: str | Path, config, variables: dict, imported_from: str) -> Path:
    """Write the workdir of weights another library trained (import-weights): config.json,
    classes.json and checkpoint 0 of {"params", "frozen"} (no optimizer state), its data state
    recording where the weights came from so that training refuses to resume it."""
    # Imported here, as in restore_variables: the readers above need neither JAX nor orbax.
    import jax
    import jax.numpy as jnp

    from instseg_jax.checkpoint import Checkpointer

    out = Path(out)
    save_config(config, out)
    write_class_map(out, config.input.category_ids, config.input.class_names)
    state = {
        "params": jax.tree.map(jnp.asarray, variables["params"]),
        "frozen": jax.tree.map(jnp.asarray, variables["frozen"]),
        "step": jnp.asarray(0, jnp.int32),
    }
    checkpointer = Checkpointer(out, 1, 1, use_async=False)
    checkpointer.save(0, state, {"imported_from": imported_from}, force=True)
    checkpointer.close()
    return out


def code_provenance(experiment_file: str | Path | None = None) -> dict:
    """Where this process's code comes from: the imported instseg_jax package, its checkout's
    commit and uncommitted tracked files (None where git or a checkout is missing), and, for an
    experiment file, the checkout it lies in. `shadowed_package` names that checkout's own
    instseg_jax when it is not the imported one: an editable install of another checkout, run
    from a worktree without PYTHONPATH=., trains the other checkout's code with this one's
    experiment files, and the run's figures are not of the worktree's commit."""
    package = Path(__file__).resolve().parent
    # Only a package git tracks is a checkout's code: an installed copy inside a checkout's
    # (ignored) .venv would otherwise report that checkout's commit.
    tracked = _git(package, "ls-files", "--error-unmatch", "__init__.py") is not None
    code_repo = _git(package, "rev-parse", "--show-toplevel") if tracked else None
    status = _git(package, "status", "--porcelain", "--untracked-files=no") if code_repo else None
    record = {
        "package": str(package),
        "code_repo": code_repo,
        "commit": _git(package, "rev-parse", "HEAD") if code_repo else None,
        "uncommitted": None if status is None else [line[3:] for line in status.splitlines()],
        "experiment_file": None,
        "shadowed_package": None,
    }
    path = Path(str(experiment_file).split(":")[0]) if experiment_file else None
    if path is not None and path.suffix == ".py" and path.is_file():
        path = path.resolve()
        record["experiment_file"] = str(path)
        for folder in path.parents:
            own = folder / "instseg_jax"
            if (own / "__init__.py").is_file():
                if own.resolve() != package:
                    record["shadowed_package"] = str(own)
                break
    return record


def append_provenance(workdir: str | Path, record: dict) -> Path:
    """Add one training start's record (code_provenance, the command, the time, jax's version)
    to workdir/provenance.json, a list: a resumed run keeps each start's code."""
    path = Path(workdir) / PROVENANCE_FILE
    starts = _read_json(path) if path.is_file() else []
    starts = starts if isinstance(starts, list) else [starts]
    entry = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "jax": importlib.metadata.version("jax"),
        **record,
    }
    path.write_text(json.dumps([*starts, entry], indent=2) + "\n")
    return path


def provenance_lines(record: dict) -> tuple[list[str], list[str]]:
    """(info, warnings) to log for a code_provenance record."""
    commit = (record["commit"] or "")[:10]
    uncommitted = record["uncommitted"] or []
    where = record["package"] + (f" at commit {commit}" if commit else " (not a git checkout)")
    if uncommitted:
        state = f", {len(uncommitted)} uncommitted files"
    else:
        state = ", clean" if commit else ""
    warnings = []
    if uncommitted:
        warnings.append(
            f"the code has uncommitted changes ({_some(uncommitted)}): this run's figures are "
            f"not those of commit {commit} alone"
        )
    if record["shadowed_package"]:
        warnings.append(
            f"{record['experiment_file']} lies beside its own {record['shadowed_package']}, but "
            f"the code running is {record['package']} (an editable install of another "
            "checkout): run with PYTHONPATH set to the experiment's checkout, or install that one"
        )
    return [f"code: {where}{state}"], warnings


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    # rstrip only: a porcelain status line starts with a space where the index is unchanged.
    return done.stdout.rstrip() if done.returncode == 0 else None
