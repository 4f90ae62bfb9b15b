"""Our training losses against torchvision's own (Mask R-CNN, FCOS, Keypoint R-CNN), without
torch.

tests/fixtures/torchvision_{,fcos_,keypoint_}losses_tiny.npz were written by
`experiments/parity/torchvision_losses.py --make-fixtures tests/fixtures` in the `make peer`
environment: three 128 x 160 synthetic scenes (ordinary, crowded, without instances) with their
ground truth, and what torchvision computed on each in training mode, both two-stage samplers
keeping every candidate: its loss terms, the gradient of their sum with respect to every head
parameter, its training proposals (and Mask R-CNN's foreground RoIs and soft mask targets).
The weights are those of the output fixtures (torchvision_tiny.npz, torchvision_fcos_tiny.npz,
torchvision_keypoint_tiny.npz), named and checked by digest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from instseg_jax.weights import loss_parity

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load(name: str) -> tuple[dict, list]:
    """(torchvision's state_dict, [(Scene, the fixture's arrays of that scene with the scene
    prefix dropped)]) of a loss fixture; its weights are those of the output fixture it names,
    checked by digest."""
    with np.load(FIXTURES / name) as f:
        arrays = {k: f[k] for k in f.files}
    source = arrays
    if "weights_fixture" in arrays:
        with np.load(FIXTURES / str(arrays["weights_fixture"])) as f:
            source = {k: f[k] for k in f.files if k.startswith("sd/")}
    state_dict = {k.removeprefix("sd/"): v for k, v in source.items() if k.startswith("sd/")}
    if "weights_digest" in arrays:
        assert loss_parity.state_dict_digest(state_dict) == str(arrays["weights_digest"]), (
            f"{arrays['weights_fixture']} no longer holds the weights {name} was made with: "
            "regenerate both (experiments/parity/torchvision_losses.py --make-fixtures)"
        )
    cases, index = [], 0
    while f"scene{index}/image" in arrays:
        p = f"scene{index}/"
        own = {k.removeprefix(p): v for k, v in arrays.items() if k.startswith(p)}
        image = own["image"]
        scene = loss_parity.Scene(
            str(own["name"]),
            image,
            own["boxes"],
            own["classes"],
            np.unpackbits(own["masks"], axis=-1, count=image.shape[1]).astype(bool),
        )
        cases.append((scene, own))
        index += 1
    return state_dict, cases, arrays


def terms_and_grads(own: dict) -> tuple[dict, dict]:
    """torchvision's loss terms and head gradients {state_dict key: array} of one scene."""
    losses = {k.removeprefix("loss/"): float(v) for k, v in own.items() if k.startswith("loss/")}
    grads = {k.removeprefix("grad/"): v for k, v in own.items() if k.startswith("grad/")}
    return losses, grads


@pytest.fixture(scope="module")
def fixture():
    state_dict, scenes, arrays = load("torchvision_losses_tiny.npz")
    variables, arch = loss_parity.tv.convert(state_dict, "fixture")
    cases = []
    for scene, own in scenes:
        losses, grads = terms_and_grads(own)
        theirs = {
            "losses": losses,
            "grads": loss_parity.head_gradients_from_torch(state_dict, grads, "fixture grads"),
            "proposals": own["proposals"],
            "mask_rois": own["mask_rois"],
            "mask_targets": own["mask_targets"],
        }
        cases.append((scene, theirs))
    return variables, arch, int(arrays["proposals_per_level"]), cases


@pytest.fixture(scope="module")
def fcos_fixture():
    state_dict, scenes, _ = load("torchvision_fcos_losses_tiny.npz")
    variables, arch = loss_parity.torchvision_fcos.convert(state_dict, "fixture")
    cases = []
    for scene, own in scenes:
        losses, grads = terms_and_grads(own)
        grads = loss_parity.fcos_head_gradients_from_torch(state_dict, grads, "fixture grads")
        cases.append((scene, {"losses": losses, "grads": grads}))
    return variables, arch, cases


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


def test_fcos_losses_and_head_gradient_match_torchvision(fcos_fixture):
    variables, arch, cases = fcos_fixture
    assert [len(scene.boxes) > 0 for scene, _ in cases] == [True, True, False]
    for scene, theirs in cases:
        ours = loss_parity.fcos_losses(variables, arch, scene)
        figures = loss_parity.compare_losses(ours, theirs)
        assert figures["failures"] == [], (scene.name, figures)
        assert max(figures["terms"].values()) <= 1e-4 and figures["grads"]["head"] <= 1e-4
        if len(scene.boxes):
            assert ours["positives"] > 0 and theirs["losses"]["bbox_regression"] > 0


@pytest.mark.slow  # a second training program to compile
def test_fcos_closed_size_ranges_break_the_crowded_scene(fcos_fixture):
    """AdelaiDet's closed level ranges (the COCO recipe's) make two more locations of the
    crowded scene positive than torchvision's open ones: their largest distance is exactly
    64, P4's lower bound."""
    variables, arch, cases = fcos_fixture
    scene, theirs = cases[1]
    ours = loss_parity.fcos_losses(
        variables, arch, scene, overrides={"size_range_bounds": "closed"}
    )
    figures = loss_parity.compare_losses(ours, theirs)
    assert figures["terms"]["classification"] > 0.01, figures
    assert figures["failures"], figures


def test_keypoint_rcnn_losses_and_head_gradients_match_torchvision():
    state_dict, scenes, arrays = load("torchvision_keypoint_losses_tiny.npz")
    variables, arch = loss_parity.torchvision_keypoint.convert(state_dict, "fixture")
    proposals = int(arrays["proposals_per_level"])
    assert [len(scene.boxes) > 0 for scene, _ in scenes] == [True, True, False]
    for scene, own in scenes:
        scene.keypoints = own["keypoints"]
        losses, grads = terms_and_grads(own)
        theirs = {
            "losses": losses,
            "grads": loss_parity.keypoint_head_gradients_from_torch(state_dict, grads, "grads"),
            "proposals": own["proposals"],
        }
        ours = loss_parity.keypoint_rcnn_losses(variables, arch, scene, proposals)
        figures = loss_parity.compare_losses(ours, theirs)
        assert figures["failures"] == [], (scene.name, figures)
        assert max(figures["terms"].values()) <= 1e-4
        assert max(figures["grads"].values()) <= 1e-4
        if len(scene.boxes):
            assert ours["keypoint_targets"] > 0 and losses["loss_keypoint"] > 0
