"""SOLO's and Decoupled SOLO's targets and losses reproduce mmdetection 3.3's
SOLOHead.loss_by_feat and DecoupledSOLOHead.loss_by_feat on the same head outputs and ground
truth (issue 31 item 1).

tests/fixtures/mmdet_solo_loss_tiny.npz was written by `experiments/parity/solo_loss.py
--make-fixture` in the `make peer-mmdet` environment: per mask branch, four two-image batches
(one mmdetection GPU each) on a 128 x 128 canvas: few+crowded, crowded+empty, empty+empty
(their ground truth stored) and two crops of a real nuclei image (re-read here from the shared
data, skipped where it is missing; their masks' SHA-256 must be the fixture's); and
mmdetection's answers: cell labels, positive cells, loss_cls, loss_mask, the gradient of
loss_cls with respect to the category logits and of loss_mask with respect to each mask input
(vanilla: the upsampled tower maps and the 1x1 predictors' kernels and biases; decoupled: the X
and Y logits). The head outputs are seeded draws (weights/mmdet_solo_loss.py
random_head_outputs) made again here and checked against the fixture's SHA-256.

The head-parameter test (slow) runs each branch's whole head: mmdetection's with a seeded state
dict on seeded FPN maps against SOLO.heads with that state dict converted (weights/
mmdet_solo_loss.py head_losses), on few+crowded and on the nuclei crops.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from instseg_jax.weights import mmdet_loss_parity
from instseg_jax.weights import mmdet_solo_loss as parity
from instseg_jax.weights import mmdet_solov2_head as head_parity

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mmdet_solo_loss_tiny.npz"
TERM_TOLERANCE = 1e-5  # relative; measured 2.0e-7 (experiments/parity/solo_loss.py)
GRAD_TOLERANCE = 1e-5  # relative norm of the difference; measured 4.6e-7
SHARED_NUCLEI = FIXTURE.parents[3] / "shared" / "data" / "dsb2018_nuclei" / "stage1_train"
STRIDE = 4
GT_FIELDS = ("boxes", "classes", "valid", "centers", "masks")


def nuclei_ground_truth(meta) -> dict:
    if not SHARED_NUCLEI.is_dir():
        pytest.skip(f"no nuclei source at {SHARED_NUCLEI}")
    images = []
    for (top, left), digest in zip(meta["nuclei_crops"], meta["nuclei_masks_sha256"], strict=True):
        classes, masks, read = head_parity.nuclei_scene(
            SHARED_NUCLEI, meta["nuclei_image"], top, left, meta["canvas"], STRIDE
        )
        assert read == digest, f"{meta['nuclei_image']} at {top, left}: not the fixture's"
        images.append((classes, masks))
    return head_parity.ground_truth_arrays(images, meta["max_instances"], STRIDE)


@pytest.mark.parametrize("nuclei", [False, True], ids=["synthetic", "nuclei"])
@pytest.mark.parametrize("branch", ["vanilla", "decoupled"])
def test_solo_targets_losses_and_gradients_match_mmdetection(branch, nuclei):
    data = np.load(FIXTURE)
    meta = json.loads(str(data["config"]))
    cfg = parity.solo_config(meta["num_classes"], meta["canvas"], branch, meta["head_channels"])
    names = ("maps", "kernels", "biases") if branch == "vanilla" else ("x", "y")
    branch_index = meta["branches"].index(branch)
    rel = mmdet_loss_parity.relative_difference
    positives = 0
    for k, batch in enumerate(meta["batches"]):
        if batch.startswith("nuclei") != nuclei:
            continue
        prefix = f"{branch}{k}_"
        outputs = parity.random_head_outputs(cfg, 2, meta["seed"] + 10 * branch_index + k)
        assert (
            mmdet_loss_parity.checksum(parity.flat_arrays(outputs))
            == (meta["inputs_sha256"][f"{branch}_{k}"])
        ), "NumPy drew other numbers than the fixture's: rerun its --make-fixture"
        if nuclei:
            gt = nuclei_ground_truth(meta)
        else:
            gt = {n: data[f"{prefix}gt_{n}"] for n in GT_FIELDS}
        theirs = {
            n[len(prefix) + len("mmdet_") :]: data[n]
            for n in data.files
            if n.startswith(prefix + "mmdet_")
        }
        ours, targets = parity.solo_losses(outputs, gt, cfg)
        np.testing.assert_array_equal(targets["cell_labels"], theirs["cell_labels"], err_msg=batch)
        np.testing.assert_array_equal(targets["positive_cells"], theirs["positive_cells"])
        # One mask target per positive cell, every one trained (mmdetection's num_pos).
        np.testing.assert_array_equal(targets["trained"], theirs["positive_cells"])
        positives += int(theirs["positive_cells"].sum())
        for term in ("loss_cls", "loss_mask"):
            assert rel(ours[term], theirs[term]) < TERM_TOLERANCE, (batch, term)
        assert rel(ours["grad_logits"], theirs["grad_logits"]) < GRAD_TOLERANCE, batch
        for n in names:
            levels = len(ours[f"grad_{n}"])
            mine = np.concatenate([g.ravel() for g in ours[f"grad_{n}"]])
            mmdet = np.concatenate([theirs[f"grad_{n}{lv}"].ravel() for lv in range(levels)])
            assert rel(mine, mmdet) < GRAD_TOLERANCE, (batch, n)
    assert positives > 0


HEAD_OUTPUT_TOLERANCE = 1e-5  # measured 4.9e-7 (the script's HEAD_TOLERANCES)
HEAD_GRAD_TOLERANCE = 2e-5  # each parameter's; measured 1.7e-6 at worst (a predictor's bias)


# Slow: two more programs (each head's forward and backward), about 6 s of CPU warm and a
# minute cold on this 2-core machine, beyond the fast tier's share of this method.
@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 1], ids=["few+crowded", "nuclei"])
@pytest.mark.parametrize("branch", ["vanilla", "decoupled"])
def test_solo_head_parameters_match_mmdetection(branch, k):
    """The whole head (weights/mmdet_solo_loss.py head_config: one conv per tower): mmdetection's
    SOLOHead / DecoupledSOLOHead with a seeded state dict on seeded FPN maps against SOLO.heads
    with that state dict converted: category logits, cell labels, both terms and the gradient of
    their sum with respect to every parameter, by mmdetection key."""
    data = np.load(FIXTURE)
    meta = json.loads(str(data["config"]))
    branch_index = meta["branches"].index(branch)
    cfg = parity.head_config(meta["num_classes"], meta["canvas"], branch)
    state_dict = parity.random_state_dict(cfg, meta["head_state_dict_seed"] + branch_index)
    fpn = head_parity.random_fpn_maps(cfg, 2, meta["head_fpn_seed"] + 10 * branch_index + k)
    redraw = "NumPy drew other numbers than the fixture's: rerun its --make-fixture"
    sums = meta["head_sha256"]
    assert mmdet_loss_parity.checksum(state_dict) == sums[f"{branch}_state_dict"], redraw
    assert mmdet_loss_parity.checksum(fpn) == sums[f"{branch}_fpn_{k}"], redraw
    if meta["head_batches"][k].startswith("nuclei"):
        gt = nuclei_ground_truth(meta)
    else:  # the loss parity's first batch holds the same scenes
        assert meta["batches"][0] == meta["head_batches"][k]
        gt = {n: data[f"vanilla0_gt_{n}"] for n in GT_FIELDS}
    prefix = f"{branch}_h{k}_mmdet_"
    theirs = {n[len(prefix) :]: data[n] for n in data.files if n.startswith(prefix)}
    outputs, terms, grads, targets = parity.head_losses(state_dict, fpn, gt, cfg)
    np.testing.assert_array_equal(targets["cell_labels"], theirs["cell_labels"])
    np.testing.assert_array_equal(targets["trained"], theirs["positive_cells"])
    rel = mmdet_loss_parity.relative_difference
    assert rel(outputs["logits"], theirs["logits"]) < HEAD_OUTPUT_TOLERANCE
    for term in ("loss_cls", "loss_mask"):
        assert rel(terms[term], theirs[term]) < TERM_TOLERANCE, term
    their_grads = {n[len("grad.") :]: v for n, v in theirs.items() if n.startswith("grad.")}
    assert sorted(their_grads) == sorted(grads), "the converter covers every parameter"
    for key, value in their_grads.items():
        assert rel(grads[key], value) < HEAD_GRAD_TOLERANCE, key
