"""A new user's path through the CLI on a COCO dataset of JPEG photos made here (3 classes,
polygons, a crowd region in RLE, images of different sizes): train, eval and predict as README
says, the start-up summary and the data report, four user mistakes ending in one line without
a traceback (and no workdir left behind), and a clean stop on Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from instseg_jax import cli

REPO = Path(__file__).resolve().parent.parent
SMOKE = "experiments/maskrcnn_nuclei.py:smoke"
TOY = "tests/methods/toy_canvas.py:smoke"  # the test suite's seconds-to-compile method
CLASSES = [(3, "cat"), (7, "dog"), (9, "bird")]  # sparse category ids, as real files have
SIZES = [(120, 160), (150, 100), (96, 128), (140, 140), (110, 170), (128, 96)]


def make_dataset(root: Path) -> Path:
    """JPEG photos of coloured polygons on noise, and their COCO instances JSON."""
    rng = np.random.default_rng(0)
    images_dir = root / "photos"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id, (h, w) in enumerate(SIZES, start=1):
        pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        photo = Image.fromarray(pixels)
        draw = ImageDraw.Draw(photo)
        for k in range(3):
            cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
            r = rng.uniform(12, 24)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
            points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
            category, _ = CLASSES[(image_id + k) % 3]
            draw.polygon(points, fill=tuple(int(v) for v in rng.integers(120, 255, 3)))
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": [[float(v) for p in points for v in p]],
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "area": 3.0 * r * r,
                    "iscrowd": 0,
                }
            )
        name = f"photo_{image_id}.jpg"
        photo.save(images_dir / name, quality=90)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    crowd = np.zeros(SIZES[0], np.uint8, order="F")
    crowd[5:25, 5:40] = 1
    rle = mask_utils.encode(crowd)
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": 1,
            "category_id": 3,
            "segmentation": {"size": list(SIZES[0]), "counts": rle["counts"].decode()},
            "bbox": [5.0, 5.0, 35.0, 20.0],
            "area": float(crowd.sum()),
            "iscrowd": 1,
        }
    )
    document = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in CLASSES],
    }
    annotation_file = root / "annotations.json"
    annotation_file.write_text(json.dumps(document))
    return annotation_file


def data_overrides(annotations: Path, images: Path) -> list[str]:
    return [
        "--config.input.source=coco",
        f"--config.input.train_split.annotations={annotations}",
        f"--config.input.train_split.images={images}",
        f"--config.input.eval_split.annotations={annotations}",
        f"--config.input.eval_split.images={images}",
    ]


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_new_users_path_on_a_coco_dataset_of_photos(tmp_path, capsys):
    annotations = make_dataset(tmp_path)
    images = tmp_path / "photos"
    workdir = tmp_path / "run"
    data = data_overrides(annotations, images)

    # Train as README says; 4 steps cross the end of the first epoch (6 images, batch 2).
    argv = ["train", "--config", SMOKE, "--workdir", str(workdir), "--max-steps", "4", *data]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"data: {annotations}: 6 images, 18 instances, 1 crowd regions" in err, err
    assert "classes (3): cat, dog, bird" in err
    assert "starting at step 0, training to step 4" in err
    assert "input epoch 0:" in err  # the per-epoch data report reaches the user
    assert "Traceback" not in err
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["input"]["category_ids"] == [3, 7, 9]
    (start,) = json.loads((workdir / "provenance.json").read_text())  # one training start
    assert start["experiment_file"].endswith("maskrcnn_nuclei.py") and not start["shadowed_package"]
    assert f"code: {start['package']}" in err

    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert f"evaluating {workdir / 'checkpoints' / '4'} on {annotations}" in out
    assert f"wrote {workdir / 'eval_4.json'}" in out
    report = json.loads((workdir / "eval_4.json").read_text())
    assert set(report) == {"step", "bbox", "segm", "timing"}

    preds = tmp_path / "preds"
    argv = ["predict", "--workdir", str(workdir), "--images", str(images), "--out", str(preds)]
    assert cli.main([*argv, "--score-threshold", "0.0"]) == 0
    records = {p.stem: json.loads(p.read_text()) for p in preds.glob("*.json")}
    assert len(records) == 6
    for image_id, (h, w) in enumerate(SIZES, start=1):
        record = records[f"photo_{image_id}"]
        assert (record["height"], record["width"]) == (h, w)
    capsys.readouterr()

    # Four mistakes: one line each, exit status 2, no workdir left behind.
    bad_json = tmp_path / "not_coco.json"
    bad_json.write_text(json.dumps({"images": []}))
    results = tmp_path / "results.json"
    results.write_text("[]")
    mistakes = [
        (
            ["train", "--config", SMOKE, "--workdir", str(tmp_path / "m1")]
            + data_overrides(tmp_path / "missing.json", images),
            "missing.json",
        ),
        (
            ["train", "--config", SMOKE, "--workdir", str(tmp_path / "m2")]
            + data_overrides(bad_json, images),
            "not_coco.json",
        ),
        (
            ["train", "--config", SMOKE, "--workdir", str(tmp_path / "m3"), *data]
            + ["--config.input.train_split.anotations=x.json"],
            "anotations",
        ),
        (
            ["eval", "--results", str(results), "--annotations", str(tmp_path / "gone.json")],
            "gone.json",
        ),
    ]
    for argv, named in mistakes:
        assert cli.main(argv) == 2, argv
        assert named in one_line(capsys.readouterr().err)
    for name in ("m1", "m2", "m3"):
        assert not (tmp_path / name).exists(), name


@pytest.mark.parametrize("workers", [1])
def test_ctrl_c_on_the_photo_dataset_stops_cleanly(tmp_path, workers):
    """Ctrl-C in a terminal reaches the whole process group, loader workers included: the run
    stops, writes its checkpoint and resumes, without a worker's traceback or leaked shared
    memory."""
    annotations = make_dataset(tmp_path)
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "instseg_jax.cli",
        "train",
        "--config",
        TOY,
        "--workdir",
        str(workdir),
        "--max-steps",
        "50",
        f"--config.input.num_workers={workers}",
        *data_overrides(annotations, tmp_path / "photos"),
    ]
    run = subprocess.Popen(
        command,
        cwd=REPO,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    metrics = workdir / "metrics.jsonl"
    start = time.time()
    while not (metrics.exists() and metrics.read_text().strip()):
        assert run.poll() is None, run.communicate()[0][-3000:]
        assert time.time() - start < 300, "the run never logged a step"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGINT)
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    stopped = int(output.split("stopped at step ")[1].split(" ")[0])
    assert (workdir / "checkpoints" / str(stopped)).is_dir()
    assert "leaked shared_memory" not in output, output[-2000:]

    # The same command resumes and finishes; no shared memory is left behind at the end.
    command[command.index("--max-steps") + 1] = str(stopped + 2)
    finished = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming from step {stopped}" in finished.stderr
    assert "leaked shared_memory" not in finished.stderr, finished.stderr[-2000:]


# ----------------------------------------------------------------- issue 34, items 1-5


def file_hashes(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def user_error_line(err: str, command: str = "train") -> str:
    """The one line a user error prints (the CLI's `instseg-jax CMD: ...`), with no traceback
    and no library's error output around it."""
    assert "Traceback" not in err and "ERROR" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"instseg-jax {command}:")]
    assert len(lines) == 1, err
    return lines[0]


