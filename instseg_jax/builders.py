"""Everything built from an experiment config, in one place: the data source, the transform
settings, the class map, the method and its model. train, evaluate, predict, demo, inference
and the weight importers all build through here, so none of them names a method.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import numpy as np

from instseg_jax import methods
from instseg_jax.backbones.resnet import IMAGENET_MEAN
from instseg_jax.config import ConfigValueError
from instseg_jax.detections import MaskPaste
from instseg_jax.input.coco import CocoSource, split_image_ids
from instseg_jax.input.synthetic import SyntheticSource
from instseg_jax.input.transforms import TransformConfig

log = logging.getLogger(__name__)

# Host-side bookkeeping that a jitted step never reads (int64 ids do not exist on device).
HOST_ONLY = ("image_id",)


def device_fields(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in HOST_ONLY}


def method(config) -> ModuleType:
    """The method module of config.method (methods.METHODS or an importable module path)."""
    return methods.get(config.method)


def build_source(input_config, train: bool, seed: int | None = None):
    """The training or evaluation split's source; input.eval_source may name another kind
    for evaluation than for training. With input.eval_fraction above 0 both are parts of
    train_split's COCO file, split by image under `seed` (config.seed, which it then needs)."""
    kind = input_config.source
    if not train and input_config.get("eval_source"):
        kind = input_config.eval_source
    fraction = float(input_config.get("eval_fraction", 0.0) or 0.0)
    if fraction and not (0.0 < fraction < 1.0 and kind == "coco"):
        raise ConfigValueError(
            f"input.eval_fraction={fraction}: it holds out a fraction between 0 and 1 of a COCO "
            f"instances file's images (input.source 'coco'; here {kind!r}); set it to 0 or "
            "to a value such as 0.2"
        )
    if kind == "synthetic":
        # Held-out scenes when the experiment names an evaluation seed (and length).
        held_out = not train and input_config.get("synthetic_eval_seed", -1) >= 0
        return SyntheticSource(
            input_config.get("synthetic_eval_length", 64)
            if held_out
            else input_config.synthetic_length,
            tuple(input_config.synthetic_hw),
            seed=input_config.synthetic_eval_seed if held_out else input_config.synthetic_seed,
            stuff=bool(input_config.get("synthetic_stuff", False)),
        )
    if kind == "coco":
        split = input_config.train_split if train or fraction else input_config.eval_split
        field = "train_split" if train or fraction else "eval_split"
        if not split.annotations:
            raise ConfigValueError(
                f"input.{field}.annotations is empty: give a COCO instances JSON with "
                f"--config.input.{field}.annotations=FILE (and .images=FOLDER)"
            )
        keep_empty = not train or not input_config.get("filter_empty", True)
        select = None
        if fraction:
            if seed is None:
                raise ValueError("build_source: input.eval_fraction's split needs config.seed")
            part = "train" if train else "eval"
            select = functools.partial(split_image_ids, fraction=fraction, seed=seed, part=part)
        # Training on keypoints skips images with too few labelled ones (detectron2's rule).
        min_keypoints = (
            int(input_config.get("min_keypoints_per_image", 0))
            if train and input_config.get("keypoints")
            else 0
        )
        return CocoSource(
            split.annotations,
            split.images,
            keep_empty=keep_empty,
            select_images=select,
            min_keypoints=min_keypoints,
        )
    if kind == "coco_panoptic":
        from instseg_jax.input.coco_panoptic import CocoPanopticSource

        split = input_config.train_split if train else input_config.eval_split
        field = "train_split" if train else "eval_split"
        for part, what in (("annotations", "a COCO panoptic JSON"), ("panoptic", "its PNG folder")):
            if not split.get(part):
                raise ConfigValueError(
                    f"input.{field}.{part} is empty: give {what} with "
                    f"--config.input.{field}.{part}=... (and .annotations, .images, .panoptic)"
                )
        keep_empty = not train or not input_config.get("filter_empty", True)
        return CocoPanopticSource(
            split.annotations, split.images, split.panoptic, keep_empty=keep_empty
        )
    raise ConfigValueError(
        f"input.source must be 'synthetic', 'coco' or 'coco_panoptic', got {kind!r}"
    )


