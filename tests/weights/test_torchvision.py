"""torchvision weight import, checked against torchvision's own outputs without torch.

tests/fixtures/torchvision_tiny.npz was written by `experiments/parity/torchvision.py
--make-fixture` in the `make peer` environment: the state_dict of a torchvision MaskRCNN with
maskrcnn_resnet50_fpn's key layout at a tiny width (one Bottleneck per stage, 16-channel FPN,
5 classes, seeded random weights with random frozen-BN statistics), one 100x120 image, and
what torchvision computed on it: FPN features, RPN proposals, detections, pasted masks.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from instseg_jax import ops
from instseg_jax.weights import parity
from instseg_jax.weights import torchvision as tv
from tests.weights.cli_import import CLI, import_then_predict

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "torchvision_tiny.npz"


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as f:
        arrays = {k: f[k] for k in f.files}
    state_dict = {k.removeprefix("sd/"): v for k, v in arrays.items() if k.startswith("sd/")}
    shape = tuple(arrays["out/masks_shape"])
    theirs = {
        "features": {k: arrays[f"out/features/{k}"] for k in parity.LEVELS},
        "proposals": arrays["out/proposals"],
        "boxes": arrays["out/boxes"],
        "scores": arrays["out/scores"],
        "labels": arrays["out/labels"],
        "masks": np.unpackbits(arrays["out/masks_bits"], axis=-1, count=shape[-1])
        .reshape(shape)
        .astype(np.float32),
    }
    return state_dict, arrays["image"], float(arrays["score_threshold"]), theirs


def test_converted_model_reproduces_torchvision(fixture):
    state_dict, image, threshold, theirs = fixture
    variables, arch = tv.convert(state_dict, "fixture")
    assert arch["stage_blocks"] == (1, 1, 1, 1) and arch["num_classes"] == 4
    ours = parity.run_converted(variables, arch, image, threshold, min_size=128, max_size=160)
    figures = parity.compare(ours, theirs)
    assert len(theirs["boxes"]) == 30  # the comparison has something to compare
    assert figures["failures"] == [], figures
    assert figures["matched_detections"] == 30
    assert figures["feature_rel_error"] <= 1e-4
    assert figures["proposal_max_px"] <= 1e-3
    assert figures["box_max_px"] <= 1e-2 and figures["score_max_diff"] <= 1e-4


def test_comparison_fails_on_empty_or_wrong_outputs(fixture):
    state_dict, image, threshold, theirs = fixture
    variables, arch = tv.convert(state_dict, "fixture")
    ours = parity.run_converted(variables, arch, image, threshold, min_size=128, max_size=160)
    empty = dict(theirs, boxes=theirs["boxes"][:0], scores=theirs["scores"][:0])
    empty["labels"], empty["masks"] = theirs["labels"][:0], theirs["masks"][:0]
    assert parity.compare(
        dict(ours, **{k: empty[k] for k in ("boxes", "scores", "labels", "masks")}), empty
    )["failures"]
    shifted = dict(ours, boxes=ours["boxes"] + 0.05)
    assert any("boxes" in f for f in parity.compare(shifted, theirs)["failures"])


@pytest.mark.parametrize(
    "detectron2_convention",
    [
        {"aligned": True},
        {"anchor_style": "detectron2"},
        {"box_rescale": "scale"},
        {"test_min_box_size": 0.0, "test_pre_nms_topk": 10},
    ],
    ids=lambda c: ",".join(c),
)
def test_each_convention_of_the_preset_matters(fixture, detectron2_convention):
    """With one torchvision convention switched back, the comparison fails: the preset's parts
    are each needed, and the comparison is sharp enough to see them."""
    state_dict, image, threshold, theirs = fixture
    variables, arch = tv.convert(state_dict, "fixture")
    ours = parity.run_converted(
        variables, arch, image, threshold, 128, 160, overrides=detectron2_convention
    )
    assert parity.compare(ours, theirs)["failures"]


def test_level_mappers_differ_just_below_a_level_boundary():
    """torchvision adds its eps after the log2, detectron2 inside it: a box a few ulps below
    112 px (level 3's lower edge) is level 3 for torchvision and level 2 for detectron2 (the
    fixture has no such box, so this is checked here)."""
    side = np.float32(112.0) * np.float32(1 - 3e-7)
    boxes = np.asarray([[[0.0, 0.0, side, side], [0.0, 0.0, 112.0, 112.0], [5, 5, 60, 40]]])
    assert np.asarray(ops.fpn_level(boxes, rule="torchvision")).tolist() == [[3, 3, 2]]
    assert np.asarray(ops.fpn_level(boxes)).tolist() == [[2, 3, 2]]
    # The reference: torchvision's formula in float64 NumPy.
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    expected = np.clip(np.floor(4 + np.log2(np.sqrt(area) / 224) + 1e-6), 2, 5)
    assert expected.tolist() == [[3, 3, 2]]


def test_legacy_key_names_convert_the_same(fixture):
    state_dict = fixture[0]
    legacy = {}
    for key, value in state_dict.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for kind in ("inner", "layer"):
            for i in range(4):
                key = key.replace(f"fpn.{kind}_blocks.{i}.0.", f"fpn.{kind}_blocks.{i}.")
        for i in range(4):
            key = key.replace(f"mask_head.{i}.0.", f"mask_head.mask_fcn{i + 1}.")
        legacy["module." + key] = value
    legacy["module.backbone.body.bn1.num_batches_tracked"] = np.asarray(0)
    a, _ = tv.convert(state_dict)
    b, _ = tv.convert(legacy)
    flat_a = dict(_flatten(a))
    flat_b = dict(_flatten(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key])


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def test_layout_of_converted_tensors(fixture):
    """Spot checks written from torchvision's layouts, independent of the converter's code."""
    sd = fixture[0]
    variables, _ = tv.convert(sd)
    p = variables["params"]
    w = sd["backbone.body.conv1.weight"]  # [O, I, kh, kw]
    assert p["backbone"]["stem"]["conv"]["kernel"][2, 5, 1, 3] == w[3, 1, 2, 5]
    fc6 = sd["roi_heads.box_head.fc6.weight"]  # input index d * 49 + y * 7 + x
    d, y, x, f = 5, 3, 6, 7
    assert p["box_head"]["fc1"]["kernel"][(y * 7 + x) * 16 + d, f] == fc6[f, d * 49 + y * 7 + x]
    cls = sd["roi_heads.box_predictor.cls_score.weight"]
    assert p["box_head"]["cls_score"]["kernel"][2, 4] == cls[0, 2]  # background last here
    assert p["box_head"]["cls_score"]["kernel"][2, 0] == cls[1, 2]
    boxes = sd["roi_heads.box_predictor.bbox_pred.weight"]  # class-major, background first
    assert p["box_head"]["bbox_pred"]["kernel"][1, 9] == boxes[4 + 9, 1]
    np.testing.assert_array_equal(
        variables["frozen"]["backbone"]["res3_0"]["shortcut"]["norm"]["var"],
        sd["backbone.body.layer2.0.downsample.1.running_var"],
    )


def test_other_architectures_are_refused_by_key(fixture):
    sd = fixture[0]
    faster = {k: v for k, v in sd.items() if "mask_" not in k}
    with pytest.raises(
        tv.StateDictError, match=r"missing key 'roi_heads\.mask_head\.0\.0\.weight'"
    ):
        tv.convert(faster, "faster.pth")
    keypoint = dict(sd, **{"roi_heads.keypoint_head.0.weight": np.zeros(1)})
    with pytest.raises(tv.StateDictError, match=r"unexpected key 'roi_heads\.keypoint_head"):
        tv.convert(keypoint, "kp.pth")
    classifier = {k.removeprefix("backbone.body."): v for k, v in sd.items() if "body" in k}
    with pytest.raises(
        tv.StateDictError, match=r"classifier\.pth.*'backbone\.body\.conv1\.weight'"
    ):
        tv.convert(classifier, "classifier.pth")


def test_torchvision_anchor_strides_and_rounding():
    levels = ops.torchvision_anchors((800, 1216))
    assert [a.shape[0] for a in levels] == [
        200 * 304 * 3,
        100 * 152 * 3,
        50 * 76 * 3,
        25 * 38 * 3,
        13 * 19 * 3,
    ]
    p6 = np.asarray(levels[4]).reshape(13, 19, 3, 4)
    # 800 // 13 = 61 rows apart, 1216 // 19 = 64 columns apart; ratio 1 anchor of size 512.
    np.testing.assert_array_equal(p6[1, 1, 1], [64 - 256, 61 - 256, 64 + 256, 61 + 256])
    # ratio 0.5 (h / w) of size 32: w = 32 * sqrt(2) = 45.25 -> +-23, h = 22.6 -> +-11.
    np.testing.assert_array_equal(np.asarray(levels[0])[0], [-23, -11, 23, 11])


def test_resize_rule_and_padding_of_the_preset():
    from instseg_jax.input import report
    from instseg_jax.input.transforms import TransformConfig, transform

    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    example = {
        "image": image,
        "masks": np.zeros((0, 375, 500), bool),
        "boxes": np.zeros((0, 4), np.float32),
        "classes": np.zeros(0, np.int32),
        "iscrowd": np.zeros(0, bool),
        "image_id": 0,
    }
    config = TransformConfig(
        canvas_hw=(1344, 1344),
        max_instances=4,
        train=False,
        short_side=(800,),
        max_long_side=1333,
        resize_rule="torchvision",
        pad_value=tv.PAD_VALUE,
    )
    out = transform(example, config, np.random.default_rng(0), report.new_counts())
    assert tuple(out["image_hw"]) == tv.resized_size((375, 500)) == (800, 1066)
    np.testing.assert_array_equal(out["image"][900, 5], tv.PAD_VALUE)
    pixels, _ = tv.preprocess(image)
    np.testing.assert_allclose(out["image"][:800, :1066], pixels[:800, :1066], atol=0.5 + 1e-3)


def test_import_weights_cli_then_predict(fixture, tmp_path):
    state_dict = fixture[0]
    config, record, out = import_then_predict(state_dict, fixture[1], tmp_path, canvas=192)
    assert config["model"]["anchor_style"] == "torchvision" and config["model"]["aligned"] is False
    assert config["input"]["category_ids"] == [1, 2, 3, 4]
    assert record["height"] == 100 and record["detections"]
    assert all(d["class"].startswith("class_") for d in record["detections"])
    # `eval --workdir` on the imported checkpoint, its eval split pointed at synthetic scenes.
    from instseg_jax.input.synthetic import SyntheticSource, write_coco

    annotations, image_dir = write_coco(SyntheticSource(3, (96, 120), seed=5), tmp_path / "coco")
    config["input"]["eval_split"] = {"annotations": str(annotations), "images": str(image_dir)}
    (out / "config.json").write_text(json.dumps(config))
    subprocess.run(CLI + ["eval", "--workdir", str(out)], check=True, capture_output=True)
    report = json.loads((out / "eval_0.json").read_text())
    assert set(report) >= {"bbox", "segm"} and 0.0 <= report["segm"]["AP"] <= 1.0
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{k: v for k, v in state_dict.items() if "fc7" not in k})
    failed = subprocess.run(
        CLI + ["import-weights", "torchvision", str(bad), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode != 0 and "roi_heads.box_head.fc7.weight" in failed.stderr
