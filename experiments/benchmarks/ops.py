"""Benchmark of the static-shape ops; with --peer, torchvision's kernels side by side.

    make bench   # JAX only:            .venv/bin/python experiments/benchmarks/ops.py
    make peer    # with torchvision:    .venv-peer/bin/python experiments/benchmarks/ops.py --peer

Cases (batch 2, 1000 boxes per image, 256 channels, P2-P5 maps of an 800x800 canvas):
RoIAlign forward and forward+backward at 7x7 and 14x14 on P2 (single map) and on P2-P5
(multilevel, each box on its own level), for our gather and einsum forms; greedy NMS of 4000
boxes to 1000; Matrix NMS of 500 masks at 200x200. Prints one table and appends it to
RESULTS.md with the machine's measured matmul and bandwidth ceilings.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    append_results,
    machine_line,
    markdown_table,
    measure_ceilings,
    time_interleaved,
)

from instseg_jax import ops

CANVAS = 800
CHANNELS = 256
BATCH = 2
NUM_BOXES = 1000


def make_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    maps = [
        rng.normal(size=(BATCH, CANVAS >> level, CANVAS >> level, CHANNELS)).astype(np.float32)
        for level in range(2, 6)
    ]
    # Box sizes log-uniform from 16 to 640 px: every level gets boxes, as with real proposals.
    side = np.exp(rng.uniform(math.log(16), math.log(640), (BATCH, NUM_BOXES, 2)))
    corner = rng.uniform(0, 1, (BATCH, NUM_BOXES, 2)) * (CANVAS - side)
    boxes = np.concatenate([corner, corner + side], -1).astype(np.float32)
    return maps, boxes


def torchvision_levels(boxes: np.ndarray) -> np.ndarray:
    """int32[B, R] levels by torchvision's LevelMapper (canonical 224 at level 4, clamped to
    2..5, eps after the log2), as the torchvision preset computes them: one set of levels
    serves both sides, so they pool each box from the same map."""
    return np.asarray(ops.fpn_level(jnp.asarray(boxes), rule="torchvision"))


def gathered_bytes(output_size: int, sampling_ratio: int = 2) -> int:
    """Bytes the gather form reads: 4 neighbour rows of D floats per sample."""
    return BATCH * NUM_BOXES * (output_size * sampling_ratio) ** 2 * 4 * CHANNELS * 4


class Torchvision:
    """torchvision's CPU kernels on the same inputs (NCHW copies made once, outside timing)."""

    def __init__(self, maps, boxes):
        import torch
        import torchvision

        torch.set_num_threads(os.cpu_count())
        self.torch = torch
        self.tv_ops = torchvision.ops
        self.version = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
        self.maps = [torch.from_numpy(np.ascontiguousarray(m.transpose(0, 3, 1, 2))) for m in maps]
        self.boxes = [torch.from_numpy(b) for b in boxes]
        self.levels = torchvision_levels(boxes)

    def roi_align(self, output_size, multilevel, backward):
        torch = self.torch
        maps = self.maps if multilevel else self.maps[:1]
        if backward:
            maps = [m.clone().requires_grad_(True) for m in maps]
        if multilevel:
            pooled = []
            for level, level_map in zip(range(2, 6), maps, strict=True):
                rois = torch.cat(
                    [
                        torch.cat([torch.full((int(n.sum()), 1), float(b)), self.boxes[b][n]], 1)
                        for b in range(BATCH)
                        for n in [torch.from_numpy(self.levels[b] == level)]
                    ]
                )
                pooled.append(
                    self.tv_ops.roi_align(
                        level_map, rois, output_size, 2.0**-level, 2, aligned=False
                    )
                )
            out = torch.cat(pooled)
        else:
            out = self.tv_ops.roi_align(maps[0], self.boxes, output_size, 0.25, 2, aligned=True)
        if backward:
            (out * out).sum().backward()
        return out

    def nms(self, boxes, scores, threshold):
        return self.tv_ops.nms(boxes, scores, threshold)[:1000]


