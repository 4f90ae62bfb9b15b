"""torchvision's Mask R-CNN (``maskrcnn_resnet50_fpn``, v1) weights in instseg_jax (FCOS's:
weights/torchvision_fcos.py, chosen by `import_weights` from the keys).

    instseg-jax import-weights torchvision maskrcnn_resnet50_fpn_coco.pth --out runs/tv
    instseg-jax eval --workdir runs/tv        # COCO val2017 under data/coco
    instseg-jax predict --workdir runs/tv --images photos/ --out preds/

`convert` maps a state_dict (a ``.pth`` read with ``torch.load(weights_only=True)``, an ``.npz``
of the same keys, or a dict of NumPy arrays) onto our parameter tree; `apply_preset` switches a
config to torchvision's conventions so that the converted model reproduces torchvision's
detections: legacy RoIAlign (aligned=False, 2 samples per bin), its level mapper (eps 1e-6
after the log2), its anchors (ratio-major float32 cell anchors rounded to integers, strides
canvas // grid), its resize (short side 800, long side <= 1333, floor of the scaled size,
bilinear without antialiasing) and padding (the mean colour, i.e. zeros after normalisation),
its RPN (1000 per level, 1000 after NMS 0.7 at test, boxes of at least 1e-3) and RoI-head
settings (score > 0.05 over every proposal and class, boxes of at least 1e-2, NMS 0.5, 100 per
image, boxes rescaled by original/resized size per axis) and its mask paste
(`detections.paste_box_mask_torchvision`). experiments/parity/torchvision.py measures the
agreement.

Class layout: torchvision's heads put the background at index 0 of 91 outputs whose index is
the COCO category id (with "N/A" gaps); ours put it last, so class i here is category i + 1.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from instseg_jax import config as config_lib
from instseg_jax.backbones.resnet import IMAGENET_MEAN
from instseg_jax.input.transforms import resize_bilinear
from instseg_jax.weights import resnet
from instseg_jax.weights.resnet import _conv, _f32

# torchvision's COCO_V1 category names: index = COCO category id, 0 the background.
COCO_CATEGORY_NAMES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# The ImageNet mean colour (0-255) rounded: torchvision pads its batches with zeros after
# normalisation, i.e. with exactly the mean; a uint8 canvas comes within half a level of it.
PAD_VALUE = (124, 116, 104)

# Key names of torchvision releases before ~0.13 (and of its published .pth files) -> today's.
_LEGACY_KEYS = (
    (re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)$"),
     r"backbone.fpn.\1_blocks.\2.0.\3"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"), None),
)  # fmt: skip


class StateDictError(ValueError):
    """A state_dict that is not torchvision's Mask R-CNN (names the key and the file)."""


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """float32 NumPy arrays by key from a .pth (torch.load, weights_only=True) or .npz file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return {k: arrays[k] for k in arrays.files}
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs torch (pip install 'instseg_jax[torch]'), or save the "
            "state_dict as .npz with numpy.savez(file, **{k: v.numpy() for k, v in sd.items()})"
        ) from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # torchvision's reference training scripts save {"model": ...}
    if not isinstance(state, dict):
        raise StateDictError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def normalize_keys(state_dict: dict) -> dict[str, np.ndarray]:
    """Today's torchvision key names; drops BN step counters and a DataParallel prefix."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, replacement in _LEGACY_KEYS:
            match = pattern.match(key)
            if match and replacement is None:  # mask_fcn1.. -> mask_head.0.0..
                key = f"roi_heads.mask_head.{int(match.group(1)) - 1}.0.{match.group(2)}"
            elif match:
                key = pattern.sub(replacement, key)
        out[key] = np.asarray(value)
    return out


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def architecture(state_dict: dict) -> dict:
    """Model config fields of a (normalised) state_dict: block counts and widths from shapes."""
    keys = state_dict.keys()

    def shape(key):
        if key not in state_dict:
            raise StateDictError(f"missing key {key!r}")
        return state_dict[key].shape

    blocks = tuple(
        _count(keys, rf"^backbone\.body\.layer{s}\.(\d+)\.conv1\.weight$") for s in (1, 2, 3, 4)
    )
    return {  # looked up in module order, so the first missing key is the one reported
        "depth": 50,
        "stage_blocks": blocks,
        "width": shape("backbone.body.conv1.weight")[0],
        "fpn_channels": shape("backbone.fpn.inner_blocks.0.0.weight")[0],
        "box_fc_dim": shape("roi_heads.box_head.fc6.weight")[0],
        "mask_head_convs": _count(keys, r"^roi_heads\.mask_head\.(\d+)\.0\.weight$"),
        "num_anchors": shape("rpn.head.cls_logits.weight")[0],
        "num_classes": shape("roi_heads.box_predictor.cls_score.weight")[0] - 1,
    }


