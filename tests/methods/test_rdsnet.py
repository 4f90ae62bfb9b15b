"""RDSNet: anchor assignment, the mask crop, the OHEM mask loss, the correlation and MBRM
against float64 NumPy encodings of the reference's rules (tests/methods/rdsnet_reference.py,
written from wangsr126/RDSNet), the smoke step, and (slow) over-fitting 4 scenes and the COCO
experiment's step."""

import numpy as np

from instseg_jax.methods import rdsnet
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step

SMOKE = "experiments/rdsnet_nuclei.py:smoke"


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(rdsnet, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert np.isfinite(step.total)
    assert_total_is_the_sum(step, ("loss_cls", "loss_box_reg", "loss_mask"))
    assert float(metrics["positive_anchors"]) > 0 and float(metrics["trained_masks"]) > 0
    assert float(metrics["loss_mask"]) > 0
    for name in ("fpn", "objects", "pixels"):
        assert magnitude(grads[name]) > 0, name
    for tower in ("cls0", "reg0", "rep0", "rep_out"):
        assert magnitude(grads["objects"][tower]) > 0, tower
    for name, group in grads["backbone"].items():
        assert (magnitude(group) > 0) == (name != "stem"), name

    k, (h, w) = cfg.detections_per_image, (v // 4 for v in cfg.canvas_hw)
    assert det["canvas_masks"].shape == (2, k, h, w) and det["boxes"].shape == (2, k, 4)
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)
    assert np.isfinite(np.asarray(det["boxes"])).all()
