"""Checks every method runs the same way (DESIGN "How a method earns its row"): over-fitting
(step 3: an experiment's smoke model trained on 4 fixed synthetic scenes through the CLI and
evaluated on the same scenes, whose exact masks are the ground truth) and the COCO
experiment's step at its real input size (step 4)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from instseg_jax import cli

# The scenes drawn at 4x their size on a 512 canvas, for methods whose masks live on a stride-4
# grid of the canvas: at 1x the smallest shapes (8 px) are 2 x 2 cells, and a mask edge can sit
# up to 2 px from the true one, which caps IoU near 0.8 whatever the training (measured: SOLOv2
# segm AP 0.66 at 1x, 0.82 at 2x with AP75 = 1.0).
CANVAS_4X = [
    "--config.input.canvas_hw=(512, 512)",
    "--config.input.short_side=(448,)",
    "--config.input.max_long_side=512",
    "--config.input.test_short_side=448",
    "--config.input.test_max_long_side=512",
]


def overfit_report(experiment: str, workdir, steps: int, overrides=()) -> dict:
    """COCO report {"bbox": ..., "segm": ...} of `experiment`:smoke trained `steps` steps on
    4 scenes (no flips, one resize, constant learning rate after warmup)."""
    fixed = [
        "--config.input.synthetic_length=4",
        "--config.input.global_batch=4",
        "--config.input.hflip=0.0",
        f"--config.schedule.total_steps={steps}",
        "--config.schedule.steps=()",
        f"--config.checkpoint.every_steps={steps}",
        "--config.log_every=50",
        "--config.eval.global_batch=4",
    ]
    argv = ["train", "--config", f"{experiment}:smoke", "--workdir", str(workdir)]
    assert cli.main([*argv, *fixed, *overrides]) == 0
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    return json.loads((workdir / f"eval_{steps}.json").read_text())


def coco_step_result(method: str) -> dict:
    """experiments/benchmarks/coco_step.py's one-round figures of a method's COCO experiment."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"))
    import coco_step

    return coco_step.run_one(method, rounds=1)
