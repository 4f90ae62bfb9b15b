import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import ops
from tests.ops import reference as ref


def clustered_boxes(seed, n=60, clusters=6):
    """Boxes jittered around a few centres: many overlaps around any threshold."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(20, 200, (clusters, 2))
    pick = rng.integers(0, clusters, n)
    xy = centres[pick] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(10, 50, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(size=n).astype(np.float32)
    return boxes, scores


def as_list(indices, count):
    indices, count = np.asarray(indices), int(count)
    assert (indices[count:] == -1).all(), "padding after count must be -1"
    return indices[:count].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_equals_greedy_reference(seed, threshold):
    boxes, scores = clustered_boxes(seed)
    want = ref.greedy_nms(boxes, scores, threshold)
    got = as_list(*jax.jit(ops.nms, static_argnums=(2, 3))(boxes, scores, threshold, 60))
    assert got == want
    # Fewer output slots keep the best ones, in the same order.
    assert as_list(*ops.nms(boxes, scores, threshold, 5)) == want[:5]


def test_tied_scores_keep_lower_index_first():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.5, 0.5, 0.5, 0.5], np.float32)
    assert as_list(*ops.nms(boxes, scores, 0.5, 4)) == [0, 3]
    # Reversed input order: the lowest index still wins the tie.
    assert as_list(*ops.nms(boxes[::-1].copy(), scores, 0.5, 4)) == [0, 1]
    scores = np.array([0.4, 0.5, 0.5, 0.1], np.float32)
    assert as_list(*ops.nms(boxes, scores, 0.5, 4)) == [1, 3]


def test_iou_exactly_at_threshold_is_not_suppressed():
    boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32)  # IoU exactly 0.5
    scores = np.array([0.9, 0.8], np.float32)
    assert as_list(*ops.nms(boxes, scores, 0.5, 2)) == [0, 1]
    assert as_list(*ops.nms(boxes, scores, 0.49, 2)) == [0]


def test_validity_mask_and_empty_inputs():
    boxes, scores = clustered_boxes(5, n=20)
    valid = np.arange(20) % 3 != 0
    want = ref.greedy_nms(boxes, scores, 0.5, valid=valid)
    assert as_list(*ops.nms(boxes, scores, 0.5, 20, valid=valid)) == want
    indices, count = ops.nms(boxes, scores, 0.5, 4, valid=np.zeros(20, bool))
    assert int(count) == 0 and np.asarray(indices).tolist() == [-1] * 4
    indices, count = ops.nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5, 3)
    assert int(count) == 0 and indices.shape == (3,)


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_nms_equals_per_class_greedy(seed):
    boxes, scores = clustered_boxes(seed, n=50)
    classes = np.random.default_rng(seed).integers(0, 3, 50).astype(np.int32)
    want = ref.greedy_nms(boxes, scores, 0.5, classes=classes)
    got = as_list(*ops.batched_nms(boxes, scores, classes, 0.5, 50))
    assert got == want


def test_nms_under_vmap_and_jit():
    cases = [clustered_boxes(s, n=30) for s in range(3)]
    boxes = np.stack([c[0] for c in cases])
    scores = np.stack([c[1] for c in cases])
    indices, counts = jax.jit(jax.vmap(lambda b, s: ops.nms(b, s, 0.5, 30)))(boxes, scores)
    for i, (b, s) in enumerate(cases):
        assert as_list(indices[i], counts[i]) == ref.greedy_nms(b, s, 0.5)


def random_masks(seed, n=12, size=16):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        y, x = rng.integers(0, size - 4, 2)
        h, w = rng.integers(3, 9, 2)
        masks[i, y : y + h, x : x + w] = True
    masks[-1] = False  # an empty mask
    masks[3] = masks[2]  # a duplicate
    return masks


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matrix_nms_matches_reference(kernel, seed):
    masks = random_masks(seed)
    rng = np.random.default_rng(seed + 10)
    classes = rng.integers(0, 2, len(masks)).astype(np.int32)
    classes[3] = classes[2]
    scores = rng.uniform(0.1, 1, len(masks)).astype(np.float32)
    got = jax.jit(ops.matrix_nms, static_argnames=("kernel",))(
        masks, classes, scores, kernel=kernel, sigma=2.0
    )
    want = ref.matrix_nms(masks, classes, scores, kernel, 2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(got[np.argmax(scores)]) == pytest.approx(float(scores.max()))


@pytest.mark.parametrize("use_masks", [False, True])
@pytest.mark.parametrize("class_aware", [False, True])
def test_fast_nms_matches_reference(use_masks, class_aware):
    boxes, scores = clustered_boxes(7, n=12)
    items = random_masks(7) if use_masks else boxes
    classes = np.random.default_rng(3).integers(0, 2, 12).astype(np.int32) if class_aware else None
    want = ref.fast_nms(items, scores, 0.4, classes)
    got = as_list(*ops.fast_nms(items, scores, 0.4, 20, classes=classes))
    assert got == want
    assert as_list(*ops.fast_nms(items, scores, 0.4, 2, classes=classes)) == want[:2]


def test_fast_nms_differs_from_greedy_where_it_should():
    # b suppresses c in Fast NMS although a already suppressed b; greedy keeps c.
    boxes = np.array([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]], np.float32)
    scores = jnp.asarray([0.9, 0.8, 0.7])
    assert as_list(*ops.nms(boxes, scores, 0.5, 3)) == [0, 2]
    assert as_list(*ops.fast_nms(boxes, scores, 0.5, 3)) == [0]
