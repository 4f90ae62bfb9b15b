import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_jax.input import report
from instseg_jax.input.coco import CocoSource, decode_segmentation
from instseg_jax.input.images import DataError, UnreadableImage, decode_image


def test_decode_image_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "rgb.png"), rgb)
    rgba = np.dstack([rgb, np.full((5, 7), 9, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "rgba.png"), rgb)
    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "grey.png"), np.dstack([grey] * 3))
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "pal.png")
    palette = np.asarray(Image.open(tmp_path / "pal.png").convert("RGB"))
    np.testing.assert_array_equal(decode_image(tmp_path / "pal.png"), palette)
    deep = (np.arange(35, dtype=np.uint16).reshape(5, 7) * 1800).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    want = np.round(deep / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(tmp_path / "deep.png")[..., 0], want)


def test_truncated_and_missing_images_name_the_file(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match=r"cut\.png"):
        decode_image(tmp_path / "cut.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UnreadableImage, match=r"junk\.png"):
        decode_image(tmp_path / "junk.png")
    with pytest.raises(DataError, match=r"nope\.png"):
        decode_image(tmp_path / "nope.png")


def write_coco(tmp_path, annotations, categories=None, images=None):
    images = images or [
        {"id": 1, "file_name": "a.png", "height": 20, "width": 30},
        {"id": 2, "file_name": "b.png", "height": 20, "width": 30},
    ]
    for image in images:
        path = tmp_path / image["file_name"]
        if not path.exists():
            Image.fromarray(np.full((image["height"], image["width"], 3), 50, np.uint8)).save(path)
    document = {
        "images": images,
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(document))
    return path


def rle_of(mask, compressed=True):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        rle["counts"] = rle["counts"].decode()
        return rle
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def test_source_decodes_every_segmentation_format(tmp_path):
    mask = np.zeros((20, 30), bool)
    mask[4:9, 5:12] = True
    polygon = [[2.0, 2.0, 10.0, 2.0, 10.0, 10.0, 2.0, 10.0]]
    anns = [
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [2, 2, 8, 8], "segmentation": polygon},
        {
            "id": 12,
            "image_id": 1,
            "category_id": 3,
            "bbox": [5, 4, 7, 5],
            "segmentation": rle_of(mask),
        },
        {
            "id": 13,
            "image_id": 1,
            "category_id": 3,
            "bbox": [5, 4, 7, 5],
            "segmentation": rle_of(mask, compressed=False),
            "iscrowd": 1,
        },
    ]
    source = CocoSource(write_coco(tmp_path, anns), tmp_path)
    assert len(source) == 2 and source.class_names == ["cat", "dog"]
    assert source.category_id([0, 1]).tolist() == [3, 7]
    example = source.load(0)
    want_polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 20, 30)))
    np.testing.assert_array_equal(example["masks"][0], want_polygon.astype(bool))
    np.testing.assert_array_equal(example["masks"][1], mask)
    np.testing.assert_array_equal(example["masks"][2], mask)
    assert example["classes"].tolist() == [1, 0, 0]
    assert example["iscrowd"].tolist() == [False, False, True]
    np.testing.assert_array_equal(example["boxes"][1], [5, 4, 12, 9])
    assert source.load(1)["masks"].shape == (0, 20, 30)  # image without annotations kept
    assert len(CocoSource(write_coco(tmp_path, anns), tmp_path, keep_empty=False)) == 1


def test_bad_annotations_are_dropped_or_clipped_and_counted(tmp_path):
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "bbox": [0, 0, 0, 5],
            "segmentation": [[0, 0, 0, 5, 0, 5]],
        },  # zero area
        {
            "id": 2,
            "image_id": 1,
            "category_id": 3,
            "bbox": [40, 40, 5, 5],
            "segmentation": [[40, 40, 45, 40, 45, 45, 40, 45]],
        },  # polygon outside the image
        {
            "id": 3,
            "image_id": 1,
            "category_id": 3,
            "bbox": [25, 15, 10, 10],
            "segmentation": [[25, 15, 35, 15, 35, 25, 25, 25]],
        },  # partly outside: clipped
    ]
    source = CocoSource(write_coco(tmp_path, anns), tmp_path)
    counts = report.new_counts()
    example = source.load(0, counts)
    assert len(example["masks"]) == 1
    assert example["boxes"][0].tolist() == [25, 15, 30, 20]
    assert report.as_dict(counts)["zero_area_annotation"] == 1
    assert report.as_dict(counts)["empty_mask"] == 1
    assert report.as_dict(counts)["clipped_annotation"] == 1


def test_unknown_category_names_the_annotation(tmp_path):
    anns = [
        {
            "id": 77,
            "image_id": 1,
            "category_id": 5,
            "bbox": [1, 1, 2, 2],
            "segmentation": [[1, 1, 3, 1, 3, 3]],
        }
    ]
    with pytest.raises(DataError, match="annotation id 77"):
        CocoSource(write_coco(tmp_path, anns), tmp_path)


def test_missing_image_file_fails_before_training(tmp_path):
    path = write_coco(tmp_path, [])
    (tmp_path / "b.png").unlink()
    with pytest.raises(DataError, match=r"b\.png"):
        CocoSource(path, tmp_path)


def test_decode_segmentation_rejects_unknown_formats():
    with pytest.raises(DataError, match="segmentation format"):
        decode_segmentation(42, 4, 4)
