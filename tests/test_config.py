import json

import pytest

from instseg_jax import config as config_lib

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
    saved = json.loads(config_lib.save(c, tmp_path).read_text())
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


@pytest.mark.parametrize(
    "spec",
    [
        NUCLEI,
        f"{NUCLEI}:smoke",
        "experiments/maskrcnn_r50_fpn_coco_1x.py",
        "experiments/maskrcnn_r50_fpn_coco_1x.py:smoke",
        "experiments/solov2_nuclei.py",
        "experiments/solov2_nuclei.py:smoke",
        "experiments/solov2_r50_fpn_coco_1x.py",
        "experiments/solov2_r50_fpn_coco_1x.py:smoke",
        "experiments/yolact_nuclei.py",
        "experiments/yolact_nuclei.py:smoke",
        "experiments/yolact_r50_coco.py",
        "experiments/yolact_r50_coco.py:smoke",
    ],
)
def test_experiments_load_locked(spec):
    c = config_lib.load(spec)
    expected = next((m for m in ("solov2", "yolact") if m in spec), "mask_rcnn")
    assert c.is_locked and c.method == expected
    with pytest.raises(ValueError, match="unknown experiment argument"):
        config_lib.load(spec.split(":")[0] + ":bogus")
