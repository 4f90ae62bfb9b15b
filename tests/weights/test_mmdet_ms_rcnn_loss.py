"""Mask Scoring R-CNN's MaskIoU head (methods/ms_rcnn.py MaskIoUHead, area_ratios,
maskiou_targets, mask_scoring_losses) reproduces mmdetection 3.3's MaskIoUHead and
MaskScoringRoIHead.mask_loss's MaskIoU part on the same RoIs, features, mask logits and head
parameters.

tests/fixtures/mmdet_ms_rcnn_loss_tiny.npz was written by `experiments/parity/ms_rcnn_loss.py
--make-fixture` in the `make peer-mmdet` environment: three two-image batches on a 128 x 128
canvas (few+crowded, crowded+empty, nuclei+few; the scenes are rebuilt here, the nuclei one
from the shared DSB 2018 set, and checked against the masks' checksums the fixture keeps), the
positive RoIs and mmdetection's answers: its 28 x 28 mask targets, area ratios, IoU targets,
the RoIs trained, the head's output, the loss and its gradient with respect to every parameter,
the RoI features and the mask logits. The seeded state dict and inputs are drawn again here
(checked against the fixture's SHA-256) and go through ours, with no torch.

Checks: on mmdetection's mask targets and area ratios, the IoU targets and trained RoIs equal
its own, the output, loss and gradients agree to float32 noise; on our own targets (box crops
of 112 cells) the area ratios, IoU targets and loss stay within the measured differences.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from instseg_jax.weights import mmdet_ms_rcnn_loss as parity
from instseg_jax.weights import mmdet_pointrend_loss as scenes
from instseg_jax.weights.mmdet_loss_parity import checksum, relative_difference
from tests.conftest import SHARED_NUCLEI

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mmdet_ms_rcnn_loss_tiny.npz"
OUTPUT_TOLERANCE = 1e-5  # relative; measured 1.3e-6 (experiments/parity/ms_rcnn_loss.py)
LOSS_TOLERANCE = 1e-5  # relative; measured 7.9e-8
GRAD_TOLERANCE = 2e-5  # relative norm of the difference; measured 1.3e-6
# Our own targets from the box crops: measured area ratios 0.013, IoU targets 0.0071, the loss
# 1.1% (relative) at most over the three batches; no RoI trained differently.
OWN_RATIO_TOLERANCE = 0.02
OWN_IOU_TARGET_TOLERANCE = 0.01
OWN_LOSS_TOLERANCE = 0.02
ROI_FIELDS = ("boxes", "classes", "gt_index", "foreground")


# Slow tier: one program (both targets' losses and gradients) compiles in 11-25 s on the 2-core
# machine, over the ~5 s a parity test may take in the fast tier.
@pytest.mark.slow
def test_maskiou_head_and_loss_match_mmdetection():
    data = np.load(FIXTURE)
    meta = json.loads(str(data["config"]))
    cfg = parity.ms_rcnn_config()
    state_dict = parity.random_state_dict(cfg, meta["state_dict_seed"])
    assert checksum(state_dict) == meta["state_dict_sha256"], "the seeded state dict changed"
    params = parity.convert_head(state_dict, cfg)
    for k, batch in enumerate(meta["batches"]):
        names = batch.split("+")
        if "nuclei" in names and not SHARED_NUCLEI.is_dir():
            pytest.skip(f"{SHARED_NUCLEI}: the shared nuclei set is absent")
        images = [scenes.scene(n, SHARED_NUCLEI) for n in names]
        for name, (_, masks) in zip(names, images, strict=True):
            assert scenes.checksum(masks) == meta["checksums"][name], name
        features, logits = parity.random_inputs(cfg, len(images), meta["input_seed"] + k)
        assert checksum([features, logits]) == meta["inputs_sha256"][k], "the inputs changed"
        rois = {n: data[f"b{k}_{n}"] for n in ROI_FIELDS}
        valid = rois["foreground"]
        theirs = {
            n[len(f"b{k}_mmdet_") :]: data[n] for n in data.files if n.startswith(f"b{k}_mmdet_")
        }
        gt = scenes.ground_truth(images, parity.CROP_SIZE)
        given = {
            "mask_targets": scenes.to_slots(theirs["mask_targets"], valid),
            "area_ratios": scenes.to_slots(theirs["area_ratios"], valid),
        }
        ours, own, own_targets = parity.maskiou_terms(
            rois, features, logits, params, gt, cfg, given
        )
        np.testing.assert_array_equal(ours["trained"][valid], theirs["trained"])
        np.testing.assert_allclose(ours["iou_targets"][valid], theirs["iou_targets"], atol=1e-6)
        assert relative_difference(ours["mask_iou"][valid], theirs["mask_iou"]) < OUTPUT_TOLERANCE
        assert relative_difference(ours["loss_mask_iou"], theirs["loss_mask_iou"]) < LOSS_TOLERANCE
        for name in ("grad_features", "grad_logits"):
            assert relative_difference(ours[name][valid], theirs[name]) < GRAD_TOLERANCE, name
        grads = parity.to_state_dict_layout(ours["grad_params"], cfg)
        for key, value in grads.items():
            assert relative_difference(value, theirs[f"grad.{key}"]) < GRAD_TOLERANCE, key

        ratio_diff = np.abs(own_targets["area_ratios"][valid] - theirs["area_ratios"])
        assert ratio_diff.max(initial=0.0) < OWN_RATIO_TOLERANCE, batch
        iou_diff = np.abs(own["iou_targets"][valid] - theirs["iou_targets"])
        assert iou_diff.max(initial=0.0) < OWN_IOU_TARGET_TOLERANCE, batch
        np.testing.assert_array_equal(own["trained"][valid], theirs["trained"])
        own_loss = relative_difference(own["loss_mask_iou"], theirs["loss_mask_iou"])
        assert own_loss < OWN_LOSS_TOLERANCE, batch