BODY = "backbone.body."


def _body_layout(arch: dict) -> dict:
    return {"bottleneck": True, "stage_blocks": arch["stage_blocks"], "width": arch["width"]}


def expected_keys(arch: dict) -> list[str]:
    """Every key of torchvision's Mask R-CNN with this architecture, in module order."""
    keys = resnet.body_keys(_body_layout(arch), BODY)
    for kind in ("inner", "layer"):
        for i in range(4):
            keys += [
                f"backbone.fpn.{kind}_blocks.{i}.0.weight",
                f"backbone.fpn.{kind}_blocks.{i}.0.bias",
            ]
    for name in ("conv.0.0", "cls_logits", "bbox_pred"):
        keys += [f"rpn.head.{name}.weight", f"rpn.head.{name}.bias"]
    for name in (
        "box_head.fc6",
        "box_head.fc7",
        "box_predictor.cls_score",
        "box_predictor.bbox_pred",
    ):
        keys += [f"roi_heads.{name}.weight", f"roi_heads.{name}.bias"]
    for i in range(max(arch["mask_head_convs"], 1)):
        keys += [f"roi_heads.mask_head.{i}.0.weight", f"roi_heads.mask_head.{i}.0.bias"]
    for name in ("conv5_mask", "mask_fcn_logits"):
        keys += [f"roi_heads.mask_predictor.{name}.weight", f"roi_heads.mask_predictor.{name}.bias"]
    return keys


def _dense_1x1(w):  # torch 1x1 conv [O, I, 1, 1] -> Dense kernel [I, O]
    return np.ascontiguousarray(w[:, :, 0, 0].T, dtype=np.float32)


def convert(state_dict: dict, source: str = "state_dict") -> tuple[dict, dict]:
    """({"params": ..., "frozen": ...}, architecture) of a torchvision Mask R-CNN state_dict.

    Raises StateDictError naming ``source`` and the first missing key (in module order) or,
    when none is missing, the first unexpected one.
    """
    sd = normalize_keys(state_dict)
    try:
        arch = architecture(sd)
    except StateDictError as error:
        raise StateDictError(
            f"{source}: not a torchvision maskrcnn_resnet50_fpn state_dict: {error}"
        ) from None
    _check_keys(sd, arch, source)
    body, frozen_body = resnet.convert_body(sd, _body_layout(arch), BODY)
    params = {
        "backbone": body,
        "fpn": _fpn_params(sd),
        "rpn_head": _rpn_head_params(sd),
        "box_head": _box_head_params(sd, arch, source),
        "mask_head": _mask_head_params(sd, arch, source),
    }
    return {"params": params, "frozen": {"backbone": frozen_body}}, arch


def _check_keys(sd: dict, arch: dict, source: str) -> None:
    """The keys of exactly this architecture, and the preset's 3 anchors per location."""
    expected = expected_keys(arch)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise StateDictError(
            f"{source}: not a torchvision maskrcnn_resnet50_fpn state_dict: missing key "
            f"{missing[0]!r} ({len(missing)} missing in all)"
        )
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise StateDictError(
            f"{source}: not a torchvision maskrcnn_resnet50_fpn state_dict: unexpected key "
            f"{unexpected[0]!r} ({len(unexpected)} unexpected in all)"
        )
    if arch["num_anchors"] != 3:
        raise StateDictError(
            f"{source}: rpn.head.cls_logits has {arch['num_anchors']} anchors per location; "
            "the torchvision preset has 3 (aspect ratios 0.5, 1, 2)"
        )


def _fpn_params(sd: dict) -> dict:
    fpn = {}
    for i in range(4):
        for kind, ours in (("inner", "lateral"), ("layer", "output")):
            prefix = f"backbone.fpn.{kind}_blocks.{i}.0"
            fpn[f"{ours}{i + 2}"] = {
                "kernel": _conv(sd[f"{prefix}.weight"]),
                "bias": _f32(sd[f"{prefix}.bias"]),
            }
    return fpn


def _rpn_head_params(sd: dict) -> dict:
    return {
        "conv": {
            "kernel": _conv(sd["rpn.head.conv.0.0.weight"]),
            "bias": _f32(sd["rpn.head.conv.0.0.bias"]),
        },
        "objectness": {
            "kernel": _dense_1x1(sd["rpn.head.cls_logits.weight"]),
            "bias": _f32(sd["rpn.head.cls_logits.bias"]),
        },
        # Both sides lay deltas out as channel a * 4 + (dx, dy, dw, dh).
        "deltas": {
            "kernel": _dense_1x1(sd["rpn.head.bbox_pred.weight"]),
            "bias": _f32(sd["rpn.head.bbox_pred.bias"]),
        },
    }


