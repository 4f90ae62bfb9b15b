"""torchvision's Keypoint R-CNN (``keypointrcnn_resnet50_fpn``) weights in instseg_jax.

    instseg-jax import-weights torchvision keypointrcnn_resnet50_fpn_coco.pth --out runs/tv_kp

`import-weights torchvision` recognises Keypoint R-CNN from its keys
(``roi_heads.keypoint_predictor.``; weights/importer.py) and comes here. `convert` maps the
state_dict onto methods/keypoint_rcnn.py's parameter tree (backbone, FPN, RPN and box head as
Mask R-CNN's in weights/torchvision.py; the 8 keypoint convs and the transposed convolution);
`apply_preset` adds to torchvision's Mask R-CNN conventions the keypoint ones: no mask head,
decoded positions without detectron2's half-pixel shift (torchvision trains and predicts on
COCO's numbers as they are), COCO's person keypoints. experiments/parity/keypoint_rcnn.py
measures the agreement with torchvision itself.
"""

from __future__ import annotations

from instseg_jax.input.keypoints import COCO_PERSON
from instseg_jax.methods import keypoint_rcnn
from instseg_jax.weights import resnet
from instseg_jax.weights import torchvision as tv
from instseg_jax.weights.state_dict import (
    StateDictError,
    conv_params,
    conv_transpose_kernel,
    count_indices,
    f32,
    read_checked,
)

HEAD = "roi_heads.keypoint_head"
PREDICTOR = "roi_heads.keypoint_predictor.kps_score_lowres"
MODEL_NAME = "torchvision keypointrcnn_resnet50_fpn"


def is_keypoint_rcnn(state_dict: dict) -> bool:
    """Whether a (torchvision) state_dict is Keypoint R-CNN's."""
    return any(
        k.removeprefix("module.").startswith("roi_heads.keypoint_predictor.") for k in state_dict
    )


def architecture(sd: dict) -> dict:
    """Mask R-CNN's fields of weights/torchvision.py (no mask head) and the keypoint head's."""
    arch = tv.architecture(sd)
    if PREDICTOR + ".weight" not in sd or HEAD + ".0.weight" not in sd:
        raise StateDictError(f"missing key {PREDICTOR + '.weight'!r} or {HEAD + '.0.weight'!r}")
    arch.update(
        num_keypoints=int(sd[PREDICTOR + ".weight"].shape[1]),
        keypoint_head_convs=count_indices(sd.keys(), rf"^{HEAD}\.(\d+)\.weight$"),
        keypoint_head_dim=int(sd[HEAD + ".0.weight"].shape[0]),
    )
    return arch


def expected_keys(arch: dict) -> list[str]:
    """Every key of torchvision's Keypoint R-CNN with this architecture, in module order."""
    keys = [k for k in tv.expected_keys(arch) if not k.startswith("roi_heads.mask_")]
    for i in range(arch["keypoint_head_convs"]):
        keys += [f"{HEAD}.{2 * i}.weight", f"{HEAD}.{2 * i}.bias"]
    return keys + [PREDICTOR + ".weight", PREDICTOR + ".bias"]


def convert(state_dict: dict, source: str = "state_dict") -> tuple[dict, dict]:
    """({"params": ..., "frozen": ...}, architecture) of a torchvision Keypoint R-CNN
    state_dict; StateDictError names ``source`` and the first missing or unexpected key."""
    sd, arch = read_checked(state_dict, source, MODEL_NAME, architecture, expected_keys)
    body, frozen_body = resnet.convert_body(sd, tv.body_layout(arch), tv.BODY)
    head = {
        f"conv{i + 1}": conv_params(sd, f"{HEAD}.{2 * i}")
        for i in range(arch["keypoint_head_convs"])
    }
    head["score_lowres"] = {  # torch's [in, out, 4, 4] -> [4, 4, in, out], same taps
        "kernel": conv_transpose_kernel(sd[PREDICTOR + ".weight"]),
        "bias": f32(sd[PREDICTOR + ".bias"]),
    }
    params = {
        "backbone": body,
        "fpn": tv.fpn_params(sd),
        "rpn_head": tv.rpn_head_params(sd),
        "box_head": tv.box_head_params(sd, arch, source),
        "keypoint_head": head,
    }
    return {"params": params, "frozen": {"backbone": frozen_body}}, arch


# The model fields a Keypoint R-CNN state_dict decides (the rest are the preset's).
ARCH_FIELDS = (
    "depth",
    "stage_blocks",
    "width",
    "fpn_channels",
    "box_fc_dim",
    "num_keypoints",
    "keypoint_head_convs",
    "keypoint_head_dim",
)


def apply_preset(config) -> None:
    """torchvision's Mask R-CNN preset (weights/torchvision.py) and its keypoint conventions."""
    tv.apply_preset(config)
    m = config.model
    m.mask_on = False
    m.keypoint_pool_size = 14
    m.keypoint_output_shift = 0.0
    m.keypoint_flip = COCO_PERSON.flip
    config.input.keypoints = "coco_person"


def coco_config(arch: dict, canvas_hw=(1344, 1344)):
    """The experiment config of an imported Keypoint R-CNN: the COCO-Keypoints base with the
    preset, the architecture read from the weights, torchvision's class map (person = 1)."""
    c = tv.imported_config(
        keypoint_rcnn.base_config(),
        arch,
        ARCH_FIELDS,
        canvas_hw,
        apply_preset,
        annotations="person_keypoints_val2017.json",
    )
    c.model.keypoint_fg_per_image = 128
    if arch["num_classes"] == 1:
        c.input.class_names = ("person",)
    return c
