"""Hugging Face `transformers` Mask2Former weights -> our Mask2Former (methods/mask2former.py).

Accepted: a directory written by `Mask2FormerForUniversalSegmentation.save_pretrained` (its
config.json and model.safetensors or pytorch_model.bin), with a ResNet backbone
(`backbone_config.model_type == "resnet"`, bottleneck or basic blocks) and the MSDeformAttn
pixel decoder, or the same state_dict and config given as Python objects (`convert`). The
config gives what the tensors cannot: attention heads, sampling points per level.

Conventions both sides share (so no preset is needed): sine positions normalised by (n + 1e-6)
without a half-cell offset; MSDeformAttn offsets in cells of each level around cell centres;
cross-attention before self-attention; a query with an empty mask attends everywhere;
predictions from the LayerNorm of the query states before the first layer and after each. The
converted model expects images in 0-255 RGB and normalises them with the ImageNet mean and std
(the image processor's defaults, image_mean and image_std times 255).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jax
import numpy as np

from instseg_jax.methods import mask2former
from instseg_jax.weights.resnet import body_layout, convert_body
from instseg_jax.weights.state_dict import (
    conv_kernel,
    conv_params,
    count_indices,
    dense_params,
    f32,
    load_state_dict,
)
from instseg_jax.weights.torchvision import COCO_CATEGORY_NAMES, coco_eval_config

PIXEL = "model.pixel_level_module."
TRANSFORMER = "model.transformer_module."


class HuggingFaceWeightsError(ValueError):
    """A checkpoint or config this importer cannot map (names the file or key and the fix)."""


def is_mask2former(state_dict: dict) -> bool:
    return f"{TRANSFORMER}queries_features.weight" in state_dict and "class_predictor.weight" in (
        state_dict
    )


def _layer_norm(sd, prefix):
    return {"scale": f32(sd[f"{prefix}.weight"]), "bias": f32(sd[f"{prefix}.bias"])}


def _group_norm(sd, prefix):
    return {"gn": _layer_norm(sd, prefix)}


def _torchvision_names(sd: dict) -> dict:
    """The HF ResNet backbone's keys renamed to torchvision's (conv1, bn1, layerS.B.convI,
    .downsample.0/1), so the torchvision body converter serves both."""
    prefix = f"{PIXEL}encoder."
    out = {}
    for key, value in sd.items():
        if not key.startswith(prefix) or key.endswith("num_batches_tracked"):
            continue
        name = key[len(prefix) :]
        name = name.replace("embedder.embedder.convolution", "conv1")
        name = name.replace("embedder.embedder.normalization", "bn1")
        m = re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$", name)
        if m:
            stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
            rest = re.sub(
                r"^layer\.(\d+)\.convolution", lambda r: f"conv{int(r.group(1)) + 1}", rest
            )
            rest = re.sub(
                r"^layer\.(\d+)\.normalization", lambda r: f"bn{int(r.group(1)) + 1}", rest
            )
            rest = rest.replace("shortcut.convolution", "downsample.0")
            rest = rest.replace("shortcut.normalization", "downsample.1")
            name = f"layer{stage}.{block}.{rest}"
        out[name] = value
    return out


def model_section(sd: dict, hf_config: dict) -> tuple[dict, int]:
    """(our model fields for this checkpoint, the rest staying the method's defaults; its number
    of classes)."""
    backbone = hf_config.get("backbone_config") or {}
    if backbone.get("model_type") != "resnet":
        raise HuggingFaceWeightsError(
            f"config.json backbone_config.model_type is {backbone.get('model_type')!r}; only "
            "ResNet backbones map onto this library's ResNet (Swin is not implemented)"
        )
    body = _torchvision_names(sd)
    layout = body_layout(body)
    blocks = layout["stage_blocks"]
    depth = 50 if layout["bottleneck"] else 18
    encoder_layers = count_indices(sd, rf"^{re.escape(PIXEL)}decoder\.encoder\.layers\.(\d+)\.")
    decoder_layers = count_indices(sd, rf"^{re.escape(TRANSFORMER)}decoder\.layers\.(\d+)\.")
    heads = int(hf_config.get("num_attention_heads", 8))
    offsets = sd[f"{PIXEL}decoder.encoder.layers.0.self_attn.sampling_offsets.weight"].shape[0]
    encoder_points = offsets // (heads * 3 * 2)
    return {
        "depth": depth,
        "width": int(layout["width"]),
        "stage_blocks": tuple(int(b) for b in blocks),
        "norm": "frozen_bn",
        "freeze_at": 0,
        "pixel_decoder": "msdeform",
        "transformer_decoder": "masked",
        "conv_dim": int(sd[f"{PIXEL}decoder.mask_projection.weight"].shape[1]),
        "mask_dim": int(sd[f"{PIXEL}decoder.mask_projection.weight"].shape[0]),
        "hidden_dim": int(sd[f"{TRANSFORMER}queries_features.weight"].shape[1]),
        "num_queries": int(sd[f"{TRANSFORMER}queries_features.weight"].shape[0]),
        "heads": heads,
        "encoder_heads": heads,
        "encoder_points": int(encoder_points),
        "encoder_layers": encoder_layers,
        "encoder_feedforward": int(sd[f"{PIXEL}decoder.encoder.layers.0.fc1.weight"].shape[0]),
        "decoder_layers": decoder_layers,
        "decoder_feedforward": int(sd[f"{TRANSFORMER}decoder.layers.0.fc1.weight"].shape[0]),
    }, int(sd["class_predictor.weight"].shape[0]) - 1


def convert(sd: dict, hf_config: dict) -> tuple[dict, dict, dict, int]:
    """(params, frozen, model fields, num_classes) of our Mask2Former from a HF state_dict."""
    if not is_mask2former(sd):
        raise HuggingFaceWeightsError(
            "not a Mask2FormerForUniversalSegmentation state_dict (no "
            f"{TRANSFORMER}queries_features.weight or class_predictor.weight)"
        )
    fields, num_classes = model_section(sd, hf_config)
    body = _torchvision_names(sd)
    backbone_params, backbone_frozen = convert_body(body, body_layout(body))

    d = f"{PIXEL}decoder."
    pixel = {"level_embed": {"embedding": f32(sd[f"{d}level_embed"])}}
    for i in range(3):
        pixel[f"input_proj{i}"] = conv_params(sd, f"{d}input_projections.{i}.0")
        pixel[f"input_norm{i}"] = _group_norm(sd, f"{d}input_projections.{i}.1")
    for i in range(fields["encoder_layers"]):
        e = f"{d}encoder.layers.{i}."
        pixel[f"encoder{i}_attn"] = {
            name: dense_params(sd, f"{e}self_attn.{name}")
            for name in ("value_proj", "sampling_offsets", "attention_weights", "output_proj")
        }
        pixel[f"encoder{i}_norm"] = _layer_norm(sd, f"{e}self_attn_layer_norm")
        pixel[f"encoder{i}_ffn"] = {
            "linear1": dense_params(sd, f"{e}fc1"),
            "linear2": dense_params(sd, f"{e}fc2"),
            "norm": _layer_norm(sd, f"{e}final_layer_norm"),
        }
    pixel["adapter1"] = {"kernel": conv_kernel(sd[f"{d}adapter_1.0.weight"])}
    pixel["adapter1_norm"] = _group_norm(sd, f"{d}adapter_1.1")
    pixel["layer1"] = {"kernel": conv_kernel(sd[f"{d}layer_1.0.weight"])}
    pixel["layer1_norm"] = _group_norm(sd, f"{d}layer_1.1")
    pixel["mask_features"] = conv_params(sd, f"{d}mask_projection")

    t = TRANSFORMER
    heads = {
        "decoder_norm": _layer_norm(sd, f"{t}decoder.layernorm"),
        "class_embed": dense_params(sd, "class_predictor"),
    }
    for i in range(3):
        heads[f"mask_embed{i}"] = dense_params(sd, f"{t}decoder.mask_predictor.mask_embedder.{i}.0")
    decoder = {
        "level_embed": {"embedding": f32(sd[f"{t}level_embed.weight"])},
        "query_feat": {"embedding": f32(sd[f"{t}queries_features.weight"])},
        "query_embed": {"embedding": f32(sd[f"{t}queries_embedder.weight"])},
        "heads": heads,
    }
    dim = fields["hidden_dim"]
    for i in range(fields["decoder_layers"]):
        layer = f"{t}decoder.layers.{i}."
        w = f32(sd[f"{layer}cross_attn.in_proj_weight"])
        b = f32(sd[f"{layer}cross_attn.in_proj_bias"])
        cross = {
            f"{name}_proj": {
                "kernel": w[k * dim : (k + 1) * dim].T.copy(),
                "bias": b[k * dim : (k + 1) * dim].copy(),
            }
            for k, name in enumerate(("q", "k", "v"))
        }
        cross["out_proj"] = dense_params(sd, f"{layer}cross_attn.out_proj")
        cross["norm"] = _layer_norm(sd, f"{layer}cross_attn_layer_norm")
        decoder[f"cross{i}"] = cross
        decoder[f"self{i}"] = {
            name: dense_params(sd, f"{layer}self_attn.{name}")
            for name in ("q_proj", "k_proj", "v_proj", "out_proj")
        }
        decoder[f"self{i}"]["norm"] = _layer_norm(sd, f"{layer}self_attn_layer_norm")
        decoder[f"ffn{i}"] = {
            "linear1": dense_params(sd, f"{layer}fc1"),
            "linear2": dense_params(sd, f"{layer}fc2"),
            "norm": _layer_norm(sd, f"{layer}final_layer_norm"),
        }
    params = {
        "backbone": backbone_params,
        "pixel_decoder": pixel,
        "transformer_decoder": decoder,
    }
    frozen = {"backbone": backbone_frozen}
    return params, frozen, fields, num_classes


def load(directory: str | Path) -> tuple[dict, dict]:
    """(state_dict as float32 NumPy arrays, config dict) of a save_pretrained directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise HuggingFaceWeightsError(
            f"{directory}: no config.json; give the directory Mask2FormerForUniversalSegmentation"
            ".save_pretrained wrote"
        )
    hf_config = json.loads(config_path.read_text())
    safetensors = directory / "model.safetensors"
    if safetensors.is_file():
        sd = load_state_dict(safetensors)
    elif (directory / "pytorch_model.bin").is_file():
        sd = load_state_dict(directory / "pytorch_model.bin")
    else:
        raise HuggingFaceWeightsError(
            f"{directory}: neither model.safetensors nor pytorch_model.bin"
        )
    return {k: np.asarray(v) for k, v in sd.items()}, hf_config


