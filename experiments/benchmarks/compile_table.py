"""One markdown table of `instseg-jax compile --out` reports (RESULTS.md's accelerator tables).

    python experiments/benchmarks/compile_table.py REPORT.json ...

A row per report's training step: target, images per chip, dtype, compile seconds, memory per
chip against the chip, XLA's GFLOP per chip, collectives by kind with their bytes, the
precision the all-reduces carry, the parameters' bytes, and the FLOP-bound upper bound of
images per second per chip (the chip's published bfloat16 peak over XLA's FLOPs per image:
a bound, never a measurement). Reports written before the tool gave the precision or the
bound show "-" there, or the bound computed by the same rule.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from instseg_jax.aot import flop_bound

GiB = 1 << 30


def row(report: dict) -> str:
    train = report["programs"]["train_step"]
    if not train.get("fits", True):
        return (
            f"| `{report['config']}` | {report['target']} | {report['per_chip_batch']} | "
            f"{report['compute_dtype']} | {train['compile_seconds']:.0f} | does not fit: "
            f"{train['out_of_memory']} | - | - | - | - | {report['parameter_bytes'] / 1e6:.1f} | - |"
        )
    memory = train["memory_bytes"]
    hbm = train["chip_memory_bytes"]
    held = max(memory["peak"], memory["total"])
    share = f"{held / hbm:.0%}" if hbm else "-"
    kinds = ", ".join(
        f"{k} {v['count']} ({v['bytes'] / 1e6:.2f} MB)"
        for k, v in train["collectives_by_kind"].items()
    )
    by_type = train.get("all_reduce_bytes_by_type")
    precision = ", ".join(f"{t} {b / 1e6:.1f} MB" for t, b in by_type.items()) if by_type else "-"
    bound = report.get("flop_bound_images_per_second_per_chip") or flop_bound(
        report["chip"], report["per_chip_batch"], train.get("flops")
    )
    gflop = f"{train['flops'] / 1e9:.1f}" if train.get("flops") else "-"
    return (
        f"| `{report['config']}` | {report['target']} | {report['per_chip_batch']} | "
        f"{report['compute_dtype']} | {train['compile_seconds']:.0f} | "
        f"{memory['peak'] / GiB:.2f} / {memory['total'] / GiB:.2f} | {share} | {gflop} | "
        f"{kinds or 'none'} | {precision} | {report['parameter_bytes'] / 1e6:.1f} | "
        f"{f'{bound:.0f}' if bound else '-'} |"
    )


def main(paths: list[str]) -> None:
    print(
        "| config | target | images per chip | dtype | compile s | peak / total GiB per chip "
        "| of chip | GFLOP per chip | collectives (count, bytes per step) | all-reduced as "
        "| parameter MB | FLOP-bound img/s/chip (upper bound) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        print(row(json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
