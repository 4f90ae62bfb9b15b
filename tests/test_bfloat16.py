"""bfloat16 compute in every COCO recipe: float32 parameters, and the first step's loss and
gradient close to float32's on the same parameters and batch (issue 27, "Memory and precision").

The comparison is experiments/benchmarks/bf16_losses.py's `compare` (its docstring states the
tolerances and why); the recipes' own dtype is checked here without compiling anything."""

import sys
from pathlib import Path

import pytest

from instseg_jax import builders
from instseg_jax import config as config_lib

BENCHMARKS = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bf16_losses  # noqa: E402
from coco_step import EXPERIMENTS  # noqa: E402


@pytest.mark.parametrize("method", sorted(EXPERIMENTS))
def test_every_coco_recipe_computes_in_bfloat16_with_float32_parameters(method):
    config = config_lib.load(f"experiments/{EXPERIMENTS[method]}")
    assert builders.model_config(config, 80).compute_dtype == "bfloat16"
    assert config.optim.name in ("sgd", "adamw")  # optax keeps its state in the params' dtype


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(EXPERIMENTS))
def test_bfloat16_first_step_matches_float32(method):
    result = bf16_losses.compare(method)
    assert result["finite"], result
    assert result["total_rel"] <= bf16_losses.TOTAL_LOSS_RTOL, result
    assert result["grad_rel"] <= bf16_losses.gradient_tolerance(method), result
