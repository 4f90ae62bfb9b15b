"""model.init_from (instseg_jax/finetune.py): a new run starts from a detector's weights, as
torchvision's "TorchVision Object Detection Finetuning Tutorial" does with a COCO Mask R-CNN
whose FastRCNNPredictor and MaskRCNNPredictor it replaces for its own classes.

The loaded arrays are checked against the stored tiny fixtures' state_dicts through the
converters (tests/weights checks those against torch's own outputs) or against a checkpoint
read with orbax directly, the re-initialised ones against a fresh initialisation of the seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from instseg_jax import builders, cli, finetune, rng
from instseg_jax import config as config_lib
from instseg_jax import train as train_lib
from instseg_jax import workdir as workdir_lib
from instseg_jax.builders import device_fields
from instseg_jax.checkpoint import Checkpointer
from instseg_jax.input.pipeline import padding_example
from instseg_jax.input.synthetic import SyntheticSource, write_coco
from instseg_jax.weights import huggingface, torchvision_fcos, torchvision_keypoint
from instseg_jax.weights import torchvision as tv
from tests.test_user_path import user_error_line
from tests.weights import test_huggingface, test_torchvision
from tests.weights import test_torchvision_fcos as fcos_tests
from tests.weights import test_torchvision_keypoint as keypoint_tests

# The leaves torchvision's tutorial replaces, in our layout: FastRCNNPredictor's cls_score and
# bbox_pred, MaskRCNNPredictor's mask_fcn_logits.
MASK_RCNN_PREDICTORS = {"box_head/cls_score", "box_head/bbox_pred", "mask_head/predictor"}


def tiny_state_dict(path) -> dict:
    with np.load(path) as f:
        return {k.removeprefix("sd/"): f[k] for k in f.files if k.startswith("sd/")}


def flat(variables: dict) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(variables).items()}


def module_of(path: str) -> str:
    """'params/box_head/cls_score/kernel' -> 'box_head/cls_score'."""
    return "/".join(path.split("/")[1:-1])


def coco_overrides(tmp_path) -> list[str]:
    """A 3-class COCO training set (the synthetic circles, rectangles and triangles written as
    COCO JSON and PNGs) and small-input settings, as overrides of an imported config."""
    annotations, images = write_coco(SyntheticSource(4, (96, 112), seed=1), tmp_path, "train")
    return [
        "input.source=coco",
        f"input.train_split.annotations={annotations}",
        f"input.train_split.images={images}",
        f"input.eval_split.annotations={annotations}",
        f"input.eval_split.images={images}",
        "input.category_ids=()",  # the data's classes, not the imported model's
        "input.class_names=()",
        "input.global_batch=1",
        "input.num_workers=0",
        "input.short_side=(96,)",
        "input.max_long_side=128",
        "input.max_instances=8",
        "input.mask_size=28",
        "checkpoint.use_async=False",
    ]


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """Mask R-CNN's tiny torchvision fixture imported on a 128x128 canvas (5 outputs: 4 classes
    and the background), then a run started from it on the 3-class COCO set (initialisation
    only: max_steps=0); its start-up log lines."""
    tmp = tmp_path_factory.mktemp("finetune")
    state_dict = tiny_state_dict(test_torchvision.FIXTURE)
    np.savez(tmp / "tiny.npz", **state_dict)
    imported = tmp / "imported"
    argv = ["import-weights", "torchvision", str(tmp / "tiny.npz"), "--out", str(imported)]
    assert cli.main([*argv, "--canvas", "128", "128"]) == 0
    overrides = coco_overrides(tmp / "coco")
    config = config_lib.load(str(imported), [*overrides, f"model.init_from={imported}"])
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("instseg_jax.train")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        state = train_lib.train(config, tmp / "run", max_steps=0, progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {
        "tmp": tmp,
        "imported": imported,
        "overrides": overrides,
        "state_dict": state_dict,
        "config": config,
        "state": state,
        "lines": lines,
    }


def batch_shapes(config) -> dict:
    """The training batch's shapes under config, as the trainer makes them."""
    example = device_fields(padding_example(builders.transform_config(config, train=True)))
    return {
        k: jax.ShapeDtypeStruct((config.input.global_batch, *np.shape(v)), np.asarray(v).dtype)
        for k, v in example.items()
    }