def check_eval_split(config, category_ids) -> None:
    """When training evaluates periodically (eval.every_steps > 0), read the evaluation split
    now, as the training split is, so that a missing or unreadable file, or categories other
    than the training data's category_ids, end the run before its step compiles rather than
    at the first evaluation."""
    every = int(config.eval.get("every_steps", 0) or 0)
    if every <= 0:
        return
    source = build_source(config.input, train=False, seed=config.seed)
    ids, _ = source_class_map(source)
    if ids != [int(i) for i in category_ids]:
        where = getattr(source, "annotation_file", None) or type(source).__name__
        raise ConfigValueError(
            f"{where}: the evaluation split's category ids {_first(ids)} ({len(ids)}) differ "
            f"from the training data's {_first(category_ids)} ({len(category_ids)}), and "
            f"evaluation every {every} steps (eval.every_steps) scores the model's classes "
            "against them: give an evaluation split with the training categories, or "
            "--config.eval.every_steps=0"
        )


def _first(values, shown: int = 8) -> str:
    """[a, b, ...]: the first `shown` of a list, for messages."""
    values = list(values)
    return "[" + ", ".join(map(str, values[:shown])) + (", ...]" if len(values) > shown else "]")


def transform_config(config, train: bool) -> TransformConfig:
    """Transform settings of the training or the test-time pipeline. What it produces besides
    images and boxes is what the method's INPUTS ask; evaluation resizes to the test size."""
    i = config.input
    inputs = method(config).INPUTS
    # Workdirs written before the test size existed get detectron2's (MIN/MAX_SIZE_TEST).
    short_side = tuple(i.short_side) if train else (int(i.get("test_short_side", 800)),)
    test_long = int(i.get("test_max_long_side", 1333))
    keypoints = {}
    if getattr(inputs, "keypoints", False):
        from instseg_jax.input.keypoints import keypoint_set

        spec = keypoint_set(str(i.get("keypoints", "")))
        keypoints = {"keypoints": spec.count, "keypoint_flip": spec.flip}
    return TransformConfig(
        **keypoints,
        canvas_hw=tuple(i.canvas_hw),
        max_instances=i.max_instances,
        # Workdirs written before ignore regions existed get the default.
        max_ignore_regions=int(i.get("max_ignore_regions", 32)),
        semantic_stride=getattr(inputs, "semantic_stride", 0),
        box_masks=inputs.box_masks,
        full_mask_stride=inputs.full_mask_stride,
        centers=inputs.centers,
        contour_points=inputs.contour_points,
        mask_size=i.mask_size,
        train=train,
        # Evaluation resizes to the test size, but a stretch stays a stretch (mmdetection's
        # test pipeline has the same Resize(keep_ratio=False)).
        resize=i.resize if train or i.resize == "stretch" else "short_side",
        stretch_hw=tuple(i.get("stretch_hw", (0, 0))),
        short_side=short_side,
        max_long_side=i.max_long_side if train else test_long,
        lsj_scale=tuple(i.lsj_scale),
        hflip=i.hflip,
        drop_crowd=True,
        resize_rule=i.get("resize_rule", "detectron2"),
        pad_value=tuple(i.get("pad_value", (0, 0, 0))),
        # Training only; workdirs written before copy-paste existed get it off.
        copy_paste=float(i.get("copy_paste", 0.0)) if train else 0.0,
        copy_paste_scale=tuple(i.get("copy_paste_scale", (0.1, 2.0))),
        copy_paste_min_area=int(i.get("copy_paste_min_area", 1)),
        copy_paste_blend=bool(i.get("copy_paste_blend", True)),
        # Training only; workdirs written before them get them off. Expand fills with the
        # pixel mean the method normalises by (mmdetection's Expand(mean=img_norm_cfg mean)).
        expand_ratio=tuple(i.get("expand_ratio", (1.0, 1.0))) if train else (1.0, 1.0),
        expand_prob=float(i.get("expand_prob", 0.5)),
        expand_fill=tuple(getattr(method(config), "PIXEL_MEAN", IMAGENET_MEAN)),
        min_iou_crop=tuple(i.get("min_iou_crop", ())) if train else (),
        min_crop_size=float(i.get("min_crop_size", 0.3)),
        photometric=bool(i.get("photometric", False)) and train,
        # Training only; workdirs written before it get it off.
        instance_filter=str(i.get("instance_filter", "none")) if train else "none",
    )


def class_map(config, source=None) -> tuple[list[int], list[str]]:
    """(category id, name) of every class index: config.input's explicit map when it has one
    (imported models), else the source's categories."""
    ids = list(config.input.get("category_ids", ()) or ())
    if ids:
        names = list(config.input.get("class_names", ()) or ())
        if len(names) != len(ids):
            raise ConfigValueError(
                f"input.class_names has {len(names)} names for {len(ids)} input.category_ids; "
                "give one name per category id"
            )
        return [int(i) for i in ids], [str(n) for n in names]
    if source is None:
        raise ConfigValueError(
            "no input.category_ids in the config and no data source to read them"
        )
    return source_class_map(source)


