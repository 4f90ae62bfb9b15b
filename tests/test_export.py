"""`instseg-jax export`: the serialized program, loaded in a fresh process by plain jax and fed
canvases made as its JSON says, reproduces `instseg-jax predict`'s detections.

The workdir is tests/fixtures/torchvision_tiny.npz imported as `import-weights torchvision`
writes it (tests/weights/test_torchvision.py describes the fixture: a tiny Mask R-CNN with
random weights, 4 classes, and a 100x120 image), on a 192 x 192 canvas; its resize rule is
torchvision's, which the fresh process implements from torch's documented bilinear rule.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_jax import cli, detections
from instseg_jax.structures import ImageGeometry

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "torchvision_tiny.npz"

# Run with `python - JSON PROGRAM IMAGES... OUT`: nothing of instseg_jax is imported (checked),
# only jax, numpy and (for detectron2's resize rule) PIL, as a server would.
FRESH_PROCESS = r"""
import json, sys
import numpy as np
import jax

description_path, program_path, *image_paths, out_path = sys.argv[1:]
description = json.loads(open(description_path).read())
prep = description["preprocessing"]


def torch_bilinear(pixels, out_h, out_w):
    # torch.nn.functional.interpolate(mode="bilinear", align_corners=False), in float32:
    # source = max((i + 0.5) * in / out - 0.5, 0), the next tap clamped to the last pixel.
    def taps(size_in, size_out):
        ratio = np.float32(size_in) / np.float32(size_out)
        src = np.maximum(
            (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * ratio - np.float32(0.5),
            np.float32(0),
        )
        first = np.floor(src).astype(np.int64)
        second = np.minimum(first + 1, size_in - 1)
        weight = (src - first).astype(np.float32)
        return first, second, np.float32(1) - weight, weight

    y0, y1, wy0, wy1 = taps(pixels.shape[0], out_h)
    x0, x1, wx0, wx1 = taps(pixels.shape[1], out_w)
    wy0, wy1 = wy0[:, None, None], wy1[:, None, None]
    wx0, wx1 = wx0[None, :, None], wx1[None, :, None]
    top, bottom = pixels[y0], pixels[y1]
    return wy0 * (wx0 * top[:, x0] + wx1 * top[:, x1]) + wy1 * (
        wx0 * bottom[:, x0] + wx1 * bottom[:, x1]
    )


def preprocess(image):
    h, w = image.shape[:2]
    canvas_h, canvas_w = prep["canvas_hw"]
    scale = min(
        prep["short_side"] / min(h, w), prep["max_long_side"] / max(h, w),
        canvas_h / h, canvas_w / w,
    )
    if prep["resize_rule"] == "torchvision":
        size = (max(1, int(np.floor(h * scale))), max(1, int(np.floor(w * scale))))
        resized = torch_bilinear(image.astype(np.float32), *size)
        resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
    else:
        from PIL import Image
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        resized = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
    canvas = np.empty((canvas_h, canvas_w, 3), np.uint8)
    canvas[:] = prep["pad_value"]
    canvas[: size[0], : size[1]] = resized
    return {
        "image": canvas, "image_hw": np.array(size, np.int32),
        "orig_hw": np.array((h, w), np.int32),
        "scale": np.float32(scale), "crop_offset": np.zeros(2, np.int32),
        "flipped": np.bool_(False), "example_valid": np.bool_(True),
    }


exported = jax.export.deserialize(open(program_path, "rb").read())
examples = [preprocess(np.load(path)) for path in image_paths]
inputs = {}
for name, spec in description["inputs"].items():
    stacked = np.stack([example[name] for example in examples])
    pad = [(0, spec["shape"][0] - len(examples))] + [(0, 0)] * (stacked.ndim - 1)
    inputs[name] = np.pad(stacked, pad).astype(spec["dtype"])
outputs = exported.call(inputs)
assert not [m for m in sys.modules if m.startswith("instseg_jax")], "instseg_jax was imported"
# bfloat16 payloads (PointRend's) as float32: np.savez keeps only NumPy's own dtypes.
arrays = {k: np.asarray(v) for k, v in outputs.items()}
arrays = {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in arrays.items()}
arrays.update({f"in_{k}": v for k, v in inputs.items() if k != "image"})
np.savez(out_path, **arrays)
print("platforms", ",".join(exported.platforms))
"""


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """(the workdir of the imported fixture, its two test images: the fixture's 100x120 and
    a 70x120 crop of it, for two geometries in one batch)."""
    from instseg_jax.weights import importer

    tmp = tmp_path_factory.mktemp("export")
    with np.load(FIXTURE) as f:
        state_dict = {k.removeprefix("sd/"): f[k] for k in f.files if k.startswith("sd/")}
        image = f["image"]
    np.savez(tmp / "tiny.npz", **state_dict)
    workdir = importer.import_weights("torchvision", tmp / "tiny.npz", tmp / "wd", (192, 192))
    return Path(workdir), {"scene": image, "crop": np.ascontiguousarray(image[20:90])}


def _detections_by_image(record: dict) -> dict:
    return {
        "boxes": np.array([d["box"] for d in record["detections"]], np.float32).reshape(-1, 4),
        "scores": np.array([d["score"] for d in record["detections"]], np.float32),
        "classes": [d["class"] for d in record["detections"]],
        "masks": [d["mask"] for d in record["detections"]],
    }


@pytest.fixture(scope="module")
def exported(tiny_workdir, tmp_path_factory) -> Path:
    """The program file of `export` on the tiny workdir: one file lowered for three platforms
    (run here on the CPU), batch 3 (two images and a padding slot), every detection kept."""
    workdir, _ = tiny_workdir
    program = tmp_path_factory.mktemp("exported") / "model.stablehlo"
    argv = ["export", "--workdir", str(workdir), "--out", str(program), "--batch", "3"]
    argv += ["--platforms", "cpu,cuda,tpu", "--config.model.score_threshold=0.0"]
    assert cli.main(argv) == 0
    return program


def test_export_writes_a_program_its_json_describes(exported):
    """The JSON against the workdir's config.json and classes.json (what the importer wrote),
    and against the deserialized program's own signature: its arguments are the JSON's inputs
    alone (the weights are constants inside), its results the JSON's outputs."""
    import jax

    description = json.loads(Path(f"{exported}.json").read_text())
    assert description["method"] == "mask_rcnn" and description["checkpoint_step"] == 0
    assert description["classes"] == {
        "category_ids": [1, 2, 3, 4],
        "class_names": [f"class_{i}" for i in range(1, 5)],
    }
    assert description["platforms"] == ["cpu", "cuda", "tpu"] and description["batch"] == 3
    assert description["jax_version"] == jax.__version__
    prep = description["preprocessing"]
    assert prep["canvas_hw"] == [192, 192] and prep["resize_rule"] == "torchvision"
    assert (prep["short_side"], prep["max_long_side"]) == (800, 1333)
    assert prep["pad_value"] == [124, 116, 104]  # torchvision's ImageNet mean, rounded
    program = jax.export.deserialize(exported.read_bytes())
    assert program.platforms == ("cpu", "cuda", "tpu")
    (inputs,), kwargs = program.in_tree.unflatten(program.in_avals)
    assert not kwargs and set(inputs) == set(description["inputs"])
    assert {"image", "image_hw", "orig_hw", "scale"} <= set(inputs)
    assert not [k for k in inputs if k.startswith("gt_")]  # training targets are not inputs
    outputs = program.out_tree.unflatten(program.out_avals)
    assert set(outputs) == {"boxes", "scores", "classes", "valid", "masks"}
    for side, avals in (("inputs", inputs), ("outputs", outputs)):
        for name, aval in avals.items():
            spec = description[side][name]
            assert (spec["shape"], spec["dtype"]) == (list(aval.shape), str(aval.dtype)), name
    assert description["inputs"]["image"]["shape"] == [3, 192, 192, 3]
    assert description["inputs"]["image"]["dtype"] == "uint8"
    assert description["outputs"]["masks"]["shape"] == [3, 100, 28, 28]


@pytest.mark.slow
def test_exported_program_reproduces_predict_in_a_fresh_process(tiny_workdir, exported, tmp_path):
    workdir, images = tiny_workdir
    program = exported
    description = json.loads(Path(f"{program}.json").read_text())
    folder = tmp_path / "images"
    folder.mkdir()
    arrays = []
    for name, image in images.items():
        Image.fromarray(image).save(folder / f"{name}.png")
        np.save(tmp_path / f"{name}.npy", image)
        arrays.append(str(tmp_path / f"{name}.npy"))
    outputs = tmp_path / "outputs.npz"
    fresh = subprocess.run(
        [sys.executable, "-", f"{program}.json", str(program), *arrays, str(outputs)],
        input=FRESH_PROCESS,
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: instseg_jax is not importable by accident
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "platforms cpu,cuda,tpu" in fresh.stdout

    predictions = tmp_path / "predict"
    argv = ["predict", "--workdir", str(workdir), "--images", str(folder)]
    argv += ["--out", str(predictions), "--score-threshold", "0.0"]
    assert cli.main(argv) == 0

    with np.load(outputs) as found:
        found = {k: found[k] for k in found.files}
    names = description["classes"]["class_names"]
    assert description["mask_paste"] == "torchvision"
    for b, (name, image) in enumerate(images.items()):
        theirs = _detections_by_image(json.loads((predictions / f"{name}.json").read_text()))
        valid = found["valid"][b] > 0
        assert valid.sum() == len(theirs["scores"]) >= 10, (name, valid.sum())
        np.testing.assert_allclose(found["boxes"][b][valid], theirs["boxes"], atol=1e-3)
        np.testing.assert_allclose(found["scores"][b][valid], theirs["scores"], atol=1e-5)
        assert [names[int(c)] for c in found["classes"][b][valid]] == theirs["classes"]
        # Masks: the exported probabilities through the host code predict pastes with (the
        # workdir's mask_paste), against predict's RLE, per detection.
        geometry = ImageGeometry(
            orig_hw=image.shape[:2],
            image_hw=tuple(int(v) for v in found["in_image_hw"][b]),
            canvas_hw=(192, 192),
            scale=float(found["in_scale"][b]),
            crop_offset=(0, 0),
        )
        ours = detections.image_instances(
            found, b, geometry, detections.MaskPaste("torchvision"), min_score=0.0
        )
        for instance, rle in zip(ours, theirs["masks"], strict=True):
            buffer = np.zeros(image.shape[:2], np.uint8, order="F")
            region = detections.encode_region(
                instance["region"], instance["top"], instance["left"], buffer
            )
            iou = mask_utils.iou([region], [rle], [False])[0, 0]
            assert iou >= 0.99 or not mask_utils.area(rle), (name, iou)


def test_export_refuses_bad_arguments_in_one_line(tiny_workdir, tmp_path, capsys):
    workdir, _ = tiny_workdir
    program = tmp_path / "model.stablehlo"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    no_checkpoint = tmp_path / "empty_run"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.json").write_text((workdir / "config.json").read_text())
    cases = [
        (["--workdir", str(workdir), "--out", str(tmp_path)], "is a folder"),
        (["--workdir", str(workdir), "--out", str(blocker / "m.stablehlo")], "cannot create"),
        (["--workdir", str(no_checkpoint), "--out", str(program)], "no checkpoint"),
        (["--workdir", str(tmp_path / "nothing"), "--out", str(program)], "no config.json"),
        (["--workdir", str(workdir), "--out", str(program), "--batch", "0"], "--batch 0"),
        (["--workdir", str(workdir), "--out", str(program), "--platforms", "gpu"], "cuda"),
        (["--workdir", str(workdir), "--out", str(program), "--checkpoint", "7"], "steps: [0]"),
    ]
    for argv, expected in cases:
        assert cli.main(["export", *argv]) == 2, argv
        message = capsys.readouterr().err
        assert message.startswith("instseg-jax export: ") and expected in message, message
        assert message.count("\n") == 1
    assert not program.exists()
