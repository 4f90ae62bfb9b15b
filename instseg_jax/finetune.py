"""`model.init_from`: start a new training run from the weights of another run or of an
imported detector (`instseg-jax import-weights`), as torchvision's fine-tuning tutorial does when
it replaces a COCO Mask R-CNN's box and mask predictors for its own classes.

    instseg-jax train --config ... --workdir runs/mine --config.model.init_from=runs/tv[:STEP]

Every parameter and frozen statistic whose path and shape match the new model is loaded. The
class-specific leaves are found, not listed: this run's model is traced (shapes only) a second
time at the source's class count (and stuff count); the leaves whose shapes change between the
two are the ones whose shape is set by the class count (Mask R-CNN's cls_score, bbox_pred and
mask predictor, FCOS's cls_logits, Mask2Former's class_embed, PointRend's point head, whose
inputs carry the coarse class scores), and they keep the fresh initialisation of the run's seed.
Any other difference (a path missing on either side, a shape another model field set) is an
architecture mismatch, refused in one line naming the first differing leaf. The optimizer, the
step and the input stream start fresh.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from instseg_jax import config as config_lib
from instseg_jax import workdir as workdir_lib
from instseg_jax.config import ConfigValueError, UserError

FIELD = "model.init_from"

# Model fields that say where weights come from, not what the model is: never compared.
WEIGHT_SOURCES = ("init_from", "backbone_weights")


class InitFromError(ConfigValueError):
    """model.init_from names no usable checkpoint, or one whose model does not fit this run."""


def parse(spec: str) -> tuple[Path, int | None]:
    """(workdir, step or None for the latest) of "WORKDIR" or "WORKDIR:STEP"."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and tail.isdigit() and head:
        return Path(head), int(tail)
    return Path(spec), None


@dataclasses.dataclass
class Source:
    """A checkpoint to start from: where it is, the config it was trained (or imported) with,
    its class map and its variables {"params": tree, "frozen": tree}."""

    spec: str
    workdir: Path
    step: int
    config: object
    class_names: list
    variables: dict

    @property
    def num_stuff_classes(self):
        return self.config.model.get("num_stuff_classes")


def read_source(spec: str) -> Source:
    """The checkpoint model.init_from names, refused in one line naming the field when there is
    none (no config.json, no such step)."""
    workdir, step = parse(spec)
    try:
        config, variables, step = workdir_lib.restore_variables(workdir, step)
        _, names = workdir_lib.read_class_map(workdir, config)
    except UserError as error:
        raise InitFromError(f"{FIELD}={spec}: {error}") from None
    return Source(spec, workdir, step, config, list(names), variables)


def check_source(config) -> None:
    """Refuse, before the data loads, a model.init_from that names no workdir or a workdir of
    another method (only its config.json is read; the checkpoint is read when the run starts)."""
    spec = config.model.get("init_from")
    if not spec:
        return
    workdir, _ = parse(spec)
    path = workdir / workdir_lib.CONFIG_FILE
    if not path.is_file():
        raise InitFromError(
            f"{FIELD}={spec}: no {path}; give a workdir written by `instseg-jax train` or "
            "`instseg-jax import-weights` (WORKDIR, or WORKDIR:STEP for another checkpoint)"
        )
    check_method(spec, config_lib.from_json(path), config)


def check_method(spec: str, source_config, config) -> None:
    """Weights of another method are refused, naming both."""
    if source_config.method != config.method:
        workdir, _ = parse(spec)
        raise InitFromError(
            f"{FIELD}={spec} holds {source_config.method} weights; this run trains "
            f"{config.method}: give a {config.method} workdir, or train "
            f"{source_config.method} (--config {workdir})"
        )


def leaf_shapes(variables: dict) -> dict[tuple, tuple]:
    """{(collection, module, ..., name): shape} of a variables tree (arrays or shape structs);
    empty collections have no leaves."""
    return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(variables).items()}


def name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass
class Plan:
    """Which leaves of the new model come from the checkpoint and which stay freshly
    initialised (path, shape in the checkpoint, shape here)."""

    loaded: list
    reinitialised: list


def match(fresh: dict, source: dict, at_source_classes: dict | None, describe: str) -> Plan:
    """The plan of loading `source` into a model of leaf shapes `fresh`.

    fresh, source: leaf_shapes of this run's fresh variables and of the checkpoint's;
    at_source_classes: leaf_shapes of this run's model built at the source's class counts (None
    when they are this run's). A leaf is class-specific when its shape differs between fresh
    and at_source_classes; every other leaf must be in the checkpoint with the same shape, and
    the checkpoint must hold nothing else. describe: the refusal's tail (why and what to do).
    """
    expected = fresh if at_source_classes is None else at_source_classes
    class_specific = {p for p in fresh if expected.get(p) != fresh[p]}
    # In the model's order, the class-specific leaves last: when one of them differs at the
    # checkpoint's class count too, a leaf before it (its input) says why.
    order = [p for p in expected if p not in class_specific]
    order += [p for p in source if p not in expected] + [p for p in fresh if p in class_specific]
    for path in order:
        if expected.get(path) != source.get(path):
            here = expected.get(path, "absent")
            counts = " at the checkpoint's class count" if path in class_specific else ""
            raise InitFromError(
                f"{name(path)} is {source.get(path, 'absent')} in the checkpoint and {here} in "
                f"this run's model{counts}: {describe}"
            )
    loaded = [p for p in fresh if p not in class_specific]
    reinitialised = [(p, source[p], fresh[p]) for p in sorted(class_specific, key=name)]
    return Plan(loaded, reinitialised)


