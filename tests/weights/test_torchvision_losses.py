"""Our Mask R-CNN training losses against torchvision's own, without torch.

tests/fixtures/torchvision_losses_tiny.npz was written by `experiments/parity/torchvision_losses.py
--make-fixture` in the `make peer` environment: the state_dict of the tiny seeded torchvision
MaskRCNN (as in torchvision_tiny.npz), three 128 x 160 synthetic scenes (ordinary, crowded,
without instances) with their ground truth, and what torchvision computed on each in training
mode with both samplers keeping every candidate: its five loss terms, the gradient of their sum
with respect to every head parameter, its training proposals, and the mask loss's foreground
RoIs and soft targets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from instseg_jax.weights import loss_parity

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "torchvision_losses_tiny.npz"


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as f:
        arrays = {k: f[k] for k in f.files}
    state_dict = {k.removeprefix("sd/"): v for k, v in arrays.items() if k.startswith("sd/")}
    variables, arch = loss_parity.tv.convert(state_dict, "fixture")
    cases = []
    index = 0
    while f"scene{index}/image" in arrays:
        p = f"scene{index}/"
        image = arrays[p + "image"]
        scene = loss_parity.Scene(
            str(arrays[p + "name"]),
            image,
            arrays[p + "boxes"],
            arrays[p + "classes"],
            np.unpackbits(arrays[p + "masks"], axis=-1, count=image.shape[1]).astype(bool),
        )
        theirs = {
            "losses": {
                k.removeprefix(p + "loss/"): float(v)
                for k, v in arrays.items()
                if k.startswith(p + "loss/")
            },
            "grads": loss_parity.head_gradients_from_torch(
                state_dict,
                {
                    k.removeprefix(p + "grad/"): v
                    for k, v in arrays.items()
                    if k.startswith(p + "grad/")
                },
                "fixture gradients",
            ),
            "proposals": arrays[p + "proposals"],
            "mask_rois": arrays[p + "mask_rois"],
            "mask_targets": arrays[p + "mask_targets"],
        }
        cases.append((scene, theirs))
        index += 1
    return variables, arch, int(arrays["proposals_per_level"]), cases


def test_mask_rcnn_losses_and_head_gradients_match_torchvision(fixture):
    variables, arch, proposals, cases = fixture
    assert [len(scene.boxes) > 0 for scene, _ in cases] == [True, True, False]
    for scene, theirs in cases:
        ours = loss_parity.mask_rcnn_losses(variables, arch, scene, proposals)
        given = loss_parity.mask_rcnn_losses(
            variables,
            arch,
            scene,
            proposals,
            given_mask_targets=(theirs["mask_rois"], theirs["mask_targets"]),
        )
        figures = loss_parity.compare_losses(ours, theirs, given)
        assert figures["failures"] == [], (scene.name, figures)
        for term in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"):
            assert figures["terms"][term] <= 1e-4, (scene.name, term, figures)
        for head in ("rpn_head", "box_head", loss_parity.TV_TARGETS):
            assert figures["grads"][head] <= 1e-4, (scene.name, head, figures)
        assert figures["terms"][loss_parity.TV_TARGETS] <= 1e-4
        if len(scene.boxes):  # the comparison has something to compare
            assert theirs["losses"]["loss_rpn_box_reg"] > 0 and theirs["losses"]["loss_box_reg"] > 0
            assert len(theirs["mask_rois"]) > 0
            # The declared mask-target difference is there, and small.
            assert 0 < figures["terms"]["loss_mask"] <= 0.1
        else:
            assert theirs["losses"]["loss_box_reg"] == 0 == ours["losses"]["loss_box_reg"]


@pytest.mark.slow  # a second training program to compile (about a minute on 2 busy cores)
def test_detectron2_loss_conventions_break_the_comparison(fixture):
    """detectron2's L1 regressions and its RPN normaliser (the COCO recipes' defaults) are not
    torchvision's: each moves its terms far beyond the tolerance."""
    variables, arch, proposals, cases = fixture
    scene, theirs = cases[1]  # the crowded scene
    ours = loss_parity.mask_rcnn_losses(
        variables,
        arch,
        scene,
        proposals,
        overrides={
            "rpn_smooth_l1_beta": 0.0,
            "box_smooth_l1_beta": 0.0,
            "rpn_loss_normalizer": "batch",
        },
    )
    figures = loss_parity.compare_losses(ours, theirs)
    for term in ("loss_objectness", "loss_rpn_box_reg", "loss_box_reg"):
        assert figures["terms"][term] > 0.01, (term, figures)
    assert figures["terms"]["loss_classifier"] <= 1e-4
    assert any("loss_box_reg" in f for f in figures["failures"])
