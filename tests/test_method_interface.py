"""The method interface holds: a method defined only in the test suite trains, evaluates and
predicts through the CLI; nothing outside methods/ and weights/ names a method; a workdir
carries its class map; user mistakes end in one line and status 2."""

import io
import json
import shutil
import tokenize
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_jax import builders, cli, evaluate, methods
from instseg_jax import config as config_lib
from instseg_jax import workdir as workdir_lib
from instseg_jax.input.synthetic import SyntheticSource, write_coco

REPO = Path(__file__).resolve().parent.parent
TOY = "tests/methods/toy_canvas.py:smoke"


def write_images(folder: Path, sizes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, hw in enumerate(sizes):
        Image.fromarray(SyntheticSource(1, hw, seed=30 + i).load(0)["image"]).save(
            folder / f"photo{i}.png"
        )
    return folder


def test_a_method_from_outside_the_package_trains_evaluates_and_predicts(tmp_path, capsys):
    workdir = tmp_path / "toy"
    assert cli.main(["train", "--config", TOY, "--workdir", str(workdir), "--max-steps", "3"]) == 0
    # The start-up summary reaches the user (the CLI's logging is visible by default).
    logged = capsys.readouterr().err
    for line in ("data: SyntheticSource", "classes (3):", "model: tests.methods.toy_canvas"):
        assert line in logged, logged
    assert "starting at step 0, training to step 3" in logged
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["method"] == "tests.methods.toy_canvas"
    assert saved["input"]["class_names"] == list(SyntheticSource.class_names)  # the map used
    assert (workdir / "checkpoints" / "3").is_dir()
    assert json.loads((workdir / "classes.json").read_text())["class_names"] == list(
        SyntheticSource.class_names
    )

    # Evaluation on the synthetic scenes themselves: their exact masks are the ground truth.
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    printed = capsys.readouterr().out
    assert f"evaluating {workdir / 'checkpoints' / '3'} on synthetic scenes" in printed
    # The tables and where the report went, not the report itself.
    assert f"wrote {workdir / 'eval_3.json'}" in printed and '"timing"' not in printed
    report = json.loads((workdir / "eval_3.json").read_text())
    assert set(report) == {"step", "bbox", "segm", "timing"}

    images = write_images(tmp_path / "images", [(70, 90), (130, 100)])
    out = tmp_path / "out"
    argv = ["predict", "--workdir", str(workdir), "--images", str(images), "--out", str(out)]
    assert cli.main([*argv, "--score-threshold", "0.0"]) == 0
    records = [json.loads((out / f"photo{i}.json").read_text()) for i in range(2)]
    assert [(r["height"], r["width"]) for r in records] == [(70, 90), (130, 100)]
    detections = [d for r in records for d in r["detections"]]
    assert detections, "the toy method made no detection at threshold 0"
    for record in records:
        for d in record["detections"]:
            assert d["mask"]["size"] == [record["height"], record["width"]]
            # No boxes from the model: the host derived each from its mask.
            rle = dict(d["mask"], counts=d["mask"]["counts"].encode())
            x, y, w, h = mask_utils.toBbox(rle)
            np.testing.assert_allclose(d["box"], [x, y, x + w, y + h], atol=1e-6)


def test_a_workdir_predicts_without_its_training_data(tmp_path):
    """The class map lives in the workdir: train on a COCO split, delete the split, move the
    workdir, predict; class names are the split's categories."""
    split, images = write_coco(SyntheticSource(4, (96, 112), seed=3), tmp_path / "data", "train")
    workdir = tmp_path / "run"
    overrides = [
        "--config.input.source=coco",
        f"--config.input.train_split.annotations={split}",
        f"--config.input.train_split.images={images}",
    ]
    argv = ["train", "--config", TOY, "--workdir", str(workdir), "--max-steps", "1", *overrides]
    assert cli.main(argv) == 0
    shutil.rmtree(tmp_path / "data")
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(workdir), str(moved))
    photos = write_images(tmp_path / "photos", [(80, 80)])
    out = tmp_path / "out"
    argv = ["predict", "--workdir", str(moved), "--images", str(photos), "--out", str(out)]
    assert cli.main([*argv, "--score-threshold", "0.0"]) == 0
    record = json.loads((out / "photo0.json").read_text())
    assert {d["class"] for d in record["detections"]} <= set(SyntheticSource.class_names)
    assert workdir_lib.read_class_map(moved, None) == ([1, 2, 3], list(SyntheticSource.class_names))