def source_class_map(source) -> tuple[list[int], list[str]]:
    ids = source.category_id(np.arange(source.num_classes))
    return [int(i) for i in ids], list(source.class_names)


def source_stuff_map(source) -> tuple[list[int], list[str]]:
    """(category ids, names) of a source's stuff classes (panoptic data); empty without."""
    ids = [int(i) for i in getattr(source, "stuff_category_ids", ())]
    return ids, [str(n) for n in getattr(source, "stuff_names", ())]


def model_config(config, num_classes: int):
    """The method's frozen config dataclass from the experiment's `model` section."""
    return method(config).Config.from_config(config.model, num_classes, config.input.canvas_hw)


def build_model(config, num_classes: int):
    """(method module, its model config, the Flax model)."""
    module = method(config)
    cfg = model_config(config, num_classes)
    return module, cfg, module.Model(cfg)


def mask_paste(cfg) -> MaskPaste:
    """How a model config's box-relative masks are pasted and cut: its optional `mask_paste`
    field ("detectron2" by default, "torchvision" under the torchvision preset) and its optional
    `mask_paste_threshold` (0.5 by default; FCIS: 0.4, its reference's BINARY_THRESH)."""
    return MaskPaste(
        getattr(cfg, "mask_paste", "detectron2"), float(getattr(cfg, "mask_paste_threshold", 0.5))
    )


def instances_per_image(source, max_instances: int, sample: int = 1000) -> np.ndarray:
    """Instances per training image, each at most max_instances (the padded batch keeps no
    more): from the annotations when the source has them (`instances_per_image()`), else
    counted on up to `sample` evenly spaced loaded examples."""
    if hasattr(source, "instances_per_image"):
        counts = np.asarray(source.instances_per_image())
    else:
        picks = np.unique(np.linspace(0, len(source) - 1, min(sample, len(source))).astype(int))
        counts = np.asarray(
            [int((~np.asarray(source.load(int(i))["iscrowd"], bool)).sum()) for i in picks]
        )
    return np.minimum(counts, max_instances)


def source_summary(source) -> str:
    """One line on a training source: images, instances, crowd regions, images skipped, and
    the classes without a training instance."""
    if hasattr(source, "records"):  # a COCO file: counted from the annotations alone
        instances = int(source.instances_per_image().sum())
        crowd = int(sum(r["iscrowd"].sum() for r in source.records))
        where = getattr(source, "annotation_file", "")
        return (
            f"{where}: {len(source)} images, {instances} instances, {crowd} crowd regions "
            f"(not training targets), {getattr(source, 'num_empty_dropped', 0)} images without "
            "instances skipped"
            + (
                f", {source.num_few_keypoints_dropped} with fewer labelled keypoints than "
                "input.min_keypoints_per_image skipped"
                if getattr(source, "num_few_keypoints_dropped", 0)
                else ""
            )
            + _classes_without_instances(source)
        )
    return f"{type(source).__name__}: {len(source)} images"


def _classes_without_instances(source) -> str:
    """ ", K of N classes have no training instance (names...)", or "" when every class has
    one: a class the file lists but never annotates (COCO's 80 of 91 ids in a small subset)
    is never learned, and its AP is absent (-1) from the tables."""
    if not all("classes" in r for r in source.records):
        return ""
    instances = np.zeros(source.num_classes, np.int64)
    for record in source.records:
        np.add.at(instances, record["classes"][~record["iscrowd"]], 1)
    missing = [name for name, n in zip(source.class_names, instances, strict=True) if not n]
    if not missing:
        return ""
    names = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return f"; {len(missing)} of {source.num_classes} classes have no training instance ({names})"


def defaults_from_data(config, source) -> list[str]:
    """Fill the method's config fields left to the training data (the optional
    `defaults_from_data(config, instances_per_image)` of the method interface); returns what
    was chosen, for the log. A model with stuff classes (model.num_stuff_classes) must have
    as many as the data."""
    stuff = list(getattr(source, "stuff_category_ids", ()))
    wanted = config.model.get("num_stuff_classes")
    if wanted is not None and wanted != len(stuff):
        raise ConfigValueError(
            f"model.num_stuff_classes is {wanted} but the training data "
            f"({type(source).__name__}) has {len(stuff)} stuff categories "
            f"{list(getattr(source, 'stuff_names', ()))}; set "
            f"--config.model.num_stuff_classes={len(stuff)}"
            + ("" if stuff else " and train on panoptic data")
        )
    notes = check_against_data(config, source)
    hook = getattr(method(config), "defaults_from_data", None)
    if hook is None:
        return notes
    return hook(config, instances_per_image(source, config.input.max_instances)) + notes


