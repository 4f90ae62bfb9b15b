"""Experiment configs: load `experiments/x.py[:arg]`, apply `--config.a.b=value` overrides,
validate, and save the result into the workdir."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import ml_collections

REQUIRED_SECTIONS = ("input", "model", "optim", "schedule", "eval", "mesh", "method", "seed")


class UserError(Exception):
    """A mistake in what the user asked for (a config field, a missing file): the CLI prints
    the message as one line and exits with status 2. Bugs keep their tracebacks."""


class ConfigKeyError(UserError, KeyError):
    __str__ = Exception.__str__  # KeyError would print the message in quotes


class ConfigTypeError(UserError, TypeError):
    pass


class ConfigValueError(UserError, ValueError):
    pass


class ConfigFileNotFound(UserError, FileNotFoundError):
    pass


def check_choice(field: str, value, choices: tuple[str, ...]) -> None:
    """Raises ConfigValueError naming the field, the values it takes and the one given, e.g.
    "model.grid_extent must be 'image' or 'canvas', got 'padded'"."""
    if value not in choices:
        quoted = [f"'{choice}'" for choice in choices]
        allowed = f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise ConfigValueError(f"{field} must be {allowed}, got {value!r}")


# COCOeval implementations (eval.evaluator, `eval --evaluator`); the first is the default.
COCO_EVALUATORS = ("hotcoco", "pycocotools")


def load(
    spec: str, overrides: list[str] | tuple[str, ...] = (), complete_record=None
) -> ml_collections.ConfigDict:
    """Config of ``path/to/experiment.py[:arg]`` with dotted overrides ``a.b=value`` applied.

    The experiment module defines get_config(arg) -> ConfigDict. Overrides must name existing
    fields; a string field takes the text as it is, other values are parsed as Python literals
    and must keep the field's type. complete_record(config, path), when given, adds to a
    workdir's config.json the method fields added since it was written, before the overrides
    (workdir.add_new_model_fields: the method table lies above this module).
    """
    # ml_collections' config_flags loads the same "file.py:arg" specs, but only while absl
    # parses the whole command line (ours is argparse), through the deprecated load_module under
    # one shared module name, and it turns a missing file or a ValueError from get_config into
    # a deferred error or a traceback inside the message: the user errors below stay one line.
    path, _, arg = spec.partition(":")
    file = Path(path)
    if file.is_dir() and (file / "config.json").is_file():  # a workdir stands for its record
        file = file / "config.json"
    if not file.is_file():
        raise ConfigFileNotFound(f"config file {file} not found (expected {CONFIG_KINDS})")
    if file.suffix == ".json":
        if arg:
            raise ConfigValueError(f"--config {spec}: a config.json takes no ':{arg}'")
        config = from_record(file, complete_record)
    elif file.suffix == ".py":
        config = _from_experiment(file, arg)
    else:
        raise ConfigValueError(f"--config {file}: expected {CONFIG_KINDS}")
    for override in overrides:
        apply_override(config, override)
    validate(config, str(file))
    return config


# What --config takes, for messages.
CONFIG_KINDS = "experiments/<name>.py[:arg], or a workdir's config.json to train as that run did"


def from_json(path: Path, lock: bool = True) -> ml_collections.ConfigDict:
    """The config of a config.json (a workdir's record of its run, workdir.save_config's), locked
    unless asked otherwise: its lists become tuples again, as the experiment files give them."""
    try:
        document = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ConfigValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(document, dict):
        raise ConfigValueError(f"{path}: not a config (a JSON object of config sections)")
    config = ml_collections.ConfigDict(_lists_as_tuples(document))
    if lock:
        config.lock()
    return config


def from_record(path: Path, complete_record=None, lock: bool = True) -> ml_collections.ConfigDict:
    """The config of a workdir's config.json (from_json) with the fields added since it was
    written: the trainer's model fields here, the method's through complete_record(config, path)
    (workdir.add_new_model_fields; load's docstring). What train, eval and predict all read."""
    config = from_json(path, lock=False)
    _add_new_trainer_fields(config)
    if complete_record is not None:
        complete_record(config, path)
    if lock:
        config.lock()
    return config


def _add_new_trainer_fields(config: ml_collections.ConfigDict) -> None:
    """Give a config.json written before a trainer model field existed (model.init_from) that
    field's default, so that it can be overridden. Only where the model section has the
    trainer's fields at all: a method of one's own may keep them out (its Config rejects them)."""
    model = config.get("model")
    if model is None or "backbone_weights" not in model:
        return
    with config.unlocked():
        for field, default in TRAINER_MODEL_FIELDS.items():
            if field not in model:
                model[field] = default


def _lists_as_tuples(value):
    if isinstance(value, dict):
        return {k: _lists_as_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_as_tuples(v) for v in value)
    return value


def _from_experiment(file: Path, arg: str) -> ml_collections.ConfigDict:
    """get_config(arg) of an experiment file."""
    module_spec = importlib.util.spec_from_file_location(f"experiment_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    # Registered like an import, so dataclasses and pickling inside the file can find it.
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigValueError(f"{file} has no get_config(arg) function")
    return module.get_config(arg or None)


def parse_value(text: str, field_type: type = object):
    """An override's text as the field's value: verbatim for a string field (as ml_collections'
    config_flags does: ``--config.x=2018`` into a string field is "2018"), else a Python
    literal, falling back to the bare text."""
    if field_type is str:
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Apply ``a.b.c=value`` (a leading ``config.`` or ``--config.`` is accepted).

    The assignment and its type check are ConfigDict's own (int widens to float, a list
    becomes a tuple, a None field takes anything); a lock forbids only new fields, so
    existing ones are set as they are. The walk to the field is here so that a wrong name
    is answered with the names that exist, and a bool is refused for a number field, which
    ConfigDict would take (bool is an int subclass).
    """
    key, sep, text = override.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
        raise ConfigValueError(f"override {override!r} must look like a.b=value")
    *sections, field = key.split(".")
    node = config
    for part in sections:
        if not isinstance(node.get(part), ml_collections.ConfigDict):
            raise ConfigKeyError(
                f"override {override!r}: no section {part!r} in the config; sections here: "
                f"{sorted(k for k, v in node.items() if isinstance(v, ml_collections.ConfigDict))}"
            )
        node = node[part]
    if field not in node:
        raise ConfigKeyError(
            f"override {override!r}: no field {field!r}; fields here: {sorted(node.keys())}"
        )
    field_type = node.get_type(field)
    value = parse_value(text, field_type)
    mismatch = ConfigTypeError(
        f"override {override!r}: {key} is {field_type.__name__}, got {type(value).__name__}"
    )
    if isinstance(value, bool) and field_type in (int, float):
        raise mismatch
    try:
        node[field] = value
    except TypeError:
        raise mismatch from None


def validate(config: ml_collections.ConfigDict, source: str = "config") -> None:
    missing = [s for s in REQUIRED_SECTIONS if s not in config]
    if missing:
        raise ConfigValueError(f"{source}: missing config sections {missing}")
    if config.input.global_batch <= 0:
        raise ConfigValueError(f"{source}: input.global_batch must be > 0")
    # Fields whose bad values would otherwise surface as a traceback far from the config.
    if config.eval.get("global_batch", 1) <= 0:
        raise ConfigValueError(f"{source}: eval.global_batch must be > 0")
    ema_decay = config.optim.get("ema_decay", 0.0)
    if not 0.0 <= ema_decay < 1.0 or config.optim.get("ema_warmup_steps", 1) <= 0:
        raise ConfigValueError(
            f"{source}: optim.ema_decay must be in [0, 1) (0 = off; mmdetection's 0.9998) and "
            f"optim.ema_warmup_steps > 0; got {ema_decay!r} and "
            f"{config.optim.get('ema_warmup_steps')!r}"
        )
    if config.get("log_every", 1) <= 0:
        raise ConfigValueError(f"{source}: log_every must be > 0 (steps between logged metrics)")
    if config.eval.get("evaluator", COCO_EVALUATORS[0]) not in COCO_EVALUATORS:
        raise ConfigValueError(
            f"{source}: eval.evaluator must be one of {', '.join(COCO_EVALUATORS)}; got "
            f"{config.eval.evaluator!r}"
        )
    for field in ("canvas_hw", "synthetic_hw"):
        value = config.input.get(field, (1, 1))
        if not (_positive_integers(value) and len(value) == 2):
            raise ConfigValueError(
                f"{source}: input.{field} must be (height, width), two positive integers; got "
                f"{value!r}"
            )
    short_side = config.input.get("short_side", (1,))
    if not (_positive_integers(short_side) and len(short_side) >= 1):
        raise ConfigValueError(
            f"{source}: input.short_side must list one or more positive sizes (training draws "
            f"one per image); got {short_side!r}"
        )
    if not config.method:
        raise ConfigValueError(
            f"{source}: config.method is empty; name a method "
            "(instseg_jax/methods/__init__.py lists them)"
        )


def _positive_integers(value) -> bool:
    return isinstance(value, tuple | list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    )


def base() -> ml_collections.ConfigDict:
    """The method-independent sections with detectron2's COCO defaults. A method's
    base_config() starts from here and adds `method` and `model`."""
    c = ml_collections.ConfigDict()
    c.method = ""
    c.seed = 0
    c.log_every = 20
    c.max_nonfinite_in_a_row = 5

    c.input = ml_collections.ConfigDict()
    c.input.source = "coco"  # "coco", "coco_panoptic" or "synthetic"
    c.input.eval_source = ""  # the evaluation split's kind when it differs from `source`
    # annotations: the COCO instances JSON (coco_panoptic: the panoptic JSON); images: their
    # folder; panoptic: the folder of the panoptic PNGs (coco_panoptic only).
    split = {"annotations": "", "images": "", "panoptic": ""}
    c.input.train_split = ml_collections.ConfigDict(split)
    c.input.eval_split = ml_collections.ConfigDict(split)
    # Above 0: hold out this fraction of train_split's images for evaluation (by image, seeded
    # by config.seed; eval_split is then not used): one annotation file, two disjoint splits.
    c.input.eval_fraction = 0.0
    # Training skips COCO images without non-crowd instances (detectron2's
    # DATALOADER.FILTER_EMPTY_ANNOTATIONS); evaluation keeps every image.
    c.input.filter_empty = True
    # Training with keypoints also skips COCO images with fewer labelled (v > 0) keypoints than
    # this, over all their annotations (detectron2's MODEL.ROI_KEYPOINT_HEAD.
    # MIN_KEYPOINTS_PER_IMAGE, filter_images_with_few_keypoints); 0 keeps them.
    c.input.min_keypoints_per_image = 1
    # Training drops small instances by a reference's rule, each counted (small_instance_dropped
    # in the data report): "coco_seg" is xieenze/PolarMask's coco_seg.py (mask of 15 pixels or
    # fewer, or box under 10 px in both width and height); "none" keeps every instance.
    c.input.instance_filter = "none"
    c.input.synthetic_length = 64
    c.input.synthetic_hw = (128, 128)
    c.input.synthetic_seed = 0
    c.input.canvas_hw = (1344, 1344)
    c.input.global_batch = 16
    c.input.num_workers = 2
    c.input.max_instances = 100
    # Slots for the boxes of instances beyond max_instances: ignore regions (structures.py).
    c.input.max_ignore_regions = 32
    c.input.mask_size = 112  # side of box-crop mask targets (methods whose INPUTS ask for them)
    c.input.resize = "short_side"  # or "lsj" (large-scale jitter) or "stretch"
    # resize "stretch" (training and evaluation): every image resized to exactly this (h, w),
    # aspect ratio not kept (mmdetection's Resize(keep_ratio=False): YOLACT 550 x 550,
    # PolarMask 768 x 1280); short_side and max_long_side are then unused.
    c.input.stretch_hw = (0, 0)
    c.input.short_side = (640, 672, 704, 736, 768, 800)  # training draws one per image
    c.input.max_long_side = 1333
    # Evaluation, periodic evaluation and predict resize to this (detectron2's MIN_SIZE_TEST /
    # MAX_SIZE_TEST), never to the smallest training size.
    c.input.test_short_side = 800
    c.input.test_max_long_side = 1333
    c.input.lsj_scale = (0.1, 2.0)
    c.input.hflip = 0.5
    c.input.resize_rule = "detectron2"  # or "torchvision" (see input/transforms.py)
    c.input.pad_value = (0, 0, 0)
    # Copy-paste (Ghiasi et al. 2021, as torchvision's references with LSJ; input/copy_paste.py):
    # the probability that a training example gets instances of its global-batch neighbour
    # pasted on (0: off); the neighbour's own scale range (of its fit to the image); the pixels
    # an occluded instance must keep (fewer: dropped, counted); grow the pasted region by 2 px
    # (torchvision's blending). Not for methods that train on keypoints or semantic maps.
    c.input.copy_paste = 0.0
    c.input.copy_paste_scale = (0.1, 2.0)
    c.input.copy_paste_min_area = 1
    c.input.copy_paste_blend = True
    # SSD-style augmentation (mmdetection's YOLACT recipe; input/ssd_augment.py), training only:
    # zoom-out by a ratio from expand_ratio ((1, 1): off; YOLACT (1, 4)) with probability
    # expand_prob, filled with the method's pixel mean; the min-IoU random crop's thresholds
    # (empty: off; YOLACT (0.1, 0.3, 0.5, 0.7, 0.9)) and smallest side fraction (0.3);
    # photometric distortion (brightness, contrast, saturation, hue, channel swap).
    c.input.expand_ratio = (1.0, 1.0)
    c.input.expand_prob = 0.5
    c.input.min_iou_crop = ()
    c.input.min_crop_size = 0.3
    c.input.photometric = False
    # Repeat-factor sampling (LVIS; detectron2's RepeatFactorTrainingSampler): an image whose
    # rarest category is in a fraction f < t of the training images repeats sqrt(t / f) times
    # per epoch on average (LVIS: t = 0.001); 0: off.
    c.input.repeat_factor_threshold = 0.0
    # An explicit class map (class index i <-> category_ids[i], named class_names[i]) for
    # imported models whose classes are not the dataset's; empty: the dataset's categories.
    c.input.category_ids = ()
    c.input.class_names = ()

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"
    c.optim.lr = 0.02
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 0.0
    # The backbone's learning rate is lr x this (a separate optax group; Mask2Former: 0.1).
    c.optim.backbone_lr_multiplier = 1.0
    # Conv and dense biases (not the norms'; the backbone's only while its multiplier is 1) train
    # at lr x this and weight decay x the next (mmdetection's paramwise_options bias_lr_mult /
    # bias_decay_mult; PolarMask and FCOS on mmdetection: 2 and 0); both 1: no bias group.
    c.optim.bias_lr_multiplier = 1.0
    c.optim.bias_weight_decay_multiplier = 1.0
    # Exponential moving average of the parameters (0.0 = off), kept in the train state and the
    # checkpoint; evaluation, periodic evaluation and export then use it instead of the raw
    # weights. The schedule is mmdetection's ExpMomentumEMA (mmdet/models/layers/ema.py) with
    # momentum = 1 - ema_decay and gamma = ema_warmup_steps: after each update, at mmengine's
    # count s of earlier averaging steps (the train step 0, 1, ...), the average moves to the
    # parameters by m_s = (1 - momentum) * exp(-(1 + s) / gamma) + momentum (s = 0 copies them),
    # ema = (1 - m_s) * ema + m_s * params. mmdetection's defaults: ema_decay 0.9998, gamma 2000.
    c.optim.ema_decay = 0.0
    c.optim.ema_warmup_steps = 2000

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
    # COCOeval's largest maxDets. Above COCO's 100, the tables report AP and AR at both.
    c.eval.max_detections = 100
    # Whose COCOeval scores bbox, segm and keypoints (COCO_EVALUATORS): hotcoco gives
    # pycocotools' stats bit for bit, over 100x faster; "pycocotools" runs pycocotools' own.
    c.eval.evaluator = COCO_EVALUATORS[0]
    # COCOeval with useCats 0: every detection may match every ground truth whatever the
    # classes (class-agnostic proposals: DeepMask's AR; per-category tables are left out).
    c.eval.class_agnostic = False

    c.mesh = ml_collections.ConfigDict()
    c.mesh.distributed = False
    return c


# Fields of every method's `model` section that the trainer reads, not the model.
TRAINER_MODEL_FIELDS = {
    # A torchvision ResNet weights file (.pth or .npz) to initialise the backbone when training
    # starts (instseg_jax/weights/resnet.py); "" = random initialisation.
    "backbone_weights": "",
    # "WORKDIR" or "WORKDIR:STEP": a new run starts from that checkpoint (a training workdir or
    # one written by import-weights), class-specific predictors re-initialised when the class
    # count differs (instseg_jax/finetune.py); takes precedence over backbone_weights. "" = off.
    "init_from": "",
}


def model_section(config_class) -> ml_collections.ConfigDict:
    """A method's `model` section: every field of its Config dataclass with its default (the
    dataclass is the one list of them) and the trainer's model fields."""
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(config_class):
        if field.name not in ("num_classes", "canvas_hw"):  # from the data and input.canvas_hw
            section[field.name] = field.default
    section.update(TRAINER_MODEL_FIELDS)
    return section


