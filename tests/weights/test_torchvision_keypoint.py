"""torchvision Keypoint R-CNN weight import, checked against torchvision's own outputs without
torch.

tests/fixtures/torchvision_keypoint_tiny.npz was written by `experiments/parity/keypoint_rcnn.py
--make-fixture` in the `make peer` environment: the state_dict of a torchvision KeypointRCNN
with keypointrcnn_resnet50_fpn's key layout at a tiny width (one Bottleneck per stage,
16-channel pyramid, 2 keypoint convs of 16, 17 keypoints, seeded random weights with random
frozen-BN terms), one 100x120 image, and what torchvision computed on it: P2..P6 features,
proposals, 20 detections with their keypoints and keypoint scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from instseg_jax.weights import parity, torchvision_keypoint
from instseg_jax.weights import torchvision as tv
from tests.weights.cli_import import import_then_predict

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "torchvision_keypoint_tiny.npz"


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as f:
        arrays = {k: f[k] for k in f.files}
    state_dict = {k.removeprefix("sd/"): v for k, v in arrays.items() if k.startswith("sd/")}
    theirs = {
        "features": {k: arrays[f"out/features/{k}"] for k in parity.LEVELS},
        **{
            k: arrays[f"out/{k}"]
            for k in ("proposals", "boxes", "scores", "labels", "keypoints", "keypoint_scores")
        },
    }
    return state_dict, arrays["image"], float(arrays["score_threshold"]), theirs


def run(variables, arch, image, threshold):
    return parity.run_converted_keypoint(variables, arch, image, threshold, 128, 160)


def test_converted_model_reproduces_torchvisions_boxes_and_keypoints(fixture):
    state_dict, image, threshold, theirs = fixture
    assert torchvision_keypoint.is_keypoint_rcnn(state_dict)
    variables, arch = torchvision_keypoint.convert(state_dict, "fixture")
    assert arch["num_keypoints"] == 17 and arch["keypoint_head_convs"] == 2
    figures = parity.compare(run(variables, arch, image, threshold), theirs)
    assert len(theirs["boxes"]) == 20  # the comparison has something to compare
    assert figures["failures"] == [], figures
    assert figures["matched_detections"] == 20 and figures["keypoints_compared"] == 20 * 17
    # Keypoints within 0.01 px where the heatmap maxima agree, and they agree on (nearly) all.
    assert figures["keypoint_maxima_agree"] >= 0.95
    assert figures["keypoint_max_px"] <= 0.01


def test_a_wrong_keypoint_weight_or_convention_breaks_the_comparison(fixture):
    state_dict, image, threshold, theirs = fixture
    variables, arch = torchvision_keypoint.convert(state_dict, "fixture")
    # The transposed convolution's taps mirrored (the classic import mistake): keypoints move,
    # boxes do not.
    head = variables["params"]["keypoint_head"]["score_lowres"]
    kernel = head["kernel"]
    head["kernel"] = kernel[::-1, ::-1]
    figures = parity.compare(run(variables, arch, image, threshold), theirs)
    assert figures["box_max_px"] <= 1e-2 and figures["failures"], figures
    head["kernel"] = kernel
    # detectron2's half-pixel output shift is not torchvision's.
    ours = run(variables, arch, image, threshold)
    ours["keypoints"][..., :2] -= 0.5
    assert parity.compare(ours, theirs)["failures"]


def test_bad_state_dicts_are_refused_naming_the_key(fixture):
    state_dict = dict(fixture[0])
    missing = {k: v for k, v in state_dict.items() if "kps_score_lowres.bias" not in k}
    with pytest.raises(tv.StateDictError, match=r"missing key .roi_heads\.keypoint_predictor"):
        torchvision_keypoint.convert(missing, "x.pth")
    extra = {**state_dict, "roi_heads.mask_head.0.0.weight": np.zeros(1)}
    with pytest.raises(tv.StateDictError, match=r"x\.pth: .*unexpected key .roi_heads\.mask_h"):
        torchvision_keypoint.convert(extra, "x.pth")


def test_import_weights_cli_recognises_keypoint_rcnn_then_predicts(fixture, tmp_path):
    config, record, _ = import_then_predict(fixture[0], fixture[1], tmp_path)
    assert config["method"] == "keypoint_rcnn" and config["model"]["keypoint_head_convs"] == 2
    assert config["model"]["keypoint_output_shift"] == 0.0 and not config["model"]["mask_on"]
    assert config["input"]["class_names"] == ["person"]
    assert record["detections"] and all(len(d["keypoints"]) == 17 for d in record["detections"])
