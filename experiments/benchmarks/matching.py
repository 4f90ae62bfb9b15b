"""Time of the static-shape Hungarian matcher (instseg_jax/ops/matching.py) per image, beside
scipy.optimize.linear_sum_assignment on the host (float64, one image at a time).

    .venv/bin/python experiments/benchmarks/matching.py [--no-write]

Cases: 100 queries x 100 and x 300 ground-truth slots (all valid, and half of them padding), one
image and 16 images in one vmapped call (as a training step calls it: a batch, and Mask2Former's
10 deep-supervision layers of a batch of 2 in the 20-problem case). Costs are Mask2Former-like:
2 x (-class probability) + 5 x BCE + 5 x dice of random mask logits at 112 points, so the
Hungarian search sees the same kind of spread as in training. Prints one table and appends it to
RESULTS.md; medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, machine_line, markdown_table, time_interleaved
from scipy.optimize import linear_sum_assignment

from instseg_jax.ops.matching import min_cost_matching

POINTS = 112


def mask2former_like_costs(rng, batch, queries, targets):
    prob = rng.dirichlet(np.ones(81), size=(batch, queries))[..., :80]
    labels = rng.integers(0, 80, (batch, targets))
    class_cost = -np.take_along_axis(prob, labels[:, None, :].repeat(queries, 1), axis=2)
    logits = rng.normal(0, 3, (batch, queries, POINTS))
    truth = (rng.uniform(size=(batch, targets, POINTS)) < 0.3).astype(np.float64)
    p = 1 / (1 + np.exp(-logits))
    bce = (
        np.einsum("bqp,btp->bqt", np.logaddexp(0, logits) - logits, truth)
        + np.einsum("bqp,btp->bqt", np.logaddexp(0, logits), 1 - truth)
    ) / POINTS
    dice = 1 - (2 * np.einsum("bqp,btp->bqt", p, truth) + 1) / (
        p.sum(-1)[:, :, None] + truth.sum(-1)[:, None, :] + 1
    )
    return (2 * class_cost + 5 * bce + 5 * dice).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    solve = jax.jit(min_cost_matching)
    rows = []
    for targets in (100, 300):
        for batch in (1, 16, 20):
            for valid_fraction in (1.0, 0.5):
                cost = mask2former_like_costs(rng, batch, 100, targets)
                col_valid = np.zeros((batch, targets), bool)
                col_valid[:, : int(targets * valid_fraction)] = True
                jax.block_until_ready(solve(cost, None, col_valid))  # compile

                def scipy_all(cost=cost, col_valid=col_valid):
                    for b in range(cost.shape[0]):
                        linear_sum_assignment(cost[b][:, col_valid[b]].astype(np.float64))

                t = time_interleaved(
                    {
                        "ours": lambda c=cost, v=col_valid: jax.block_until_ready(
                            solve(c, None, v)
                        ),
                        "scipy": scipy_all,
                    },
                    args.rounds,
                )
                row = [
                    f"100 x {targets}" + ("" if valid_fraction == 1 else " (half padded)"),
                    str(batch),
                    f"{t['ours'] / batch * 1e3:.2f}",
                    f"{t['scipy'] / batch * 1e3:.2f}",
                ]
                rows.append(row)
                print(row, flush=True)
    columns = ["queries x targets", "images per call", "ours ms/image", "scipy ms/image (host)"]
    table = markdown_table(rows, columns)
    header = machine_line() + "; medians of interleaved rounds; one jitted vmapped call"
    print(header)
    print(table)
    if not args.no_write:
        append_results(
            "Hungarian matcher (`python experiments/benchmarks/matching.py`)", header, table
        )


if __name__ == "__main__":
    main()
