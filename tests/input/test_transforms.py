import numpy as np
import pytest

from instseg_jax.input import report
from instseg_jax.input.synthetic import SyntheticSource
from instseg_jax.input.transforms import TransformConfig, box_crop_target, transform


def rectangle_example(hw=(60, 80), rects=((10, 5, 30, 25),)):
    masks = np.zeros((len(rects), *hw), bool)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = True
    image = np.zeros((*hw, 3), np.uint8)
    image[..., 0] = np.arange(hw[1])[None, :]  # red = column: shows flips
    return {
        "image": image,
        "masks": masks,
        "boxes": np.array(rects, np.float32),
        "classes": np.arange(len(rects), dtype=np.int32),
        "iscrowd": np.zeros(len(rects), bool),
        "image_id": 5,
    }


def test_eval_geometry_maps_back_exactly():
    config = TransformConfig(
        canvas_hw=(128, 128),
        train=False,
        short_side=(120,),
        max_long_side=128,
        max_instances=4,
        mask_size=8,
    )
    out = transform(rectangle_example(), config, np.random.default_rng(0), report.new_counts())
    scale = float(out["scale"])
    assert scale == pytest.approx(min(120 / 60, 128 / 80))
    assert out["image_hw"].tolist() == [96, 128] and out["orig_hw"].tolist() == [60, 80]
    np.testing.assert_allclose(out["gt_boxes"][0] / scale, [10, 5, 30, 25], rtol=1e-6)
    assert out["gt_valid"].tolist() == [True, False, False, False]
    assert (out["gt_masks"][0] == 1).all(), "a rectangle fills its own box crop"
    assert (out["image"][96:] == 0).all(), "padding below the valid region"


def test_box_crop_of_an_ellipse_matches_direct_sampling():
    yy, xx = np.mgrid[:50, :70]
    mask = ((yy - 20) / 12.0) ** 2 + ((xx - 30) / 20.0) ** 2 <= 1
    crop = box_crop_target(mask, (10, 8, 51, 33), 16)
    # Independent reference: nearest pixel of each bin centre, compared away from the edge.
    centres_y = 8 + (np.arange(16) + 0.5) * 25 / 16
    centres_x = 10 + (np.arange(16) + 0.5) * 41 / 16
    inside = ((centres_y[:, None] - 20.5) / 12.0) ** 2 + ((centres_x[None] - 30.5) / 20.0) ** 2
    decided = np.abs(inside - 1) > 0.25
    np.testing.assert_array_equal(crop[decided], (inside <= 1)[decided])


