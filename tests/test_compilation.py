"""The CPU compile options hold: no convolution of the training step runs inside a YNNPACK
fusion (a jax upgrade that brings the slow weight gradient back fails here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import builders, compilation, sharding
from instseg_jax import config as config_lib
from instseg_jax import train as train_lib
from instseg_jax.input.pipeline import padding_example

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU compile option")


def test_the_detector_finds_a_convolution_in_a_ynn_fusion_without_the_option():
    x, w = jnp.ones((2, 64, 64, 64)), jnp.ones((3, 3, 64, 64))

    def loss(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims).sum()

    grad = jax.grad(loss, argnums=(0, 1))
    default = jax.jit(grad).lower(x, w).compile().as_text()
    if "__ynn_fusion" not in default:
        pytest.skip(f"jax {jax.__version__} puts nothing in YNNPACK fusions here")
    assert compilation.ynn_convolutions(default)
    assert compilation.compiler_options()  # this jax accepts the option
    assert compilation.ynn_convolutions(compilation.jit(grad).lower(x, w).compile().as_text()) == []


# Slow tier since 2026-12-06 (about 50 s: a whole Mask R-CNN step compiled), to keep `make test`
# under 20 minutes; the op-level check above holds the CPU option in the fast tier.
@pytest.mark.slow
def test_the_training_step_has_no_convolution_in_a_ynn_fusion():
    config = config_lib.load("experiments/maskrcnn_nuclei.py:smoke")
    method, cfg, model = builders.build_model(config, 3)
    example = builders.device_fields(padding_example(builders.transform_config(config, True)))
    batch = {k: np.stack([v] * 2) for k, v in example.items()}
    # Shapes only: the step is compiled, never run (an eager init costs a minute here).
    variables = jax.eval_shape(
        lambda b: model.init(jax.random.key(0), b, train=True, key=jax.random.key(1)), batch
    )
    tx = train_lib.optimizer(config, variables["params"])
    state = jax.eval_shape(lambda v: train_lib.state_from_variables(v, tx, config), variables)
    mesh = sharding.make_mesh()
    step = train_lib.make_train_step(
        model, method.loss_fn, tx, cfg, mesh, sharding.replicated(mesh)
    )
    text = step.lower(state, batch).compile().as_text()
    assert " convolution(" in text  # the step has convolutions to check
    assert compilation.ynn_convolutions(text) == []
