"""Friction a new user met on unseen COCO data (issue 34, items 6-11): bad annotations named,
the recipe's settings checked against the data, a sign of life while the step compiles, quiet
logs, overrides for eval and predict, per-category AP, readable plots."""

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

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