@functools.lru_cache(maxsize=4)
def _predict_program(cfg):
    """One jitted forward per model config (the parity checks call it several times)."""
    model = mask2former.Model(cfg)
    return jax.jit(lambda v, x: model.apply(v, x, method=mask2former.Mask2Former.predict))


def predict(params: dict, frozen: dict, fields: dict, num_classes: int, images: np.ndarray):
    """(class logits [P, B, Q, C+1], mask logits [P, B, Q, H/4, W/4]) of every prediction layer
    of the converted model on images [B, H, W, 3] in 0-255 RGB (H, W multiples of 32)."""
    cfg = mask2former.Mask2FormerConfig(
        num_classes=num_classes, canvas_hw=tuple(images.shape[1:3]), **fields
    )
    variables = {"params": params, "frozen": frozen}
    classes, masks = _predict_program(cfg)(variables, np.asarray(images, np.float32))
    return np.asarray(classes), np.asarray(masks)


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs|: the parity figure of one output."""
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def coco_config(fields: dict, num_classes: int, hf_config: dict, canvas_hw=(1024, 1024)):
    """The experiment config of an imported model: our COCO Mask2Former with the checkpoint's
    architecture and its class names (COCO's 80 category ids when it has 80 classes)."""
    c = coco_eval_config(mask2former.base_config(), canvas_hw)
    c.input.test_short_side = min(canvas_hw)
    c.input.test_max_long_side = max(canvas_hw)
    for key, value in fields.items():
        c.model[key] = value
    labels = hf_config.get("id2label") or {}
    names = tuple(labels.get(str(i), f"class_{i}") for i in range(num_classes))
    if num_classes == 80:
        ids = tuple(
            i for i, n in enumerate(COCO_CATEGORY_NAMES) if n not in ("__background__", "N/A")
        )
    else:
        ids = tuple(range(1, num_classes + 1))
    c.input.category_ids = ids
    c.input.class_names = names
    return c
