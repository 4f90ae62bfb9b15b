"""Every method by its `config.method` name. Adding a method is one module here plus one line
in METHODS; the trainer, evaluation, prediction and importers only ever call `get`.

A method module provides (see README "Adding a method"):
  Config          frozen dataclass; Config.from_config(model_section, num_classes, canvas_hw)
                  rejects unknown fields with the list of known ones
  INPUTS          structures.Inputs: what the input pipeline must produce for it
  Model           Flax module: Model(cfg).apply(variables, batch, train=True, key=key) -> outputs
                  (targets built inside, under stop_gradient); train=False -> outputs with
                  "detections" (structures.py's Detections, K fixed slots)
  loss_fn         loss_fn(outputs, batch, cfg) -> (scalar loss, metrics dict)
  base_config()   the method's reference experiment config (ml_collections.ConfigDict)
  smoke(config)   shrinks a config of the method to seconds on a CPU (tests)

Config must be hashable (tuples, not lists: the jitted inference is cached per config); an
optional `mask_paste` field picks the host-side paste rule of box-relative masks and an optional
`mask_paste_threshold` their cut (0.5 without it; builders.mask_paste).

Optional, used when present:
  defaults_from_data(config, instances_per_image) -> list of log lines
                  fills config fields left to the training data when training starts (Mask
                  R-CNN: model.mask_fg_per_image 0 or -1); the run's config.json keeps the values
  make_inference(model) -> (variables, device batch) -> Detections
                  inference as several jitted programs orchestrated on the host (Mask R-CNN:
                  the mask head on a small or the full slot budget); default: one jitted forward
  object_sizes_covered(model_section) -> (field, smallest, largest)
                  the object sizes (sqrt of box area, canvas pixels) the model's assignment
                  covers and the field that sets them (Mask R-CNN: model.anchor_sizes); the
                  trainer warns when many training objects fall outside

`config.method` may also be an importable module path ("mypackage.my_method", installed or
under the working directory): a method that lives outside this package (a research prototype,
a test) runs through every command unchanged.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from instseg_jax.config import ConfigValueError
from instseg_jax.methods import (
    blendmask,
    condinst,
    deepmask,
    fcis,
    fcos,
    instancefcn,
    keypoint_rcnn,
    mask2former,
    mask_rcnn,
    ms_rcnn,
    panet,
    panoptic_fpn,
    pointrend,
    polarmask,
    rdsnet,
    solo,
    solov2,
    yolact,
    yolact_plus,
)

METHODS: dict[str, ModuleType] = {
    "blendmask": blendmask,
    "condinst": condinst,
    "deepmask": deepmask,
    "fcis": fcis,
    "fcos": fcos,
    "instancefcn": instancefcn,
    "keypoint_rcnn": keypoint_rcnn,
    "mask2former": mask2former,
    "mask_rcnn": mask_rcnn,
    "ms_rcnn": ms_rcnn,
    "panet": panet,
    "panoptic_fpn": panoptic_fpn,
    "pointrend": pointrend,
    "polarmask": polarmask,
    "rdsnet": rdsnet,
    "solo": solo,
    "solov2": solov2,
    "yolact": yolact,
    "yolact_plus": yolact_plus,
}

REQUIRED = ("Config", "INPUTS", "Model", "loss_fn", "base_config", "smoke")


def get(name: str) -> ModuleType:
    """The method module of `config.method`: a METHODS key or an importable module path."""
    if name in METHODS:
        return METHODS[name]
    if "." not in name:
        raise ConfigValueError(
            f"config.method {name!r} is not a method; known: {sorted(METHODS)} "
            "(or give an importable module path such as 'mypackage.my_method')"
        )
    try:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            # The `instseg-jax` script does not put the working directory on sys.path.
            if os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())
            module = importlib.import_module(name)
    except ImportError as error:
        raise ConfigValueError(
            f"config.method {name!r}: cannot import the module ({error})"
        ) from error
    missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
    if missing:
        raise ConfigValueError(f"config.method {name!r}: the module lacks {missing}")
    return module