def differing_model_fields(source_config, config) -> list[str]:
    """`field (source value there, value here)` for each model field the two configs set
    differently (the weight-source fields left out)."""
    there, here = source_config.model.to_dict(), config.model.to_dict()
    fields = sorted((set(there) | set(here)) - set(WEIGHT_SOURCES))
    return [
        f"{f} ({there.get(f, 'absent')!r} there, {here.get(f, 'absent')!r} here)"
        for f in fields
        if _plain(there.get(f)) != _plain(here.get(f))
    ]


def _plain(value):
    """Lists and tuples compare alike (config.json holds lists, experiment files tuples)."""
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def loaded_variables(config, variable_shapes: Callable, notes: list) -> dict:
    """The variables model.init_from gives this run: {collection: tree} of the checkpoint's
    leaves that fit (class-specific ones left out, to keep their fresh initialisation), for
    `with_loaded`. Refuses another method or an architecture mismatch before anything is
    computed; appends what was loaded and re-initialised, and why, to `notes` (the start-up
    summary).

    variable_shapes(config, num_classes): the shapes of the variables of config's model with
    num_classes thing classes (traced, nothing computed)."""
    source = read_source(config.model.init_from)
    check_method(source.spec, source.config, config)
    new_names = list(config.input.class_names)
    num_classes, source_classes = len(new_names), len(source.class_names)
    fresh = leaf_shapes(variable_shapes(config, num_classes))
    at_source_classes = None
    variant = config
    stuff_here = config.model.get("num_stuff_classes")
    if source_classes != num_classes or source.num_stuff_classes != stuff_here:
        variant = copy.deepcopy(config)
        with variant.unlocked():
            if stuff_here is not None and source.num_stuff_classes is not None:
                variant.model.num_stuff_classes = source.num_stuff_classes
        at_source_classes = leaf_shapes(variable_shapes(variant, source_classes))
    differing = differing_model_fields(source.config, config)
    fix = (
        "the architecture differs (model fields that differ: "
        + ("; ".join(differing[:4]) or "none; the code that built the checkpoint differed")
        + f"): train with {source.workdir}/config.json's model fields, or without {FIELD}"
    )
    try:
        plan = match(fresh, leaf_shapes(source.variables), at_source_classes, fix)
    except InitFromError as error:
        raise InitFromError(f"{FIELD}={source.spec}: {error}") from None
    notes.extend(_summary(source, config, plan, fresh, new_names, differing))
    checkpoint = traverse_util.flatten_dict(source.variables)
    return traverse_util.unflatten_dict({p: checkpoint[p] for p in plan.loaded})


def with_loaded(variables: dict, loaded: dict) -> dict:
    """variables (a fresh initialisation) with the leaves `loaded` holds replaced, each cast to
    the fresh leaf's dtype; the tree's structure, empty collections included, is kept."""
    flat = traverse_util.flatten_dict(variables, keep_empty_nodes=True)
    for path, value in traverse_util.flatten_dict(loaded).items():
        flat[path] = jnp.asarray(value, flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


def _summary(source: Source, config, plan: Plan, fresh: dict, names: list, differing) -> list:
    """The start-up summary's lines on what init_from loaded, re-initialised, and why."""
    count = lambda paths: sum(int(np.prod(fresh[p])) for p in paths)
    reinit = [p for p, _, _ in plan.reinitialised]
    lines = [
        f"{FIELD}: {len(plan.loaded)} of {len(fresh)} leaves ({count(plan.loaded) / 1e6:.2f} M "
        f"values, frozen statistics included) loaded from {source.workdir} step {source.step} "
        f"({source.config.method}, {len(source.class_names)} classes); optimizer and step start "
        "at 0"
    ]
    if plan.reinitialised:
        shown = ", ".join(f"{name(p)} {have}->{want}" for p, have, want in plan.reinitialised)
        lines.append(
            f"{FIELD}: {len(reinit)} class-specific leaves ({count(reinit) / 1e6:.3f} M values) "
            f"re-initialised, as the class count is {len(names)} here and "
            f"{len(source.class_names)} there: {shown}"
        )
    elif source.class_names != names:
        lines.append(
            f"{FIELD}: same class count, other classes ({source.class_names[:3]}... there, "
            f"{names[:3]}... here): the predictors load as they are, class i starting as the "
            "source's class i"
        )
    if config.model.get("backbone_weights"):
        lines.append(
            f"{FIELD} takes precedence: model.backbone_weights={config.model.backbone_weights} "
            "is not read (the checkpoint holds the backbone)"
        )
    if differing:
        lines.append(
            f"{FIELD}: model fields that differ from the checkpoint's config (shapes unchanged; "
            f"the loaded weights were trained with the values there): {'; '.join(differing)}"
        )
    return lines
