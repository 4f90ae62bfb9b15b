"""data/prepare_nuclei.py on the real nuclei set (../shared/data, never copied into the repo)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

REPO = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("prepare_nuclei", REPO / "data" / "prepare_nuclei.py")
prepare = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(prepare)

pytestmark = pytest.mark.skipif(
    not prepare.DEFAULT_SRC.is_dir(), reason=f"no nuclei source at {prepare.DEFAULT_SRC}"
)


def sample_dirs(count_per_kind=3):
    """A few real image folders of each kind (grey fluorescence, colour tissue)."""
    chosen = {"grey": [], "colour": []}
    for image_dir in sorted(prepare.DEFAULT_SRC.iterdir()):
        kind = prepare.image_kind(prepare.read_rgb(image_dir / "images" / f"{image_dir.name}.png"))
        if len(chosen[kind]) < count_per_kind:
            chosen[kind].append(image_dir)
        if all(len(v) == count_per_kind for v in chosen.values()):
            break
    return chosen["grey"] + chosen["colour"]


def test_masks_survive_pixel_exact_and_reruns_are_byte_identical(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for image_dir in sample_dirs():
        (src / image_dir.name).symlink_to(image_dir)
    prepare.convert(src, tmp_path / "a", require_both_kinds=False)
    prepare.convert(src, tmp_path / "b", require_both_kinds=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert files_a == files_b and len(files_a) == 6 + 2
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel

    checked = 0
    for split in ("train", "val"):
        document = json.loads((tmp_path / "a" / "annotations" / f"{split}.json").read_text())
        assert document["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
        images = {im["id"]: im for im in document["images"]}
        for ann in document["annotations"]:
            image = images[ann["image_id"]]
            source = src / image["source_id"] / "masks" / f"{ann['source_mask']}.png"
            want = np.asarray(Image.open(source)) > 0
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), want)
            assert ann["area"] == int(want.sum()) and ann["iscrowd"] == 0
            rows, cols = np.flatnonzero(want.any(1)), np.flatnonzero(want.any(0))
            assert ann["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
            checked += 1
        for image in document["images"]:
            rgb = np.asarray(Image.open(tmp_path / "a" / "images" / image["file_name"]))
            original = np.asarray(
                Image.open(src / image["source_id"] / "images" / image["file_name"]).convert("RGB")
            )
            np.testing.assert_array_equal(rgb, original)
    assert checked > 50


def test_split_is_stable_about_85_15_and_has_both_kinds():
    ids = sorted(p.name for p in prepare.DEFAULT_SRC.iterdir())
    splits = [prepare.split_of(i) for i in ids]
    assert 0.10 < splits.count("val") / len(ids) < 0.20
    # Known ids keep their split on every machine (SHA-256, not Python's salted hash()).
    assert (
        prepare.split_of("00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e")
        == "val"
    )
    assert (
        prepare.split_of("00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552")
        == "train"
    )
    assert splits.count("val") == 79  # of 538: 14.7%
    kinds = {"train": set(), "val": set()}
    for image_id, split in zip(ids, splits, strict=True):
        path = prepare.DEFAULT_SRC / image_id / "images" / f"{image_id}.png"
        kinds[split].add(prepare.image_kind(prepare.read_rgb(path)))
    assert kinds == {"train": {"grey", "colour"}, "val": {"grey", "colour"}}
