"""torchvision ResNet weights -> our ResNet (backbones/resnet.py): the backbone initialisation of
any method (`--config.model.backbone_weights=FILE`) and the body of torchvision's Mask R-CNN.

Accepted: a torchvision classification checkpoint of resnet18/34/50/101 (keys conv1, bn1,
layer1..4, fc; fc is dropped), as a .pth state_dict (read with weights_only=True) or an .npz of
the same keys; a detection checkpoint's "backbone.body." prefix is accepted too. Files come from
torchvision's model zoo (e.g. `torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url`, fetched
once on a machine with internet; nothing is downloaded at run time).

Batch-norm statistics and affine terms go to the FrozenBatchNorm layers (collection "frozen"),
which is why a pretrained backbone needs model.norm = "frozen_bn" (detectron2's and
torchvision's recipe): GroupNorm normalises per image and group, and ImageNet BN statistics have
no GroupNorm equivalent, so the converted convolutions would see features of another scale.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from instseg_jax.backbones.resnet import STAGES, deformable_blocks, deformable_conv_name
from instseg_jax.config import ConfigValueError
from instseg_jax.weights.state_dict import conv_kernel, count_indices, f32, load_state_dict


class BackboneWeightsError(ConfigValueError):
    """A weights file that does not fit the configured backbone (names file, key or field)."""


def _norm(sd, prefix):
    return {
        "scale": f32(sd[f"{prefix}.weight"]),
        "bias": f32(sd[f"{prefix}.bias"]),
        "mean": f32(sd[f"{prefix}.running_mean"]),
        "var": f32(sd[f"{prefix}.running_var"]),
    }


def stage_blocks(keys, prefix: str = "") -> tuple[int, int, int, int]:
    """Blocks of each of the 4 stages of the ResNet keys under `prefix`."""
    return tuple(
        count_indices(keys, rf"^{re.escape(prefix)}layer{stage}\.(\d+)\.conv1\.weight$")
        for stage in (1, 2, 3, 4)
    )


def body_layout(sd: dict, prefix: str = "") -> dict:
    """{"bottleneck": bool, "stage_blocks": (4 counts), "width": res2 channels} of the ResNet
    keys under `prefix` (e.g. "backbone.body.")."""
    keys = sd.keys()
    return {
        "bottleneck": any(
            re.match(rf"^{re.escape(prefix)}layer1\.0\.conv3\.weight$", k) for k in keys
        ),
        "stage_blocks": stage_blocks(keys, prefix),
        "width": int(sd[f"{prefix}conv1.weight"].shape[0]),
    }


def body_keys(layout: dict, prefix: str = "") -> list[str]:
    """Every key of a torchvision ResNet body with this layout, in module order."""
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = [f"{prefix}conv1.weight"] + [f"{prefix}bn1.{k}" for k in bn]
    convs = (1, 2, 3) if layout["bottleneck"] else (1, 2)
    for stage, count in enumerate(layout["stage_blocks"], start=1):
        for block in range(count):
            base = f"{prefix}layer{stage}.{block}"
            for i in convs:
                keys += [f"{base}.conv{i}.weight"] + [f"{base}.bn{i}.{k}" for k in bn]
            if block == 0 and (stage > 1 or layout["bottleneck"]):
                keys += [f"{base}.downsample.0.weight"]
                keys += [f"{base}.downsample.1.{k}" for k in bn]
    return keys


def convert_body(sd: dict, layout: dict, prefix: str = "") -> tuple[dict, dict]:
    """(params, frozen) of our ResNet from the torchvision body keys under `prefix`."""
    params = {"stem": {"conv": {"kernel": conv_kernel(sd[f"{prefix}conv1.weight"])}}}
    frozen = {"stem": {"norm": _norm(sd, f"{prefix}bn1")}}
    convs = (1, 2, 3) if layout["bottleneck"] else (1, 2)
    for stage, count in enumerate(layout["stage_blocks"], start=1):
        for block in range(count):
            base = f"{prefix}layer{stage}.{block}"
            p, f = {}, {}
            for i in convs:
                p[f"conv{i}"] = {"conv": {"kernel": conv_kernel(sd[f"{base}.conv{i}.weight"])}}
                f[f"conv{i}"] = {"norm": _norm(sd, f"{base}.bn{i}")}
            if f"{base}.downsample.0.weight" in sd:
                p["shortcut"] = {"conv": {"kernel": conv_kernel(sd[f"{base}.downsample.0.weight"])}}
                f["shortcut"] = {"norm": _norm(sd, f"{base}.downsample.1")}
            params[f"res{stage + 1}_{block}"] = p
            frozen[f"res{stage + 1}_{block}"] = f
    return params, frozen


def with_deformable_starts(params: dict, layout: dict, model_config) -> dict:
    """params with the deformable convolutions' own parameters (model.dcn_layers and
    model.dcn_interval; backbones/resnet.py deformable_blocks) at their start: the pretrained
    3x3 kernel stays the deformed convolution's "kernel", its bias and the offset-and-modulation
    convolution ("offset") start at zero, as dbolya/yolact backbone.py sets them after loading
    the ImageNet weights (offsets 0, modulation 0.5)."""
    placement = deformable_blocks(
        layout["stage_blocks"],
        tuple(model_config.get("dcn_layers", ()) or ()),
        int(model_config.get("dcn_interval", 1)),
    )
    name = deformable_conv_name(layout["bottleneck"])
    out = dict(params)
    for stage, blocks in enumerate(placement):
        for block, deformable in enumerate(blocks):
            if not deformable:
                continue
            key = f"res{stage + 2}_{block}"
            conv = dict(out[key][name]["conv"])
            kh, kw, channels, features = conv["kernel"].shape
            conv["bias"] = np.zeros((features,), np.float32)
            conv["offset"] = {
                "kernel": np.zeros((kh, kw, channels, 3 * kh * kw), np.float32),
                "bias": np.zeros((3 * kh * kw,), np.float32),
            }
            out[key] = {**out[key], name: {**out[key][name], "conv": conv}}
    return out


# torchvision's ImageNet classification checkpoints (ResNet{depth}_Weights.IMAGENET1K_V1).
IMAGENET_CHECKPOINTS = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    101: "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}


def require_pretrained_frozen_bn(model_config) -> None:
    """Refuse to start training a FrozenBatchNorm ResNet without model.backbone_weights: its
    frozen statistics and affine terms would stay the identity of a fresh initialisation, so
    the network would train with no normalisation at all (the COCO recipes' silent failure).
    GroupNorm ("group_norm") trains from scratch; a run resumed from a checkpoint (an imported
    workdir included) has its weights already and is not asked, nor is one started from another
    run's checkpoint (model.init_from: its frozen statistics come along)."""
    if model_config.get("norm") != "frozen_bn":
        return
    if model_config.get("backbone_weights") or model_config.get("init_from"):
        return
    depth = int(model_config.get("depth", 50))
    where = IMAGENET_CHECKPOINTS.get(depth, "torchvision's model zoo")
    raise BackboneWeightsError(
        "model.backbone_weights is empty but model.norm is frozen_bn: a FrozenBatchNorm ResNet "
        "needs ImageNet weights (random ones train without normalisation). Give "
        f"--config.model.backbone_weights=resnet{depth}.pth, torchvision's "
        f"ResNet{depth}_Weights.IMAGENET1K_V1 ({where}, fetched once where there is internet; "
        ".pth needs torch, or an .npz of its state_dict; nothing downloads at run time), or "
        "start from a detector's checkpoint with --config.model.init_from=WORKDIR, or train from "
        "scratch with --config.model.norm=group_norm --config.model.freeze_at=0"
    )


def load_backbone(path: str | Path, model_config) -> tuple[dict, dict, str]:
    """(params, frozen, description) of the backbone in a torchvision ResNet weights file,
    checked against the experiment's model section (depth, width, stage_blocks, norm)."""
    field = "model.backbone_weights"
    if model_config.get("norm", "frozen_bn") != "frozen_bn":
        raise BackboneWeightsError(
            f"{field}={path}: model.norm is {model_config.norm!r}; pretrained ResNet weights "
            "carry batch-norm statistics, which only FrozenBatchNorm keeps: set "
            "--config.model.norm=frozen_bn (GroupNorm has no equivalent of ImageNet statistics)"
        )
    try:
        sd = load_state_dict(path)
    except FileNotFoundError as error:
        raise BackboneWeightsError(f"{field}: {error}") from None
    sd = {k.removeprefix("module."): v for k, v in sd.items() if "num_batches_tracked" not in k}
    prefix = "backbone.body." if "backbone.body.conv1.weight" in sd else ""
    if f"{prefix}conv1.weight" not in sd:
        raise BackboneWeightsError(
            f"{field}={path}: not a torchvision ResNet state_dict (no conv1.weight; first keys: "
            f"{sorted(sd)[:3]})"
        )
    layout = body_layout(sd, prefix)
    depth = int(model_config.get("depth", 50))
    expected_blocks = tuple(model_config.get("stage_blocks", ()) or STAGES[depth])
    wanted = {
        "bottleneck": depth >= 50,
        "stage_blocks": expected_blocks,
        "width": int(model_config.get("width", 64)),
    }
    for name, value in layout.items():
        if value != wanted[name]:
            raise BackboneWeightsError(
                f"{field}={path}: the file's ResNet has {name} {value}, the config's (model.depth "
                f"{depth}, model.width {wanted['width']}) {wanted[name]}; set model.depth to the "
                "file's ResNet (18, 34, 50 or 101)"
            )
    expected = body_keys(layout, prefix)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise BackboneWeightsError(
            f"{field}={path}: missing key {missing[0]!r} ({len(missing)} missing in all)"
        )
    params, frozen = convert_body(sd, layout, prefix)
    params = with_deformable_starts(params, layout, model_config)
    dropped = sorted(set(sd) - set(expected))
    description = (
        f"{path}: torchvision ResNet ({'bottleneck' if layout['bottleneck'] else 'basic'} "
        f"blocks {layout['stage_blocks']}, width {layout['width']}), {len(expected)} tensors"
        + (f"; not used: {len(dropped)} ({', '.join(dropped[:3])}...)" if dropped else "")
    )
    return params, frozen, description


def load_backbone_weights(path: str | Path, model_config) -> tuple[dict, str]:
    """({"params": {"backbone": ...}, "frozen": {"backbone": ...}}, description): the
    variables a torchvision ResNet weights file gives, by submodule, for the trainer to put in
    place of the initialised ones. The default of every method whose ResNet is its "backbone"
    submodule (all of them today); a method with another backbone defines its own
    `load_backbone_weights` with this signature."""
    params, frozen, description = load_backbone(path, model_config)
    return {"params": {"backbone": params}, "frozen": {"backbone": frozen}}, description


def backbone_weights_loader(method_module):
    """The method's own `load_backbone_weights(path, model_config)`, else the ResNet one."""
    return getattr(method_module, "load_backbone_weights", load_backbone_weights)