def two_class_copy(annotations: Path) -> Path:
    """The photo dataset without its third category ("bird")."""
    document = json.loads(annotations.read_text())
    document["categories"] = document["categories"][:2]
    kept = {c["id"] for c in document["categories"]}
    document["annotations"] = [a for a in document["annotations"] if a["category_id"] in kept]
    path = annotations.with_name("two_classes.json")
    path.write_text(json.dumps(document))
    return path


def test_a_resume_the_checkpoint_does_not_fit_leaves_the_workdir_as_it_was(tmp_path, capsys):
    annotations = make_dataset(tmp_path)
    images = tmp_path / "photos"
    workdir = tmp_path / "run"
    train = ["train", "--config", TOY, "--workdir", str(workdir), "--max-steps", "2"]
    assert cli.main([*train, *data_overrides(annotations, images)]) == 0
    capsys.readouterr()
    before = file_hashes(workdir)

    two_classes = data_overrides(two_class_copy(annotations), images)
    refusals = [
        ([*train, *two_classes], "holds a 3-class tests.methods.toy_canvas checkpoint (step 2)"),
        (
            [*train, *data_overrides(annotations, images), "--config.model.width=8"],
            "whose arrays do not fit",
        ),
        (
            [*train, *data_overrides(annotations, images), "--config.optim.name=sgd"],
            "whose arrays do not fit",
        ),
    ]
    for argv, expected in refusals:
        assert cli.main(argv) == 2, argv
        line = user_error_line(capsys.readouterr().err)
        assert expected in line and "use a new --workdir" in line, line
        assert file_hashes(workdir) == before, argv
    assert "the config asks for 2 classes" in user_error_line(
        (cli.main([*train, *two_classes]), capsys.readouterr().err)[1]
    )

    # The same data and config still resume.
    train[train.index("--max-steps") + 1] = "3"
    assert cli.main([*train, *data_overrides(annotations, images)]) == 0
    assert "resuming from step 2" in capsys.readouterr().err