def method_config(config_class, model_config, num_classes: int, canvas_hw):
    """A method's frozen Config from an experiment's `model` section: unknown fields are
    rejected with the list of known ones, lists become tuples (the Config must hash)."""
    fields = {f.name for f in dataclasses.fields(config_class)} - {"num_classes", "canvas_hw"}
    values = {k: v for k, v in dict(model_config).items() if k not in TRAINER_MODEL_FIELDS}
    unknown = set(values) - fields
    if unknown:
        raise ConfigValueError(
            f"unknown model config fields {sorted(unknown)}; known: "
            f"{sorted(fields | set(TRAINER_MODEL_FIELDS))}"
        )
    values = {k: _as_tuple(v) for k, v in values.items()}
    return config_class(num_classes=num_classes, canvas_hw=tuple(canvas_hw), **values)


def _as_tuple(value):
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def smoke_common(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The method-independent half of every `smoke` shrink: synthetic scenes on a 128x128
    canvas, batch 2, checkpoints every 2 steps."""
    c.input.source = "synthetic"
    c.input.synthetic_length = 16
    if "synthetic_eval_seed" in c.input:  # evaluate on the training scenes (over-fitting tests)
        c.input.synthetic_eval_seed = -1
    c.input.synthetic_hw = (112, 128)
    c.input.canvas_hw = (128, 128)
    c.input.global_batch = 2
    c.input.num_workers = 0
    c.input.max_instances = 8
    c.input.mask_size = 28
    c.input.short_side = (112,)
    c.input.max_long_side = 128
    c.input.test_short_side = 112
    c.input.test_max_long_side = 128
    if c.input.get("resize") == "stretch":  # still a stretch: the 112 x 128 scenes to 128 x 128
        c.input.stretch_hw = (128, 128)
    c.optim.lr = 0.01
    c.optim.clip_norm = 0.0
    c.schedule.total_steps = 100
    c.schedule.warmup_steps = 10
    c.schedule.steps = (80,)
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 2
    c.eval.max_detections = 100
    c.log_every = 1
    return c
