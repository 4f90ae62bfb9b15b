"""The `instseg-jax` command. Subcommands arrive with the parts they drive."""

from __future__ import annotations

import argparse
import logging
import sys

OVERRIDES_HELP = """\
Any config field can be overridden after the options: --config.FIELD=VALUE, e.g.
  --config.input.train_split.annotations=DATA/annotations.json
  --config.input.train_split.images=DATA/images --config.optim.lr=0.005
  --config.input.canvas_hw='(512, 512)'
Fields and defaults: instseg_jax/config.py (input, optim, schedule, eval, ...), the method's
Config dataclass (model.*, e.g. instseg_jax/methods/mask_rcnn.py) and the experiment file;
a run's workdir/config.json lists every field it used."""

WORKDIR_OVERRIDES_HELP = """\
--config.FIELD=VALUE after the options overrides the workdir's config.json for this run only,
e.g. --config.model.score_threshold=0.01 --config.eval.max_detections=300
--config.input.eval_split.annotations=OTHER.json --config.input.eval_split.images=FOLDER"""


def config_fields_help(width: int = 100) -> str:
    """Every method-independent config field with its default (config.base(), the one list of
    them), a few lines per section, for `train --help`."""
    import textwrap

    import ml_collections

    from instseg_jax import config as config_lib

    def fields(section, prefix=""):
        for key, value in section.items():
            if isinstance(value, ml_collections.ConfigDict):
                yield from fields(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={value!r}".replace(" ", "")

    base = config_lib.base()
    sections = {"": [k for k, v in base.items() if not isinstance(v, ml_collections.ConfigDict)]}
    sections.update({f"{k}.": [k] for k, v in base.items() if k not in sections[""]})
    lines = [
        "Config fields and their defaults (the experiment file sets its own; a run's",
        "workdir/config.json lists every value it used):",
    ]
    for name, keys in sections.items():
        if name:  # a section: its fields, nested ones by their dotted path
            items = list(fields(base[keys[0]]))
        else:  # the top-level fields
            items = [f"{k}={base[k]!r}" for k in keys]
        lines += textwrap.wrap(
            "  ".join(items),
            width,
            initial_indent=f"  {name:<12}",
            subsequent_indent=" " * 14,
            break_on_hyphens=False,
        )
    lines.append(
        f"  {'model.':<12}the fields of the method's Config dataclass, with their defaults "
        "(methods/*.py)"
    )
    return "\n".join(lines)


# Loggers of the libraries under the CLI: their INFO lines (orbax's checkpoint chatter, absl's)
# only with --verbose.
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "grain", "tensorflow_datasets")


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each message (tests and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(verbose: bool) -> None:
    """The package's INFO messages on stderr (absl, imported by orbax, sets the root logger to
    WARNING, so a root-level basicConfig would show nothing); other libraries at WARNING
    unless verbose."""
    package = logging.getLogger("instseg_jax")
    if not any(getattr(h, "_instseg_cli", False) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._instseg_cli = True
        package.addHandler(handler)
    package.setLevel(logging.DEBUG if verbose else logging.INFO)
    package.propagate = False
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if r.startswith("--config.")]
    unknown = [r for r in rest if not r.startswith("--config.")]
    overridable = ("train", "compile", "eval", "predict", "export")
    if unknown or (overrides and args.command not in overridable):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    configure_logging(args.verbose)
    from instseg_jax.config import UserError
    from instseg_jax.input.images import DataError

    try:
        return _run(args)
    except (UserError, DataError) as error:
        # A user's mistake (a config field, a missing or malformed file): one line, status 2.
        print(f"instseg-jax {args.command}: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per job; `--config.*` overrides are parsed apart."""
    parser = argparse.ArgumentParser(prog="instseg-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", help="also show the libraries' INFO messages"
    )
    # Every command that compiles a model shares JAX's persistent compilation cache.
    compiles = argparse.ArgumentParser(add_help=False, parents=[common])
    compiles.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help="JAX's persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR, else "
        "~/.cache/instseg_jax/jax): a second run of a config skips most compilation",
    )
    compiles.add_argument(
        "--no-compile-cache", action="store_true", help="compile everything afresh"
    )
    _add_demo(commands, compiles)
    _add_train(commands, compiles)
    _add_eval(commands, compiles)
    _add_predict(commands, compiles)
    _add_import_weights(commands, common)
    _add_compile(commands, common)
    _add_export(commands, common)
    commands.add_parser("version", parents=[common], help="print the package and JAX versions")
    return parser


_DEFAULTS = argparse.ArgumentDefaultsHelpFormatter


class _RAW_DEFAULTS(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the options' help, the epilog's lines as written."""


def _add_demo(commands, parent) -> None:
    demo = commands.add_parser(
        "demo",
        parents=[parent],
        formatter_class=_DEFAULTS,
        help="train, evaluate and draw Mask R-CNN on nuclei",
    )
    demo.add_argument("--src", default=None, help="a stage1_train folder (optional)")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--ops", action="store_true", help="only the ops showcase (seconds)")


def _add_train(commands, parent) -> None:
    train = commands.add_parser(
        "train",
        parents=[parent],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a model from an experiment config",
        description="Train a model from an experiment config.",
        epilog=OVERRIDES_HELP + "\n\n" + config_fields_help(),
    )
    train.add_argument(
        "--config",
        required=True,
        help="experiments/<name>.py[:arg], or a workdir's config.json (or the workdir) to train "
        "as that run did",
    )
    train.add_argument("--workdir", required=True, help="checkpoints, metrics, config.json")
    train.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop early at this step (default: schedule.total_steps)",
    )


def _add_eval(commands, parent) -> None:
    evaluate = commands.add_parser(
        "eval",
        parents=[parent],
        formatter_class=_RAW_DEFAULTS,
        help="COCO bbox/segm/keypoint evaluation (hotcoco; pycocotools with --evaluator)",
        epilog=WORKDIR_OVERRIDES_HELP,
    )
    evaluate.add_argument("--workdir", help="a training workdir to evaluate")
    evaluate.add_argument("--checkpoint", type=int, default=None, help="step (default latest)")
    evaluate.add_argument("--results", help="a COCO results JSON to evaluate on its own")
    evaluate.add_argument("--annotations", help="the ground-truth COCO JSON for --results")
    evaluate.add_argument(
        "--out",
        help="--results: also write the report as JSON here (--workdir writes eval_<step>.json "
        "into the workdir)",
    )
    evaluate.add_argument(
        "--max-dets",
        type=int,
        default=None,
        help="COCOeval's largest maxDets (default: the config's eval.max_detections, else 100); "
        "above 100, AP and AR at it are reported beside COCO's maxDets=100 table",
    )
    evaluate.add_argument(
        "--evaluator",
        choices=("hotcoco", "pycocotools"),  # config.COCO_EVALUATORS (the parser imports none)
        default=None,
        help="whose COCOeval (default: the config's eval.evaluator, else hotcoco, which gives "
        "pycocotools' stats bit for bit, faster)",
    )
    evaluate.add_argument(
        "--raw-weights",
        action="store_true",
        help="a run with optim.ema_decay: evaluate its raw weights, not their EMA (writes "
        "eval_<step>_raw.json)",
    )


def _add_predict(commands, parent) -> None:
    predict = commands.add_parser(
        "predict",
        parents=[parent],
        formatter_class=_RAW_DEFAULTS,
        help="detections and overlay PNGs for images",
        epilog=WORKDIR_OVERRIDES_HELP,
    )
    predict.add_argument("--workdir", help="a training workdir (latest checkpoint)")
    predict.add_argument(
        "--checkpoint", dest="checkpoint_path", help="a checkpoint folder: DIR/checkpoints/STEP"
    )
    predict.add_argument("--images", nargs="+", required=True, help="image files or folders")
    predict.add_argument("--out", required=True, help="folder for <name>.json and <name>.png")
    predict.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="keep detections >= this (below the model's model.score_threshold, that is lowered "
        "to it)",
    )


def _add_import_weights(commands, parent) -> None:
    importer = commands.add_parser(
        "import-weights",
        parents=[parent],
        formatter_class=_DEFAULTS,
        help="convert another library's Mask R-CNN, Keypoint R-CNN, FCOS or Mask2Former weights "
        "to a workdir",
    )
    importer.add_argument(
        "library", choices=["torchvision", "huggingface"], help="where the weights come from"
    )
    importer.add_argument(
        "file",
        help="torchvision: maskrcnn_resnet50_fpn, keypointrcnn_resnet50_fpn or fcos_resnet50_fpn "
        "state_dict (told apart by its keys), .pth (needs torch) or .npz; huggingface: the "
        "save_pretrained directory of a Mask2FormerForUniversalSegmentation with a ResNet "
        "backbone",
    )
    importer.add_argument("--out", required=True, help="workdir for config.json + checkpoint")
    importer.add_argument(
        "--canvas",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="static input canvas (multiples of 32; torchvision's default 1344 x 1344 fits "
        "800x1333 either way; huggingface: default 1024 x 1024)",
    )


def _add_compile(commands, parent) -> None:
    compiler = commands.add_parser(
        "compile",
        parents=[parent],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="compile an experiment's training step for a TPU slice (or N CPU devices) without "
        "one: memory, FLOPs, collectives per chip",
        description="Ahead-of-time compile an experiment's training step (and evaluation step) "
        "for a target's devices; nothing runs. TPU targets need libtpu: `make tpu-env`, then "
        ".venv-tpu/bin/instseg-jax compile ... (instseg_jax/aot.py).",
        epilog=OVERRIDES_HELP,
    )
    compiler.add_argument("--config", required=True, help="experiments/<name>.py[:arg]")
    compiler.add_argument(
        "--target",
        required=True,
        help="a TPU slice CHIP:SHAPE (v5e:2x2, v5e:4x4, v4:2x2x1, v5p:2x2x1, v6e:2x2), h100:N "
        "(N H100s, deviceless) or cpu:N (N host CPU devices)",
    )
    compiler.add_argument(
        "--per-chip-batch", type=int, required=True, help="images per chip (global = x chips)"
    )
    compiler.add_argument(
        "--eval", action="store_true", help="also compile the evaluation step (test-time shapes)"
    )
    compiler.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the heads (default: input.category_ids, the synthetic scenes' or "
        "COCO's 80)",
    )
    compiler.add_argument("--out", default=None, help="write the report as JSON here")


def _add_export(commands, parent) -> None:
    exporter = commands.add_parser(
        "export",
        parents=[parent],
        formatter_class=_RAW_DEFAULTS,
        help="write a workdir's inference program as serialized StableHLO (jax.export) with a "
        "JSON of its inputs, outputs and classes",
        epilog=WORKDIR_OVERRIDES_HELP,
    )
    exporter.add_argument("--workdir", required=True, help="a training or imported workdir")
    exporter.add_argument(
        "--out", required=True, help="the program file; its description goes to OUT.json"
    )
    exporter.add_argument("--batch", type=int, default=1, help="canvases per call (static)")
    exporter.add_argument("--checkpoint", type=int, default=None, help="step (default latest)")
    exporter.add_argument(
        "--platforms",
        default="cpu",
        help="comma-separated platforms the one file runs on: cpu, cuda, rocm, tpu (lowered "
        "here without those devices)",
    )


def _run(args) -> int:
    if not getattr(args, "no_compile_cache", True):
        from instseg_jax import compilation

        compilation.enable_persistent_cache(args.compile_cache)
    if args.command == "demo":
        if args.ops:
            from instseg_jax import ops_showcase

            ops_showcase.main(["--out", args.out])
        else:
            from instseg_jax import demo as demo_module

            return demo_module.main(["--out", args.out] + (["--src", args.src] if args.src else []))
    elif args.command == "train":
        from instseg_jax import train as train_module

        return train_module.main(args)
    elif args.command == "eval":
        from instseg_jax import evaluate as evaluate_module

        return evaluate_module.main(args)
    elif args.command == "predict":
        from instseg_jax import predict as predict_module

        return predict_module.main(args)
    elif args.command == "import-weights":
        from instseg_jax.weights import importer

        try:
            out = importer.import_weights(args.library, args.file, args.out, args.canvas)
        except importer.IMPORT_ERRORS as error:
            print(f"instseg-jax import-weights: {error}", file=sys.stderr)
            return 2
        print(f"wrote {out}/config.json and {out}/checkpoints/0 (from {args.file})")
        print(f"next: instseg-jax eval --workdir {out}  |  instseg-jax predict --workdir {out} ...")
    elif args.command == "compile":
        from instseg_jax import aot

        aot.prepare_host(args.target)  # before JAX starts its backends
        return aot.main(args)
    elif args.command == "export":
        from instseg_jax import export

        return export.main(args)
    elif args.command == "version":
        import jax

        from instseg_jax import __version__

        print(f"instseg_jax {__version__}, jax {jax.__version__} ({jax.default_backend()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
