"""torchvision's Mask R-CNN (``maskrcnn_resnet50_fpn``, v1) weights in instseg_jax (FCOS's:
weights/torchvision_fcos.py; weights/importer.py chooses the converter from the keys).

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

import numpy as np

from instseg_jax.backbones.resnet import IMAGENET_MEAN
from instseg_jax.input.transforms import resize_bilinear
from instseg_jax.methods import mask_rcnn
from instseg_jax.weights import resnet
from instseg_jax.weights.state_dict import (
    StateDictError,
    conv_params,
    conv_transpose_kernel,
    count_indices,
    dense_1x1_kernel,
    dense_kernel,
    dense_params,
    f32,
    read_checked,
    shape_of,
)

MODEL_NAME = "torchvision maskrcnn_resnet50_fpn"

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

BODY = "backbone.body."


def architecture(sd: dict) -> dict:
    """Model config fields of a (normalised) state_dict: block counts and widths from shapes."""
    return {  # looked up in module order, so the first missing key is the one reported
        "depth": 50,
        "stage_blocks": resnet.stage_blocks(sd.keys(), BODY),
        "width": shape_of(sd, "backbone.body.conv1.weight")[0],
        "fpn_channels": shape_of(sd, "backbone.fpn.inner_blocks.0.0.weight")[0],
        "box_fc_dim": shape_of(sd, "roi_heads.box_head.fc6.weight")[0],
        "mask_head_convs": count_indices(sd, r"^roi_heads\.mask_head\.(\d+)\.0\.weight$"),
        "num_anchors": shape_of(sd, "rpn.head.cls_logits.weight")[0],
        "num_classes": shape_of(sd, "roi_heads.box_predictor.cls_score.weight")[0] - 1,
    }


def body_layout(arch: dict) -> dict:
    """resnet.py's layout of the ResNet body of an architecture (always bottleneck blocks)."""
    return {"bottleneck": True, "stage_blocks": arch["stage_blocks"], "width": arch["width"]}


def expected_keys(arch: dict) -> list[str]:
    """Every key of torchvision's Mask R-CNN with this architecture, in module order."""
    keys = resnet.body_keys(body_layout(arch), BODY)
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


def convert(state_dict: dict, source: str = "state_dict") -> tuple[dict, dict]:
    """({"params": ..., "frozen": ...}, architecture) of a torchvision Mask R-CNN state_dict.

    Raises StateDictError naming ``source`` and the first missing key (in module order) or,
    when none is missing, the first unexpected one.
    """
    sd, arch = read_checked(state_dict, source, MODEL_NAME, architecture, expected_keys)
    if arch["num_anchors"] != 3:
        raise StateDictError(
            f"{source}: rpn.head.cls_logits has {arch['num_anchors']} anchors per location; "
            "the torchvision preset has 3 (aspect ratios 0.5, 1, 2)"
        )
    body, frozen_body = resnet.convert_body(sd, body_layout(arch), BODY)
    params = {
        "backbone": body,
        "fpn": fpn_params(sd),
        "rpn_head": rpn_head_params(sd),
        "box_head": box_head_params(sd, arch, source),
        "mask_head": _mask_head_params(sd, arch, source),
    }
    return {"params": params, "frozen": {"backbone": frozen_body}}, arch


def fpn_params(sd: dict) -> dict:
    """The FPN's lateral and output convs of P2..P5 (Mask R-CNN's and Keypoint R-CNN's)."""
    fpn = {}
    for i in range(4):
        for kind, ours in (("inner", "lateral"), ("layer", "output")):
            fpn[f"{ours}{i + 2}"] = conv_params(sd, f"backbone.fpn.{kind}_blocks.{i}.0")
    return fpn


def rpn_head_params(sd: dict) -> dict:
    """The RPN head: a 3x3 conv, then 1x1 objectness and box-delta convs as Dense layers."""
    return {
        "conv": conv_params(sd, "rpn.head.conv.0.0"),
        "objectness": {
            "kernel": dense_1x1_kernel(sd["rpn.head.cls_logits.weight"]),
            "bias": f32(sd["rpn.head.cls_logits.bias"]),
        },
        # Both sides lay deltas out as channel a * 4 + (dx, dy, dw, dh).
        "deltas": {
            "kernel": dense_1x1_kernel(sd["rpn.head.bbox_pred.weight"]),
            "bias": f32(sd["rpn.head.bbox_pred.bias"]),
        },
    }