def _code_tokens(path: Path):
    """NAME tokens and string literals of a Python file (comments and prose docstrings are
    free to mention a method; code is not)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    for token in tokens:
        if token.type == tokenize.NAME:
            yield token.string
        elif token.type == tokenize.STRING and len(token.string) < 80:
            yield token.string.strip("'\"")


def test_no_module_outside_methods_and_weights_names_a_method():
    names = set()
    for key, module in methods.METHODS.items():
        names |= {key, module.__name__.rsplit(".", 1)[-1], module.Model.__name__}
        names.add(module.Config.__name__)
    offenders = []
    for path in sorted((REPO / "instseg_jax").rglob("*.py")):
        relative = path.relative_to(REPO / "instseg_jax")
        if relative.parts[0] in ("methods", "weights"):
            continue
        used = names & set(_code_tokens(path))
        if used:
            offenders.append(f"{relative}: {sorted(used)}")
    assert not offenders, offenders
    # The check can fail: the module that registers methods names them.
    assert names & set(_code_tokens(REPO / "instseg_jax" / "methods" / "__init__.py"))


def test_evaluation_resizes_to_the_test_size_not_the_smallest_training_size():
    config = config_lib.load("experiments/maskrcnn_nuclei.py")
    train = builders.transform_config(config, train=True)
    test = builders.transform_config(config, train=False)
    assert train.short_side == (224, 256) and test.short_side == (256,)
    coco = config_lib.load("experiments/maskrcnn_r50_fpn_coco_1x.py")
    test = builders.transform_config(coco, train=False)
    assert (test.short_side, test.max_long_side) == ((800,), 1333)  # detectron2's *_SIZE_TEST


def test_max_detections_above_coco_100_is_reported_beside_it(tmp_path):
    """One image with 150 objects, all found: COCO's AR@100 is 100/150; at maxDets 200 all."""
    boxes = [[10 * (i % 15), 10 * (i // 15), 8, 8] for i in range(150)]
    gt = {
        "images": [{"id": 1, "height": 160, "width": 160}],
        "categories": [{"id": 1, "name": "dot"}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 64, "iscrowd": 0}
            for i, b in enumerate(boxes)
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    results = [
        {"image_id": 1, "category_id": 1, "bbox": b, "score": 1.0 - i / 1000}
        for i, b in enumerate(boxes)
    ]
    standard = evaluate.coco_evaluate(path, results, print_tables=False)["bbox"]
    both = evaluate.named(
        evaluate.coco_evaluate(path, results, print_tables=False, max_detections=200)["bbox"], 200
    )
    assert standard[8] == pytest.approx(100 / 150, abs=1e-3)  # AR@100
    assert both["AR100"] == pytest.approx(standard[8]) and both["AP"] == pytest.approx(standard[0])
    assert both["AR@200"] == pytest.approx(1.0) and both["AP@200"] == pytest.approx(1.0)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval", "--workdir", "no/such/workdir"], "no config.json"),
        (["eval", "--results", "missing.json", "--annotations", "gt.json"], "missing.json"),
        (["train", "--config", "experiments/nope.py", "--workdir", "x"], "nope.py"),
        (["train", "--config", TOY, "--workdir", "x", "--config.model.widht=3"], "widht"),
        (["predict", "--workdir", "no/such/workdir", "--images", "a.png", "--out", "o"], "no "),
        (["eval", "--workdir", "w", "--max-dets", "50"], "--max-dets 50"),
        (["eval", "--results", "{tmp}/bad.json", "--annotations", "{tmp}/bad.json"], "bad.json"),
    ],
)
def test_user_mistakes_end_in_one_line_and_status_2(argv, expected, capsys, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert expected in _last_line(captured.err)


def test_a_failed_start_leaves_no_workdir_behind(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = [
        "train",
        "--config",
        "experiments/maskrcnn_nuclei.py:smoke",
        "--workdir",
        str(workdir),
        "--config.model.norm=frozen_bn",
        f"--config.model.backbone_weights={tmp_path / 'missing.pth'}",
    ]
    assert cli.main(argv) == 2
    assert "missing.pth" in _last_line(capsys.readouterr().err)
    assert not workdir.exists()  # config.json had been written before the weights were read
    # A workdir the user made is theirs: it stays.
    workdir.mkdir()
    assert cli.main(argv) == 2
    assert workdir.is_dir()
