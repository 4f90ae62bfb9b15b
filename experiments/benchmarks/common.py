"""Shared pieces of the benchmark scripts: machine description, interleaved timing, ceilings,
and appending a table to RESULTS.md.

Comparisons are timed interleaved (ours, theirs, ours, theirs, ...) in one process, because these
machines are noisy and a ratio measured side by side is the only figure worth quoting.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(extra: dict[str, str] | None = None) -> str:
    import jax

    parts = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }
    parts.update(extra or {})
    return ", ".join(f"{k} {v}" for k, v in parts.items())


def time_interleaved(
    candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each zero-argument callable, run in turn round after round.

    Each callable must block until its result is ready (the caller wraps JAX calls in
    ``jax.block_until_ready``).
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_ceilings(rounds: int = 5) -> dict[str, float]:
    """This machine's own ceilings through XLA: float32 matmul FLOP/s and read bandwidth."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    big = jnp.ones((64 * 1024 * 1024,), jnp.float32)  # 256 MiB
    # A reduction reads every byte once and writes nothing: a fresh output buffer would time
    # the kernel's page faults instead of memory.
    total = jax.jit(jnp.sum)
    t = time_interleaved(
        {
            "matmul": lambda: jax.block_until_ready(matmul(a)),
            "stream": lambda: jax.block_until_ready(total(big)),
        },
        rounds,
    )
    return {
        "matmul_flops": 2 * n**3 / t["matmul"],
        "stream_bytes": big.size * 4 / t["stream"],
    }


def append_results(title: str, header: str, table: str, notes: str = "") -> None:
    """Append one dated section to RESULTS.md (created with a heading when missing)."""
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nEvery section is appended by a script in this folder; the "
            "command that produced it is in its heading.\n"
        )
    with RESULTS.open("a") as f:
        f.write(f"\n## {title}\n\n{header}\n\n{table}\n")
        if notes:
            f.write(f"\n{notes}\n")


def step_run_title(title: str, script: str, args) -> str:
    """A RESULTS.md section title that names the command of a training-step benchmark (args:
    experiment, batch, overrides): 'title (`python experiments/benchmarks/<script> --experiment
    E --batch B overrides...`)'."""
    command = ["python", f"experiments/benchmarks/{script}", "--experiment", args.experiment]
    command += ["--batch", str(args.batch), *args.overrides]
    return f"{title} (`{' '.join(command)}`)"


def step_run_line(args) -> str:
    """The start of a training-step benchmark's section header: the machine, then the
    experiment with its overrides and the batch."""
    return (
        f"{machine_line()}; experiments/{args.experiment} {' '.join(args.overrides)}, "
        f"batch {args.batch}"
    )


def markdown_table(rows: list[list[str]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
