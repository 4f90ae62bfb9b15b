"""Experiment configs: load `experiments/x.py[:arg]`, apply `--config.a.b=value` overrides,
validate, and save the result into the workdir."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import ml_collections

REQUIRED_SECTIONS = ("input", "model", "optim", "schedule", "eval", "mesh", "method", "seed")


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Config of ``path/to/experiment.py[:arg]`` with dotted overrides ``a.b=value`` applied.

    The experiment module defines get_config(arg) -> ConfigDict. Overrides must name existing
    fields; values are parsed as Python literals and must keep the field's type.
    """
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} not found (expected experiments/<name>.py)")
    module_spec = importlib.util.spec_from_file_location(f"experiment_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{file} has no get_config(arg) function")
    config = module.get_config(arg or None)
    for override in overrides:
        apply_override(config, override)
    validate(config, str(file))
    return config


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Apply ``a.b.c=value`` (a leading ``config.`` or ``--config.`` is accepted)."""
    key, sep, text = override.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
        raise ValueError(f"override {override!r} must look like a.b=value")
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if part not in node:
            raise KeyError(f"override {override!r}: no section {part!r} in the config")
        node = node[part]
    field = parts[-1]
    if field not in node:
        raise KeyError(
            f"override {override!r}: no field {field!r}; fields here: {sorted(node.keys())}"
        )
    value = parse_value(text)
    current = node[field]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and value is not None and type(current) is not type(value):
        raise TypeError(
            f"override {override!r}: {key} is {type(current).__name__}, got {type(value).__name__}"
        )
    with config.unlocked() if config.is_locked else _null():
        node[field] = value


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def validate(config: ml_collections.ConfigDict, source: str = "config") -> None:
    missing = [s for s in REQUIRED_SECTIONS if s not in config]
    if missing:
        raise ValueError(f"{source}: missing config sections {missing}")
    if config.input.global_batch <= 0:
        raise ValueError(f"{source}: input.global_batch must be > 0")


def save(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    path = Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list) + "\n")
    return path


def mask_rcnn_base() -> ml_collections.ConfigDict:
    """detectron2's Mask R-CNN R50-FPN 1x defaults; experiments start from here."""
    c = ml_collections.ConfigDict()
    c.method = "mask_rcnn"
    c.seed = 0
    c.log_every = 20
    c.max_nonfinite_in_a_row = 5

    c.input = ml_collections.ConfigDict()
    c.input.source = "coco"  # "coco" or "synthetic"
    c.input.eval_source = ""  # the evaluation split's kind when it differs from `source`
    c.input.train_split = ml_collections.ConfigDict({"annotations": "", "images": ""})
    c.input.eval_split = ml_collections.ConfigDict({"annotations": "", "images": ""})
    c.input.synthetic_length = 64
    c.input.synthetic_hw = (128, 128)
    c.input.synthetic_seed = 0
    c.input.canvas_hw = (1344, 1344)
    c.input.global_batch = 16
    c.input.num_workers = 2
    c.input.max_instances = 100
    c.input.mask_size = 112
    c.input.resize = "short_side"
    c.input.short_side = (640, 672, 704, 736, 768, 800)
    c.input.max_long_side = 1333
    c.input.lsj_scale = (0.1, 2.0)
    c.input.hflip = 0.5
    c.input.resize_rule = "detectron2"  # or "torchvision" (see input/transforms.py)
    c.input.pad_value = (0, 0, 0)
    # An explicit class map (class index i <-> category_ids[i], named class_names[i]) for
    # imported models whose classes are not the dataset's; empty: the dataset's categories.
    c.input.category_ids = ()
    c.input.class_names = ()

    c.model = ml_collections.ConfigDict()
    c.model.mask_on = True
    c.model.depth = 50
    c.model.width = 64
    c.model.norm = "frozen_bn"
    c.model.freeze_at = 2
    c.model.fpn_channels = 256
    c.model.anchor_sizes = ((32,), (64,), (128,), (256,), (512,))
    c.model.aspect_ratios = (0.5, 1.0, 2.0)
    c.model.rpn_pre_nms_topk_train = 2000
    c.model.rpn_pre_nms_topk_test = 1000
    c.model.rpn_post_nms_topk_train = 1000
    c.model.rpn_post_nms_topk_test = 1000
    c.model.rpn_nms_threshold = 0.7
    c.model.rpn_batch_per_image = 256
    c.model.rpn_positive_fraction = 0.5
    c.model.roi_batch_per_image = 512
    c.model.roi_positive_fraction = 0.25
    c.model.roi_iou_threshold = 0.5
    c.model.box_pool_size = 7
    c.model.box_fc_dim = 1024
    c.model.mask_pool_size = 14
    c.model.mask_fg_per_image = 128
    c.model.mask_head_convs = 4
    c.model.sampling_ratio = 2
    c.model.aligned = True
    c.model.score_threshold = 0.05
    c.model.test_pre_nms_topk = 1000
    c.model.test_nms_threshold = 0.5
    c.model.detections_per_image = 100
    c.model.compute_dtype = "float32"
    # detectron2's conventions; instseg_jax.weights.torchvision.apply_preset switches them.
    c.model.stage_blocks = ()
    c.model.anchor_style = "detectron2"
    c.model.level_mapper = "detectron2"
    c.model.rpn_min_size = 0.0
    c.model.test_min_box_size = 0.0
    c.model.box_rescale = "scale"
    c.model.mask_paste = "detectron2"

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"
    c.optim.lr = 0.02
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 0.0

    c.schedule = ml_collections.ConfigDict()
    c.schedule.total_steps = 90_000
    c.schedule.warmup_steps = 1000
    c.schedule.warmup_factor = 0.001
    c.schedule.decay = "step"
    c.schedule.steps = (60_000, 80_000)
    c.schedule.gamma = 0.1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 5000
    c.checkpoint.keep = 3
    c.checkpoint.use_async = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0
    c.eval.global_batch = 8

    c.mesh = ml_collections.ConfigDict()
    c.mesh.distributed = False
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a Mask R-CNN config to seconds on a CPU: synthetic scenes, ResNet-18 of width 16,
    a 128x128 canvas, few anchors and RoIs."""
    c.input.source = "synthetic"
    c.input.synthetic_length = 16
    c.input.synthetic_hw = (112, 128)
    c.input.canvas_hw = (128, 128)
    c.input.global_batch = 2
    c.input.num_workers = 0
    c.input.max_instances = 8
    c.input.mask_size = 28
    c.input.short_side = (112,)
    c.input.max_long_side = 128
    c.model.depth = 18
    c.model.width = 16
    c.model.norm = "group_norm"
    c.model.freeze_at = 1
    c.model.fpn_channels = 32
    c.model.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
    c.model.rpn_pre_nms_topk_train = 200
    c.model.rpn_pre_nms_topk_test = 100
    c.model.rpn_post_nms_topk_train = 64
    c.model.rpn_post_nms_topk_test = 50
    c.model.rpn_batch_per_image = 64
    c.model.roi_batch_per_image = 32
    c.model.box_fc_dim = 64
    c.model.mask_fg_per_image = 8
    c.model.mask_head_convs = 1
    c.optim.lr = 0.01
    c.optim.clip_norm = 0.0
    c.schedule.total_steps = 100
    c.schedule.warmup_steps = 10
    c.schedule.steps = (80,)
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 2
    c.log_every = 1
    return c


def finish(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """An experiment's last step: apply its argument (only `smoke` so far) and lock."""
    if arg == "smoke":
        c = smoke(c)
    elif arg:
        raise ValueError(f"unknown experiment argument {arg!r}; use 'smoke' or nothing")
    c.lock()
    return c
