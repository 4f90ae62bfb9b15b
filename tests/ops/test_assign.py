import jax
import numpy as np
import pytest

from instseg_jax import ops
from tests.ops import reference as ref


def iou_matrix(seed, g=5, p=40):
    rng = np.random.default_rng(seed)
    iou = rng.uniform(0, 1, (g, p)).astype(np.float32) ** 2
    iou[:, :3] = [[0.3], [0.3], [0.2], [0.1], [0.0]][:g]  # exactly at the lower threshold
    iou[0, 3] = 0.7  # exactly at the upper threshold
    iou[1, 4] = iou[2, 4] = 0.9  # two ground truths tie for one prediction
    iou[4] = np.minimum(iou[4], 0.25)  # a ground truth only matched as low quality
    return iou


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("low_quality", [True, False])
def test_match_equals_reference(seed, low_quality):
    iou = iou_matrix(seed)
    matched, labels = jax.jit(ops.match, static_argnums=(1, 2, 3))(
        iou, (0.3, 0.7), (0, -1, 1), low_quality
    )
    want_matched, want_labels = ref.match(iou, (0.3, 0.7), (0, -1, 1), low_quality)
    np.testing.assert_array_equal(labels, want_labels)
    positive = want_labels == 1
    np.testing.assert_array_equal(np.asarray(matched)[positive], want_matched[positive])
    # Half-open intervals: IoU exactly 0.3 is ignored (-1), exactly 0.7 is positive.
    assert int(labels[3]) == 1
    assert int(matched[4]) == 1, "ties go to the lower ground-truth index"


def test_padded_ground_truth_never_matches():
    iou = iou_matrix(3)
    gt_valid = np.array([True, False, True, False, True])
    matched, labels = ops.match(iou, gt_valid=gt_valid)
    _want_matched, want_labels = ref.match(iou, (0.3, 0.7), (0, -1, 1), True, gt_valid)
    np.testing.assert_array_equal(labels, want_labels)
    assert not np.isin(np.asarray(matched)[np.asarray(labels) == 1], [1, 3]).any()
    _, labels = ops.match(iou, gt_valid=np.zeros(5, bool))
    assert (np.asarray(labels) == 0).all()
    matched, labels = ops.match(np.zeros((0, 7), np.float32))
    assert labels.shape == (7,) and (np.asarray(labels) == 0).all()


def test_low_quality_match_ignores_ground_truth_without_overlap():
    iou = np.array([[0.0, 0.0, 0.0], [0.1, 0.6, 0.2]], np.float32)
    _, labels = ops.match(iou)
    np.testing.assert_array_equal(labels, [0, 1, 0])


def test_match_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="labels"):
        ops.match(np.zeros((1, 1), np.float32), thresholds=(0.5,), labels=(0, -1, 1))
    with pytest.raises(ValueError, match="increase"):
        ops.match(np.zeros((1, 1), np.float32), thresholds=(0.7, 0.3))


@pytest.mark.parametrize(
    ("num_pos", "num_neg", "num_samples", "fraction"),
    [
        (100, 500, 256, 0.5),
        (10, 500, 256, 0.5),
        (10, 20, 256, 0.25),
        (0, 0, 16, 0.5),
        (300, 3, 64, 0.25),
        (5, 5, 4, 1.0),
    ],
)
def test_sample_balanced_counts_and_members(num_pos, num_neg, num_samples, fraction):
    rng = np.random.default_rng(num_pos + num_neg)
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * 50, np.int32)
    rng.shuffle(labels)
    indices, valid = jax.jit(ops.sample_balanced, static_argnums=(1, 2))(
        labels, num_samples, fraction, jax.random.key(0)
    )
    indices, valid = np.asarray(indices), np.asarray(valid)
    assert indices.shape == valid.shape == (num_samples,)
    want_pos = min(num_pos, int(num_samples * fraction))
    want_neg = min(num_neg, num_samples - want_pos)
    chosen = indices[valid]
    assert len(chosen) == want_pos + want_neg
    assert len(set(chosen.tolist())) == len(chosen), "no index drawn twice"
    np.testing.assert_array_equal(labels[chosen], [1] * want_pos + [0] * want_neg)
    assert valid[: want_pos + want_neg].all() and not valid[want_pos + want_neg :].any()
    assert (indices[~valid] == 0).all()


def test_sample_balanced_is_keyed_and_uniform():
    labels = np.array([1] * 40 + [0] * 400, np.int32)
    first = ops.sample_balanced(labels, 64, 0.25, jax.random.key(1))
    again = ops.sample_balanced(labels, 64, 0.25, jax.random.key(1))
    other = ops.sample_balanced(labels, 64, 0.25, jax.random.key(2))
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])
    counts = np.zeros(40)
    for k in range(300):
        idx, valid = ops.sample_balanced(labels, 64, 0.25, jax.random.key(100 + k))
        np.add.at(counts, np.asarray(idx)[np.asarray(valid) & (np.asarray(idx) < 40)], 1)
    # Each positive is drawn with probability 16/40; 300 draws -> 120 +- ~8.5 (sd).
    assert np.abs(counts - 120).max() < 45
