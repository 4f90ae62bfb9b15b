"""One training step and one inference pass of a method's smoke model on its first batch (DESIGN
"How a method earns its row", step 2), shared by the methods' smoke tests: each test keeps its
own assertions on what the step returns.

The loss and gradients are computed on a "data" mesh of two CPU devices, one image each (the
smoke batch holds two), and the program's HLO is read on the way: DESIGN "Only gradients cross
chips" is checked in the fast tier on the program the smoke test compiles anyway, not on a
second compile per method (a collective that mixes images shows between two devices as between
eight; tests/test_sharding_collectives.py compiles whole training steps on eight in the slow
tier). tests/conftest.py gives the test processes their two CPU devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from instseg_jax import builders, hlo_collectives, sharding
from instseg_jax import config as config_lib
from tests.methods.test_mask_rcnn import first_batch
from tests.test_sharding_collectives import crossings

MESH_DEVICES = 2


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
    and the detections of the same batch with the initial weights. Fails when the loss and
    gradient program, sharded over images, moves anything between devices but the gradients and
    a few scalars."""
    config = config_lib.load(experiment, list(overrides))
    source, batch = first_batch(config)
    cfg = builders.model_config(config, source.num_classes)
    model = module.Model(cfg)
    variables = jax.jit(
        lambda b: model.init(jax.random.key(0), b, train=True, key=jax.random.key(1))
    )(batch)

    def loss(p, b):
        outputs = model.apply({"params": p}, b, train=True, key=jax.random.key(2))
        return module.loss_fn(outputs, b, cfg)

    (total, metrics), grads = loss_and_gradients_over_images(loss, variables["params"], batch)
    det = jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)["detections"]
    return SmokeStep(cfg, batch, float(total), metrics, grads, det)


def loss_and_gradients_over_images(loss, params, batch):
    """((loss, metrics), gradients) of `loss(params, batch)` compiled as train.py's step is
    sharded (parameters replicated, images split over a two-device "data" mesh, outputs
    replicated, so the gradients are all-reduced here as there), after asserting from the
    compiled HLO that nothing but the gradients and a few scalars crosses devices."""
    mesh = Mesh(np.asarray(jax.devices()[:MESH_DEVICES]), ("data",))
    assert mesh.size == MESH_DEVICES, "tests/conftest.py sets jax_num_cpu_devices"
    replicated, by_image = sharding.replicated(mesh), sharding.data_sharded(mesh)
    params = jax.device_put(params, replicated)
    batch = jax.device_put(batch, by_image)
    program = (
        jax.jit(
            jax.value_and_grad(loss, has_aux=True),
            in_shardings=(replicated, by_image),
            out_shardings=replicated,
        )
        .lower(params, batch)
        .compile()
    )
    leaves = jax.tree.leaves(params)
    report = hlo_collectives.step_report(
        program.as_text(), [x.size for x in leaves], sum(x.nbytes for x in leaves)
    )
    assert not crossings(report), crossings(report)
    return program(params, batch)


def magnitude(tree) -> float:
    """Sum of absolute values over every leaf (0 only for an untouched gradient group)."""
    return float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))


def assert_total_is_the_sum(step: SmokeStep, terms) -> None:
    assert step.total == pytest.approx(sum(float(step.metrics[k]) for k in terms), rel=1e-5)
