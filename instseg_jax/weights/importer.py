"""`instseg-jax import-weights LIBRARY FILE --out DIR`: the top of weights/, which reads a
checkpoint, picks the converter its keys name and writes a workdir that `eval` and `predict`
read (workdir.write_imported_workdir).

    torchvision   a .pth / .npz state_dict: FCOS (``head.classification_head.`` keys),
                  Keypoint R-CNN (``roi_heads.keypoint_predictor.``), else Mask R-CNN
    huggingface   a Mask2FormerForUniversalSegmentation.save_pretrained directory
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from instseg_jax import workdir
from instseg_jax.weights import huggingface, torchvision, torchvision_fcos, torchvision_keypoint
from instseg_jax.weights.huggingface import HuggingFaceWeightsError
from instseg_jax.weights.state_dict import StateDictError, load_state_dict

# The errors an import reports to the user in one line (a file that is not the model, a missing
# file, torch absent for a .pth).
IMPORT_ERRORS = (StateDictError, HuggingFaceWeightsError, FileNotFoundError, ImportError)

# The canvas an imported model evaluates on unless --canvas says otherwise.
DEFAULT_CANVAS = {"torchvision": (1344, 1344), "huggingface": (1024, 1024)}

# torchvision converters recognised by their keys, tried in order; Mask R-CNN otherwise.
TORCHVISION_BY_KEYS = (
    (torchvision_fcos.is_fcos, torchvision_fcos),
    (torchvision_keypoint.is_keypoint_rcnn, torchvision_keypoint),
)


def torchvision_converter(state_dict: dict) -> ModuleType:
    """The converter module (convert, coco_config) of a torchvision state_dict's model."""
    for recognises, converter in TORCHVISION_BY_KEYS:
        if recognises(state_dict):
            return converter
    return torchvision


def import_torchvision(weights: str | Path, out: str | Path, canvas_hw=(1344, 1344)) -> Path:
    """Write out/config.json, classes.json and checkpoint 0 of a torchvision detector's
    weights file (Mask R-CNN, FCOS or Keypoint R-CNN, told apart by its keys)."""
    state_dict = load_state_dict(weights)
    converter = torchvision_converter(state_dict)
    variables, arch = converter.convert(state_dict, str(weights))
    config = converter.coco_config(arch, canvas_hw)
    return workdir.write_imported_workdir(out, config, variables, str(weights))


def import_huggingface(directory: str | Path, out: str | Path, canvas_hw=(1024, 1024)) -> Path:
    """Write out/config.json, classes.json and checkpoint 0 of a Hugging Face Mask2Former
    save_pretrained directory."""
    sd, hf_config = huggingface.load(directory)
    params, frozen, fields, num_classes = huggingface.convert(sd, hf_config)
    config = huggingface.coco_config(fields, num_classes, hf_config, canvas_hw)
    variables = {"params": params, "frozen": frozen}
    return workdir.write_imported_workdir(out, config, variables, str(directory))


IMPORTERS = {"torchvision": import_torchvision, "huggingface": import_huggingface}


def import_weights(library: str, source: str | Path, out: str | Path, canvas_hw=None) -> Path:
    """The workdir `out` of the weights `source` trained by `library` (an IMPORTERS key), on
    canvas_hw or the library's default canvas."""
    canvas_hw = tuple(canvas_hw or DEFAULT_CANVAS[library])
    return IMPORTERS[library](source, out, canvas_hw)
