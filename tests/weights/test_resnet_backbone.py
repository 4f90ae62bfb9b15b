"""Backbone initialisation from torchvision ResNet weights: the converted tiny ResNets reproduce
torchvision's stage outputs (tests/fixtures/resnet_tiny.npz, made by
experiments/parity/resnet_backbone.py), bad files and configs end in one clear error, and
`train --config.model.backbone_weights=FILE` starts from the file's weights."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import cli
from instseg_jax import config as config_lib
from instseg_jax.backbones.resnet import ResNet
from instseg_jax.weights.resnet import BackboneWeightsError, load_backbone
from instseg_jax.workdir import restore_variables

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "resnet_tiny.npz"
DEPTH = {"basic": 18, "bottleneck": 50}


def model_section(kind, **changes):
    section = {
        "depth": DEPTH[kind],
        "width": 4,
        "stage_blocks": (1, 1, 1, 1),
        "norm": "frozen_bn",
    }
    section.update(changes)
    return _Section(section)


class _Section(dict):
    """A dict with ConfigDict's attribute access (what load_backbone reads)."""

    __getattr__ = dict.__getitem__


def write_state_dict(tmp_path, kind, prefix="", drop=()) -> Path:
    with np.load(FIXTURE) as arrays:
        sd = {
            prefix + k.removeprefix(f"{kind}/sd/"): arrays[k]
            for k in arrays.files
            if k.startswith(f"{kind}/sd/") and k.removeprefix(f"{kind}/sd/") not in drop
        }
    path = tmp_path / f"{kind}.npz"
    np.savez(path, **sd)
    return path


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("prefix", ["", "backbone.body."])
def test_converted_backbone_reproduces_torchvision_stage_outputs(tmp_path, kind, prefix):
    params, frozen, description = load_backbone(
        write_state_dict(tmp_path, kind, prefix), model_section(kind)
    )
    assert "fc" not in str(sorted(params)) and "not used: 2" in description  # fc dropped
    with np.load(FIXTURE) as arrays:
        image = jnp.asarray(arrays["input"].transpose(0, 2, 3, 1))
        expected = {i: arrays[f"{kind}/out/layer{i}"].transpose(0, 2, 3, 1) for i in range(1, 5)}
    model = ResNet(DEPTH[kind], 4, "frozen_bn", 0, stage_blocks=(1, 1, 1, 1))
    outputs = model.apply({"params": params, "frozen": frozen}, image)
    for i in range(1, 5):
        np.testing.assert_allclose(
            np.asarray(outputs[f"res{i + 1}"]), expected[i], rtol=1e-4, atol=1e-4
        )


def test_the_comparison_fails_with_a_wrong_statistic(tmp_path):
    params, frozen, _ = load_backbone(write_state_dict(tmp_path, "basic"), model_section("basic"))
    frozen = jax.tree.map(np.array, frozen)
    frozen["res3_0"]["conv1"]["norm"]["mean"] += 0.5
    with np.load(FIXTURE) as arrays:
        image = jnp.asarray(arrays["input"].transpose(0, 2, 3, 1))
        expected = arrays["basic/out/layer2"].transpose(0, 2, 3, 1)
    model = ResNet(18, 4, "frozen_bn", 0, stage_blocks=(1, 1, 1, 1))
    out = model.apply({"params": params, "frozen": frozen}, image)["res3"]
    assert np.abs(np.asarray(out) - expected).max() > 1e-2


@pytest.mark.parametrize(
    "section, drop, message",
    [
        ({"norm": "group_norm"}, (), "norm=frozen_bn"),
        ({"depth": 50}, (), "bottleneck False"),
        ({"width": 8}, (), "width 4"),
        ({"stage_blocks": (2, 2, 2, 2)}, (), "stage_blocks (1, 1, 1, 1)"),
        ({}, ("layer3.0.bn2.running_var",), "missing key 'layer3.0.bn2.running_var'"),
    ],
)
def test_bad_weights_or_configs_are_refused_by_name(tmp_path, section, drop, message):
    path = write_state_dict(tmp_path, "basic", drop=drop)
    with pytest.raises(BackboneWeightsError, match=r"model\.backbone_weights") as error:
        load_backbone(path, model_section("basic", **section))
    assert message in str(error.value)