def fresh_variables(config, num_classes: int) -> dict:
    """A fresh initialisation of config's model with the trainer's seed stream, as a run
    without model.init_from makes it."""
    _, _, model = builders.build_model(config, num_classes)
    init = train_lib.init_variables_fn(model, batch_shapes(config), config)
    return jax.jit(init)(rng.stream(config.seed, "params"))


def shapes_fn(config):
    return train_lib.variable_shapes_fn(batch_shapes(config))


@pytest.mark.slow  # one initialisation compiled for the run, one for the reference
def test_fine_tuning_to_three_classes_loads_the_detector_and_reinitialises_its_predictors(
    fine_tuned,
):
    state = fine_tuned["state"]
    ours = flat({"params": state["params"], "frozen": state["frozen"]})
    converted = flat(tv.convert(fine_tuned["state_dict"])[0])
    assert ours.keys() == converted.keys()
    fresh = flat(fresh_variables(fine_tuned["config"], 3))
    modules = {module_of(path) for path in ours}
    assert {"backbone/stem/conv", "backbone/stem/norm", "fpn/lateral2", "rpn_head/conv"} <= modules
    assert {"box_head/fc1", "box_head/fc2", "mask_head/conv1"} <= modules
    reinitialised = []
    for path, value in ours.items():
        if module_of(path) in MASK_RCNN_PREDICTORS:
            reinitialised.append(path)
            assert converted[path].shape != value.shape, path  # 4 classes there, 3 here
            np.testing.assert_array_equal(value, fresh[path], err_msg=path)
        else:  # the backbone, FPN, RPN, box head, mask head, frozen statistics: exactly
            np.testing.assert_array_equal(value, converted[path], err_msg=path)
    assert len(reinitialised) == 6
    assert int(state["step"]) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"]))
    lines = " | ".join(fine_tuned["lines"])
    assert f"model.init_from: {len(ours) - 6} of {len(ours)} leaves" in lines, lines
    assert "6 class-specific leaves" in lines and "3 here and 4 there" in lines, lines
    assert "box_head/cls_score/kernel (32, 5)->(32, 4)" in lines, lines


@pytest.mark.slow  # shares the fixture's compiled initialisation
def test_a_training_workdir_at_a_step_is_a_source_too(fine_tuned, tmp_path):
    """The fine-tuned run's state saved as a training checkpoint (optimizer state, input
    position) at step 5, then read by model.init_from=WORKDIR:5 for a 2-class model."""
    run = fine_tuned["tmp"] / "run"  # config.json and classes.json written by train
    checkpointer = Checkpointer(run, 1, 2, use_async=False)
    checkpointer.save(5, fine_tuned["state"], {"position": 0}, force=True)
    checkpointer.close()
    config = config_lib.load(str(run), [f"model.init_from={run}:5"])
    with config.unlocked():
        config.input.category_ids, config.input.class_names = (1, 2), ("a", "b")
    notes = []
    loaded = flat(finetune.loaded_variables(config, shapes_fn(config), notes))
    # The reference: the checkpoint's state read with orbax alone.
    saved = ocp.PyTreeCheckpointer().restore(run / "checkpoints" / "5" / "state")
    saved = flat({"params": saved["params"], "frozen": saved["frozen"]})
    assert set(saved) - set(loaded) == {p for p in saved if module_of(p) in MASK_RCNN_PREDICTORS}
    for path, value in loaded.items():
        np.testing.assert_array_equal(value, saved[path], err_msg=path)
    assert "from " + str(run) + " step 5" in notes[0], notes
    assert "2 here and 3 there" in notes[1], notes


def imported_mask_rcnn(tmp_path):
    variables, arch = tv.convert(tiny_state_dict(test_torchvision.FIXTURE))
    return variables, tv.coco_config(arch, (128, 128))


def imported_keypoint_rcnn(tmp_path):
    state_dict = tiny_state_dict(keypoint_tests.FIXTURE)
    variables, arch = torchvision_keypoint.convert(state_dict)
    return variables, torchvision_keypoint.coco_config(arch, (128, 128))


def imported_fcos(tmp_path):
    variables, arch = torchvision_fcos.convert(tiny_state_dict(fcos_tests.FIXTURE))
    return variables, torchvision_fcos.coco_config(arch, (128, 128))


