"""Panoptic quality (instseg_jax.panoptic.PanopticQuality) against an independent implementation,
torchmetrics' PanopticQuality, on seeded random cases (`make peer` env with torchmetrics).

    .venv-peer/bin/python experiments/parity/panoptic_quality.py
    .venv-peer/bin/python experiments/parity/panoptic_quality.py --make-fixture \
        tests/fixtures/panoptic_quality_torchmetrics.npz              # the CI test's data

panopticapi, the reference implementation, is not on the package index; torchmetrics' version
follows it with two departures, both about void pixels of the *prediction*: it also leaves a
prediction's void pixels inside a ground-truth segment out of their union, and it excuses an
unmatched ground-truth segment that lies mostly on predicted void. So the cases here predict a
category for every pixel (no predicted void), where the two agree with panopticapi; the ground
truth has void pixels (both leave them out of the union and excuse predictions lying mostly on
them). Crowd regions, which torchmetrics does not model, are tested by hand-made cases in
tests/test_panoptic.py.

Each case: a 40 x 48 ground truth of stuff bands (2 stuff categories), things (3 categories,
several instances each, occluding) and void patches; the prediction perturbs it (segments
shifted, eroded, relabelled, split, false segments added, void pixels given a category). PQ,
SQ and RQ over all categories, things and stuff, and PQ per category must agree to 1e-6
(torchmetrics' IoUs are float32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402

ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from instseg_jax.panoptic import PanopticQuality  # noqa: E402

THINGS = (1, 2, 3)
STUFF = (4, 5)
HW = (40, 48)
VOID_CATEGORY = 0  # torchmetrics: any category outside things and stuff is void


def random_case(rng: np.random.Generator):
    """(ground truth, prediction): int64[H, W, 2] maps of (category, instance) each."""
    height, width = HW
    category = np.zeros(HW, np.int64)
    instance = np.zeros(HW, np.int64)
    split = int(rng.integers(10, 30))
    category[:split], category[split:] = STUFF
    for k in range(int(rng.integers(1, 7))):
        y0, x0 = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
        h, w = int(rng.integers(3, 16)), int(rng.integers(3, 16))
        category[y0 : y0 + h, x0 : x0 + w] = rng.choice(THINGS)
        instance[y0 : y0 + h, x0 : x0 + w] = k + 1
    for _ in range(int(rng.integers(0, 3))):  # void patches
        y0, x0 = int(rng.integers(0, height - 2)), int(rng.integers(0, width - 2))
        h, w = int(rng.integers(2, 10)), int(rng.integers(2, 10))
        category[y0 : y0 + h, x0 : x0 + w] = VOID_CATEGORY
        instance[y0 : y0 + h, x0 : x0 + w] = 0
    gt = np.stack([category, instance], axis=-1)

    pred_category, pred_instance = category.copy(), instance.copy()
    void = pred_category == VOID_CATEGORY
    pred_category[void] = rng.choice(STUFF + THINGS)  # every pixel predicted
    pred_instance[void] = 50
    for k in np.unique(instance[instance > 0]):
        mask = instance == k
        action = rng.integers(0, 6)
        if action == 1:  # shifted: part of it spills over the neighbours
            shift = tuple(int(v) for v in rng.integers(-4, 5, 2))
            moved = np.roll(mask, shift, axis=(0, 1))
            pred_category[moved] = category[mask][0]
            pred_instance[moved] = k
        elif action == 2:  # relabelled
            pred_category[mask] = rng.choice([c for c in THINGS if c != category[mask][0]])
        elif action == 3:  # split in two instances
            rows = np.flatnonzero(mask.any(axis=1))
            lower = mask & (np.arange(height)[:, None] > rows[len(rows) // 2])
            pred_instance[lower] = 100 + k
        elif action == 4:  # eroded: its border given to the stuff
            inner = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 0) & np.roll(mask, 2, 1)
            border = mask & ~inner
            pred_category[border] = STUFF[0]
            pred_instance[border] = 0
    for j in range(int(rng.integers(0, 3))):  # false things
        y0, x0 = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
        h, w = int(rng.integers(3, 8)), int(rng.integers(3, 8))
        pred_category[y0 : y0 + h, x0 : x0 + w] = rng.choice(THINGS)
        pred_instance[y0 : y0 + h, x0 : x0 + w] = 200 + j
    stuff = np.isin(pred_category, STUFF)
    pred_instance[stuff] = 0
    gt[..., 1][np.isin(category, STUFF)] = 0
    return gt, np.stack([pred_category, pred_instance], axis=-1)


def segments_of(pair: np.ndarray):
    """(int64[H, W] segment ids, segments) of a (category, instance) map; void -> id 0."""
    ids = np.zeros(pair.shape[:2], np.int64)
    segments = []
    for category, instance in np.unique(pair.reshape(-1, 2), axis=0):
        if category == VOID_CATEGORY:
            continue
        segment_id = len(segments) + 1
        ids[(pair[..., 0] == category) & (pair[..., 1] == instance)] = segment_id
        segments.append({"id": segment_id, "category_id": int(category)})
    return ids, segments


def ours(gts: np.ndarray, preds: np.ndarray) -> dict:
    quality = PanopticQuality({**{c: True for c in THINGS}, **{c: False for c in STUFF}})
    for gt, pred in zip(gts, preds, strict=True):
        quality.add(*segments_of(gt), *segments_of(pred))
    summary = quality.summary()
    out = {
        f"{name}_{stat}": summary[name][stat]
        for name in ("All", "Things", "Stuff")
        for stat in ("PQ", "SQ", "RQ")
    }
    for category in THINGS + STUFF:
        values = summary["per_category"].get(category, {"PQ": 0.0})
        out[f"PQ_{category}"] = values["PQ"]
    return out


def torchmetrics_figures(gts: np.ndarray, preds: np.ndarray) -> dict:
    """torchmetrics' PQ, SQ, RQ over all categories and its per-category PQ; the things and
    stuff averages from its per-category values over the categories its own counts say are
    present (TP + FP + FN > 0)."""
    import torch
    from torchmetrics.detection import PanopticQuality as Reference

    def metric(per_class: bool):
        m = Reference(
            things=set(THINGS), stuffs=set(STUFF), return_sq_and_rq=True,
            return_per_class=per_class,
        )  # fmt: skip
        m.update(torch.from_numpy(preds), torch.from_numpy(gts))
        return m, m.compute().numpy()

    _, overall = metric(False)
    counted, per_class = metric(True)
    per_class = per_class.reshape(-1, 3)  # [categories, (PQ, SQ, RQ)], things then stuff
    order = sorted(THINGS) + sorted(STUFF)  # torchmetrics' continuous ids
    denominator = (
        counted.true_positives + 0.5 * counted.false_positives + 0.5 * counted.false_negatives
    ).numpy()
    out = {
        f"All_{stat}": float(v) for stat, v in zip(("PQ", "SQ", "RQ"), overall.ravel(), strict=True)
    }
    for name, categories in (("Things", THINGS), ("Stuff", STUFF)):
        rows = [order.index(c) for c in categories if denominator[order.index(c)] > 0]
        for j, stat in enumerate(("PQ", "SQ", "RQ")):
            out[f"{name}_{stat}"] = float(per_class[rows, j].mean()) if rows else 0.0
    for category in order:
        out[f"PQ_{category}"] = float(per_class[order.index(category), 0])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--make-fixture", type=Path, help="write the cases and figures here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    pairs = [random_case(rng) for _ in range(args.cases)]
    gts = np.stack([g for g, _ in pairs])
    preds = np.stack([p for _, p in pairs])
    reference = torchmetrics_figures(gts, preds)
    mine = ours(gts, preds)
    worst = 0.0
    for key in sorted(reference):
        difference = abs(reference[key] - mine[key])
        worst = max(worst, difference)
        print(f"{key:10s} torchmetrics {reference[key]:.6f}  ours {mine[key]:.6f}")
    print(f"{args.cases} cases, largest difference {worst:.2e}")
    if args.make_fixture:
        np.savez_compressed(
            args.make_fixture,
            gts=gts.astype(np.int16),
            preds=preds.astype(np.int16),
            keys=np.asarray(sorted(reference)),
            values=np.asarray([reference[k] for k in sorted(reference)], np.float64),
        )
        print(f"wrote {args.make_fixture}")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