def roi_align_cases(maps, boxes, peer):
    """Rows of (case, ours seconds, theirs seconds or None, bytes gathered) for RoIAlign."""
    maps_j = [jnp.asarray(m) for m in maps]
    boxes_j = jnp.asarray(boxes)
    levels_j = jnp.asarray(torchvision_levels(boxes))
    rows = []
    for size in (7, 14):
        for multilevel in (False, True):
            for method in ("gather", "einsum"):
                if multilevel:
                    # aligned=False and torchvision's level mapper: torchvision's MultiScaleRoIAlign.
                    def pool(m, b, method=method, size=size):
                        return ops.multilevel_roi_align(
                            m, b, size, aligned=False, method=method, levels=levels_j
                        )

                    args = (maps_j,)
                else:

                    def pool(m, b, method=method, size=size):
                        return ops.roi_align(m[0], b, size, 0.25, 2, True, method=method)

                    args = (maps_j[:1],)
                forward = jax.jit(pool)
                grad = jax.jit(jax.grad(lambda m, b, pool=pool: jnp.sum(pool(m, b) ** 2)))
                for backward, fn in ((False, forward), (True, grad)):
                    name = (
                        f"roi_align {'P2-P5' if multilevel else 'P2'} {size}x{size} {method} "
                        f"{'fwd+bwd' if backward else 'fwd'}"
                    )
                    candidates = {
                        "ours": lambda fn=fn, a=args: jax.block_until_ready(fn(*a, boxes_j))
                    }
                    if peer and method == "gather":
                        candidates["theirs"] = lambda s=size, ml=multilevel, bw=backward: (
                            peer.roi_align(s, ml, bw)
                        )
                    rounds = 3 if method == "einsum" else 5
                    t = time_interleaved(candidates, rounds)
                    check = ""
                    if peer and method == "gather" and not backward:
                        ours = np.asarray(fn(*args, boxes_j))
                        theirs = peer.roi_align(size, multilevel, False).detach().numpy()
                        if multilevel:  # torchvision returns boxes grouped by level
                            order = [
                                (b, r)
                                for lv in range(2, 6)
                                for b in range(BATCH)
                                for r in range(NUM_BOXES)
                                if peer.levels[b, r] == lv
                            ]
                            ours = np.stack([ours[b, r] for b, r in order])
                        else:
                            ours = ours.reshape(-1, size, size, CHANNELS)
                        diff = np.abs(ours - theirs.transpose(0, 2, 3, 1)).max()
                        check = f"max |diff| {diff:.1e}"
                    rows.append((name, t["ours"], t.get("theirs"), gathered_bytes(size), check))
                    print(rows[-1], flush=True)
    return rows


def nms_cases(peer):
    rng = np.random.default_rng(1)
    corner = rng.uniform(0, 700, (4000, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(20, 150, (4000, 2))], 1).astype(np.float32)
    scores = rng.uniform(size=4000).astype(np.float32)
    fn = jax.jit(lambda b, s: ops.nms(b, s, 0.7, 1000))
    bj, sj = jnp.asarray(boxes), jnp.asarray(scores)
    candidates = {"ours": lambda: jax.block_until_ready(fn(bj, sj))}
    check = ""
    if peer:
        bt, st = peer.torch.from_numpy(boxes), peer.torch.from_numpy(scores)
        candidates["theirs"] = lambda: peer.nms(bt, st, 0.7)
        indices, count = fn(bj, sj)
        same = np.array_equal(np.asarray(indices)[: int(count)], peer.nms(bt, st, 0.7).numpy())
        check = f"same kept boxes: {same}"
    t = time_interleaved(candidates, 20)
    rows = [("nms 4000 -> 1000 (IoU 0.7)", t["ours"], t.get("theirs"), None, check)]

    masks = jnp.asarray(rng.uniform(size=(500, 200, 200)) > 0.5)
    classes = jnp.asarray(rng.integers(0, 5, 500).astype(np.int32))
    mask_scores = jnp.asarray(rng.uniform(size=500).astype(np.float32))
    matrix = jax.jit(ops.matrix_nms)
    t = time_interleaved(
        {"ours": lambda: jax.block_until_ready(matrix(masks, classes, mask_scores))}, 5
    )
    rows.append(("matrix_nms 500 masks 200x200", t["ours"], None, None, ""))
    for row in rows:
        print(row, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", action="store_true", help="also time torchvision (make peer)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args()

    maps, boxes = make_inputs()
    peer = Torchvision(maps, boxes) if args.peer else None
    ceilings = measure_ceilings()
    print(
        f"ceilings: {ceilings['matmul_flops'] / 1e9:.1f} GFLOP/s matmul, "
        f"{ceilings['stream_bytes'] / 1e9:.1f} GB/s stream",
        flush=True,
    )
    rows = roi_align_cases(maps, boxes, peer) + nms_cases(peer)

    table_rows = []
    for name, ours, theirs, nbytes, check in rows:
        ratio = f"{theirs / ours:.2f}x" if theirs else "-"
        bandwidth = (
            f"{nbytes / ours / 1e9:.1f} GB/s ({nbytes / ours / ceilings['stream_bytes']:.0%})"
            if nbytes and "gather" in name
            else "-"
        )
        table_rows.append(
            [
                name,
                f"{ours * 1e3:.1f}",
                f"{theirs * 1e3:.1f}" if theirs else "-",
                ratio,
                bandwidth,
                check or "-",
            ]
        )
    columns = [
        "case",
        "ours ms",
        "torchvision ms",
        "speed-up (theirs/ours)",
        "gathered bytes/s (of stream ceiling)",
        "check",
    ]
    table = markdown_table(table_rows, columns)
    header = machine_line({"peer": peer.version} if peer else None) + (
        f"; ceilings {ceilings['matmul_flops'] / 1e9:.1f} GFLOP/s float32 matmul, "
        f"{ceilings['stream_bytes'] / 1e9:.1f} GB/s stream; medians of interleaved rounds"
    )
    print(header)
    print(table)
    if not args.no_write:
        command = "make peer" if peer else "make bench"
        append_results(f"Ops (`{command}`)", header, table)


if __name__ == "__main__":
    main()
