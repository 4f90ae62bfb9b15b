"""`instseg-jax import-weights torchvision` of a stored fixture's state_dict, then `predict` on
its image, through the command line as a user runs them (shared by the weight-import tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image


def import_then_predict(state_dict: dict, image: np.ndarray, tmp_path) -> tuple[dict, dict]:
    """(the imported workdir's config.json, predict's JSON record of the image) for weights
    imported on a 256x256 canvas and predictions at score threshold 0."""
    weights = tmp_path / "tiny.npz"
    np.savez(weights, **state_dict)
    out = tmp_path / "imported"
    cli = [sys.executable, "-m", "instseg_jax.cli"]
    subprocess.run(
        cli + ["import-weights", "torchvision", str(weights), "--out", str(out)]
        + ["--canvas", "256", "256"],
        check=True,
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(image).save(images / "scene.png")
    subprocess.run(
        cli
        + ["predict", "--workdir", str(out), "--images", str(images), "--out", str(tmp_path / "p")]
        + ["--score-threshold", "0.0"],
        check=True,
    )
    record = json.loads((tmp_path / "p" / "scene.json").read_text())
    assert (tmp_path / "p" / "scene.png").is_file()
    return config, record
