import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import ops
from tests.ops import reference as ref

RTOL = 1e-5


def random_boxes(rng, n, scale=100.0, min_size=0.0):
    xy = rng.uniform(-10, scale, (n, 2))
    wh = rng.uniform(min_size, scale / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


EDGE_BOXES = np.array(
    [
        [0, 0, 0, 0],  # a point
        [5, 5, 5, 9],  # zero width
        [0, 0, 10, 10],
        [0, 0, 10, 10],  # duplicate
        [10, 10, 20, 20],  # touching corner
        [3, 3, 2, 2],  # inverted
        [-5, -5, 1, 1],  # partly negative
    ],
    np.float32,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("op", "reference"),
    [(ops.box_iou, ref.iou), (ops.box_ioa, ref.ioa), (ops.generalized_box_iou, ref.giou)],
)
def test_pairwise_overlaps_match_reference(seed, op, reference):
    rng = np.random.default_rng(seed)
    a = np.concatenate([random_boxes(rng, 13), EDGE_BOXES])
    b = np.concatenate([random_boxes(rng, 9), EDGE_BOXES])
    got = np.asarray(jax.jit(op)(a, b))
    want = ref.pairwise(reference, a, b)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


def test_iou_of_empty_boxes_is_zero_and_has_finite_gradients():
    points = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    assert np.asarray(ops.box_iou(points, points)).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    grads = jax.grad(lambda a: ops.box_iou(a, points).sum() + ops.generalized_box_iou(a, a).sum())(
        points
    )
    assert np.isfinite(np.asarray(grads)).all()


def test_box_area():
    boxes = np.concatenate([random_boxes(np.random.default_rng(3), 8), EDGE_BOXES])
    np.testing.assert_allclose(ops.box_area(boxes), [ref.area(b) for b in boxes], rtol=RTOL)
    assert ops.box_area(boxes.reshape(3, 5, 4)).shape == (3, 5)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_match_reference_and_invert(weights):
    rng = np.random.default_rng(4)
    sources = random_boxes(rng, 20, min_size=1.0)
    targets = random_boxes(rng, 20, min_size=1.0)
    deltas = np.asarray(ops.encode_boxes(targets, sources, weights))
    want = [ref.encode(t, s, weights) for t, s in zip(targets, sources, strict=True)]
    np.testing.assert_allclose(deltas, want, rtol=RTOL, atol=1e-6)
    decoded = np.asarray(ops.decode_boxes(deltas, sources, weights))
    np.testing.assert_allclose(decoded, targets, rtol=RTOL, atol=1e-4)


def test_decode_clamps_dw_dh_from_above_only():
    sources = np.array([[0, 0, 16, 16]] * 4, np.float32)
    deltas = np.array(
        [[0, 0, 10.0, 10.0], [0, 0, -5.0, -5.0], [0, 0, 4.0, 4.2], [0, 0, 4.2, 4.0]], np.float32
    )
    clamp = math.log(1000.0 / 16)
    got = np.asarray(ops.decode_boxes(deltas, sources))
    want = [ref.decode(d, s, (1, 1, 1, 1), clamp) for d, s in zip(deltas, sources, strict=True)]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
    # The clamp is exactly log(1000/16): the widest box is 1000 px wide.
    np.testing.assert_allclose(got[0, 2] - got[0, 0], 1000.0, rtol=RTOL)
    # A shrinking delta is not clamped from below.
    np.testing.assert_allclose(got[1, 2] - got[1, 0], 16 * math.exp(-5.0), rtol=1e-4)
    # A custom clamp is honoured.
    custom = np.asarray(ops.decode_boxes(deltas[:1], sources[:1], clamp=1.0))
    np.testing.assert_allclose(custom[0, 2] - custom[0, 0], 16 * math.e, rtol=RTOL)


def test_decode_class_specific_deltas_against_shared_sources():
    rng = np.random.default_rng(5)
    sources = random_boxes(rng, 6, min_size=2.0)
    deltas = rng.normal(0, 0.5, (6, 3, 4)).astype(np.float32)
    weights = (10.0, 10.0, 5.0, 5.0)
    got = np.asarray(ops.decode_boxes(deltas, sources, weights))
    assert got.shape == (6, 3, 4)
    for n in range(6):
        for k in range(3):
            want = ref.decode(deltas[n, k], sources[n], weights, math.log(1000 / 16))
            np.testing.assert_allclose(got[n, k], want, rtol=RTOL, atol=1e-4)


def test_clip_boxes_with_scalar_and_batched_sizes():
    boxes = np.array([[[-5, -5, 50, 70], [10, 20, 30, 40]]], np.float32)
    np.testing.assert_array_equal(
        ops.clip_boxes(boxes, (60, 40)), [[[0, 0, 40, 60], [10, 20, 30, 40]]]
    )
    hw = np.array([[25, 35]], np.int32)  # [B, 2]
    np.testing.assert_array_equal(
        ops.clip_boxes(boxes, hw[:, None, :]), [[[0, 0, 35, 25], [10, 20, 30, 25]]]
    )


def test_format_conversions_round_trip_and_match_definitions():
    boxes = random_boxes(np.random.default_rng(6), 10)
    xywh = np.asarray(ops.xyxy_to_xywh(boxes))
    np.testing.assert_allclose(xywh[:, 2:], boxes[:, 2:] - boxes[:, :2], rtol=RTOL)
    cxcywh = np.asarray(ops.xyxy_to_cxcywh(boxes))
    np.testing.assert_allclose(cxcywh[:, :2], (boxes[:, :2] + boxes[:, 2:]) / 2, rtol=RTOL)
    np.testing.assert_allclose(ops.xywh_to_xyxy(xywh), boxes, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(ops.cxcywh_to_xyxy(cxcywh), boxes, rtol=RTOL, atol=1e-5)


def test_vmap_over_images_equals_loop():
    rng = np.random.default_rng(7)
    a = np.stack([random_boxes(rng, 5) for _ in range(3)])
    b = np.stack([random_boxes(rng, 4) for _ in range(3)])
    batched = jax.vmap(ops.box_iou)(a, b)
    for i in range(3):
        np.testing.assert_allclose(batched[i], ops.box_iou(a[i], b[i]), rtol=RTOL)
