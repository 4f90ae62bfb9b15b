"""`instseg-jax predict` on synthetic images: valid JSON and PNG files, bad files skipped."""

import json

import numpy as np
from PIL import Image

from instseg_jax import cli
from instseg_jax import config as config_lib
from instseg_jax import train as train_lib
from instseg_jax.input.synthetic import SyntheticSource


def test_predict_writes_json_and_overlays_and_skips_bad_files(tmp_path):
    workdir = tmp_path / "run"
    train_lib.train(
        config_lib.load("experiments/maskrcnn_nuclei.py:smoke"),
        workdir,
        max_steps=2,
        progress=False,
    )
    images = tmp_path / "images"
    images.mkdir()
    source = SyntheticSource(3, (90, 140), seed=9)
    for i in range(3):  # other sizes than the training canvas
        Image.fromarray(source.load(i)["image"]).save(images / f"scene{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "predict",
                "--workdir",
                str(workdir),
                "--images",
                str(images),
                "--out",
                str(out),
                "--score-threshold",
                "0.0",
            ]
        )
        == 0
    )
    for i in range(3):
        record = json.loads((out / f"scene{i}.json").read_text())
        assert (record["height"], record["width"]) == (90, 140)
        for detection in record["detections"]:
            x0, y0, x1, y1 = detection["box"]
            assert 0 <= x0 <= x1 <= 140 and 0 <= y0 <= y1 <= 90
            assert detection["class"] in source.class_names
            assert detection["mask"]["size"] == [90, 140]
        picture = Image.open(out / f"scene{i}.png")
        assert picture.size == (140, 90) and picture.mode == "RGB"
    assert not (out / "broken.json").exists()
    assert np.asarray(Image.open(out / "scene0.png")).std() > 0
