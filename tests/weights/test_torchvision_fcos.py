"""torchvision FCOS weight import, checked against torchvision's own outputs without torch.

tests/fixtures/torchvision_fcos_tiny.npz was written by `experiments/parity/fcos.py
--make-fixture` in the `make peer` environment: the state_dict of a torchvision FCOS with
fcos_resnet50_fpn's key layout at a tiny width (one Bottleneck per stage, 32-channel pyramid,
two-conv towers, 6 outputs, seeded random weights with random frozen-BN and GroupNorm terms),
one 100x120 image, and what torchvision computed on it (its batch padded to a multiple of 128):
P3..P7 features and 40 detections.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from instseg_jax.weights import parity, torchvision_fcos
from instseg_jax.weights import torchvision as tv
from tests.weights.cli_import import import_then_predict

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "torchvision_fcos_tiny.npz"


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as f:
        arrays = {k: f[k] for k in f.files}
    state_dict = {k.removeprefix("sd/"): v for k, v in arrays.items() if k.startswith("sd/")}
    theirs = {
        "features": {k: arrays[f"out/features/{k}"] for k in parity.FCOS_LEVELS},
        "boxes": arrays["out/boxes"],
        "scores": arrays["out/scores"],
        "labels": arrays["out/labels"],
    }
    return state_dict, arrays["image"], float(arrays["score_threshold"]), theirs


def run(variables, arch, image, threshold, **overrides):
    return parity.run_converted_fcos(variables, arch, image, threshold, 128, 160, 128, overrides)


def test_converted_model_reproduces_torchvision(fixture):
    state_dict, image, threshold, theirs = fixture
    assert torchvision_fcos.is_fcos(state_dict)
    variables, arch = torchvision_fcos.convert(state_dict, "fixture")
    assert arch["stage_blocks"] == (1, 1, 1, 1) and arch["head_convs"] == 2
    assert arch["num_classes"] == 5
    figures = parity.compare(run(variables, arch, image, threshold), theirs)
    assert len(theirs["boxes"]) == 40  # the comparison has something to compare
    assert figures["failures"] == [], figures
    assert figures["matched_detections"] == 40
    assert figures["feature_rel_error"] <= 1e-4
    assert figures["box_max_px"] <= 1e-2 and figures["score_max_diff"] <= 1e-4


def test_a_wrong_convention_or_weight_breaks_the_comparison(fixture):
    state_dict, image, threshold, theirs = fixture
    variables, arch = torchvision_fcos.convert(state_dict, "fixture")
    # A GroupNorm scale of the regression tower: boxes move, features do not.
    norm = variables["params"]["head"]["box_norm1"]["gn"]
    norm["scale"] = norm["scale"] * 1.01
    figures = parity.compare(run(variables, arch, image, threshold), theirs)
    assert figures["feature_rel_error"] <= 1e-4 and figures["failures"], figures
    norm["scale"] = norm["scale"] / 1.01
    # The preset's conventions matter: AdelaiDet's locations (cell centres) break it.
    figures = parity.compare(run(variables, arch, image, threshold, location_offset=0.5), theirs)
    assert figures["failures"], figures


def test_bad_state_dicts_are_refused_naming_the_key(fixture):
    state_dict = dict(fixture[0])
    missing = {k: v for k, v in state_dict.items() if "bbox_ctrness.bias" not in k}
    with pytest.raises(tv.StateDictError, match=r"missing key .head\.regression_head\.bbox_ctrn"):
        torchvision_fcos.convert(missing, "x.pth")
    extra = {**state_dict, "head.regression_head.extra.weight": np.zeros(1)}
    with pytest.raises(tv.StateDictError, match=r"x\.pth: .*unexpected key .head\.regression"):
        torchvision_fcos.convert(extra, "x.pth")


def test_import_weights_cli_recognises_fcos_then_predicts(fixture, tmp_path):
    config, record, _ = import_then_predict(fixture[0], fixture[1], tmp_path)
    assert config["method"] == "fcos" and config["model"]["head_convs"] == 2
    assert config["model"]["box_rescale"] == "per_axis"
    assert config["input"]["category_ids"] == [1, 2, 3, 4, 5]
    assert record["height"] == 100 and record["detections"]
    assert all("segmentation" not in d for d in record["detections"])


def test_the_imported_canvas_is_rounded_up_to_a_multiple_of_128(fixture):
    _, arch = torchvision_fcos.convert(fixture[0], "fixture")
    assert torchvision_fcos.coco_config(arch, (1344, 1300)).input.canvas_hw == (1408, 1408)