def test_training_into_an_import_weights_workdir_is_refused_untouched(tmp_path, capsys):
    """A workdir as import-weights writes it (config.json, classes.json, checkpoint 0 of params
    and frozen statistics only, the source file's name beside it) cannot be resumed."""
    from instseg_jax import config as config_lib
    from instseg_jax import train as train_lib
    from instseg_jax import workdir as workdir_lib
    from instseg_jax.checkpoint import Checkpointer

    annotations = make_dataset(tmp_path)
    scratch = tmp_path / "scratch"
    config = config_lib.load(TOY, data_overrides(annotations, tmp_path / "photos"))
    trained = train_lib.train(config, scratch, max_steps=1, progress=False)
    workdir = tmp_path / "imported"
    workdir_lib.save_config(config, workdir)
    workdir_lib.write_class_map(workdir, config.input.category_ids, config.input.class_names)
    checkpointer = Checkpointer(workdir, 1, 1, use_async=False)
    state = {"params": trained["params"], "frozen": trained["frozen"], "step": trained["step"] * 0}
    checkpointer.save(0, state, {"imported_from": "weights.pth"}, force=True)
    checkpointer.close()
    capsys.readouterr()
    before = file_hashes(workdir)

    argv = ["train", "--config", str(workdir / "config.json"), "--workdir", str(workdir)]
    assert cli.main(argv) == 2
    line = user_error_line(capsys.readouterr().err)
    assert "imported by import-weights (from weights.pth)" in line, line
    assert file_hashes(workdir) == before


def test_a_workdirs_config_json_trains_as_that_run_did(tmp_path, capsys):
    first = tmp_path / "first"
    assert cli.main(["train", "--config", TOY, "--workdir", str(first), "--max-steps", "1"]) == 0
    recorded = json.loads((first / "config.json").read_text())
    for spec, name in ((first / "config.json", "second"), (first, "third")):
        workdir = tmp_path / name
        argv = ["train", "--config", str(spec), "--workdir", str(workdir), "--max-steps", "1"]
        assert cli.main([*argv, "--config.input.canvas_hw=(96, 96)"]) == 0
        again = json.loads((workdir / "config.json").read_text())
        assert again == {**recorded, "input": {**recorded["input"], "canvas_hw": [96, 96]}}
    capsys.readouterr()
    assert cli.main(["train", "--config", f"{first / 'config.json'}:smoke", "--workdir", "x"]) == 2
    assert "takes no ':smoke'" in user_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "section, position, field, value, named",
    [
        ("annotations", 1, "category_id", None, "annotation id 2 has no 'category_id'"),
        ("images", 2, "file_name", None, "image id 3 has no 'file_name'"),
        ("images", 0, "height", "tall", "image id 1 has height 'tall', not an integer"),
        ("annotations", 4, "image_id", None, "annotation id 5 has no 'image_id'"),
        ("categories", 0, "id", None, "category 0 of 'categories' has no 'id'"),
    ],
)
def test_a_coco_entry_without_a_field_ends_in_one_line(
    tmp_path, capsys, section, position, field, value, named
):
    annotations = make_dataset(tmp_path)
    document = json.loads(annotations.read_text())
    entry = document[section][position]
    if value is None:
        del entry[field]
    else:
        entry[field] = value
    annotations.write_text(json.dumps(document))
    workdir = tmp_path / "run"
    argv = ["train", "--config", TOY, "--workdir", str(workdir)]
    assert cli.main([*argv, *data_overrides(annotations, tmp_path / "photos")]) == 2
    line = user_error_line(capsys.readouterr().err)
    assert f"{annotations}: {named}" in line, line
    assert not workdir.exists()


def test_a_global_batch_the_devices_do_not_divide_ends_in_one_line(tmp_path):
    """2 images over 4 devices: refused before the data is read, not a traceback from jax
    at the first step."""
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "instseg_jax.cli", "train", "--config", TOY]
    command += ["--workdir", str(workdir), "--config.input.global_batch=2"]
    env = {
        **os.environ,
        "XLA_FLAGS": (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
        ),
    }
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    line = user_error_line(done.stderr)
    assert "input.global_batch 2 does not divide over the 4 devices" in line, line
    assert "--config.input.global_batch=4" in line
    assert not workdir.exists()

    # Asked for a multi-process run where JAX finds no cluster (a new process: JAX must not
    # have started its backend before jax.distributed.initialize).
    command[-1] = "--config.mesh.distributed=True"
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "mesh.distributed=True but JAX detects no cluster" in user_error_line(done.stderr)


