"""torchvision's FCOS (``fcos_resnet50_fpn``) weights in instseg_jax.

    instseg-jax import-weights torchvision fcos_resnet50_fpn_coco.pth --out runs/tv_fcos

`import-weights torchvision` recognises FCOS from its keys (``head.classification_head.``;
weights/importer.py) and comes here. `convert` maps the state_dict onto methods/fcos.py's
parameter tree; `apply_preset` switches a config to torchvision's conventions
(methods.fcos.TORCHVISION: locations at i x stride, no per-level scales, the score threshold
0.2 on sqrt(class x centerness), in training open level ranges and an unweighted GIoU loss; its
resize and mean-colour padding; boxes rescaled per axis). experiments/parity/fcos.py measures
the agreement with torchvision itself, experiments/parity/torchvision_losses.py that of the
training losses.

One difference stays: torchvision pads its batch to a multiple of 32 and places P6/P7
locations at canvas // grid strides; our canvas is a multiple of 128 so that every level's
stride is exact. On a canvas that torchvision's padding would also produce (its
``transform.size_divisible = 128``, as the parity check runs it) the two agree.

Class layout: torchvision's FCOS has one output per COCO category id including the unused 0;
ours drops output 0, so class i here is category i + 1 (as for Mask R-CNN).
"""

from __future__ import annotations

import re

from instseg_jax.methods import fcos
from instseg_jax.weights import resnet
from instseg_jax.weights import torchvision as tv
from instseg_jax.weights.state_dict import (
    StateDictError,
    conv_kernel,
    f32,
    read_checked,
    shape_of,
)

BODY = tv.BODY
HEADS = {"cls": "head.classification_head", "box": "head.regression_head"}
MODEL_NAME = "torchvision fcos_resnet50_fpn"


def is_fcos(state_dict: dict) -> bool:
    """Whether a (torchvision) state_dict is FCOS's rather than Mask R-CNN's."""
    return any(k.removeprefix("module.").startswith(HEADS["cls"] + ".") for k in state_dict)


def _tower_convs(keys, head: str) -> int:
    """Conv layers of a head's tower: nn.Sequential of (Conv2d, GroupNorm, ReLU) triples."""
    regex = re.compile(rf"^{re.escape(head)}\.conv\.(\d+)\.weight$")
    return len({int(m.group(1)) for k in keys if (m := regex.match(k))}) // 2


def architecture(sd: dict) -> dict:
    """Model config fields of a state_dict: block counts and widths from shapes and keys."""
    return {
        "depth": 50,
        "stage_blocks": resnet.stage_blocks(sd.keys(), BODY),
        "width": shape_of(sd, "backbone.body.conv1.weight")[0],
        "fpn_channels": shape_of(sd, "backbone.fpn.inner_blocks.0.0.weight")[0],
        "head_convs": _tower_convs(sd.keys(), HEADS["cls"]),
        "num_anchors": shape_of(sd, f"{HEADS['box']}.bbox_ctrness.weight")[0],
        "num_classes": shape_of(sd, f"{HEADS['cls']}.cls_logits.weight")[0] - 1,
    }


def expected_keys(arch: dict) -> list[str]:
    """Every key of torchvision's FCOS with this architecture, in module order."""
    keys = resnet.body_keys(tv.body_layout(arch), BODY)
    for kind in ("inner", "layer"):
        for i in range(3):
            keys += [f"backbone.fpn.{kind}_blocks.{i}.0.{p}" for p in ("weight", "bias")]
    for level in (6, 7):
        keys += [f"backbone.fpn.extra_blocks.p{level}.{p}" for p in ("weight", "bias")]
    for tower, head in HEADS.items():
        for i in range(arch["head_convs"]):
            for layer in (3 * i, 3 * i + 1):  # the conv and its GroupNorm
                keys += [f"{head}.conv.{layer}.{p}" for p in ("weight", "bias")]
        outputs = ("cls_logits",) if tower == "cls" else ("bbox_reg", "bbox_ctrness")
        for name in outputs:
            keys += [f"{head}.{name}.{p}" for p in ("weight", "bias")]
    return keys


