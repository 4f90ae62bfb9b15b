"""Friction a new user met on unseen COCO data (issue 34, items 6-11): bad annotations named,
the recipe's settings checked against the data, a sign of life while the step compiles, quiet
logs, overrides for eval and predict, per-category AP, readable plots."""

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instseg_jax import builders, cli, evaluate
from instseg_jax import config as config_lib
from instseg_jax import train as train_module
from instseg_jax.input import pipeline as pipeline_module
from instseg_jax.input import report
from instseg_jax.input.coco import CocoSource
from instseg_jax.input.pipeline import InputPipeline
from instseg_jax.input.transforms import TransformConfig

REPO = Path(__file__).resolve().parent.parent
TOY = "tests/methods/toy_canvas.py:smoke"


def square(ann_id, image_id, x0, y0, x1, y1, category_id=1, **extra):
    """A square annotation: its polygon and its bbox."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": float((x1 - x0) * (y1 - y0)),
        "iscrowd": 0,
        **extra,
    }


def coco_dataset(root: Path, annotations, num_images=2, hw=(40, 48), categories=None) -> Path:
    """Grey PNGs and a COCO instances JSON of the given annotations."""
    root.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(num_images):
        Image.fromarray(np.full((*hw, 3), 40 + 20 * i, np.uint8)).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": hw[0], "width": hw[1]})
    categories = categories or [{"id": 1, "name": "thing"}]
    path = root / "annotations.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


# ----------------------------------------------------------------- 6: bad annotations named


def test_bad_annotations_are_named_with_their_file_and_a_bad_box_is_rebuilt(tmp_path, caplog):
    anns = [
        square(1, 1, 2, 2, 10, 10),
        # Two points: no polygon left, the annotation is dropped.
        {**square(31, 1, 12, 2, 20, 10), "segmentation": [[12, 2, 20, 10]]},
        # Negative width, a fine polygon: kept, its box taken from the mask.
        {**square(47, 2, 5, 6, 25, 30), "bbox": [25, 6, -20, 24]},
    ]
    path = coco_dataset(tmp_path, anns)
    with caplog.at_level(logging.WARNING, logger="instseg_jax.input.coco"):
        source = CocoSource(path, tmp_path)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{path}: annotation id 31: polygon of 2 point(s)"), lines
    assert "dropped" in lines[0]
    assert lines[1].startswith(f"{path}: annotation id 47: bbox [25, 6, -20, 24] has a negative")
    assert "taken from its segmentation" in lines[1]

    counts = report.new_counts()
    assert len(source.load(0, counts)["masks"]) == 1
    example = source.load(1, counts)
    np.testing.assert_array_equal(example["boxes"], [[5, 6, 25, 30]])
    assert report.as_dict(counts)["bbox_from_mask"] == 1
    assert report.as_dict(counts)["empty_mask"] == 1

    # Many bad annotations: the first few by name, then one line for the rest; none again
    # when the same file is read a second time (the evaluation split of the same file).
    many = [{**square(100 + i, 1, 2, 2, 10, 10), "bbox": [2, 2, 0, 8]} for i in range(9)]
    path = coco_dataset(tmp_path / "many", many)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="instseg_jax.input.coco"):
        CocoSource(path, tmp_path / "many")
        CocoSource(path, tmp_path / "many")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6, lines
    assert "annotation id 100: bbox [2, 2, 0, 8] has a zero width" in lines[0]
    assert "4 more annotations" in lines[-1]


# ------------------------------------------------------- 7: the recipe checked against the data


def big_objects(root: Path, num_images=8) -> Path:
    """Images of 100x120 px, each with one 80x90 px object."""
    anns = [square(i + 1, i + 1, 10, 5, 100, 85) for i in range(num_images)]
    return coco_dataset(root, anns, num_images=num_images, hw=(100, 120))


def coco_config(spec, annotations: Path, *overrides, eval_annotations=None):
    eval_annotations = eval_annotations or annotations
    return config_lib.load(
        spec,
        [
            "input.source=coco",
            f"input.train_split.annotations={annotations}",
            f"input.train_split.images={annotations.parent}",
            f"input.eval_split.annotations={eval_annotations}",
            f"input.eval_split.images={eval_annotations.parent}",
            *overrides,
        ],
    )


def test_objects_outside_the_methods_sizes_are_warned_about_naming_the_field(tmp_path, caplog):
    path = big_objects(tmp_path / "train")
    held_out = big_objects(tmp_path / "val", 2)
    spec = "experiments/maskrcnn_nuclei.py:smoke"
    config = coco_config(spec, path, eval_annotations=held_out)
    source = builders.build_source(config.input, train=True, seed=0)
    with caplog.at_level(logging.WARNING, logger="instseg_jax.builders"):
        builders.check_against_data(config, source)  # anchors of 16-256 px: 85 px objects fit
    assert not caplog.records, caplog.text

    config = coco_config(spec, path, "model.anchor_sizes=((4,), (8,))", eval_annotations=held_out)
    with caplog.at_level(logging.WARNING, logger="instseg_jax.builders"):
        builders.check_against_data(config, source)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "model.anchor_sizes=((4,), (8,)) covers" in line and "100% larger" in line, line
    assert "--config.model.anchor_sizes" in line
    # The sizes are measured on the canvas at the training resize (smoke: short side 112 of
    # 100x120 images, long side at most 128: scale 1.067).
    sizes = builders.training_object_sizes(config, source)
    np.testing.assert_allclose(sizes, np.sqrt(90 * 80) * 128 / 120, rtol=1e-6)


def test_one_file_as_both_splits_is_warned_about_and_eval_fraction_splits_it(tmp_path, caplog):
    path = big_objects(tmp_path / "data", num_images=10)
    config = coco_config(TOY, path)
    source = builders.build_source(config.input, train=True, seed=config.seed)
    with caplog.at_level(logging.WARNING, logger="instseg_jax.builders"):
        builders.check_against_data(config, source)
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"are the same file ({path})" in line and "--config.input.eval_fraction" in line

    caplog.clear()
    config = coco_config(TOY, path, "input.eval_fraction=0.3")
    with caplog.at_level(logging.WARNING, logger="instseg_jax.builders"):
        notes = builders.check_against_data(config, source)
    assert not caplog.records and "30% of the images" in notes[0], notes

    def split(seed):
        train = builders.build_source(config.input, train=True, seed=seed)
        held_out = builders.build_source(config.input, train=False, seed=seed)
        return [r["image_id"] for r in train.records], held_out

    train_ids, held_out = split(0)
    eval_ids = [r["image_id"] for r in held_out.records]
    assert len(eval_ids) == 3 and sorted(train_ids + eval_ids) == list(range(1, 11))
    assert split(0)[0] == train_ids and split(1)[0] != train_ids  # seeded by config.seed
    # COCOeval scores the held-out images only.
    assert sorted(evaluate.ground_truth(held_out).getImgIds()) == eval_ids
    assert "30% of" in evaluate.evaluation_data(config)

    with pytest.raises(config_lib.ConfigValueError, match="eval_fraction"):
        builders.build_source(
            config_lib.load(TOY, ["input.eval_fraction=0.5"]).input, train=False, seed=0
        )


# ----------------------------------------------- 8: a sign of life while the step compiles


class RecordingBar:
    """tqdm's interface as the trainer uses it, recording the position after each move."""

    def __init__(self, total, initial=0, **kwargs):
        self.n, self.positions = initial, []
        RecordingBar.last = self

    def update(self, amount=1):
        if amount:
            self.n += amount
            self.positions.append(self.n)

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def test_the_compile_is_announced_and_the_bar_moves_every_step(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(train_module, "tqdm", RecordingBar)
    config = config_lib.load(TOY, ["log_every=100"])
    with caplog.at_level(logging.INFO, logger="instseg_jax.train"):
        train_module.train(config, tmp_path / "run", max_steps=3)
    assert RecordingBar.last.positions == [1, 2, 3]  # not one jump at the logged step 3
    text = caplog.text
    assert "compiling the training step (" in text
    assert text.index("compiling the training step") < text.index("input over the run")
    # The smoke recipe's 10 warmup steps do not fit in 3.
    assert "schedule.warmup_steps=10 is not below the run's 3 steps" in text

    # The first step's compile time, kept beside the compilation cache, is quoted next time.
    times = train_module.CompileTimes(config)
    times.path = tmp_path / "cache" / times.FILE
    times.path.parent.mkdir()
    assert "can take minutes" in times.message()
    times.record(42.4)
    times.record(3.0)  # a warm cache's load does not replace the cold figure
    assert "(first run: about 42 s; cached afterwards)" in times.message()


# ------------------------------------------- 9 and 10: quiet logs, eval and predict for a user


@pytest.fixture(scope="module")
def trained_toy(tmp_path_factory):
    """A toy model trained 3 steps on a COCO file of 3 images whose third category has no
    annotation; (workdir, the training log, the images folder)."""
    root = tmp_path_factory.mktemp("toy")
    anns = [square(1, 1, 4, 4, 30, 30), square(2, 2, 10, 6, 40, 36, category_id=2)]
    anns.append(square(3, 3, 6, 4, 20, 24))
    categories = [{"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}]
    categories.append({"id": 5, "name": "quince"})
    path = coco_dataset(root / "data", anns, num_images=3, categories=categories)
    workdir = root / "run"
    argv = ["train", "--config", TOY, "--workdir", str(workdir), "--max-steps", "3"]
    argv += [
        "--config.input.source=coco",
        f"--config.input.train_split.annotations={path}",
        f"--config.input.train_split.images={path.parent}",
        f"--config.input.eval_split.annotations={path}",
        f"--config.input.eval_split.images={path.parent}",
    ]
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        assert cli.main(argv) == 0
    return workdir, log.getvalue(), path.parent


def test_the_start_up_summary_counts_classes_without_instances_and_clean_epochs_are_quiet(
    trained_toy,
):
    _, log, _ = trained_toy
    assert "3 images, 3 instances" in log
    assert "1 of 3 classes have no training instance (quince)" in log
    # 3 steps of 2 images cross epoch 0 of 3 images: nothing to say about it, one line at the end.
    assert "input epoch" not in log and "no data issues" in log.split("input over the run")[1]
    assert log.count("no data issues") == 1


def test_eval_prints_tables_with_per_category_ap_takes_overrides_and_points_to_its_report(
    trained_toy, capsys
):
    workdir, _, _ = trained_toy
    assert cli.main(["eval", "--workdir", str(workdir), "--config.eval.max_detections=150"]) == 0
    captured = capsys.readouterr()
    assert "per-category segm AP:" in captured.out and "per-category bbox AP:" in captured.out
    table = captured.out.split("per-category segm AP:")[1]
    assert "apple" in table and "pear" in table and "quince" in table
    assert f"wrote {workdir / 'eval_3.json'}" in captured.out and '"timing"' not in captured.out
    assert "input" not in captured.err  # no epoch line for an evaluation pass
    report = json.loads((workdir / "eval_3.json").read_text())
    assert "AP@150" in report["segm"]  # the override reached the evaluation
    config = json.loads((workdir / "config.json").read_text())
    assert config["eval"]["max_detections"] == 100  # for this run only

    assert cli.main(["eval", "--workdir", str(workdir), "--config.eval.max_detectoins=5"]) == 2
    assert "max_detectoins" in capsys.readouterr().err


def test_predict_takes_overrides_and_lowers_the_models_threshold_to_its_own(
    trained_toy, tmp_path, capsys, caplog
):
    workdir, _, images = trained_toy
    argv = ["predict", "--workdir", str(workdir), "--images", str(images / "0.png")]
    with caplog.at_level(logging.INFO, logger="instseg_jax.predict"):
        assert cli.main([*argv, "--out", str(tmp_path / "a"), "--score-threshold", "0.01"]) == 0
    assert "model.score_threshold lowered from 0.05 to 0.01" in caplog.text
    caplog.clear()
    override = "--config.model.score_threshold=0.001"
    with caplog.at_level(logging.INFO, logger="instseg_jax.predict"):
        assert (
            cli.main([*argv, "--out", str(tmp_path / "b"), "--score-threshold", "0.01", override])
            == 0
        )
    assert "lowered" not in caplog.text  # the override's 0.001 is below 0.01 already
    assert (tmp_path / "b" / "0.json").is_file()


def test_train_help_lists_the_config_fields_with_their_defaults(capsys):
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["train", "--help"])
    assert exit_status.value.code == 0
    text = capsys.readouterr().out
    for field in ("eval_fraction=0.0", "warmup_steps=1000", "lr=0.02", "every_steps=5000"):
        assert field in text, field
    for section in ("input.", "optim.", "schedule.", "eval.", "checkpoint.", "model."):
        assert f"\n  {section}" in text, section


def test_per_category_ap_is_cocoevals_precision_per_category(tmp_path, capsys):
    """Category 1 found exactly, category 2 missed, category 3 without ground truth."""
    boxes = {1: [2, 2, 10, 10], 2: [20, 20, 8, 8]}
    gt = {
        "images": [{"id": 1, "height": 40, "width": 40}],
        "categories": [{"id": 1, "name": "found"}, {"id": 2, "name": "missed"}]
        + [{"id": 3, "name": "absent"}],
        "annotations": [
            {"id": c, "image_id": 1, "category_id": c, "bbox": b, "area": 64.0, "iscrowd": 0}
            for c, b in boxes.items()
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    results = [{"image_id": 1, "category_id": 1, "bbox": boxes[1], "score": 0.9}]
    evaluate.coco_evaluate(path, results, print_tables=True)
    lines = capsys.readouterr().out.split("per-category bbox AP:\n")[1].splitlines()
    cells = [c.strip() for c in lines[2].split("|")]
    assert cells == ["found", "100.0", "missed", "0.0", "absent", "-"], lines


def test_an_unreadable_image_is_named_once_and_an_unchanged_epoch_report_not_repeated(
    tmp_path, caplog
):
    path = coco_dataset(tmp_path, [square(i + 1, i + 1, 2, 2, 12, 12) for i in range(4)], 4)
    (tmp_path / "2.png").write_bytes(b"not a png")
    config = TransformConfig(
        canvas_hw=(48, 48), short_side=(40,), max_long_side=48, max_instances=2, mask_size=4
    )
    pipeline = InputPipeline(
        CocoSource(path, tmp_path), config, 2, process_index=0, process_count=1
    )
    with caplog.at_level(logging.INFO, logger="instseg_jax.input.pipeline"):
        for _ in range(7):  # three epochs and a half
            next(pipeline)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"skipped: {tmp_path / '2.png'}: cannot decode image (cannot identify image file "
        f"'{tmp_path / '2.png'}')",
        "input epoch 0: unreadable_image=1",
    ], lines
    assert report.as_dict(pipeline.total_counts)["unreadable_image"] == 3

    # A worker logs in the main process's format (it starts without the CLI's setup).
    package = logging.getLogger("instseg_jax")
    saved = package.handlers, package.level, package.propagate
    try:
        pipeline_module._init_worker((logging.INFO, "%(asctime)s %(message)s", "%H:%M"), 0, 1)
        (handler,) = package.handlers
        assert handler.formatter._fmt == "%(asctime)s %(message)s" and not package.propagate
    finally:
        package.handlers, package.level, package.propagate = saved


# ------------------------------------------------------------- 11: plots a reader can read


def test_the_ap_plot_is_matplotlibs_with_axes_and_the_runs_name(tmp_path):
    workdir = tmp_path / "fruit_run"
    workdir.mkdir()
    for step, ap in ((100, 0.1), (200, 0.25), (300, 0.3)):
        report = {"step": step, "bbox": {"AP": ap, "AP50": 2 * ap}, "segm": {"AP": ap, "AP50": ap}}
        (workdir / f"eval_{step}.json").write_text(json.dumps(report))
    picture = Image.open(evaluate.plot_ap(workdir))
    assert picture.size == (640, 400)
    assert picture.info["Software"].startswith("Matplotlib")  # axes, ticks and labels drawn
    assert picture.info["Title"] == "fruit_run: evaluation AP versus training step"


def test_a_workdir_older_than_a_model_field_takes_its_override(tmp_path, caplog):
    """eval/predict on a config.json written before the method gained a field (FCIS's
    model.test_mask_voting came after its first runs): the field gets the default the method
    would use, and `--config.model.FIELD=VALUE` overrides it instead of being refused."""
    from instseg_jax import workdir as workdir_lib

    config = config_lib.load("tests/methods/toy_canvas.py:smoke")
    path = workdir_lib.save_config(config, tmp_path)
    document = json.loads(path.read_text())
    del document["model"]["score_threshold"]
    path.write_text(json.dumps(document))
    old = config_lib.from_json(path, lock=False)
    with pytest.raises(config_lib.ConfigKeyError):
        config_lib.apply_override(old, "model.score_threshold=0.5")
    with caplog.at_level(logging.INFO):
        assert workdir_lib.add_new_model_fields(old, path) == ["score_threshold"]
    assert old.model.score_threshold == 0.05  # toy_canvas.Config's default
    config_lib.apply_override(old, "model.score_threshold=0.5")
    assert old.model.score_threshold == 0.5
    assert "predates model fields score_threshold" in caplog.text
    # `train --config WORKDIR --config.model.FIELD=VALUE` (and `compile`) load it the same way.
    with pytest.raises(config_lib.ConfigKeyError):
        config_lib.load(str(tmp_path), ["--config.model.score_threshold=0.5"])
    loaded = config_lib.load(
        str(tmp_path),
        ["--config.model.score_threshold=0.5"],
        complete_record=workdir_lib.add_new_model_fields,
    )
    assert loaded.model.score_threshold == 0.5 and loaded.is_locked
