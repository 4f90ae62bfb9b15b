"""Training metrics: a JSON-lines file and TensorBoard event files, no TensorFlow needed.

The event files are written by tensorboardX, which carries its own copy of TensorBoard's
protos and the TFRecord framing.
"""

from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter

# tensorboardX writes from a background thread and flushes at most this often, so TensorBoard
# sees a running job within seconds without a disk flush per metric; close() flushes the rest.
FLUSH_SECONDS = 5


class MetricsWriter:
    """Appends {step, metrics...} to workdir/metrics.jsonl and to workdir/tensorboard/.

    Each metric becomes one TensorBoard scalar series under its own name. Only process 0 writes
    (``enabled``); other processes get a writer that does nothing.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.workdir / "metrics.jsonl").open("a")
        self.tensorboard = SummaryWriter(
            str(self.workdir / "tensorboard"), flush_secs=FLUSH_SECONDS
        )

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self.jsonl.flush()
        for name, value in values.items():
            self.tensorboard.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