def box_head_params(sd: dict, arch: dict, source: str) -> dict:
    """The two-FC box head and its predictor, the background class moved last."""
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
            "kernel": f32(
                fc6.reshape(fc_dim, channels, side, side).transpose(2, 3, 1, 0).reshape(-1, fc_dim)
            ),
            "bias": f32(sd["roi_heads.box_head.fc6.bias"]),
        },
        "fc2": dense_params(sd, "roi_heads.box_head.fc7"),
        # Background moves from the first output to the last.
        "cls_score": {
            "kernel": dense_kernel(np.concatenate([cls_w[1:], cls_w[:1]])),
            "bias": f32(np.concatenate([cls_b[1:], cls_b[:1]])),
        },
        # Class-major [(C + 1) * 4] outputs; the background's 4 are never used.
        "bbox_pred": {
            "kernel": dense_kernel(sd["roi_heads.box_predictor.bbox_pred.weight"][4:]),
            "bias": f32(sd["roi_heads.box_predictor.bbox_pred.bias"][4:]),
        },
    }


def _mask_head_params(sd: dict, arch: dict, source: str) -> dict:
    mask_head = {}
    for i in range(arch["mask_head_convs"]):
        mask_head[f"conv{i + 1}"] = conv_params(sd, f"roi_heads.mask_head.{i}.0")
    mask_head["deconv"] = {
        "kernel": conv_transpose_kernel(sd["roi_heads.mask_predictor.conv5_mask.weight"]),
        "bias": f32(sd["roi_heads.mask_predictor.conv5_mask.bias"]),
    }
    logits_w = sd["roi_heads.mask_predictor.mask_fcn_logits.weight"]  # [C + 1, D, 1, 1]
    mask_head["predictor"] = {
        "kernel": dense_1x1_kernel(logits_w[1:]),
        "bias": f32(sd["roi_heads.mask_predictor.mask_fcn_logits.bias"][1:]),
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
    # Training losses (models/detection/rpn.py compute_loss, roi_heads.py fastrcnn_loss):
    # smooth L1 of beta 1/9 in both regressions, the RPN's divided by the anchors sampled.
    m.rpn_smooth_l1_beta = 1.0 / 9
    m.box_smooth_l1_beta = 1.0 / 9
    m.rpn_loss_normalizer = "sampled"
    m.box_pool_size = 7
    m.mask_pool_size = 14
    m.score_threshold = 0.05
    m.test_pre_nms_topk = 0  # every (proposal, class) pair above the threshold
    m.test_min_box_size = 1e-2
    m.test_nms_threshold = 0.5
    m.detections_per_image = 100
    m.box_rescale = "per_axis"
    m.mask_paste = "torchvision"


def coco_eval_config(c, canvas_hw, annotations: str = "instances_val2017.json"):
    """c (a method's COCO base config) set to evaluate an imported model on COCO val2017 under
    data/coco, one image per batch, on a canvas_hw canvas."""
    c.input.eval_split.annotations = f"data/coco/annotations/{annotations}"
    c.input.eval_split.images = "data/coco/val2017"
    c.input.canvas_hw = tuple(canvas_hw)
    c.eval.global_batch = 1
    return c


def imported_config(c, arch: dict, fields, canvas_hw, preset, annotations="instances_val2017.json"):
    """The experiment config of an imported torchvision model: c (the method's COCO base) set
    to evaluate on COCO val2017, switched to torchvision's conventions by `preset`, with the
    architecture `fields` read from the weights and torchvision's class map."""
    coco_eval_config(c, canvas_hw, annotations)
    preset(c)
    for key in fields:
        c.model[key] = arch[key]
    set_class_map(c, arch["num_classes"])
    return c


# The model fields a Mask R-CNN state_dict decides (the rest are the preset's).
ARCH_FIELDS = ("depth", "stage_blocks", "width", "fpn_channels", "box_fc_dim", "mask_head_convs")


def coco_config(arch: dict, canvas_hw=(1344, 1344)):
    """The experiment config of an imported model: detectron2's COCO base with the torchvision
    preset, the architecture read from the weights and torchvision's class map."""
    c = imported_config(mask_rcnn.base_config(), arch, ARCH_FIELDS, canvas_hw, apply_preset)
    c.model.mask_on = True
    return c


def set_class_map(c, num_classes: int) -> None:
    """torchvision's class layout: class i is COCO category id i + 1, named as in COCO_V1 when
    the model has all 91 outputs."""
    c.input.category_ids = tuple(range(1, num_classes + 1))
    if num_classes + 1 == len(COCO_CATEGORY_NAMES):
        c.input.class_names = COCO_CATEGORY_NAMES[1:]
    else:
        c.input.class_names = tuple(f"class_{k}" for k in range(1, num_classes + 1))


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
