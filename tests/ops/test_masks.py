import jax
import numpy as np
import pytest

from instseg_jax import ops
from tests.ops import reference as ref


def case(seed, k=4, side=6, image_hw=(20, 23)):
    rng = np.random.default_rng(seed)
    masks = rng.uniform(size=(k, side, side)).astype(np.float32)
    xy = rng.uniform(-4, 18, (k, 2))
    wh = rng.uniform(0.5, 14, (k, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes[0] = [2.25, 3.5, 2.75, 4.0]  # smaller than a pixel
    boxes[1] = [5, 5, 5, 9]  # zero width
    return masks, boxes, image_hw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paste_probabilities_match_reference(seed):
    masks, boxes, image_hw = case(seed)
    got = np.asarray(ops.paste_mask_probabilities(masks, boxes, image_hw))
    for k in range(len(masks)):
        want = ref.paste_mask(masks[k], boxes[k], image_hw)
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 3])
def test_paste_masks_thresholds_at_half_inclusive(seed):
    masks, boxes, image_hw = case(seed)
    got = np.asarray(jax.jit(ops.paste_masks, static_argnums=2)(masks, boxes, image_hw))
    assert got.dtype == bool and got.shape == (4, *image_hw)
    for k in range(len(masks)):
        soft = ref.paste_mask(masks[k], boxes[k], image_hw)
        decided = np.abs(soft - 0.5) > 1e-5  # away from the threshold, float32 must agree
        np.testing.assert_array_equal(got[k][decided], (soft >= 0.5)[decided])
    assert not got[1].any(), "a zero-width box pastes nothing"
    # A constant 0.5 mask in an integer box: every pixel strictly inside is exactly 0.5 -> True.
    half = np.full((1, 4, 4), 0.5, np.float32)
    pasted = np.asarray(ops.paste_masks(half, np.array([[2, 2, 10, 10]], np.float32), (12, 12)))
    assert pasted[0, 3:9, 3:9].all() and not pasted[0, :2].any()


def test_crop_and_resize_matches_reference_roi_align():
    rng = np.random.default_rng(4)
    masks = (rng.uniform(size=(3, 20, 24)) > 0.5).astype(np.uint8)
    boxes = np.array([[2, 3, 15, 18], [0, 0, 24, 20], [10.5, 4.25, 11.5, 5.75]], np.float32)
    got = np.asarray(ops.crop_and_resize_masks(masks, boxes, 7))
    for n in range(3):
        want = ref.roi_align(
            masks[n][None, :, :, None].astype(np.float32), boxes[None, n : n + 1], 7, 1.0, 2, True
        )[0, 0, :, :, 0]
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-6)


def test_paste_then_crop_round_trips_a_mask():
    image = np.zeros((64, 64), bool)
    yy, xx = np.mgrid[:64, :64]
    image |= (yy - 30) ** 2 / 15**2 + (xx - 25) ** 2 / 10**2 <= 1  # an ellipse
    box = np.asarray(ops.masks_to_boxes(image[None]))  # [1, 4]
    crop = ops.crop_and_resize_masks(image[None], box, 28)
    pasted = np.asarray(ops.paste_masks(crop, box, (64, 64)))[0]
    iou = (pasted & image).sum() / (pasted | image).sum()
    assert iou > 0.97


def test_masks_to_boxes():
    masks = np.zeros((3, 10, 12), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 9, 11] = True
    got = np.asarray(ops.masks_to_boxes(masks))
    np.testing.assert_array_equal(got, [[3, 2, 9, 5], [11, 9, 12, 10], [0, 0, 0, 0]])


def test_mask_iou_matches_reference():
    rng = np.random.default_rng(5)
    masks = rng.uniform(size=(6, 9, 9)) > 0.6
    masks[0] = False
    np.testing.assert_allclose(ops.mask_iou(masks, masks), ref.mask_iou_matrix(masks), rtol=1e-6)