def imported_mask2former(tmp_path):
    sd, hf_config, _ = test_huggingface.fixture()
    params, frozen, fields, num_classes = huggingface.convert(sd, hf_config)
    config = huggingface.coco_config(fields, num_classes, hf_config, (128, 128))
    return {"params": params, "frozen": frozen}, config


# Each importer's model, and the modules whose outputs are its classes (the reference's names:
# torchvision's box_predictor and mask_predictor, FCOS's classification_head.cls_logits,
# transformers' class_predictor).
IMPORTED = {
    "mask_rcnn": (imported_mask_rcnn, MASK_RCNN_PREDICTORS),
    "keypoint_rcnn": (imported_keypoint_rcnn, {"box_head/cls_score", "box_head/bbox_pred"}),
    "fcos": (imported_fcos, {"head/cls_logits"}),
    "mask2former": (imported_mask2former, {"transformer_decoder/heads/class_embed"}),
}


@pytest.mark.parametrize("method", sorted(IMPORTED))
def test_an_imported_detector_loads_all_but_its_class_predictors(method, tmp_path):
    make, predictors = IMPORTED[method]
    variables, config = make(tmp_path)
    source = tmp_path / "imported"
    workdir_lib.write_imported_workdir(source, config, variables, "fixture")
    config = config_lib.load(str(source), [f"model.init_from={source}"])
    count = 2 if len(config.input.category_ids) == 3 else 3
    with config.unlocked():
        config.input.category_ids = tuple(range(1, count + 1))
        config.input.class_names = tuple(f"mine_{i}" for i in range(count))
        if config.model.get("mask_fg_per_image") == 0:  # chosen from the data when train starts
            config.model.mask_fg_per_image = 8
    notes = []
    loaded = flat(finetune.loaded_variables(config, shapes_fn(config), notes))
    converted = flat(variables)
    assert {module_of(p) for p in set(converted) - set(loaded)} == predictors, notes
    assert set(loaded) <= set(converted)
    for path, value in loaded.items():
        np.testing.assert_array_equal(value, converted[path], err_msg=path)
    assert f"{count} here" in notes[1], notes


def test_another_method_or_architecture_is_refused_in_one_line_leaving_no_workdir(tmp_path, capsys):
    variables, config = imported_mask_rcnn(tmp_path)
    source = tmp_path / "imported"
    workdir_lib.write_imported_workdir(source, config, variables, "fixture")
    workdir = tmp_path / "run"
    other_method = ["train", "--config", "experiments/fcos_nuclei.py:smoke"]
    argv = [*other_method, "--workdir", str(workdir), f"--config.model.init_from={source}"]
    assert cli.main(argv) == 2
    line = user_error_line(capsys.readouterr().err)
    assert f"model.init_from={source} holds mask_rcnn weights; this run trains fcos" in line
    assert not workdir.exists()
    # The box head's width changed: refused at its first layer, with both shapes.
    data = [f"--config.{o}" for o in coco_overrides(tmp_path / "coco")]
    argv = ["train", "--config", str(source), "--workdir", str(workdir), *data]
    argv += ["--config.model.box_fc_dim=8", f"--config.model.init_from={source}:0"]
    assert cli.main(argv) == 2
    line = user_error_line(capsys.readouterr().err)
    assert "params/box_head/fc1/" in line and "model.init_from=" in line, line
    assert "(32,) in the checkpoint and (8,) in this run's model" in line, line
    assert "box_fc_dim (32 there, 8 here)" in line, line
    assert not workdir.exists()
    # No such checkpoint step: named with the field.
    argv[-1] = f"--config.model.init_from={source}:7"
    assert cli.main(argv) == 2
    line = user_error_line(capsys.readouterr().err)
    assert f"model.init_from={source}:7" in line and "available steps: [0]" in line, line
    assert not workdir.exists()


def test_frozen_batch_norm_accepts_init_from_as_its_weights():
    from instseg_jax.weights.resnet import BackboneWeightsError, require_pretrained_frozen_bn

    model = {"norm": "frozen_bn", "backbone_weights": "", "init_from": ""}
    with pytest.raises(BackboneWeightsError, match=r"model\.init_from=WORKDIR"):
        require_pretrained_frozen_bn(model)
    require_pretrained_frozen_bn(dict(model, init_from="runs/tv"))