@pytest.mark.parametrize("mistake", ["missing file", "missing image", "other categories"])
def test_the_evaluation_split_is_checked_before_the_step_compiles(tmp_path, capsys, mistake):
    annotations = make_dataset(tmp_path)
    images = tmp_path / "photos"
    eval_file = tmp_path / "eval.json"
    document = json.loads(annotations.read_text())
    expected = f"{eval_file}: "
    if mistake == "missing file":
        expected = str(eval_file)
    elif mistake == "missing image":
        document["images"][1]["file_name"] = "gone.jpg"
        eval_file.write_text(json.dumps(document))
        expected = "gone.jpg: image file of image id 2 is missing"
    else:
        eval_file = two_class_copy(annotations)
        expected = f"{eval_file}: the evaluation split's category ids [3, 7] (2) differ"
    workdir = tmp_path / "run"
    argv = ["train", "--config", TOY, "--workdir", str(workdir), "--config.eval.every_steps=2"]
    argv += data_overrides(annotations, images)
    argv += [f"--config.input.eval_split.annotations={eval_file}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in user_error_line(err), err
    assert "compiling" not in err and not workdir.exists()


def test_no_detections_are_said_and_keep_pycocotools_values(tmp_path, caplog, capsys):
    """Above a score no detection reaches, evaluation says so in one line and reports
    pycocotools' values: AP 0 where the ground truth has objects, -1 for a size it has none of
    (the photos' objects are all under 96 x 96 px: no large ones)."""
    import logging

    from instseg_jax import config as config_lib
    from instseg_jax import evaluate
    from instseg_jax import train as train_lib

    annotations = make_dataset(tmp_path)
    config = config_lib.load(TOY, data_overrides(annotations, tmp_path / "photos"))
    state = train_lib.train(config, tmp_path / "run", max_steps=1, progress=False)
    with config.unlocked():
        config.model.score_threshold = 2.0  # above any mean probability
    variables = {"params": state["params"], "frozen": state["frozen"]}
    with caplog.at_level(logging.WARNING, logger="instseg_jax.evaluate"):
        report = evaluate.evaluate_model(config, variables, print_tables=True)
    said = [r.getMessage() for r in caplog.records if "no detections" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "no detections above model.score_threshold=2.0 on 6 images"
    ), said
    for iou_type in ("bbox", "segm"):
        assert report[iou_type]["AP"] == 0.0 and report[iou_type]["AR100"] == 0.0
        assert report[iou_type]["APl"] == -1.0 and report[iou_type]["ARl"] == -1.0
    assert "Average Precision" in capsys.readouterr().out  # pycocotools' table is printed


def test_a_stop_request_ends_the_run_within_a_step_of_the_device(tmp_path, monkeypatch):
    """A stop request (Ctrl-C) ends training after the step under way, not at the next logging
    step: the host never dispatches more than one step beyond those the device has finished
    (asynchronous dispatch would otherwise let it queue every step up to the next logging
    step's metrics, and the run would go on through all of them)."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from instseg_jax import config as config_lib
    from instseg_jax import sharding
    from instseg_jax import train as train_lib
    from instseg_jax.input import report

    monkeypatch.setattr(train_lib.CompileTimes, "record", lambda self, seconds: None)
    config = config_lib.load(TOY, ["--config.log_every=1000"])
    signalled_at = 20
    finished_when_signalled = []
    dispatched = []  # each step's loss: ready once the device has run the step

    @jax.jit
    def slow_step(state, batch):  # milliseconds of device work per step, dispatched at once
        x = jax.lax.fori_loop(0, 30, lambda _, x: jnp.tanh(x @ x), state["x"])
        metrics = {"loss": x[0, 0], "nonfinite_run": jnp.zeros((), jnp.int32)}
        return {"x": x, "step": state["step"] + 1}, metrics

    def step_fn(state, batch):
        state, metrics = slow_step(state, batch)
        dispatched.append(metrics["loss"])
        return state, metrics

    class Loader:  # a ready batch at once, and a Ctrl-C when batch `signalled_at` is asked for
        total_counts = report.new_counts()
        requests = 0

        def __next__(self):
            self.requests += 1
            if self.requests == signalled_at:
                finished_when_signalled.append(sum(bool(x.is_ready()) for x in dispatched))
                os.kill(os.getpid(), signal.SIGINT)
            return {"image": np.zeros((2, 1), np.float32)}

        def get_state(self):
            return {}

    saved = []  # the steps checkpointed

    class Checkpoints:
        directory = tmp_path / "checkpoints"

        class manager:  # orbax's CheckpointManager, as Checkpointer.manager
            should_save = staticmethod(lambda step: False)

        def save(self, step, state, data_state, force=False):
            saved.append(step)

    class Writer:
        def write(self, step, record):
            pass

    state = {"x": jnp.eye(96) * 0.5, "step": jnp.zeros((), jnp.int32)}
    mesh = sharding.make_mesh()
    bar = tqdm(total=400, disable=True)
    _, stopped = train_lib._run_steps(
        config, state, step_fn, Loader(), mesh, Checkpoints(), Writer(), bar, tmp_path, 400
    )
    assert stopped is not None and stopped[1] == "SIGINT"
    assert saved == [stopped[0]]
    # Steps finished on the device when the stop was asked for, and the step the run ended at.
    assert stopped[0] - finished_when_signalled[0] <= 2, (stopped, finished_when_signalled)


def test_predict_on_nothing_it_can_read_ends_in_one_line(tmp_path, capsys):
    """A missing file (a misspelt name) or only unreadable files: status 2 and one line, not
    status 0 having written nothing; a missing path writes no --out folder either."""
    make_dataset(tmp_path)
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", TOY, "--workdir", str(workdir), "--max-steps", "1"]) == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "photos" / "photo_9.jpg")], "photo_9.jpg: no such file or folder"),
        ([str(tmp_path / "photos"), str(tmp_path / "typo")], "typo: no such file or folder"),
        ([str(broken)], "none of the 1 image file(s) could be read (" + str(broken)),
    ]
    for images, expected in cases:
        capsys.readouterr()
        argv = ["predict", "--workdir", str(workdir), "--images", *images, "--out", str(out)]
        assert cli.main(argv) == 2, images
        assert expected in user_error_line(capsys.readouterr().err, "predict")
        assert not (out / "photo_1.json").exists()
    argv = ["predict", "--workdir", str(workdir), "--images", str(tmp_path / "photos")]
    assert cli.main([*argv, "--out", str(broken)]) == 2
    assert f"--out {broken} is a file" in user_error_line(capsys.readouterr().err, "predict")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--config", TOY, "--workdir", "{tmp}/a_file"], "a_file is a file"),
        (
            ["train", "--config", TOY, "--workdir", "{tmp}/w", "--config.input.canvas_hw=(128,)"],
            "input.canvas_hw must be (height, width)",
        ),
        (["train", "--config", TOY, "--workdir", "{tmp}/w", "--config.log_every=0"], "log_every"),
        (
            ["train", "--config", TOY, "--workdir", "{tmp}/w", "--config.input.short_side=()"],
            "input.short_side must list one or more",
        ),
        (["eval", "--workdir", "{tmp}/bad_record"], "config.json: not valid JSON"),
        (
            ["eval", "--workdir", "{tmp}/record", "--config.eval.global_batch=0"],
            "eval.global_batch must be > 0",
        ),
        (
            ["eval", "--results", "{tmp}/record/config.json", "--annotations", "{tmp}/gt.json"],
            "config.json: expected a JSON list of COCO results",
        ),
        (
            ["eval", "--results", "{tmp}/no_bbox.json", "--annotations", "{tmp}/gt.json"],
            "no_bbox.json: hotcoco cannot read these results",
        ),
        (
            ["eval", "--results", "{tmp}/other_image.json", "--annotations", "{tmp}/gt.json"],
            "other_image.json: hotcoco cannot read these results",
        ),
    ],
)
def test_more_user_mistakes_end_in_one_line(tmp_path, capsys, argv, expected):
    """Mistakes that ended in a traceback: a workdir that is a file, malformed config fields,
    an edited config.json that is no longer JSON, an eval override of a bad value, results
    files that are not COCO results."""
    from instseg_jax import config as config_lib
    from instseg_jax import workdir as workdir_lib

    (tmp_path / "a_file").write_text("x")
    workdir_lib.save_config(config_lib.load(TOY), tmp_path / "record")
    (tmp_path / "bad_record").mkdir()
    (tmp_path / "bad_record" / "config.json").write_text('{"model": {"score_threshold": 0.1,}}')
    gt = {"images": [{"id": 1, "height": 8, "width": 8}], "annotations": []}
    (tmp_path / "gt.json").write_text(json.dumps({**gt, "categories": [{"id": 1, "name": "a"}]}))
    (tmp_path / "no_bbox.json").write_text(json.dumps([{"image_id": 1, "score": 0.5}]))
    other = [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}]
    (tmp_path / "other_image.json").write_text(json.dumps(other))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    assert expected in user_error_line(capsys.readouterr().err, argv[0])
    assert not (tmp_path / "w").exists()
