"""The matcher against scipy.optimize.linear_sum_assignment (float64) on random cost matrices:
square, rectangular both ways, padded rows and columns, integer costs with many tied optima, and
several problems of one batch with different valid counts (one vmapped program)."""

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from instseg_jax.ops.matching import min_cost_matching

solve = jax.jit(min_cost_matching)


def check_against_scipy(cost, row_valid, col_valid, row_to_col, col_to_row):
    rows = np.arange(cost.shape[0])
    matched = row_to_col >= 0
    pairs = rows[matched], row_to_col[matched]
    assert row_valid[pairs[0]].all() and col_valid[pairs[1]].all(), "a padded row or column matched"
    assert len(set(pairs[1].tolist())) == len(pairs[1]), "a column matched twice"
    assert (col_to_row[pairs[1]] == pairs[0]).all(), "row_to_col and col_to_row disagree"
    assert (col_to_row >= 0).sum() == matched.sum()
    sub = cost[np.ix_(row_valid, col_valid)].astype(np.float64)
    want_rows, want_cols = linear_sum_assignment(sub)
    assert matched.sum() == len(want_rows) == min(row_valid.sum(), col_valid.sum())
    want = sub[want_rows, want_cols].sum()
    got = cost[pairs].astype(np.float64).sum()
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)


@pytest.mark.parametrize("shape", [(100, 100), (100, 300), (9, 4)])
def test_total_cost_equals_scipy(shape):
    rng = np.random.default_rng(sum(shape))
    batch = 4
    cost = rng.normal(size=(batch,) + shape).astype(np.float32)
    cost[1] = rng.integers(0, 6, shape)  # many optimal matchings: ties
    cost[3] = rng.uniform(size=shape) * 10.0
    row_valid = np.ones((batch, shape[0]), bool)
    col_valid = np.ones((batch, shape[1]), bool)
    row_valid[2] = rng.uniform(size=shape[0]) < 0.6  # padded rows and columns
    col_valid[2] = rng.uniform(size=shape[1]) < 0.5
    col_valid[3, : shape[1] // 2] = False  # padding first, not only last
    row_to_col, col_to_row = map(np.asarray, solve(cost, row_valid, col_valid))
    for b in range(batch):
        check_against_scipy(cost[b], row_valid[b], col_valid[b], row_to_col[b], col_to_row[b])


def test_more_valid_rows_than_columns_in_one_problem_fewer_in_another():
    """The per-problem transpose: one program, both orientations."""
    rng = np.random.default_rng(7)
    cost = rng.normal(size=(2, 12, 12)).astype(np.float32)
    row_valid = np.array([[True] * 12, [True] * 3 + [False] * 9])
    col_valid = np.array([[True] * 5 + [False] * 7, [True] * 12])
    row_to_col, col_to_row = map(np.asarray, solve(cost, row_valid, col_valid))
    for b in range(2):
        check_against_scipy(cost[b], row_valid[b], col_valid[b], row_to_col[b], col_to_row[b])


def test_nothing_valid_and_non_finite_costs():
    cost = np.array([[np.nan, 1.0, np.inf], [0.0, -np.inf, 2.0]], np.float32)
    row_to_col, col_to_row = map(np.asarray, solve(cost, np.zeros(2, bool), np.ones(3, bool)))
    assert (row_to_col == -1).all() and (col_to_row == -1).all()
    # Non-finite costs still give a complete matching that avoids them where it can.
    row_to_col, _ = map(np.asarray, solve(cost, np.ones(2, bool), np.ones(3, bool)))
    assert row_to_col.tolist() == [1, 0]
