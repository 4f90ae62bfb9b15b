"""One training step and one inference pass of a method's smoke model on its first batch (DESIGN
"How a method earns its row", step 2), shared by the methods' smoke tests: each test keeps its
own assertions on what the step returns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from instseg_jax import builders
from instseg_jax import config as config_lib
from tests.methods.test_mask_rcnn import first_batch


@dataclasses.dataclass
class SmokeStep:
    cfg: object
    batch: dict
    total: float
    metrics: dict
    grads: dict
    detections: dict


def smoke_step(module, experiment: str, overrides=()) -> SmokeStep:
    """The loss, its metrics and gradients of one step (init, loss and inference each one jit),
    and the detections of the same batch with the initial weights."""
    config = config_lib.load(experiment, list(overrides))
    source, batch = first_batch(config)
    cfg = builders.model_config(config, source.num_classes)
    model = module.Model(cfg)
    variables = jax.jit(
        lambda b: model.init(jax.random.key(0), b, train=True, key=jax.random.key(1))
    )(batch)

    def loss(p):
        outputs = model.apply({"params": p}, batch, train=True, key=jax.random.key(2))
        return module.loss_fn(outputs, batch, cfg)

    (total, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    det = jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)["detections"]
    return SmokeStep(cfg, batch, float(total), metrics, grads, det)


def magnitude(tree) -> float:
    """Sum of absolute values over every leaf (0 only for an untouched gradient group)."""
    return float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))


def assert_total_is_the_sum(step: SmokeStep, terms) -> None:
    assert step.total == pytest.approx(sum(float(step.metrics[k]) for k in terms), rel=1e-5)
