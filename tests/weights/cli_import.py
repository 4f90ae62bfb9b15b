"""`instseg-jax import-weights torchvision` of a stored fixture's state_dict, then `predict` on
its image, through the command line as a user runs them (shared by the weight-import tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

CLI = [sys.executable, "-m", "instseg_jax.cli"]


def import_then_predict(state_dict: dict, image: np.ndarray, tmp_path, canvas: int = 256):
    """(the imported workdir's config.json, predict's JSON record of the image, the workdir)
    for weights imported on a canvas x canvas canvas and predictions at score threshold 0."""
    weights = tmp_path / "tiny.npz"
    np.savez(weights, **state_dict)
    out = tmp_path / "imported"
    cli = CLI
    subprocess.run(
        cli + ["import-weights", "torchvision", str(weights), "--out", str(out)]
        + ["--canvas", str(canvas), str(canvas)],
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
    return config, record, out
