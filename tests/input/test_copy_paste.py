"""Copy-paste against a float64 / bool NumPy encoding of the rule of torchvision's
references/detection/transforms.py (_copy_paste: the pasted region is the union of the chosen
masks, blending's bool Gaussian blur grows it by 2 px; this image's pixels and masks under it
are replaced and occluded, empty remains dropped, boxes recomputed from the masks; random
subset = unique(randint(0, k, (k,)))), with input.copy_paste_min_area for the remains."""

import dataclasses

import numpy as np
import pytest

from instseg_jax.config import ConfigValueError
from instseg_jax.input import copy_paste, report
from instseg_jax.input.transforms import TransformConfig

H, W = 12, 16
# The partner's own jitter fixed at 1 and no flip: placed as it is (the same size).
CONFIG = TransformConfig(canvas_hw=(16, 16), copy_paste=1.0, copy_paste_scale=(1.0, 1.0), hflip=0.0)


def rect(top, bottom, left, right, hw=(H, W)):
    mask = np.zeros(hw, bool)
    mask[top:bottom, left:right] = True
    return mask


def hand_built_pair():
    """This image: A (half covered), B (a sliver left), C (untouched, a COCO float box),
    D (a crowd region under the grown edge). Partner: P (pasted), Q (crowd: never pasted)."""
    rng = np.random.default_rng(0)
    masks = np.stack(
        [
            rect(4, 8, 2, 8),  # A
            rect(6, 8, 11, 14),  # B
            rect(0, 2, 0, 3),  # C
            rect(9, 12, 6, 10),  # D (crowd)
        ]
    )
    boxes = np.array(
        [[2, 4, 8, 8], [11, 6, 14, 8], [0.2, 0.1, 3.0, 2.0], [6, 9, 10, 12]], np.float32
    )
    example = {
        "image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        "masks": masks,
        "boxes": boxes,
        "classes": np.array([0, 1, 2, 1], np.int32),
        "iscrowd": np.array([False, False, False, True]),
        "image_id": 7,
    }
    partner_masks = np.stack([rect(4, 8, 6, 12), rect(0, 3, 12, 16)])
    partner = {
        "image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        "masks": partner_masks,
        "boxes": np.array([[6, 4, 12, 8], [12, 0, 16, 3]], np.float32),
        "classes": np.array([2, 0], np.int32),
        "iscrowd": np.array([False, True]),
        "image_id": 9,
    }
    return example, partner


def reference_paste(example, partner, blend: bool, min_area: int):
    """float64 / bool encoding: every mask full-size, the growth as a Chebyshev distance."""
    pasted = [m for m, crowd in zip(partner["masks"], partner["iscrowd"], strict=True) if not crowd]
    region = np.any(pasted, axis=0)
    if blend:
        ys, xs = np.nonzero(region)
        gy, gx = np.mgrid[:H, :W]
        distance = np.maximum(
            np.abs(gy[..., None] - ys).astype(np.float64), np.abs(gx[..., None] - xs)
        ).min(axis=-1)
        region = distance <= 2.0
    image = np.where(region[..., None], partner["image"], example["image"])
    masks, boxes, classes, crowd, dropped = [], [], [], [], 0
    for i, mask in enumerate(example["masks"]):
        remains = mask & ~region
        if remains.sum() == mask.sum():
            box = example["boxes"][i].astype(np.float64)
        elif remains.sum() < min_area:
            dropped += 1
            continue
        else:
            ys, xs = np.nonzero(remains)
            box = np.array([xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0])
        masks.append(remains)
        boxes.append(box)
        classes.append(example["classes"][i])
        crowd.append(example["iscrowd"][i])
    for i, mask in enumerate(partner["masks"]):
        if partner["iscrowd"][i]:
            continue
        ys, xs = np.nonzero(mask)
        masks.append(mask)
        boxes.append(np.array([xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0]))
        classes.append(partner["classes"][i])
        crowd.append(False)
    return image, np.array(masks), np.array(boxes), np.array(classes), np.array(crowd), dropped


