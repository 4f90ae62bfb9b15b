import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import ops
from tests.ops import reference as ref


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def bce(x, t):
    p = sigmoid(x)
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


@pytest.fixture
def logits_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6, 5)).astype(np.float32)
    targets = (rng.uniform(size=(6, 5)) > 0.5).astype(np.float32)
    weights = (rng.uniform(size=(6, 5)) > 0.3).astype(np.float32)
    return logits, targets, weights


def test_bce_with_logits(logits_targets):
    x, t, w = logits_targets
    want = sum(w.flat[i] * bce(x.flat[i], t.flat[i]) for i in range(x.size)) / 7.0
    got = ops.binary_cross_entropy_with_logits(x, t, weights=w, normalizer=7.0)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # Stable at extreme logits.
    big = ops.binary_cross_entropy_with_logits(jnp.array([100.0, -100.0]), jnp.array([0.0, 1.0]))
    assert float(big) == pytest.approx(200.0, rel=1e-5)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0)])
def test_sigmoid_focal_loss(logits_targets, alpha, gamma):
    x, t, w = logits_targets
    total = 0.0
    for xi, ti, wi in zip(x.flat, t.flat, w.flat, strict=True):
        p = sigmoid(xi)
        p_t = p * ti + (1 - p) * (1 - ti)
        loss = bce(xi, ti) * (1 - p_t) ** gamma
        if alpha >= 0:
            loss *= alpha * ti + (1 - alpha) * (1 - ti)
        total += wi * loss
    got = ops.sigmoid_focal_loss(x, t, alpha, gamma, weights=w, normalizer=3.0)
    assert float(got) == pytest.approx(total / 3.0, rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9, 1.0])
def test_smooth_l1(beta):
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(2, 10, 4)).astype(np.float32)
    valid = rng.uniform(size=(10, 1)) > 0.5
    total = 0.0
    for i in range(10):
        for j in range(4):
            d = abs(float(pred[i, j]) - float(target[i, j]))
            loss = d if beta == 0 else (0.5 * d * d / beta if d < beta else d - 0.5 * beta)
            total += loss * valid[i, 0]
    got = ops.smooth_l1_loss(pred, target, beta, weights=valid, normalizer=2.0)
    assert float(got) == pytest.approx(total / 2.0, rel=1e-5)


def test_giou_loss():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 50, (2, 8, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (2, 8, 2))], -1).astype(np.float32)
    weights = np.arange(8, dtype=np.float32)
    want = sum(weights[i] * (1 - ref.giou(boxes[0, i], boxes[1, i])) for i in range(8)) / 4.0
    assert float(ops.giou_loss(boxes[0], boxes[1], weights, 4.0)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("squared", [False, True])
def test_dice_loss(squared):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 6, 6)).astype(np.float32)
    targets = rng.uniform(size=(4, 6, 6)) > 0.5
    weights = np.array([1, 0, 1, 1], np.float32)
    total = 0.0
    k = 2 if squared else 1
    for n in range(4):
        p = 1 / (1 + np.exp(-logits[n].astype(np.float64)))
        t = targets[n].astype(np.float64)
        total += weights[n] * (1 - (2 * (p * t).sum() + 1) / ((p**k).sum() + (t**k).sum() + 1))
    got = ops.dice_loss(logits, targets, weights, normalizer=3.0, squared=squared)
    assert float(got) == pytest.approx(total / 3.0, rel=1e-5)


def test_losses_have_finite_gradients(logits_targets):
    x, t, _w = logits_targets
    for fn in (ops.binary_cross_entropy_with_logits, ops.sigmoid_focal_loss, ops.dice_loss):
        grad = jax.grad(lambda z, fn=fn: fn(z * 30, t, weights=None))(jnp.asarray(x))
        assert np.isfinite(np.asarray(grad)).all()
    grad = jax.grad(lambda p: ops.smooth_l1_loss(p, jnp.zeros_like(p), beta=0.0))(jnp.zeros(3))
    assert np.isfinite(np.asarray(grad)).all()


def test_probability_logit_inverts_the_sigmoid_and_matches_mmcv_prior():
    """Inverse of the float64 sigmoid above; the prior bias is mmcv's bias_init_with_prob
    (mmcv/cnn/utils/weight_init.py: float(-np.log((1 - prior_prob) / prior_prob)))."""
    for p in (1e-6, 0.01, 0.2, 0.5, 0.9, 1 - 1e-9):
        assert sigmoid(ops.probability_logit(p)) == pytest.approx(p, rel=1e-12, abs=1e-15)
    assert ops.probability_logit(0.01) == pytest.approx(float(-np.log((1 - 0.01) / 0.01)))
    assert ops.probability_logit(0.0) == -math.inf
    assert ops.probability_logit(1.0) == math.inf
    with pytest.raises(ValueError, match="not a probability"):
        ops.probability_logit(1.5)
