"""Our training losses against torchvision's own (Mask R-CNN, FCOS, Keypoint R-CNN), without
torch.

tests/fixtures/torchvision_{,fcos_,keypoint_}losses_tiny.npz were written by
`experiments/parity/torchvision_losses.py --make-fixtures tests/fixtures` in the `make peer`
environment: three 128 x 160 synthetic scenes (ordinary, crowded, without instances) with their
ground truth, and what torchvision computed on each in training mode, both two-stage samplers
keeping every candidate: its loss terms, the gradient of their sum with respect to every head
parameter, its training proposals (and Mask R-CNN's foreground RoIs and soft mask targets).
The weights are those of the output fixtures (torchvision_tiny.npz, torchvision_fcos_tiny.npz,
torchvision_keypoint_tiny.npz), named and checked by digest. Mask R-CNN's and FCOS's fixtures
also hold torchvision's answers on a crop of a real nuclei image ("nuclei/"): the crop is re-read
here from the shared data set (skipped where it is missing) and checked against the stored
digest; the fixtures hold none of its pixels or masks.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from instseg_jax.weights import loss_parity
from tests.conftest import SHARED_NUCLEI

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load(name: str):
    """(torchvision's state_dict, [Scene], {case prefix: that case's arrays, prefix dropped},
    all arrays) of a loss fixture: cases "scene0/".. (each scene alone) and "batch/" (all
    scenes in one batch). Its weights are those of the output fixture it names, checked by
    digest."""
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
    scenes, cases, index = [], {}, 0
    while f"scene{index}/image" in arrays:
        cases[f"scene{index}/"] = own = _case(arrays, f"scene{index}/")
        image = own["image"]
        scenes.append(
            loss_parity.Scene(
                str(own["name"]),
                image,
                own["boxes"],
                own["classes"],
                np.unpackbits(own["masks"], axis=-1, count=image.shape[1]).astype(bool),
                own.get("keypoints"),
            )
        )
        index += 1
    cases["batch/"] = _case(arrays, "batch/")
    if "nuclei/spec" in arrays:
        cases["nuclei/"] = _case(arrays, "nuclei/")
    return state_dict, scenes, cases, arrays


def _case(arrays: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}


def theirs_of(own: dict, state_dict: dict, grads_from_torch) -> dict:
    """torchvision's side of one case in compare_losses' terms: loss terms, head gradients in
    our tree, and the per-image records (key0, key1, ... -> a list)."""
    losses = {k.removeprefix("loss/"): float(v) for k, v in own.items() if k.startswith("loss/")}
    grads = {k.removeprefix("grad/"): v for k, v in own.items() if k.startswith("grad/")}
    theirs = {"losses": losses, "grads": grads_from_torch(state_dict, grads, "fixture grads")}
    for key in ("proposals", "mask_rois", "mask_targets"):
        if f"{key}0" in own:
            theirs[key] = [own[f"{key}{i}"] for i in range(sum(k.startswith(key) for k in own))]
    return theirs


def ours_of(model: str, variables, arch, batch, proposals, theirs, **kwargs):
    """(our side, our side on torchvision's mask targets or None) of one case."""
    if model == "fcos":
        return loss_parity.fcos_losses(variables, arch, batch, **kwargs), None
    if model == "keypoint_rcnn":
        return loss_parity.keypoint_rcnn_losses(variables, arch, batch, proposals, **kwargs), None
    ours = loss_parity.mask_rcnn_losses(variables, arch, batch, proposals, **kwargs)
    given = loss_parity.mask_rcnn_losses(
        variables,
        arch,
        batch,
        proposals,
        given_mask_targets=list(zip(theirs["mask_rois"], theirs["mask_targets"], strict=True)),
        ours=ours,
        **kwargs,
    )
    return ours, given


MODELS = {
    "mask_rcnn": (
        "torchvision_losses_tiny.npz",
        loss_parity.tv.convert,
        loss_parity.head_gradients_from_torch,
    ),
    "fcos": (
        "torchvision_fcos_losses_tiny.npz",
        loss_parity.torchvision_fcos.convert,
        loss_parity.fcos_head_gradients_from_torch,
    ),
    "keypoint_rcnn": (
        "torchvision_keypoint_losses_tiny.npz",
        loss_parity.torchvision_keypoint.convert,
        loss_parity.keypoint_head_gradients_from_torch,
    ),
}


@functools.cache
def loaded(model: str):
    """(variables, arch, proposals per level, [Scene], {prefix: torchvision's side})."""
    name, convert, grads_from_torch = MODELS[model]
    state_dict, scenes, cases, arrays = load(name)
    variables, arch = convert(state_dict, "fixture")
    theirs = {p: theirs_of(own, state_dict, grads_from_torch) for p, own in cases.items()}
    for prefix, own in cases.items():
        theirs[prefix].update({k: own[k] for k in ("spec", "digest") if k in own})
    return variables, arch, int(arrays.get("proposals_per_level", 0)), scenes, theirs


def nuclei_scene(model: str) -> tuple[loss_parity.Scene, dict]:
    """(the nuclei crop re-read from the shared data set, torchvision's side on it); skips
    where the data set is missing, fails where the crop read is not the one the fixture was
    made on."""
    theirs = loaded(model)[4].get("nuclei/")
    assert theirs is not None, f"{MODELS[model][0]} has no nuclei case: regenerate it"
    if not SHARED_NUCLEI.is_dir():
        pytest.skip(f"no nuclei source at {SHARED_NUCLEI} (the nuclei loss-parity case)")
    spec = loss_parity.NucleiCrop.from_json(str(theirs["spec"]))
    scene = loss_parity.nuclei_scene(SHARED_NUCLEI, spec)
    assert loss_parity.scene_digest(scene) == str(theirs["digest"]), (
        f"{spec} reads another scene than the fixture's: the data set or nuclei_scene changed "
        "(regenerate with experiments/parity/torchvision_losses.py --make-fixtures)"
    )
    return scene, theirs


def check_case(model: str, batch, theirs: dict) -> dict:
    variables, arch, proposals, _, _ = loaded(model)
    ours, given = ours_of(model, variables, arch, batch, proposals, theirs)
    figures = loss_parity.compare_losses(ours, theirs, given)
    assert figures["failures"] == [], figures
    declared = ("loss_mask", "mask_head")  # Mask R-CNN's mask targets (loss_parity)
    assert max(e for t, e in figures["terms"].items() if t not in declared) <= 1e-4, figures
    assert max(e for h, e in figures["grads"].items() if h not in declared) <= 1e-4, figures
    if "proposals" in theirs:  # both sides trained on the same proposals
        assert figures["proposals"]["max_px"] <= 1e-3
    return figures


# Mask R-CNN's case in the fast tier (the frame every two-stage loss shares); FCOS's and Keypoint
# R-CNN's (20-30 s each to compile cold on 2 busy cores) in the slow one, to keep `make test`
# under its 20 minutes.
@pytest.mark.parametrize(
    "model", [m if m == "mask_rcnn" else pytest.param(m, marks=pytest.mark.slow) for m in MODELS]
)
def test_losses_and_head_gradients_match_torchvision(model):
    """Each scene alone: every loss term and every head's gradient within 1e-4 of torchvision's
    (Mask R-CNN's mask term and mask head within the declared target difference, and within
    1e-4 on torchvision's targets)."""
    _, _, _, scenes, theirs = loaded(model)
    assert [len(scene.boxes) > 0 for scene in scenes] == [True, True, False]
    for index, scene in enumerate(scenes):
        case = theirs[f"scene{index}/"]
        figures = check_case(model, scene, case)
        if len(scene.boxes):  # the comparison has something to compare
            regression = {"fcos": "bbox_regression"}.get(model, "loss_box_reg")
            assert case["losses"][regression] > 0
        if model == "mask_rcnn" and len(scene.boxes):  # the declared difference, and small
            assert 0 < figures["terms"]["loss_mask"] <= 0.1


# Mask R-CNN's in the fast tier (the program of the scenes above: about 3 s), FCOS's in the slow
# one with the rest of FCOS.
@pytest.mark.parametrize("model", ["mask_rcnn", pytest.param("fcos", marks=pytest.mark.slow)])
def test_losses_on_a_nuclei_crop_match_torchvision(model):
    """A real image: 45 small nuclei (2 to 126 px^2, some touching, some cut by the crop) far
    below the smallest anchor (32 px). Every term and head gradient within 1e-4 of
    torchvision's (the mask term within its declared target difference), the same training
    proposals."""
    scene, theirs = nuclei_scene(model)
    assert len(scene.boxes) == 45
    figures = check_case(model, scene, theirs)
    if model == "mask_rcnn":  # every nucleus is a foreground RoI: the mask term covers them
        assert sum(len(r) for r in theirs["mask_rois"]) >= len(scene.boxes)
        assert 0 < figures["terms"]["loss_mask"] <= 0.1


@pytest.mark.slow  # a batch of three: another program to compile per model
@pytest.mark.parametrize("model", list(MODELS))
def test_losses_over_a_batch_match_torchvision(model):
    """All three scenes in one batch (normalisers over the batch; an empty image beside
    others)."""
    _, _, _, scenes, theirs = loaded(model)
    check_case(model, scenes, theirs["batch/"])


@pytest.mark.slow  # a second training program to compile (about a minute on 2 busy cores)
def test_detectron2_loss_conventions_break_the_comparison():
    """detectron2's L1 regressions and its RPN normaliser (the COCO recipes' defaults) are not
    torchvision's: each moves its terms far beyond the tolerance."""
    variables, arch, proposals, scenes, theirs = loaded("mask_rcnn")
    ours = loss_parity.mask_rcnn_losses(
        variables,
        arch,
        scenes[1],  # the crowded scene
        proposals,
        overrides={
            "rpn_smooth_l1_beta": 0.0,
            "box_smooth_l1_beta": 0.0,
            "rpn_loss_normalizer": "batch",
        },
    )
    figures = loss_parity.compare_losses(ours, theirs["scene1/"])
    for term in ("loss_objectness", "loss_rpn_box_reg", "loss_box_reg"):
        assert figures["terms"][term] > 0.01, (term, figures)
    assert figures["terms"]["loss_classifier"] <= 1e-4
    assert any("loss_box_reg" in f for f in figures["failures"])


@pytest.mark.slow  # a second training program to compile
def test_fcos_closed_size_ranges_break_the_crowded_scene():
    """AdelaiDet's closed level ranges (the COCO recipe's) make two more locations of the
    crowded scene positive than torchvision's open ones: their largest distance is exactly
    64, P4's lower bound."""
    variables, arch, _, scenes, theirs = loaded("fcos")
    ours = loss_parity.fcos_losses(
        variables, arch, scenes[1], overrides={"size_range_bounds": "closed"}
    )
    figures = loss_parity.compare_losses(ours, theirs["scene1/"])
    assert figures["terms"]["classification"] > 0.01, figures
    assert figures["failures"], figures
