"""Friction a new user met on unseen COCO data (issue 34, items 6-11): bad annotations named,
the recipe's settings checked against the data, a sign of life while the step compiles, quiet
logs, overrides for eval and predict, per-category AP, readable plots."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instseg_jax import builders, evaluate
from instseg_jax import config as config_lib
from instseg_jax import train as train_module
from instseg_jax.input import report
from instseg_jax.input.coco import CocoSource

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