@pytest.mark.parametrize("blend", [False, True])
def test_paste_matches_a_numpy_encoding_of_the_rule(blend):
    example, partner = hand_built_pair()
    config = dataclasses.replace(CONFIG, copy_paste_blend=blend, copy_paste_min_area=5)
    counts = report.new_counts()
    out = copy_paste.paste(example, partner, config, np.random.default_rng(3), counts)
    image, masks, boxes, classes, crowd, dropped = reference_paste(example, partner, blend, 5)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(np.asarray(out["masks"]), masks)
    np.testing.assert_allclose(out["boxes"], boxes, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["classes"], classes)
    np.testing.assert_array_equal(out["iscrowd"], crowd)
    assert report.as_dict(counts)["copy_paste_occluded"] == dropped == 1  # B's sliver
    assert out["image_id"] == 7
    # What the rule must do here, whatever the encoding: A's box shrinks to its left part,
    # C keeps its float box, the crowd region Q is not pasted.
    np.testing.assert_array_equal(out["boxes"][0], [2, 4, 6 if not blend else 4, 8])
    np.testing.assert_array_equal(out["boxes"][1], np.float32([0.2, 0.1, 3.0, 2.0]))
    assert out["classes"].tolist()[-1] == 2 and len(out["classes"]) == 4
    if blend:  # the grown edge cut row 9 off the crowd region D
        np.testing.assert_array_equal(out["boxes"][2], [6, 10, 10, 12])


def test_a_jittered_flipped_partner_pastes_nearest_neighbour_masks():
    """A partner twice this image's size at jitter 1 is halved (fit 0.5): pixel r of the
    frame reads source pixel floor((r + 0.5) * 2) = 2 r + 1; flipped, columns reverse."""
    example, _ = hand_built_pair()
    rng = np.random.default_rng(1)
    partner_mask = np.zeros((2 * H, 2 * W), bool)
    partner_mask[3:15, 4:13] = True
    partner_mask[8, 20:27] = True  # one row thick: its odd columns only survive halving
    partner = {
        "image": rng.integers(0, 256, (2 * H, 2 * W, 3), dtype=np.uint8),
        "masks": partner_mask[None],
        "boxes": np.array([[4, 3, 27, 15]], np.float32),
        "classes": np.array([1], np.int32),
        "iscrowd": np.array([False]),
        "image_id": 3,
    }
    config = dataclasses.replace(CONFIG, hflip=1.0, copy_paste_blend=False)
    out = copy_paste.paste(example, partner, config, np.random.default_rng(0), report.new_counts())
    expected = partner_mask[1::2, 1::2][:, ::-1]
    np.testing.assert_array_equal(np.asarray(out["masks"])[-1], expected)
    ys, xs = np.nonzero(expected)
    np.testing.assert_array_equal(
        out["boxes"][-1], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    )
    assert out["classes"][-1] == 1


def test_chosen_instances_follow_torchvision_selection_rate():
    """unique(randint(0, k, (k,))) keeps each of k instances with probability 1 - (1 - 1/k)^k
    (0.672 for k = 5); 4000 draws: a standard error of 0.0074, tolerance 0.04."""
    rng = np.random.default_rng(0)
    hits = np.zeros(5)
    for _ in range(4000):
        chosen = copy_paste.chosen_instances(5, rng)
        assert len(chosen) >= 1 and (np.diff(chosen) > 0).all()
        hits[chosen] += 1
    np.testing.assert_allclose(hits / 4000, 1 - 0.8**5, atol=0.04)


def test_copy_paste_refuses_keypoint_and_semantic_targets():
    with pytest.raises(ConfigValueError, match=r"input\.copy_paste"):
        TransformConfig(keypoints=5, copy_paste=0.5)
    with pytest.raises(ConfigValueError, match=r"input\.copy_paste"):
        TransformConfig(semantic_stride=4, copy_paste=0.5)
    with pytest.raises(ConfigValueError, match=r"input\.copy_paste"):
        TransformConfig(copy_paste=1.5)