def test_flip_moves_boxes_masks_and_pixels_together():
    example = rectangle_example(rects=((10, 5, 30, 25), (50, 10, 60, 40)))
    example["masks"][0, 5:25, 10:15] = False  # asymmetric: a notch on the left side
    base = dict(
        canvas_hw=(64, 96),
        short_side=(60,),
        max_long_side=96,
        max_instances=3,
        mask_size=10,
        resize="short_side",
    )
    plain = transform(
        example, TransformConfig(**base, hflip=0.0), np.random.default_rng(0), report.new_counts()
    )
    flipped = transform(
        example, TransformConfig(**base, hflip=1.0), np.random.default_rng(0), report.new_counts()
    )
    width = int(plain["image_hw"][1])
    np.testing.assert_array_equal(flipped["image"][:, :width], plain["image"][:, :width][:, ::-1])
    b = plain["gt_boxes"][:2]
    np.testing.assert_allclose(flipped["gt_boxes"][:2, 0], width - b[:, 2])
    np.testing.assert_allclose(flipped["gt_boxes"][:2, 2], width - b[:, 0])
    np.testing.assert_array_equal(flipped["gt_masks"], plain["gt_masks"][:, :, ::-1])
    strided = dict(base, box_masks=False, full_mask_stride=4)
    plain4 = transform(
        example,
        TransformConfig(**strided, hflip=0.0),
        np.random.default_rng(0),
        report.new_counts(),
    )
    flip4 = transform(
        example,
        TransformConfig(**strided, hflip=1.0),
        np.random.default_rng(0),
        report.new_counts(),
    )
    assert "gt_masks" not in plain4 and plain4["gt_full_masks"].shape == (3, 16, 24)
    np.testing.assert_array_equal(
        flip4["gt_full_masks"][:, :, : width // 4],
        plain4["gt_full_masks"][:, :, : width // 4][:, :, ::-1],
    )


def test_instance_limit_keeps_the_largest_and_counts():
    rects = [(0, 0, 4, 4), (10, 10, 30, 30), (40, 0, 45, 50), (50, 50, 52, 52)]
    config = TransformConfig(
        canvas_hw=(80, 80),
        train=False,
        short_side=(60,),
        max_long_side=80,
        max_instances=2,
        mask_size=4,
    )
    counts = report.new_counts()
    out = transform(rectangle_example(rects=rects), config, np.random.default_rng(0), counts)
    assert out["gt_classes"].tolist() == [1, 2]  # the two largest, in their original order
    assert report.as_dict(counts)["instances_over_limit"] == 2
    assert report.as_dict(counts)["image_over_instance_limit"] == 1


def test_crowd_and_degenerate_instances_are_dropped_for_training():
    example = rectangle_example(rects=((10, 5, 30, 25), (40, 40, 60, 50), (70, 0, 71, 1)))
    example["iscrowd"][1] = True
    config = TransformConfig(
        canvas_hw=(32, 32),
        short_side=(24,),
        max_long_side=32,
        max_instances=3,
        mask_size=4,
        hflip=0.0,
    )
    counts = report.new_counts()
    out = transform(example, config, np.random.default_rng(0), counts)
    assert out["gt_valid"].tolist() == [True, False, False]
    assert report.as_dict(counts)["crowd_dropped"] == 1
    assert report.as_dict(counts)["degenerate_box"] == 1
    only_crowd = rectangle_example()
    only_crowd["iscrowd"][:] = True
    counts = report.new_counts()
    out = transform(only_crowd, config, np.random.default_rng(0), counts)
    assert not out["gt_valid"].any() and report.as_dict(counts)["crowd_only_image"] == 1


def test_large_scale_jitter_crops_consistently():
    source = SyntheticSource(4, (96, 96), seed=1)
    config = TransformConfig(
        canvas_hw=(64, 64),
        resize="lsj",
        lsj_scale=(1.5, 2.0),
        max_instances=10,
        mask_size=16,
        hflip=0.0,
    )
    for i in range(4):
        example = source.load(i)
        out = transform(example, config, np.random.default_rng(i), report.new_counts())
        scale, (oy, ox) = float(out["scale"]), out["crop_offset"]
        assert out["image_hw"].tolist() == [64, 64]
        valid = out["gt_valid"]
        assert (out["gt_boxes"][valid] >= 0).all() and (out["gt_boxes"][valid] <= 64).all()
        for box, mask_crop in zip(out["gt_boxes"][valid], out["gt_masks"][valid], strict=True):
            assert mask_crop.any(), "every kept box holds part of its instance"
            pre = (box + [ox, oy, ox, oy]) / scale
            assert (pre[2:] - pre[:2] > 0).all()


@pytest.mark.parametrize("flip", [False, True])
def test_one_example_carries_every_kind_of_target_a_method_asks_for(flip):
    """Box crops, stride-4 full masks and mass centres together; centres against float64
    means of the masks' pixel centres mapped onto the canvas (scale 1.6, then the flip)."""
    example = rectangle_example(rects=((10, 5, 30, 25), (40, 30, 75, 58)))
    example["masks"][1, 30:40, 40:50] = False  # an L-shape: its centre is not its box's
    config = TransformConfig(
        canvas_hw=(96, 128), train=True, short_side=(96,), max_long_side=128, hflip=float(flip),
        max_instances=3, mask_size=16, box_masks=True, full_mask_stride=4, centers=True,
    )  # fmt: skip
    out = transform(example, config, np.random.default_rng(0), report.new_counts())
    assert out["gt_masks"].shape == (3, 16, 16) and out["gt_full_masks"].shape == (3, 24, 32)
    scale, valid_w = float(out["scale"]), int(out["image_hw"][1])
    assert scale == pytest.approx(1.6) and bool(out["flipped"]) == flip
    for slot, mask in enumerate(example["masks"]):
        ys, xs = np.nonzero(mask)
        x = (xs.astype(np.float64) + 0.5).mean() * scale
        y = (ys.astype(np.float64) + 0.5).mean() * scale
        expected = (valid_w - x if flip else x, y)
        np.testing.assert_allclose(out["gt_centers"][slot], expected, rtol=1e-5)
    np.testing.assert_array_equal(out["gt_centers"][2], [0, 0])


def test_instances_over_the_limit_become_ignore_regions_on_the_canvas():
    """5 instances, room for 2: the 3 dropped ones' boxes go through the same scale, crop and
    flip as the kept ones' and become ignore regions, largest first (C 84 px, D 35, E 12); with
    only 2 ignore slots the smallest is counted instead."""
    rects = [
        (28, 8, 48, 28),  # A, area 400: kept
        (30, 30, 50, 45),  # B, 300: kept
        (20, 46, 34, 52),  # C, 84: its left side falls outside the crop
        (40, 47, 47, 52),  # D, 35
        (50, 8, 53, 12),  # E, 12
    ]
    base = dict(
        canvas_hw=(64, 64), resize="lsj", lsj_scale=(1.5, 1.5), hflip=1.0, mask_size=4,
        max_instances=2, max_ignore_regions=4,
    )  # fmt: skip
    counts = report.new_counts()
    out = transform(
        rectangle_example(rects=rects), TransformConfig(**base), np.random.default_rng(1), counts
    )
    scale, (oy, ox) = float(out["scale"]), out["crop_offset"]
    valid_h, valid_w = out["image_hw"]
    assert scale == pytest.approx(1.2) and bool(out["flipped"])
    assert ox > 20 * scale, "the crop cuts C's left side (its right side once flipped)"
    expected = np.array(rects[2:], np.float64) * scale - [ox, oy, ox, oy]
    expected = np.clip(expected, 0, [valid_w, valid_h, valid_w, valid_h])
    expected[:, [0, 2]] = valid_w - expected[:, [2, 0]]
    assert out["ignore_boxes"].shape == (4, 4) and out["ignore_boxes"].dtype == np.float32
    assert out["ignore_valid"].tolist() == [True, True, True, False]
    np.testing.assert_allclose(out["ignore_boxes"][:3], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["ignore_boxes"][3], [0, 0, 0, 0])
    # The same boxes the instances get as ground truth when nothing is dropped.
    everything = transform(
        rectangle_example(rects=rects),
        TransformConfig(**dict(base, max_instances=5)),
        np.random.default_rng(1),
        report.new_counts(),
    )
    assert not everything["ignore_valid"].any()
    np.testing.assert_array_equal(out["ignore_boxes"][:3], everything["gt_boxes"][2:5])
    assert report.as_dict(counts)["instances_over_limit"] == 3
    assert "instances_over_limit=3" in report.summary(counts)

    counts = report.new_counts()
    two_slots = TransformConfig(**dict(base, max_ignore_regions=2))
    out = transform(rectangle_example(rects=rects), two_slots, np.random.default_rng(1), counts)
    np.testing.assert_allclose(out["ignore_boxes"], expected[:2], rtol=1e-6)
    assert report.as_dict(counts)["instances_over_limit"] == 3
    assert report.as_dict(counts)["ignore_regions_over_limit"] == 1
