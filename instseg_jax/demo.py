"""`make demo`: train Mask R-CNN on the real nuclei set, evaluate it, draw overlays.

1. Prepare data/nuclei from ../shared/data/dsb2018_nuclei (or --src STAGE1_TRAIN) when missing.
   With no nuclei source anywhere, say how to get one and use seeded synthetic scenes instead.
2. Train experiments/maskrcnn_nuclei.py:demo (400 steps, about 10 minutes on 2 CPU cores) in
   demo_out/run (a second `make demo` resumes or reuses that run).
3. Evaluate on the val split with pycocotools (bbox and segm tables).
4. Write overlay PNGs of a few val images to demo_out/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NUCLEI = REPO / "data" / "nuclei"


def prepare_nuclei(src: str | None) -> bool:
    """True when data/nuclei is ready (prepared now or before)."""
    if (NUCLEI / "annotations" / "val.json").exists():
        return True
    spec = importlib.util.spec_from_file_location(
        "prepare_nuclei", REPO / "data" / "prepare_nuclei.py"
    )
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    source = Path(src) if src else prepare.DEFAULT_SRC
    if not source.is_dir():
        print(
            f"No nuclei source at {source}. Download stage1_train of the 2018 Data Science "
            "Bowl (BBBC038: https://bbbc.broadinstitute.org/BBBC038), unzip it and run\n"
            "  make demo SRC=PATH/TO/stage1_train\n"
            "Running the same demo on seeded synthetic scenes instead."
        )
        return False
    print(f"preparing {NUCLEI} from {source}")
    prepare.convert(source, NUCLEI)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train, evaluate and draw Mask R-CNN.")
    parser.add_argument("--src", default=None, help="a stage1_train folder (optional)")
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic run (tests)")
    parser.add_argument("--overlays", type=int, default=6)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from instseg_jax import config as config_lib
    from instseg_jax import evaluate, predict
    from instseg_jax import train as train_lib
    from instseg_jax import workdir as workdir_lib
    from instseg_jax.input.synthetic import SyntheticSource, write_coco

    out = Path(args.out)
    real = not args.smoke and prepare_nuclei(args.src)
    experiment = str(REPO / "experiments" / "maskrcnn_nuclei.py")
    if real:
        config = config_lib.load(
            f"{experiment}:demo",
            [
                f"--config.input.train_split.annotations={NUCLEI / 'annotations' / 'train.json'}",
                f"--config.input.train_split.images={NUCLEI / 'images'}",
                f"--config.input.eval_split.annotations={NUCLEI / 'annotations' / 'val.json'}",
                f"--config.input.eval_split.images={NUCLEI / 'images'}",
            ],
        )
        val_images = NUCLEI / "images"
        names = [
            im["file_name"]
            for im in json.loads((NUCLEI / "annotations" / "val.json").read_text())["images"]
        ]
    else:
        annotations, val_images = write_coco(
            SyntheticSource(16, (112, 128), seed=100), out / "synthetic", "val"
        )
        overrides = [
            f"--config.input.eval_split.annotations={annotations}",
            f"--config.input.eval_split.images={val_images}",
            "--config.input.eval_source=coco",
        ]
        if args.smoke:
            overrides += ["--config.schedule.total_steps=4", "--config.eval.global_batch=4"]
        config = config_lib.load(
            f"{experiment}:smoke" if args.smoke else f"{experiment}:demo",
            overrides if args.smoke else overrides + ["--config.input.source=synthetic"],
        )
        names = sorted(p.name for p in Path(val_images).iterdir())
    workdir = out / "run"
    print(f"training {config.schedule.total_steps} steps -> {workdir}")
    train_lib.train(config, workdir)
    config, variables, step = workdir_lib.restore_variables(workdir)
    print(f"evaluating step {step} on the val split")
    report = evaluate.evaluate_model(config, variables, workdir, step)
    files = [Path(val_images) / n for n in names[: args.overlays]]
    _, class_names = workdir_lib.read_class_map(workdir, config)
    predict.predict(config, variables, files, out, 0.5, class_names)
    segm = report.get("segm", {})
    print(f"segm AP {segm.get('AP', 0):.3f}, AP50 {segm.get('AP50', 0):.3f}; overlays in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
