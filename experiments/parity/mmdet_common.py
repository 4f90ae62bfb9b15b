"""What the mmdetection loss parity scripts (solov2_loss.py, yolact_loss.py, condinst_loss.py,
pointrend_loss.py; `make peer-mmdet`'s environment) share: the level layout conversion between
our flat head outputs and mmdetection's per-level maps, the tolerance bookkeeping, the closing
summary line, the
fixture writing and the verdict every script ends with.

Import it first, from the scripts' folder (they put it on sys.path): it imports mmdet_shim,
which must stub mmcv.ops before anything imports mmdet, and puts the repository on sys.path for
instseg_jax.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mmdet_shim  # noqa: F401  (stubs mmcv.ops: imported for that effect)
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SHARED_NUCLEI = ROOT.parent / "shared" / "data" / "dsb2018_nuclei" / "stage1_train"


def split_levels(flat, shapes, anchors: int = 1) -> list[np.ndarray]:
    """[B, T, K] (ours: the levels' cells in turn, row-major, `anchors` rows a cell) -> per level
    [B, anchors K, h, w] (mmdetection's), for levels of `shapes` (h, w)."""
    out, offset = [], 0
    for h, w in shapes:
        n = h * w * anchors
        level = flat[:, offset : offset + n].reshape(flat.shape[0], h, w, -1)
        out.append(np.ascontiguousarray(level.transpose(0, 3, 1, 2)))
        offset += n
    return out


def join_levels(levels, anchors: int = 1) -> np.ndarray:
    """split_levels run backwards: per level [B, anchors K, h, w] -> [B, T, K]."""
    return np.concatenate(
        [
            lv.transpose(0, 2, 3, 1).reshape(lv.shape[0], -1, lv.shape[1] // anchors)
            for lv in levels
        ],
        1,
    )


def check_tolerances(label: str, checks: dict, tolerances: dict, worst: dict, failures: list):
    """For each kind of figure in checks ({kind: relative differences}): raises worst[kind] to
    the largest (from 0 where worst has none yet), and lists a failure "label kind value"
    where that exceeds tolerances[kind]."""
    for kind, values in checks.items():
        worst[kind] = max(worst.get(kind, 0.0), *values)
        if max(values) > tolerances[kind]:
            failures.append(f"{label} {kind} {max(values):.2e}")


def mask_slots(positives, draws, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(index int32[B, slots], valid bool[B, slots]): the positives each image trains its masks
    on, as mmdetection picks them: all of an image's positives (int[P], in its order) where
    they fit, else the first `slots` of a recorded torch.randperm draw over them; `draws` holds
    one draw per such image, in image order, and every draw must be used."""
    index = np.zeros((len(positives), slots), np.int32)
    valid = np.zeros((len(positives), slots), bool)
    draws = iter(draws)
    for i, pos in enumerate(positives):
        chosen = pos
        if len(pos) > slots:
            chosen = pos[next(draws).numpy()[:slots]]
        index[i, : len(chosen)] = chosen
        valid[i, : len(chosen)] = True
    assert next(draws, None) is None, "a randperm draw was not accounted for"
    return index, valid


def print_summary(worst, tolerances, head_worst, head_tolerances, start: float) -> None:
    """The closing JSON line: the worst relative differences of the loss parity and of the
    head-parameter parity against their tolerances, and the run's seconds since `start`."""
    summary = {
        "worst_relative": worst,
        "tolerances": tolerances,
        "head_worst_relative": head_worst,
        "head_tolerances": head_tolerances,
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(summary))


def write_fixture(path, meta: dict, arrays: dict) -> None:
    """Writes the CI test's npz (config: meta as JSON, and the arrays) where --make-fixture
    named a path; nothing without one."""
    if path:
        np.savez_compressed(path, config=json.dumps(meta), **arrays)
        print(f"wrote {path}")


def verdict(failures: list, ok: str) -> None:
    """The last line: exit status 1 with every failure listed, else `OK: ok`."""
    if failures:
        print("FAIL: " + "; ".join(failures))
        sys.exit(1)
    print(f"OK: {ok}")
