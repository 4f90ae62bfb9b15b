"""Minimum-cost bipartite matching (the linear sum assignment problem) with static shapes.

`min_cost_matching(cost, row_valid, col_valid)` matches min(valid rows, valid columns) pairs of
valid rows and columns, each row and column at most once, at the least total cost: the answer of
scipy.optimize.linear_sum_assignment on the valid sub-matrix (the same total cost; where several
matchings tie, possibly another of them). Padded rows and columns are never matched.

The solver is the Hungarian algorithm in its shortest-augmenting-path form with row and column
potentials (Kuhn-Munkres as Jonker and Volgenant run it, O(n^2 m)): rows are added one at a time,
each by a Dijkstra search over reduced costs from the new row to a free column, then the path is
flipped. Every step is vector work over one row of the cost matrix inside `lax.while_loop`s whose
trip counts are bounded by the matrix size (a NaN cost cannot hang it), so it jits, vmaps over
images and decoder layers, and runs under any mesh with no host callback.

Orientation: the search needs at most as many rows to add as allowed columns. The matrix is padded
to a square and, per problem, transposed when it has more valid rows than valid columns, so one
compiled program serves both cases under vmap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _hungarian_square(cost, active_rows, allowed_cols):
    """Optimal assignment of every active row of cost[S, S] to a distinct allowed column.

    Requires sum(active_rows) <= sum(allowed_cols). Returns int32[S]: for each column the row
    assigned to it, or -1.
    """
    size = cost.shape[0]
    dtype = cost.dtype
    inf = jnp.asarray(jnp.inf, dtype)
    # Index 0 of rows and columns is the search's virtual start (as in the textbook statement
    # of the algorithm); real rows and columns are 1..S.
    padded = jnp.zeros((size + 1, size + 1), dtype).at[1:, 1:].set(cost)
    blocked = jnp.concatenate([jnp.zeros((1,), bool), ~allowed_cols])

    def add_row(row, state):
        u, v, owner = state  # owner[j]: the row holding column j (0: free)
        start = jnp.where(active_rows[row - 1], row, 0)
        owner = owner.at[0].set(start)

        def searching(s):
            column, _, _, _, _, _, owner, steps = s
            return (owner[column] != 0) & (steps <= size)

        def search_step(s):
            column, used, min_slack, way, u, v, owner, steps = s
            used = used.at[column].set(True)
            from_row = owner[column]
            slack = padded[from_row] - u[from_row] - v
            free = ~used
            better = free & (slack < min_slack)
            min_slack = jnp.where(better, slack, min_slack)
            way = jnp.where(better, column, way)
            candidates = jnp.where(free, min_slack, inf)
            next_column = jnp.argmin(candidates)
            delta = candidates[next_column]
            # Potentials move by delta on the search tree: every used column's row (blocked
            # columns are used and free, so they shift the never-read u[0]).
            u = u.at[owner].add(jnp.where(used, delta, 0.0))
            v = jnp.where(used, v - delta, v)
            min_slack = jnp.where(used, min_slack, min_slack - delta)
            return next_column, used, min_slack, way, u, v, owner, steps + 1

        init = (
            jnp.zeros((), jnp.int32),
            blocked,
            jnp.full((size + 1,), inf),
            jnp.zeros((size + 1,), jnp.int32),
            u,
            v,
            owner,
            jnp.zeros((), jnp.int32),
        )
        column, _, _, way, u, v, owner, _ = jax.lax.while_loop(searching, search_step, init)

        # Flip the path back from the free column it reached to the virtual start.
        def flipping(s):
            column, _, steps = s
            return (column != 0) & (steps <= size)

        def flip_step(s):
            column, owner, steps = s
            previous = way[column]
            return previous, owner.at[column].set(owner[previous]), steps + 1

        _, owner, _ = jax.lax.while_loop(
            flipping, flip_step, (column, owner, jnp.zeros((), jnp.int32))
        )
        return u, v, owner

    init = (
        jnp.zeros((size + 1,), dtype),
        jnp.zeros((size + 1,), dtype),
        jnp.zeros((size + 1,), jnp.int32),
    )
    _, _, owner = jax.lax.fori_loop(1, size + 1, add_row, init)
    return owner[1:] - 1


def _match_one(cost, row_valid, col_valid):
    rows, cols = cost.shape
    size = max(rows, cols)
    finite = jnp.where(jnp.isfinite(cost), cost, jnp.finfo(cost.dtype).max / 4)
    square = jnp.zeros((size, size), cost.dtype).at[:rows, :cols].set(finite)
    row_valid_sq = jnp.zeros((size,), bool).at[:rows].set(row_valid)
    col_valid_sq = jnp.zeros((size,), bool).at[:cols].set(col_valid)
    swap = row_valid.sum() > col_valid.sum()
    row_of_col = _hungarian_square(
        jnp.where(swap, square.T, square),
        jnp.where(swap, col_valid_sq, row_valid_sq),
        jnp.where(swap, row_valid_sq, col_valid_sq),
    )
    matched = row_of_col >= 0
    position = jnp.arange(size, dtype=jnp.int32)
    # Solved rows/columns are original rows/columns, or the other way round when swapped.
    orig_row = jnp.where(swap, position, row_of_col)
    orig_col = jnp.where(swap, row_of_col, position)
    drop = jnp.int32(size)  # out of range: dropped by the scatter
    row_to_col = (
        jnp.full((size,), -1, jnp.int32)
        .at[jnp.where(matched, orig_row, drop)]
        .set(orig_col, mode="drop")
    )
    col_to_row = (
        jnp.full((size,), -1, jnp.int32)
        .at[jnp.where(matched, orig_col, drop)]
        .set(orig_row, mode="drop")
    )
    return row_to_col[:rows], col_to_row[:cols]


def min_cost_matching(
    cost: jnp.ndarray,
    row_valid: jnp.ndarray | None = None,
    col_valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Least-total-cost matching of cost[..., R, C] (leading axes: independent problems).

    row_valid bool[..., R] / col_valid bool[..., C] (default all valid): padded rows and columns,
    never matched. Non-finite costs count as a very large finite cost. Returns
    (row_to_col int32[..., R], col_to_row int32[..., C]), -1 where unmatched; exactly
    min(valid rows, valid columns) pairs are matched.
    """
    cost = jnp.asarray(cost)
    if cost.ndim < 2:
        raise ValueError(f"cost must be [..., rows, columns], got shape {cost.shape}")
    if not jnp.issubdtype(cost.dtype, jnp.floating):
        cost = cost.astype(jnp.float32)
    batch = cost.shape[:-2]
    if row_valid is None:
        row_valid = jnp.ones(cost.shape[:-1], bool)
    if col_valid is None:
        col_valid = jnp.ones(batch + cost.shape[-1:], bool)
    row_valid = jnp.broadcast_to(jnp.asarray(row_valid, bool), cost.shape[:-1])
    col_valid = jnp.broadcast_to(jnp.asarray(col_valid, bool), batch + cost.shape[-1:])
    solve = _match_one
    for _ in batch:
        solve = jax.vmap(solve)
    return solve(cost, row_valid, col_valid)