def _box_head_params(sd: dict, arch: dict, source: str) -> dict:
    fc6 = sd["roi_heads.box_head.fc6.weight"]  # [F, D * 7 * 7], input index d * 49 + y * 7 + x
    fc_dim, channels = fc6.shape[0], arch["fpn_channels"]
    side = round((fc6.shape[1] / channels) ** 0.5)
    if side * side * channels != fc6.shape[1]:
        raise StateDictError(
            f"{source}: roi_heads.box_head.fc6.weight has {fc6.shape[1]} inputs, not "
            f"{channels} channels x a square pooled grid"
        )
    cls_w = sd["roi_heads.box_predictor.cls_score.weight"]  # [C + 1, F], background first
    cls_b = sd["roi_heads.box_predictor.cls_score.bias"]
    return {
        # Ours flattens pooled [y, x, d]: input index (y * 7 + x) * D + d.
        "fc1": {
            "kernel": _f32(
                fc6.reshape(fc_dim, channels, side, side).transpose(2, 3, 1, 0).reshape(-1, fc_dim)
            ),
            "bias": _f32(sd["roi_heads.box_head.fc6.bias"]),
        },
        "fc2": {
            "kernel": _f32(sd["roi_heads.box_head.fc7.weight"].T),
            "bias": _f32(sd["roi_heads.box_head.fc7.bias"]),
        },
        # Background moves from the first output to the last.
        "cls_score": {
            "kernel": _f32(np.concatenate([cls_w[1:], cls_w[:1]]).T),
            "bias": _f32(np.concatenate([cls_b[1:], cls_b[:1]])),
        },
        # Class-major [(C + 1) * 4] outputs; the background's 4 are never used.
        "bbox_pred": {
            "kernel": _f32(sd["roi_heads.box_predictor.bbox_pred.weight"][4:].T),
            "bias": _f32(sd["roi_heads.box_predictor.bbox_pred.bias"][4:]),
        },
    }


def _mask_head_params(sd: dict, arch: dict, source: str) -> dict:
    mask_head = {}
    for i in range(arch["mask_head_convs"]):
        prefix = f"roi_heads.mask_head.{i}.0"
        mask_head[f"conv{i + 1}"] = {
            "kernel": _conv(sd[f"{prefix}.weight"]),
            "bias": _f32(sd[f"{prefix}.bias"]),
        }
    deconv = sd["roi_heads.mask_predictor.conv5_mask.weight"]  # [in, out, 2, 2]
    mask_head["deconv"] = {
        "kernel": _f32(np.transpose(deconv, (2, 3, 0, 1))),  # [2, 2, in, out], same taps
        "bias": _f32(sd["roi_heads.mask_predictor.conv5_mask.bias"]),
    }
    logits_w = sd["roi_heads.mask_predictor.mask_fcn_logits.weight"]  # [C + 1, D, 1, 1]
    mask_head["predictor"] = {
        "kernel": _dense_1x1(logits_w[1:]),
        "bias": _f32(sd["roi_heads.mask_predictor.mask_fcn_logits.bias"][1:]),
    }
    channels = arch["fpn_channels"]
    if mask_head["conv1"]["kernel"].shape[-1] != channels:
        raise StateDictError(
            f"{source}: the mask head has {mask_head['conv1']['kernel'].shape[-1]} channels and "
            f"the FPN {channels}; this model needs them equal"
        )
    return mask_head


def apply_detector_preset(config) -> None:
    """What every torchvision detector shares (Mask R-CNN, FCOS): GeneralizedRCNNTransform's
    resize (short side 800, long side <= 1333, its rounding) and mean-colour padding, and a
    FrozenBN backbone with trainable_backbone_layers=3."""
    i, m = config.input, config.model
    i.resize = "short_side"
    i.resize_rule = "torchvision"
    i.short_side = (800,)
    i.max_long_side = 1333
    i.test_short_side = 800
    i.test_max_long_side = 1333
    i.pad_value = PAD_VALUE
    m.norm = "frozen_bn"
    m.freeze_at = 2  # trainable_backbone_layers=3: conv1 and layer1 frozen