# Share of the training objects outside the sizes a method covers from which the trainer warns.
OBJECTS_OUTSIDE_WARNING = 0.1


def check_against_data(config, source) -> list[str]:
    """Warn (log) where a recipe's settings do not fit the training data: the training and
    evaluation splits one file, the objects' sizes outside what the method covers (its
    optional `object_sizes_covered`); returns notes for the start-up log."""
    notes = _check_splits(config)
    hook = getattr(method(config), "object_sizes_covered", None)
    if hook is None:  # the sizes are a pass over every record: only for a method that uses them
        return notes
    sizes = training_object_sizes(config, source)
    if sizes is None or not sizes.size:
        return notes
    field, smallest, largest = hook(config.model)
    smaller, larger = float(np.mean(sizes < smallest)), float(np.mean(sizes > largest))
    if max(smaller, larger) <= OBJECTS_OUTSIDE_WARNING:
        return notes
    value = config
    for part in field.split("."):
        value = value[part]
    low, median, high = np.percentile(sizes, [5, 50, 95])
    outside = ", ".join(
        f"{share:.0%} {side}"
        for share, side in ((smaller, "smaller"), (larger, "larger"))
        if share > 0
    )
    log.warning(
        "training objects outside the sizes %s=%s covers (about %.0f-%.0f px): %s; they "
        "measure %.0f-%.0f px (5th-95th percentile, median %.0f) on the %dx%d canvas at the "
        "training resize. Set --config.%s to span them (or resize with input.short_side)",
        field,
        tuple(value),
        smallest,
        largest,
        outside,
        low,
        high,
        median,
        *config.input.canvas_hw,
        field,
    )
    return notes


def training_object_sizes(config, source) -> np.ndarray | None:
    """float64[n] side (sqrt of box area) of every training object with a box, in canvas
    pixels at the training resize's middle scale (the median of input.short_side, or the
    middle of input.lsj_scale); None for a source without annotation records (synthetic
    scenes)."""
    records = getattr(source, "records", None)
    if not records or not all("boxes" in r and "height" in r for r in records):
        return None
    i = config.input
    canvas_h, canvas_w = (float(v) for v in i.canvas_hw)
    sizes = []
    for record in records:
        boxes = np.asarray(record["boxes"], np.float64)[~np.asarray(record["iscrowd"], bool)]
        width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        usable = np.isfinite(width) & np.isfinite(height) & (width > 0) & (height > 0)
        image_h, image_w = float(record["height"]), float(record["width"])
        fit = min(canvas_h / image_h, canvas_w / image_w)
        if i.resize == "lsj":
            scale = fit * float(np.sqrt(np.prod(i.lsj_scale)))
        else:
            short = float(np.median(i.short_side))
            scale = min(short / min(image_h, image_w), i.max_long_side / max(image_h, image_w), fit)
        sizes.append(np.sqrt(width[usable] * height[usable]) * scale)
    return np.concatenate(sizes) if sizes else np.zeros(0)


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _check_splits(config) -> list[str]:
    """Warn when the training and evaluation splits are one annotation file (evaluation would
    score the training images); a note on input.eval_fraction's split when there is one."""
    i = config.input
    if i.source != "coco" or (i.get("eval_source") or "coco") != "coco":
        return []
    train_file, eval_file = i.train_split.annotations, i.eval_split.annotations
    fraction = float(i.get("eval_fraction", 0.0) or 0.0)
    if fraction:
        unused = eval_file and not _same_file(train_file, eval_file)
        return [
            f"evaluation: {fraction:.0%} of the images of {train_file} held out "
            f"(input.eval_fraction, split by seed {config.seed}); the training data is the rest"
            + (f"; input.eval_split ({eval_file}) is not used" if unused else "")
        ]
    if train_file and eval_file and _same_file(train_file, eval_file):
        log.warning(
            "input.train_split and input.eval_split are the same file (%s): evaluation will "
            "score the training images. Give a held-out file with "
            "--config.input.eval_split.annotations=FILE, or hold out part of this one with "
            "--config.input.eval_fraction=0.2",
            train_file,
        )
    return []
