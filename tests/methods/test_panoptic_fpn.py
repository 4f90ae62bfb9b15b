"""Panoptic FPN: the semantic loss against a NumPy cross-entropy with ignored cells, the smoke
step (both heads trained, semantic classes beside the detections), over-fitting 4 scenes to
PQ >= 80 and the COCO experiment's step (slow). The combination, panoptic quality and the
panoptic outputs are tested in tests/test_panoptic.py, the panoptic source in
tests/input/test_coco_panoptic.py."""

import numpy as np
import pytest

from instseg_jax.methods import panoptic_fpn
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step


def test_semantic_loss_is_the_mean_cross_entropy_over_labelled_cells():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    targets = rng.integers(0, 3, (2, 4, 5)).astype(np.uint8)
    targets[0, :2] = panoptic_fpn.IGNORE
    got = float(panoptic_fpn.semantic_loss(logits, targets))
    x = logits.astype(np.float64)
    nll = (
        np.log(np.exp(x).sum(-1))
        - np.take_along_axis(x, np.minimum(targets, 2)[..., None].astype(np.int64), -1)[..., 0]
    )
    assert got == pytest.approx(nll[targets != 255].mean(), rel=1e-5)
    assert float(panoptic_fpn.semantic_loss(logits, np.full_like(targets, 255))) == 0.0


def test_one_step_trains_both_heads_and_ships_semantic_classes():
    step = smoke_step(panoptic_fpn, "experiments/panoptic_fpn_synthetic.py:smoke")
    terms = ["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"]
    terms.append("loss_sem_seg")
    assert all(np.isfinite(float(step.metrics[k])) for k in terms)
    assert_total_is_the_sum(step, terms)
    assert float(step.metrics["loss_sem_seg"]) > 0
    assert magnitude(step.grads["semantic_head"]) > 0 and magnitude(step.grads["mask_head"]) > 0
    classes = np.asarray(step.detections["semantic_classes"])
    assert classes.shape == (2, 32, 32) and classes.max() <= 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipes' compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import overfit_report

    report = overfit_report(
        "experiments/panoptic_fpn_synthetic.py",
        tmp_path / "overfit",
        steps=300,
        overrides=[
            f"--config.model.compute_dtype={dtype}",
            "--config.optim.name=adamw",
            "--config.optim.lr=0.002",
        ],
    )
    assert report["panoptic"]["PQ"] >= 80, report["panoptic"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("panoptic_fpn")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