def apply_preset(config) -> None:
    """Switch an experiment config (ConfigDict, unlocked) to torchvision's conventions."""
    apply_detector_preset(config)
    m = config.model
    m.aligned = False
    m.sampling_ratio = 2
    m.level_mapper = "torchvision"
    m.anchor_style = "torchvision"
    m.anchor_sizes = ((32,), (64,), (128,), (256,), (512,))
    m.aspect_ratios = (0.5, 1.0, 2.0)
    m.rpn_pre_nms_topk_train = 2000
    m.rpn_post_nms_topk_train = 2000
    m.rpn_pre_nms_topk_test = 1000
    m.rpn_post_nms_topk_test = 1000
    m.rpn_nms_threshold = 0.7
    m.rpn_min_size = 1e-3
    m.rpn_batch_per_image = 256
    m.rpn_positive_fraction = 0.5
    m.roi_batch_per_image = 512
    m.roi_positive_fraction = 0.25
    m.box_pool_size = 7
    m.mask_pool_size = 14
    m.score_threshold = 0.05
    m.test_pre_nms_topk = 0  # every (proposal, class) pair above the threshold
    m.test_min_box_size = 1e-2
    m.test_nms_threshold = 0.5
    m.detections_per_image = 100
    m.box_rescale = "per_axis"
    m.mask_paste = "torchvision"


def coco_config(arch: dict, canvas_hw=(1344, 1344)):
    """The experiment config of an imported model: detectron2's COCO base with the torchvision
    preset, the architecture read from the weights and torchvision's class map."""
    from instseg_jax.methods import mask_rcnn

    c = mask_rcnn.base_config()
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    c.input.canvas_hw = tuple(canvas_hw)
    c.eval.global_batch = 1
    apply_preset(c)
    for key in ("depth", "stage_blocks", "width", "fpn_channels", "box_fc_dim", "mask_head_convs"):
        c.model[key] = arch[key]
    c.model.mask_on = True
    set_class_map(c, arch["num_classes"])
    return c


def set_class_map(c, num_classes: int) -> None:
    """torchvision's class layout: class i is COCO category id i + 1, named as in COCO_V1 when
    the model has all 91 outputs."""
    c.input.category_ids = tuple(range(1, num_classes + 1))
    if num_classes + 1 == len(COCO_CATEGORY_NAMES):
        c.input.class_names = COCO_CATEGORY_NAMES[1:]
    else:
        c.input.class_names = tuple(f"class_{k}" for k in range(1, num_classes + 1))


def import_weights(weights: str | Path, out: str | Path, canvas_hw=(1344, 1344)) -> Path:
    """Write out/config.json and an orbax checkpoint (step 0) that `eval` and `predict` read."""
    import jax
    import jax.numpy as jnp

    from instseg_jax import builders
    from instseg_jax.checkpoint import Checkpointer
    from instseg_jax.weights import torchvision_fcos, torchvision_keypoint

    state_dict = load_state_dict(weights)
    if torchvision_fcos.is_fcos(state_dict):
        variables, arch = torchvision_fcos.convert(state_dict, str(weights))
        config = torchvision_fcos.coco_config(arch, canvas_hw)
    elif torchvision_keypoint.is_keypoint_rcnn(state_dict):
        variables, arch = torchvision_keypoint.convert(state_dict, str(weights))
        config = torchvision_keypoint.coco_config(arch, canvas_hw)
    else:
        variables, arch = convert(state_dict, str(weights))
        config = coco_config(arch, canvas_hw)
    out = Path(out)
    config_lib.save(config, out)
    builders.write_class_map(out, config.input.category_ids, config.input.class_names)
    state = {
        "params": jax.tree.map(jnp.asarray, variables["params"]),
        "frozen": jax.tree.map(jnp.asarray, variables["frozen"]),
        "step": jnp.asarray(0, jnp.int32),
    }
    checkpointer = Checkpointer(out, 1, 1, use_async=False)
    checkpointer.save(0, state, {"imported_from": str(weights)}, force=True)
    checkpointer.close()
    return out


# ----------------------------------------------------------------------------- inference side


def resized_size(orig_hw, min_size: int = 800, max_size: int = 1333) -> tuple[int, int]:
    """torchvision's GeneralizedRCNNTransform size: scale = min(min_size / short, max_size /
    long) in double precision, each side floor(side * scale)."""
    h, w = (int(v) for v in orig_hw)
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return int(np.floor(h * scale)), int(np.floor(w * scale))


def preprocess(image: np.ndarray, min_size: int = 800, max_size: int = 1333, divisor: int = 32):
    """(float32[Hp, Wp, 3] pixels, (h, w)) as torchvision feeds its model, in 0-255 units: the
    image resized in float by torch's bilinear rule and padded to a multiple of ``divisor``
    with the mean colour (zeros after normalisation)."""
    h, w = resized_size(image.shape[:2], min_size, max_size)
    resized = resize_bilinear(image.astype(np.float32), (h, w))
    hp, wp = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    canvas = np.empty((hp, wp, 3), np.float32)
    canvas[:] = np.asarray(IMAGENET_MEAN, np.float32)
    canvas[:h, :w] = resized
    return canvas, (h, w)
