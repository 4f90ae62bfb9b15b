"""Keypoints through the input side: the synthetic scenes' keypoints against their masks, the
transform's scale, crop and flip (a flipped canvas's keypoints are those of the flipped masks,
left and right swapped), the COCO round trip of write_coco and CocoSource (COCO's pixel-index
convention), and the keypoint sets' mirror maps."""

import numpy as np
import pytest

from instseg_jax.input import keypoints as keypoint_sets
from instseg_jax.input.coco import CocoSource
from instseg_jax.input.synthetic import SyntheticSource, shape_keypoints, write_coco
from instseg_jax.input.transforms import TransformConfig, transform


def test_shape_keypoints_are_extreme_pixels_and_the_mass_centre():
    mask = np.zeros((1, 20, 30), bool)
    mask[0, 5:9, 10:20] = True  # rows 5..8, columns 10..19
    mask[0, 9, 12:14] = True  # a foot in row 9, columns 12..13
    points = shape_keypoints(mask)[0]
    ys, xs = np.nonzero(mask[0])
    want = [
        (14.5 + 0.5, 5.5),  # top: mean column of row 5 (10..19) = 14.5, + 0.5
        (10.5, 6.5 + 0.5),  # left: column 10, mean row of its pixels (5..8) = 6.5
        (19.5, 6.5 + 0.5),
        (12.5 + 0.5, 9.5),  # bottom: row 9, mean column 12.5
        (xs.mean() + 0.5, ys.mean() + 0.5),
    ]
    assert np.allclose(points[:, :2], want) and (points[:, 2] == 2).all()


def canvas_config(**changes):
    base = dict(
        canvas_hw=(128, 128),
        max_instances=12,
        box_masks=False,
        full_mask_stride=1,
        keypoints=5,
        keypoint_flip=keypoint_sets.SYNTHETIC_SHAPES.flip,
        short_side=(128,),
        max_long_side=128,
        hflip=0.0,
    )
    base.update(changes)
    return TransformConfig(**base)


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_transformed_keypoints_are_those_of_the_transformed_masks(hflip):
    source = SyntheticSource(length=4, canvas_hw=(128, 128), seed=3)
    for index in range(4):
        example = source.load(index)
        out = transform(example, canvas_config(hflip=hflip), np.random.default_rng(0), None)
        assert bool(out["flipped"]) == (hflip == 1.0)
        n = int(out["gt_valid"].sum())
        # At scale 1 the stride-1 canvas masks are the (flipped) masks themselves.
        want = shape_keypoints(out["gt_full_masks"][:n].astype(bool))
        assert np.allclose(out["gt_keypoints"][:n], want, atol=1e-4), index
        assert (out["gt_keypoints"][n:] == 0).all()


def test_scaled_and_cropped_keypoints_follow_the_boxes_and_lose_what_leaves_the_canvas():
    example = {
        "image": np.zeros((100, 200, 3), np.uint8),
        "masks": np.zeros((1, 100, 200), bool),
        "boxes": np.array([[20.0, 10.0, 180.0, 90.0]], np.float32),
        "classes": np.zeros(1, np.int32),
        "iscrowd": np.zeros(1, bool),
        "image_id": 7,
        "keypoints": np.array([[[30.5, 20.5, 2], [190.0, 50.0, 1], [0, 0, 0]]], np.float32),
    }
    example["masks"][0, 10:90, 20:180] = True
    config = canvas_config(
        canvas_hw=(64, 64),
        short_side=(32,),
        max_long_side=64,
        keypoints=3,
        keypoint_flip=(0, 1, 2),
        full_mask_stride=0,
    )
    out = transform(example, config, np.random.default_rng(0), None)
    scale = float(out["scale"])
    assert scale == pytest.approx(0.32)  # 100 x 200 -> 32 x 64
    assert np.allclose(out["gt_keypoints"][0, 0], [30.5 * scale, 20.5 * scale, 2])
    assert np.allclose(out["gt_keypoints"][0, 1], [190.0 * scale, 50.0 * scale, 1])
    assert (out["gt_keypoints"][0, 2] == 0).all()  # unlabelled stays empty
    # A keypoint beyond the valid region has no target.
    example["keypoints"][0, 1, 0] = 205.0
    out = transform(example, config, np.random.default_rng(0), None)
    assert (out["gt_keypoints"][0, 1] == 0).all()


