"""The loader on data as it comes from the field: phone photos with an EXIF orientation, images
whose size disagrees with the annotation file, RLEs of another size, annotations without a
bbox, 32-bit images holding 8-bit values, and images with a thousand instances.

Every fixture is made here, in tmp_path.
"""

import json
import logging
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from instseg_jax.input import report
from instseg_jax.input.coco import CocoSource
from instseg_jax.input.images import DataError, UnreadableImage, decode_image
from instseg_jax.input.instances import InstanceMasks
from instseg_jax.input.pipeline import InputPipeline
from instseg_jax.input.transforms import TransformConfig, transform

ORIENTATION = 0x0112  # the EXIF tag

# raw pixels stored in the file for each EXIF orientation, given the upright image a viewer
# (and detectron2's read_image) shows: the inverse of the tag's transposition.
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


def save_with_orientation(pixels, path, orientation, **kwargs):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, exif=exif.tobytes(), **kwargs)


def coco_file(tmp_path, images, annotations, name="ann.json"):
    path = tmp_path / name
    document = {"images": images, "annotations": annotations}
    document["categories"] = [{"id": 1, "name": "thing"}]
    path.write_text(json.dumps(document))
    return path


def square(ann_id, image_id, x0, y0, x1, y1, **extra):
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
    }
    ann.update(extra)
    return ann


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_exif_transpose_does(tmp_path, orientation):
    upright = np.random.default_rng(orientation).integers(0, 256, (5, 8, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    save_with_orientation(STORED[orientation](upright), path, orientation)
    with Image.open(path) as image:
        want = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    np.testing.assert_array_equal(want, upright)  # the fixture itself is right
    np.testing.assert_array_equal(decode_image(path), upright)


def test_phone_photo_rotated_by_exif_matches_its_annotations(tmp_path):
    """A JPEG stored sideways with orientation 6: the annotation file's width/height and
    coordinates are those of the upright image, as detectron2 reads it."""
    upright = np.full((40, 64, 3), 20, np.uint8)
    upright[5:15, 40:60] = 235  # a bright object near the top right of the upright photo
    save_with_orientation(STORED[6](upright), tmp_path / "phone.jpg", 6, quality=95)
    path = coco_file(
        tmp_path,
        [{"id": 1, "file_name": "phone.jpg", "height": 40, "width": 64}],
        [square(1, 1, 40, 5, 60, 15)],
    )
    example = CocoSource(path, tmp_path).load(0)
    assert example["image"].shape == (40, 64, 3)
    mask = np.asarray(example["masks"])[0]
    grey = example["image"].mean(axis=2)
    assert grey[mask].min() > 200 and grey[~mask].max() < 60
    np.testing.assert_array_equal(example["boxes"], [[40, 5, 60, 15]])


def four_images(tmp_path, size_of=lambda i: (20, 24), json_size_of=None):
    json_size_of = json_size_of or size_of
    images, anns = [], []
    for i in range(4):
        height, width = size_of(i)
        Image.fromarray(np.full((height, width, 3), 30 * i, np.uint8)).save(tmp_path / f"{i}.png")
        json_h, json_w = json_size_of(i)
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": json_h, "width": json_w})
        anns.append(square(i + 1, i + 1, 2, 2, 9, 9))
    return images, anns


CONFIG = TransformConfig(
    canvas_hw=(24, 24), short_side=(20,), max_long_side=24, max_instances=2, mask_size=4
)
EVAL_CONFIG = TransformConfig(
    canvas_hw=(24, 24), train=False, short_side=(20,), max_long_side=24, max_instances=2,
    mask_size=4,
)  # fmt: skip


def test_image_size_differing_from_the_annotation_file_is_skipped_and_counted(tmp_path, caplog):
    images, anns = four_images(tmp_path, json_size_of=lambda i: (20, 24) if i != 2 else (24, 20))
    source = CocoSource(coco_file(tmp_path, images, anns), tmp_path)
    pipeline = InputPipeline(source, CONFIG, 4, process_index=0, process_count=1)
    with caplog.at_level(logging.INFO, logger="instseg_jax.input.pipeline"):
        batches = [next(pipeline) for _ in range(2)]  # epoch 0 is reported at step 1
    assert 3 not in batches[0]["image_id"].tolist()
    assert report.as_dict(pipeline.total_counts)["image_size_mismatch"] >= 1
    assert "image_size_mismatch=1" in caplog.text
    assert "2.png" in caplog.text

    strict = InputPipeline(source, CONFIG, 4, strict=True, process_index=0, process_count=1)
    with pytest.raises(DataError, match=r"2\.png.*20x24.*24x20"):
        next(strict)

    evaluation = InputPipeline(source, EVAL_CONFIG, 4, process_index=0, process_count=1)
    batch = next(evaluation)
    assert batch["example_valid"].tolist() == [True, True, False, True]
    assert report.as_dict(evaluation.total_counts)["image_size_mismatch"] == 1


def test_a_state_saved_before_the_newer_issue_kinds_restores(tmp_path):
    images, anns = four_images(tmp_path)
    source = CocoSource(coco_file(tmp_path, images, anns), tmp_path)
    pipeline = InputPipeline(source, CONFIG, 4, process_index=0, process_count=1)
    old = {"step": 1, "epoch_counts": [0, 2] + [0] * 7, "total_counts": [1] * 9}
    pipeline.set_state({**old, "reported_epoch": 0})
    next(pipeline)
    assert report.as_dict(pipeline.total_counts)["zero_area_annotation"] == 1
    assert len(pipeline.get_state()["total_counts"]) == len(report.ISSUE_KINDS)


def test_rle_of_another_size_is_skipped_and_counted_naming_the_annotation(tmp_path, caplog):
    images, anns = four_images(tmp_path)
    small = np.zeros((10, 12), np.uint8)
    small[2:6, 3:8] = 1
    rle = mask_utils.encode(np.asfortranarray(small))
    anns[1]["id"] = 4242
    anns[1]["segmentation"] = {"size": [10, 12], "counts": rle["counts"].decode()}
    anns[1]["bbox"] = [3, 2, 5, 4]
    source = CocoSource(coco_file(tmp_path, images, anns), tmp_path)
    with pytest.raises(DataError, match=r"annotation id 4242.*10x12.*20x24"):
        source.load(1)

    pipeline = InputPipeline(source, CONFIG, 4, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="instseg_jax.input.pipeline"):
        batch = next(pipeline)
    assert 2 not in batch["image_id"].tolist()
    assert report.as_dict(pipeline.total_counts)["bad_segmentation"] == 1
    assert "annotation id 4242" in caplog.text
    strict = InputPipeline(source, CONFIG, 4, strict=True, process_index=0, process_count=1)
    with pytest.raises(DataError, match="annotation id 4242"):
        next(strict)


def test_uncompressed_rle_whose_counts_do_not_cover_the_image_is_refused(tmp_path):
    images, anns = four_images(tmp_path)
    anns[0]["segmentation"] = {"size": [20, 24], "counts": [30, 40, 600]}  # 670 != 480
    source = CocoSource(coco_file(tmp_path, images, anns), tmp_path)
    with pytest.raises(DataError, match=r"annotation id 1.*670.*480"):
        source.load(0)


def test_annotation_without_bbox_takes_its_box_from_the_mask(tmp_path):
    images, anns = four_images(tmp_path)
    del anns[0]["bbox"]
    anns.append(square(9, 1, 12, 4, 20, 18, bbox=None))
    source = CocoSource(coco_file(tmp_path, images, anns), tmp_path)
    counts = report.new_counts()
    example = source.load(0, counts)
    np.testing.assert_array_equal(example["boxes"], [[2, 2, 9, 9], [12, 4, 20, 18]])
    assert len(example["masks"]) == 2
    assert report.as_dict(counts)["bbox_from_mask"] == 2
    assert report.as_dict(counts)["zero_area_annotation"] == 0


def test_malformed_bbox_fails_when_the_file_is_read(tmp_path):
    images, anns = four_images(tmp_path)
    anns[2]["bbox"] = [1, 2, 3]
    with pytest.raises(DataError, match=r"annotation id 3.*bbox"):
        CocoSource(coco_file(tmp_path, images, anns), tmp_path)


def test_32_bit_images_are_decoded_by_their_value_range(tmp_path):
    eight = np.arange(48, dtype=np.int32).reshape(6, 8) * 5  # 8-bit values, 0..235
    Image.fromarray(eight).save(tmp_path / "eight.tif")
    assert Image.open(tmp_path / "eight.tif").mode == "I"
    np.testing.assert_array_equal(decode_image(tmp_path / "eight.tif")[..., 0], eight)
    sixteen = eight * 250  # 16-bit values, up to 58750: scaled from 0..65535 as before
    Image.fromarray(sixteen).save(tmp_path / "sixteen.tif")
    want = np.round(sixteen / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(tmp_path / "sixteen.tif")[..., 0], want)
    wide = eight * 9_000_000  # beyond 16 bits: scaled from the positive int32 range
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    want = np.round(wide / (2**31 - 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(tmp_path / "wide.tif")[..., 0], want)
    Image.fromarray(eight - 100).save(tmp_path / "negative.tif")
    with pytest.raises(UnreadableImage, match=r"negative\.tif.*-100"):
        decode_image(tmp_path / "negative.tif")


def crowded_scene(tmp_path, count, side, seed=0):
    """A side x side PNG with `count` polygon instances of 4..48 px, as a COCO file."""
    rng = np.random.default_rng(seed)
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(tmp_path / "crowd.png")
    anns = []
    for i in range(count):
        w, h = rng.integers(4, 48, 2)
        x0, y0 = rng.integers(0, side - 48, 2)
        cx, cy = x0 + w / 2, y0 + h / 2
        angles = np.linspace(0, 2 * np.pi, 9)[:-1]
        polygon = np.stack([cx + w / 2 * np.cos(angles), cy + h / 2 * np.sin(angles)], 1)
        ann = square(i + 1, 1, 0, 0, 1, 1)
        ann["segmentation"] = [polygon.ravel().round(2).tolist()]
        ann["bbox"] = [float(x0), float(y0), float(w), float(h)]
        anns.append(ann)
    image = {"id": 1, "file_name": "crowd.png", "height": side, "width": side}
    return CocoSource(coco_file(tmp_path, [image], anns, "crowd.json"), tmp_path)


def test_crowded_image_never_holds_every_full_mask_at_once(tmp_path):
    count, side = 200, 512  # every full mask at once: 200 x 512 x 512 bytes = 52 MB
    source = crowded_scene(tmp_path, count, side)
    config = TransformConfig(
        canvas_hw=(side, side), short_side=(side,), max_long_side=side, max_instances=100,
        mask_size=28, full_mask_stride=4, centers=True,
    )  # fmt: skip
    tracemalloc.start()
    try:
        example = source.load(0)
        out = transform(example, config, np.random.default_rng(0), report.new_counts())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["gt_valid"].sum() == 100
    assert peak < count * side * side / 8, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_targets_from_box_crops_equal_those_from_full_masks(tmp_path, flip):
    source = crowded_scene(tmp_path, 60, 160, seed=3)
    example = source.load(0)
    masks = example["masks"]
    dense = np.asarray(masks)
    assert dense.shape == masks.shape == (60, 160, 160) and len(masks) == 60
    np.testing.assert_array_equal(masks[7], dense[7])
    np.testing.assert_array_equal(next(iter(masks)), dense[0])
    # Each mask whole, from pixel (0, 0): the computation of full-resolution masks.
    full = InstanceMasks(list(dense), np.zeros((60, 2)), dense.shape[1:])
    config = TransformConfig(
        canvas_hw=(128, 128), resize="lsj", lsj_scale=(0.5, 1.5), hflip=flip, max_instances=40,
        mask_size=14, full_mask_stride=4, centers=True,
    )  # fmt: skip
    for seed in range(3):
        got = transform(example, config, np.random.default_rng(seed), report.new_counts())
        want = transform(
            {**example, "masks": full}, config, np.random.default_rng(seed), report.new_counts()
        )
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