def test_the_spec_takes_an_optional_step():
    assert finetune.parse("runs/tv") == (Path("runs/tv"), None)
    assert finetune.parse("runs/tv:2000") == (Path("runs/tv"), 2000)
    assert finetune.parse("runs/a:b") == (Path("runs/a:b"), None)


# Per method, the modules whose output (or input) size is the class count, as each reference
# sizes them: detectron2's box predictor and mask predictor (Mask R-CNN, PANet, Panoptic FPN,
# Keypoint R-CNN without a mask head), PointRend's coarse head and point head (its inputs carry
# the coarse class scores), AdelaiDet's cls_logits (FCOS, CondInst, BlendMask with its auxiliary
# semantic head, PolarMask), SOLOv2's category branch, YOLACT's class confidences and semantic
# head, Mask2Former's class_embed; Panoptic FPN's semantic head counts the stuff classes.
R_CNN = {"box_head/cls_score", "box_head/bbox_pred"}
CLASS_MODULES = {
    "mask_rcnn": MASK_RCNN_PREDICTORS,
    "panet": MASK_RCNN_PREDICTORS,
    "ms_rcnn": MASK_RCNN_PREDICTORS | {"maskiou_head/fc_mask_iou"},  # MaskIoUHead's per class
    "panoptic_fpn": MASK_RCNN_PREDICTORS | {"semantic_head/predictor"},
    "keypoint_rcnn": R_CNN,
    "pointrend": R_CNN
    | {"coarse_head/prediction", "point_head/fc1", "point_head/fc2", "point_head/fc3"}
    | {"point_head/predictor"},
    "fcos": {"head/cls_logits"},
    "condinst": {"head/cls_logits"},
    "deepmask": set(),  # class-agnostic: no module is sized by the class count
    "polarmask": {"head/cls_logits"},
    "blendmask": {"head/cls_logits", "semantic_head/logits"},
    "solo": {"category_tower/predict"},
    "solov2": {"category_tower/predict"},
    "instancefcn": {"obj2"},  # one objectness logit per window side and class
    "yolact": {"head/classes", "semantic"},
    "mask2former": {"transformer_decoder/heads/class_embed"},
}


@pytest.mark.slow  # every method traced three times, a checkpoint written and read for each
@pytest.mark.parametrize("method", sorted(CLASS_MODULES))
def test_every_methods_own_workdir_fine_tunes_to_another_class_count(method, tmp_path):
    """A workdir of the method's smoke model with 5 classes (and one more stuff class, where
    it has them), random weights, as the source of a 3-class run: everything loads but the
    modules sized by the class count."""
    from instseg_jax.methods import METHODS

    module = METHODS[method]
    config = module.smoke(module.base_config())
    source_config = config.copy_and_resolve_references()
    if "num_stuff_classes" in config.model:
        source_config.model.num_stuff_classes = config.model.num_stuff_classes + 1
    source_config.input.category_ids = (1, 2, 3, 4, 5)
    source_config.input.class_names = ("a", "b", "c", "d", "e")
    if source_config.model.get("mask_fg_per_image") == 0:
        source_config.model.mask_fg_per_image = config.model.mask_fg_per_image = 8
    shapes = train_lib.variable_shapes_fn(batch_shapes(source_config))(source_config, 5)
    draw = np.random.default_rng(0)
    shapes = {"params": shapes["params"], "frozen": shapes.get("frozen", {})}
    weights = jax.tree.map(lambda s: draw.normal(size=s.shape).astype(s.dtype), shapes)
    source = tmp_path / "source"
    workdir_lib.write_imported_workdir(source, source_config, weights, "a run")
    config.model.init_from = str(source)
    config.input.category_ids, config.input.class_names = (1, 2, 3), ("x", "y", "z")
    notes = []
    loaded = flat(finetune.loaded_variables(config, shapes_fn(config), notes))
    saved = flat(weights)
    assert {module_of(p) for p in set(saved) - set(loaded)} == CLASS_MODULES[method], notes
    for path, value in loaded.items():
        np.testing.assert_array_equal(value, saved[path], err_msg=path)