def test_a_source_without_keypoints_is_an_error_naming_the_field():
    example = SyntheticSource(length=1).load(0)
    del example["keypoints"]
    with pytest.raises(ValueError, match="keypoints"):
        transform(example, canvas_config(), np.random.default_rng(0), None)


def test_coco_round_trip_keeps_keypoints_at_coco_pixel_indices(tmp_path):
    source = SyntheticSource(length=3, canvas_hw=(64, 80), seed=5)
    annotations, images = write_coco(source, tmp_path)
    import json

    document = json.loads(annotations.read_text())
    first = document["annotations"][0]
    points = source.load(0)["keypoints"][0]
    assert first["keypoints"][:2] == pytest.approx(list(points[0, :2] - 0.5))
    assert first["num_keypoints"] == 5
    assert document["categories"][0]["keypoints"] == list(keypoint_sets.SYNTHETIC_SHAPES.names)
    coco = CocoSource(str(annotations), str(images))
    assert coco.num_keypoints == 5
    for index in range(3):
        assert np.allclose(
            coco.load(index)["keypoints"], source.load(index)["keypoints"], atol=1e-4
        )


def test_keypoint_sets_mirror_left_and_right():
    coco = keypoint_sets.COCO_PERSON
    assert coco.flip == (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
    assert coco.count == 17 and len(coco.skeleton) == 14
    with pytest.raises(ValueError, match=r"input\.keypoints"):
        keypoint_sets.keypoint_set("bogus")


def test_training_on_keypoints_skips_images_with_too_few_labelled_ones(tmp_path):
    """detectron2's filter_images_with_few_keypoints (detectron2/data/build.py): an image is
    kept when its annotations hold at least MIN_KEYPOINTS_PER_IMAGE (1) keypoints with v > 0,
    counted over every annotation carrying "keypoints". Encoded here on the written file; the
    training source drops (and counts) the others, evaluation keeps every image."""
    import json

    from instseg_jax import builders
    from instseg_jax import config as config_lib

    source = SyntheticSource(length=4, canvas_hw=(64, 80), seed=5)
    annotations, images = write_coco(source, tmp_path)
    document = json.loads(annotations.read_text())
    by_image = {}
    for ann in document["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    first, second = sorted(by_image)[:2]
    for ann in by_image[first]:  # every keypoint unlabelled
        ann["keypoints"][2::3] = [0] * (len(ann["keypoints"]) // 3)
    for ann in by_image[second]:  # no keypoints at all
        ann.pop("keypoints")
    annotations.write_text(json.dumps(document))

    def labelled(anns):
        return sum(sum(v > 0 for v in a["keypoints"][2::3]) for a in anns if "keypoints" in a)

    kept = sorted(i["id"] for i in document["images"] if labelled(by_image.get(i["id"], [])) >= 1)
    config = config_lib.load(
        "experiments/keypoint_rcnn_synthetic.py:smoke",
        [
            "--config.input.source=coco",
            f"--config.input.train_split.annotations={annotations}",
            f"--config.input.train_split.images={images}",
            f"--config.input.eval_split.annotations={annotations}",
            f"--config.input.eval_split.images={images}",
        ],
    )
    train = builders.build_source(config.input, train=True, seed=0)
    assert [r["image_id"] for r in train.records] == kept and len(kept) == 2
    assert train.num_few_keypoints_dropped == 2
    assert "2 with fewer labelled keypoints" in builders.source_summary(train)
    assert len(builders.build_source(config.input, train=False, seed=0)) == 4
