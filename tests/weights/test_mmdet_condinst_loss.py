"""CondInst's targets and losses reproduce mmdetection 3.3's CondInstBboxHead.loss_by_feat and
CondInstMaskHead.loss_by_feat on the same head outputs and ground truth (issue 29 item 4).

tests/fixtures/mmdet_condinst_loss_tiny.npz was written by `experiments/parity/condinst_loss.py
--make-fixture` in the `make peer-mmdet` environment: three four-image batches (two mmdetection
GPUs of two images, the COCO recipe's model.loss_normaliser_images 2) of the scenes few,
crowded, empty and nuclei (a crop of a DSB2018 image, re-read here from the shared data, never
stored: the fixture holds its masks' checksum); the head outputs' seeds and checksums; and
mmdetection's answers: location labels and matched instances, its mask-slot draw (torch.randperm
beyond 16 masks per image, given to ours), the four loss terms and the gradient of their total
with respect to every head output. Here the same inputs go through CondInst.assign, the mask
slots' dynamic heads and loss_fn, with no torch.

Ours runs at the COCO recipe's rules (CondInstConfig's defaults: mask_upsampling "aligned", the
references' aligned_bilinear; mass_centre_convention "pixel_index", their centroid of integer
pixel indices, from our pipeline's pixel-centre gt_centers) except one where mmdetection
deviates from AdelaiDet (the script's docstring): GIoU without AdelaiDet's +1 smoothing
(model.giou_smoothing 0 here, 1 in the recipe).

The head-parameter test runs the whole heads: mmdetection's CondInstBboxHead (FCOS towers with
GroupNorm, conv_cls / conv_reg / conv_centerness, the level scales, the controller) and
CondInstMaskHead's MaskFeatModule with a seeded state dict on seeded FPN maps P3..P7
(weights/mmdet_condinst_head.py draws both again here and checks their SHA-256 against the
fixture's) against our CondInst.heads with that state dict converted, on the first batch and its
randperm draw; compared are the head outputs, the targets, the four terms and the gradient of
the total loss with respect to every parameter, in mmdetection's names.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from instseg_jax.weights import mmdet_condinst_head as head_parity
from instseg_jax.weights import mmdet_condinst_loss as parity
from instseg_jax.weights.mmdet_loss_parity import checksum, relative_difference
from tests.conftest import SHARED_NUCLEI

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mmdet_condinst_loss_tiny.npz"
TERM_TOLERANCE = 1e-5  # relative; measured 2.2e-7 (experiments/parity/condinst_loss.py)
GRAD_TOLERANCE = 1e-5  # relative norm of the difference; measured 5.9e-7
# The whole heads (experiments/parity/condinst_loss.py HEAD_TOLERANCES): outputs measured
# 9e-7; the worst parameter's gradient 1.1e-5 (the mask branch's P3 GroupNorm weight, a sum
# that cancels: each float32 side is 6e-6 from torch's float64 answer), the others <= 6e-6.
HEAD_OUTPUT_TOLERANCE = 1e-5
HEAD_GRAD_TOLERANCE = 4e-5
DATA = np.load(FIXTURE)
META = json.loads(str(DATA["config"]))


@pytest.mark.parametrize("k", range(len(META["batches"])))
def test_condinst_targets_losses_and_gradients_match_mmdetection(k):
    names = META["batches"][k]
    stage1_train = SHARED_NUCLEI
    if "nuclei" in names:
        if not stage1_train.is_dir():
            pytest.skip(f"no nuclei source at {stage1_train}")
        masks = parity.scene("nuclei", stage1_train)[1]
        assert parity.masks_checksum(masks) == META["nuclei_masks_sha256"], (
            f"{parity.NUCLEI_IMAGE}: its masks differ from the fixture's"
        )
    cfg = parity.condinst_config(
        META["num_classes"], META["canvas"], META["mask_slots"], giou_smoothing=0.0
    )
    head = parity.random_head_outputs(META["seed"] + k, len(names), cfg)
    assert parity.head_checksum(head) == str(DATA[f"b{k}_head_checksum"]), (
        "numpy's default_rng stream changed: rerun experiments/parity/condinst_loss.py "
        "--make-fixture"
    )
    gt = parity.ground_truth([parity.scene(n, stage1_train) for n in names])
    theirs = {n[len(f"b{k}_mmdet_") :]: DATA[n] for n in DATA.files if n.startswith(f"b{k}_mmdet_")}
    ours, targets = parity.condinst_losses(
        head, gt, theirs["slot_location"], theirs["slot_valid"], cfg
    )
    batch = "+".join(names)
    np.testing.assert_array_equal(targets["location_classes"], theirs["location_classes"], batch)
    np.testing.assert_array_equal(targets["matched"], theirs["matched"], batch)
    for term in parity.TERMS:
        assert relative_difference(ours[term], theirs[term]) < TERM_TOLERANCE, (batch, term)
    for name in parity.HEAD_OUTPUTS:
        difference = relative_difference(ours[f"grad_{name}"], theirs[f"grad_{name}"])
        assert difference < GRAD_TOLERANCE, (batch, name)
    # Our own draw of the mask slots: every positive where they fit, the overflow counted.
    positives = (theirs["matched"] >= 0).sum(axis=1)
    fits = positives <= META["mask_slots"]
    np.testing.assert_array_equal(targets["own_slots"][fits], theirs["matched"][fits] >= 0)
    np.testing.assert_array_equal(
        targets["own_overflow"], np.maximum(positives - META["mask_slots"], 0)
    )
    if "crowded" in names:  # the scene must make the draw matter
        assert (~fits).any() and (theirs["slot_valid"].sum(axis=1) == META["mask_slots"]).any()


def test_condinst_head_parameters_match_mmdetection():
    k = META["head_batch"]
    names = META["batches"][k]
    if "nuclei" in names and not SHARED_NUCLEI.is_dir():
        pytest.skip(f"no nuclei source at {SHARED_NUCLEI}")
    cfg = head_parity.head_config(META["mask_slots"], giou_smoothing=0.0)
    loss_cfg = parity.condinst_config(  # the test above's: its compiled loss program
        META["num_classes"], META["canvas"], META["mask_slots"], giou_smoothing=0.0
    )
    state_dict = head_parity.random_state_dict(cfg, META["head_state_dict_seed"])
    fpn = head_parity.random_fpn_maps(cfg, len(names), META["head_fpn_seed"])
    redraw = "NumPy drew other numbers than the fixture's: rerun its --make-fixture"
    assert checksum(state_dict) == str(DATA["h_state_dict_sha256"]), redraw
    assert checksum(fpn) == str(DATA["h_fpn_sha256"]), redraw
    images = [parity.scene(n, SHARED_NUCLEI) for n in names]
    if "nuclei" in names:
        masks = images[names.index("nuclei")][1]
        assert parity.masks_checksum(masks) == META["nuclei_masks_sha256"], parity.NUCLEI_IMAGE
    theirs = {n[len("h_mmdet_") :]: DATA[n] for n in DATA.files if n.startswith("h_mmdet_")}
    outputs, terms, grads, targets = head_parity.head_losses(
        state_dict,
        fpn,
        parity.ground_truth(images),
        theirs["slot_location"],
        theirs["slot_valid"],
        cfg,
        loss_cfg,
    )
    np.testing.assert_array_equal(targets["location_classes"], theirs["location_classes"])
    np.testing.assert_array_equal(targets["matched"], theirs["matched"])
    assert (theirs["matched"] >= 0).sum(axis=1).max() > META["mask_slots"], "a randperm draw"
    for name in parity.HEAD_OUTPUTS:
        assert relative_difference(outputs[name], theirs[name]) < HEAD_OUTPUT_TOLERANCE, name
    for term in parity.TERMS:
        assert relative_difference(terms[term], theirs[term]) < TERM_TOLERANCE, term
    their_grads = {n[len("grad.") :]: v for n, v in theirs.items() if n.startswith("grad.")}
    assert sorted(their_grads) == sorted(grads), "the converter covers every parameter"
    for key, value in their_grads.items():
        assert relative_difference(grads[key], value) < HEAD_GRAD_TOLERANCE, key
