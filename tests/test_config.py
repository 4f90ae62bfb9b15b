import json
from pathlib import Path

import pytest

from instseg_jax import config as config_lib
from instseg_jax import workdir as workdir_lib

NUCLEI = "experiments/maskrcnn_nuclei.py"


def test_overrides_apply_with_types_checked(tmp_path):
    c = config_lib.load(
        NUCLEI,
        [
            "--config.optim.lr=0.01",
            "--config.input.canvas_hw=(128, 128)",
            "--config.optim.clip_norm=1",
            "--config.model.norm=frozen_bn",
        ],
    )
    assert c.optim.lr == 0.01 and c.input.canvas_hw == (128, 128) and c.optim.clip_norm == 1.0
    assert c.model.norm == "frozen_bn"
    with pytest.raises(KeyError, match="no field 'lrr'"):
        config_lib.load(NUCLEI, ["--config.optim.lrr=0.1"])
    with pytest.raises(KeyError, match="no section 'optimizer'"):
        config_lib.load(NUCLEI, ["--config.optimizer.lr=0.1"])
    with pytest.raises(TypeError, match=r"optim\.lr is float, got str"):
        config_lib.load(NUCLEI, ["--config.optim.lr=fast"])
    with pytest.raises(ValueError, match=r"a\.b=value"):
        config_lib.load(NUCLEI, ["--config.optim.lr"])
    with pytest.raises(FileNotFoundError, match=r"experiments/nope\.py"):
        config_lib.load("experiments/nope.py")
    saved = json.loads(workdir_lib.save_config(c, tmp_path).read_text())
    assert saved["optim"]["lr"] == 0.01
    assert saved["input"]["canvas_hw"] == [128, 128]


def test_override_errors_name_what_exists():
    with pytest.raises(KeyError, match=r"no section 'optimizer'.*sections here: \[.*'optim'"):
        config_lib.load(NUCLEI, ["--config.optimizer.lr=0.1"])
    with pytest.raises(KeyError, match=r"no section 'lr'"):
        config_lib.load(NUCLEI, ["--config.optim.lr.x=0.1"])
    with pytest.raises(KeyError, match=r"no field 'lrr'; fields here: \[.*'lr'"):
        config_lib.load(NUCLEI, ["--config.optim.lrr=0.1"])


def test_override_bool_is_not_a_number():
    # ConfigDict alone would take True for an int or float field (bool subclasses int).
    with pytest.raises(TypeError, match=r"seed is int, got bool"):
        config_lib.load(NUCLEI, ["--config.seed=True"])
    with pytest.raises(TypeError, match=r"optim\.lr is float, got bool"):
        config_lib.load(NUCLEI, ["--config.optim.lr=True"])
    with pytest.raises(TypeError, match=r"model\.mask_on is bool, got int"):
        config_lib.load(NUCLEI, ["--config.model.mask_on=1"])


def test_string_field_takes_the_text_as_it_is():
    c = config_lib.load(
        NUCLEI,
        ["--config.input.train_split.images=2018", "--config.input.eval_split.images=[val]"],
    )
    assert c.input.train_split.images == "2018" and c.input.eval_split.images == "[val]"


EXPERIMENT_FILES = sorted(
    str(p.relative_to(Path(__file__).resolve().parents[1]))
    for p in (Path(__file__).resolve().parents[1] / "experiments").glob("*.py")
)


@pytest.mark.parametrize("spec", EXPERIMENT_FILES + [f"{e}:smoke" for e in EXPERIMENT_FILES])
def test_experiments_load_locked(spec):
    """Every experiment file and its smoke shrink load, locked, with the method its file is
    named after."""
    c = config_lib.load(spec)
    name = Path(spec.split(":")[0]).stem.replace("_", "")
    assert c.is_locked and name.startswith(c.method.replace("_", "")), (spec, c.method)
    with pytest.raises(ValueError, match="unknown experiment argument"):
        config_lib.load(spec.split(":")[0] + ":bogus")


def test_a_choice_field_names_itself_its_values_and_the_value_given():
    with pytest.raises(
        config_lib.ConfigValueError,
        match=r"^model\.f must be 'class', 'product' or 'combined', got 'y'$",
    ):
        config_lib.check_choice("model.f", "y", ("class", "product", "combined"))
    config_lib.check_choice("model.f", "class", ("class", "product", "combined"))
    from instseg_jax.methods import solov2

    with pytest.raises(
        config_lib.ConfigValueError,
        match=r"^model\.grid_extent must be 'image' or 'canvas', got 'padded'$",
    ):
        solov2.SOLOv2Config(num_classes=1, grid_extent="padded")