def _conv_params(sd, prefix, drop_first_output: bool = False):
    weight, bias = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]
    if drop_first_output:
        weight, bias = weight[1:], bias[1:]
    return {"kernel": conv_kernel(weight), "bias": f32(bias)}


def convert(state_dict: dict, source: str = "state_dict") -> tuple[dict, dict]:
    """({"params": ..., "frozen": ...}, architecture) of a torchvision FCOS state_dict.

    Raises StateDictError naming ``source`` and the first missing key (in module order) or,
    when none is missing, the first unexpected one.
    """
    sd, arch = read_checked(state_dict, source, MODEL_NAME, architecture, expected_keys)
    if arch["num_anchors"] != 1:
        raise StateDictError(
            f"{source}: {HEADS['box']}.bbox_ctrness has {arch['num_anchors']} anchors per "
            "location; FCOS has one"
        )
    backbone, frozen_backbone = resnet.convert_body(sd, tv.body_layout(arch), BODY)
    fpn = {}
    for i in range(3):
        fpn[f"lateral{i + 3}"] = _conv_params(sd, f"backbone.fpn.inner_blocks.{i}.0")
        fpn[f"output{i + 3}"] = _conv_params(sd, f"backbone.fpn.layer_blocks.{i}.0")
    for level in (6, 7):
        fpn[f"extra{level}"] = _conv_params(sd, f"backbone.fpn.extra_blocks.p{level}")
    head = {}
    for tower, prefix in HEADS.items():
        for i in range(arch["head_convs"]):
            head[f"{tower}_conv{i}"] = _conv_params(sd, f"{prefix}.conv.{3 * i}")
            norm = f"{prefix}.conv.{3 * i + 1}"
            head[f"{tower}_norm{i}"] = {
                "gn": {"scale": f32(sd[f"{norm}.weight"]), "bias": f32(sd[f"{norm}.bias"])}
            }
    head["cls_logits"] = _conv_params(sd, f"{HEADS['cls']}.cls_logits", drop_first_output=True)
    head["bbox_pred"] = _conv_params(sd, f"{HEADS['box']}.bbox_reg")
    head["centerness"] = _conv_params(sd, f"{HEADS['box']}.bbox_ctrness")
    params = {"backbone": backbone, "fpn": fpn, "head": head}
    return {"params": params, "frozen": {"backbone": frozen_backbone}}, arch


# The model fields an FCOS state_dict decides (the rest are the preset's).
ARCH_FIELDS = ("depth", "stage_blocks", "width", "fpn_channels", "head_convs")


def apply_preset(config) -> None:
    """Switch an FCOS experiment config (ConfigDict, unlocked) to torchvision's conventions."""
    tv.apply_detector_preset(config)
    m = config.model
    m.sizes_of_interest = (64, 128, 256, 512)
    m.center_sampling_radius = 1.5
    m.candidates_per_level = 1000
    m.nms_threshold = 0.6
    m.detections_per_image = 100
    m.box_rescale = "per_axis"
    m.update(fcos.TORCHVISION)


def coco_config(arch: dict, canvas_hw=(1408, 1408)):
    """The experiment config of an imported FCOS: AdelaiDet's COCO base with the torchvision
    preset, the architecture read from the weights and torchvision's class map; the canvas
    rounded up to a multiple of 128 (import-weights' default 1344 becomes 1408)."""
    # Every level's stride must divide the canvas: rounded up to a multiple of P7's 128.
    canvas_hw = tuple(-(-int(v) // 128) * 128 for v in canvas_hw)
    return tv.imported_config(fcos.base_config(), arch, ARCH_FIELDS, canvas_hw, apply_preset)