def test_a_file_that_is_not_a_resnet_is_refused(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, **{"encoder.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(BackboneWeightsError, match="not a torchvision ResNet"):
        load_backbone(path, model_section("basic"))
    with pytest.raises(BackboneWeightsError, match="no such weights file"):
        load_backbone(tmp_path / "missing.pth", model_section("basic"))


def test_training_starts_from_the_files_backbone(tmp_path, capsys):
    weights = write_state_dict(tmp_path, "basic")
    workdir = tmp_path / "run"
    argv = [
        "train",
        "--config",
        "experiments/maskrcnn_nuclei.py:smoke",
        "--workdir",
        str(workdir),
        "--max-steps",
        "1",
        "--config.model.width=4",
        "--config.model.stage_blocks=(1, 1, 1, 1)",
        "--config.model.norm=frozen_bn",
        f"--config.model.backbone_weights={weights}",
    ]
    assert cli.main(argv) == 0
    assert f"backbone initialised from {weights}" in capsys.readouterr().err
    assert json.loads((workdir / "config.json").read_text())["model"]["backbone_weights"] == str(
        weights
    )
    _, variables, step = restore_variables(workdir)
    assert step == 1
    expected_params, expected_frozen, _ = load_backbone(weights, model_section("basic"))
    # Frozen statistics never train, and the smoke config freezes the stem (freeze_at=1).
    for got, want in zip(
        jax.tree.leaves(variables["frozen"]["backbone"]),
        jax.tree.leaves(expected_frozen),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["backbone"]["stem"]["conv"]["kernel"]),
        expected_params["stem"]["conv"]["kernel"],
    )


COCO_RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "experiments").glob("*coco*.py"))


# One recipe in the fast tier (the check reads only model.norm and model.backbone_weights, the
# same fields in every recipe); the others in the slow tier.
@pytest.mark.parametrize(
    "recipe",
    [r if "maskrcnn" in r else pytest.param(r, marks=pytest.mark.slow) for r in COCO_RECIPES],
)
def test_frozen_bn_recipes_refuse_to_train_without_imagenet_weights(recipe, tmp_path, capsys):
    """Every COCO recipe is FrozenBN: without model.backbone_weights it would train a random
    ResNet without normalisation. One line naming the field, the checkpoint and the GroupNorm
    alternative; status 2; no workdir; refused before the (here missing) data is read."""
    workdir = tmp_path / "run"
    argv = ["train", "--config", recipe, "--workdir", str(workdir)]
    missing = tmp_path / "no_such_annotations.json"
    assert cli.main([*argv, f"--config.input.train_split.annotations={missing}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("instseg-jax train: model.backbone_weights is empty"), line
    assert "--config.model.backbone_weights=" in line and "IMAGENET1K_V1" in line
    # torchvision's ImageNet checkpoints are named by depth (FCIS's recipe is a ResNet-101).
    depth = int(config_lib.load(recipe).model.get("depth", 50))
    assert f"download.pytorch.org/models/resnet{depth}-" in line
    assert "--config.model.norm=group_norm" in line
    assert not workdir.exists()


def test_the_coco_mask_rcnn_scratch_variant_trains_without_weights(tmp_path, capsys):
    """`:scratch` is detectron2's from-scratch recipe (configs/Misc/
    scratch_mask_rcnn_R_50_FPN_3x_gn.yaml: GroupNorm, FREEZE_AT 0, STEPS (210000, 250000),
    MAX_ITER 270000, no weights): the weights check lets it through to the data check."""
    recipe = "experiments/maskrcnn_r50_fpn_coco_1x.py"
    c = config_lib.load(f"{recipe}:scratch")
    assert (c.model.norm, c.model.freeze_at, c.model.backbone_weights) == ("group_norm", 0, "")
    assert (c.schedule.total_steps, tuple(c.schedule.steps)) == (270_000, (210_000, 250_000))
    assert c.model.compute_dtype == "bfloat16"
    missing = tmp_path / "no_such_annotations.json"
    argv = ["train", "--config", f"{recipe}:scratch", "--workdir", str(tmp_path / "run")]
    assert cli.main([*argv, f"--config.input.train_split.annotations={missing}"]) == 2
    err = capsys.readouterr().err
    assert "no_such_annotations.json" in err and "backbone_weights" not in err, err


def test_the_trainer_loads_a_methods_own_backbone_weights_else_the_resnet_ones(tmp_path):
    """A method module may define load_backbone_weights (another backbone); without one the
    torchvision ResNet loader fills the "backbone" submodule of both collections."""
    from types import SimpleNamespace

    from instseg_jax.weights import resnet

    def own(path, model_config):
        return {"params": {}}, "own"

    assert resnet.backbone_weights_loader(SimpleNamespace(load_backbone_weights=own)) is own
    default = resnet.backbone_weights_loader(SimpleNamespace())
    variables, description = default(write_state_dict(tmp_path, "basic"), model_section("basic"))
    params, frozen, _ = load_backbone(write_state_dict(tmp_path, "basic"), model_section("basic"))
    assert sorted(variables) == ["frozen", "params"] and "torchvision ResNet" in description
    assert jax.tree.structure(variables["params"]["backbone"]) == jax.tree.structure(params)
    assert jax.tree.structure(variables["frozen"]["backbone"]) == jax.tree.structure(frozen)
