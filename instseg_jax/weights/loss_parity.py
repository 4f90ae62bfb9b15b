"""Our side of the torchvision loss parity check (training mode), and the comparison itself.

experiments/parity/torchvision_losses.py runs torchvision's Mask R-CNN, FCOS and Keypoint
R-CNN in training mode (the `make peer` environment) and `mask_rcnn_losses`, `fcos_losses` and
`keypoint_rcnn_losses` here on the same converted weights, image and ground truth, then
`compare_losses`; tests/weights/test_torchvision_losses.py compares ours with torchvision's
loss terms and head gradients stored in tests/fixtures/torchvision_*losses_tiny.npz (no torch
needed there).

Both two-stage samplers keep every candidate (the script raises torchvision's
batch_size_per_image beyond any candidate count; `loss_overrides` sizes ours to all anchors and
all RoI candidates, positive fraction 1), so no random draw separates the two sides; FCOS
draws nothing. Everything else is each side's own: matching, targets, proposals (torchvision's
training proposals are recorded only to check that both sides trained on the same set),
losses and their normalisers.

Ground truth comes as a `Scene`: image uint8[H, W, 3] at a size torchvision's resize leaves
alone (the tiny models' 128 x 160), boxes float32[N, 4] xyxy, classes int[N] (ours;
torchvision's label is class + 1), masks bool[N, H, W], optionally keypoints float32[N, K, 3].
N = 0 is an image without instances.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax import builders, ops
from instseg_jax.input.instances import mask_box
from instseg_jax.input.transforms import box_crop_target
from instseg_jax.methods import fcos, keypoint_rcnn, mask_rcnn
from instseg_jax.methods.fcos import FCOS
from instseg_jax.methods.keypoint_rcnn import KeypointRCNN
from instseg_jax.methods.mask_rcnn import MaskRCNN
from instseg_jax.weights import torchvision as tv
from instseg_jax.weights import torchvision_fcos, torchvision_keypoint

# torchvision's loss names -> ours (Mask R-CNN).
MASK_RCNN_TERMS = {
    "loss_objectness": "loss_rpn_cls",
    "loss_rpn_box_reg": "loss_rpn_loc",
    "loss_classifier": "loss_cls",
    "loss_box_reg": "loss_box_reg",
    "loss_mask": "loss_mask",
}
# Our parameter subtrees compared by gradient (torchvision's rpn.head, roi_heads.box_head and
# box_predictor, roi_heads.mask_head and mask_predictor).
HEADS = ("rpn_head", "box_head", "mask_head")
# Relative error of each loss term and of each head's gradient (norm of the difference over
# the norm of torchvision's): float32 noise on sums of a few thousand terms is ~1e-6; 1e-4
# leaves room for summation order and float32 RoIAlign, and a wrong rule moves a term by far
# more (a beta or a normaliser by tens of percent).
LOSS_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-4
# The mask term's declared difference (see `mask_target_note`): its own, looser bounds.
MASK_TARGET_TOLERANCE = {"loss_mask": 0.1, "mask_head": 0.5}
# The mask term and the mask head's gradient with torchvision's targets given to ours.
TV_TARGETS = "mask_with_tv_targets"
MASK_TARGET_NOTE = (
    "loss_mask differs by its targets, not its formula: ours RoIAlign each ground truth's "
    "box crop (input.mask_size square, aligned, 2 samples per bin) and threshold it at 0.5 "
    "(detectron2's rule, ops.mask_targets; full masks never reach the device), torchvision "
    "RoIAligns the full-image mask with aligned=False and adaptive sampling and keeps the "
    "soft values (roi_heads.py project_masks_on_boxes). Given torchvision's targets, ours "
    "gives its mask loss and mask-head gradient to float noise (mask_with_tv_targets)."
)


# Ground-truth slots per image of our side: the nuclei crop's 45 nuclei fit (torchvision takes
# each image's own count; empty slots change nothing but the compiled shapes).
MAX_INSTANCES = 48


@dataclasses.dataclass
class Scene:
    name: str
    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    masks: np.ndarray
    keypoints: np.ndarray | None = None  # float32[N, K, 3] (x, y, visibility) image pixels


def loss_overrides(canvas_hw, num_proposals: int, max_instances: int) -> dict:
    """Model fields of the loss mode: samplers that keep every candidate (all anchors of the
    canvas, all proposals plus ground-truth slots, positive fraction 1, a mask slot for each),
    and num_proposals proposals before and after NMS per level in training."""
    anchors = sum(
        int(a.shape[0]) for a in tv_anchors(canvas_hw)
    )  # every anchor of the canvas is a sampling candidate
    rois = num_proposals + max_instances
    return {
        "rpn_batch_per_image": anchors,
        "rpn_positive_fraction": 1.0,
        "roi_batch_per_image": rois,
        "roi_positive_fraction": 1.0,
        "mask_fg_per_image": rois,
        "rpn_pre_nms_topk_train": num_proposals,
        "rpn_post_nms_topk_train": num_proposals,
    }


def tv_anchors(canvas_hw):
    """The torchvision preset's anchors of a canvas, level by level."""
    return ops.torchvision_anchors(
        tuple(canvas_hw), ((32,), (64,), (128,), (256,), (512,)), (0.5, 1.0, 2.0)
    )


def as_batch(scenes) -> list[Scene]:
    """A Scene or a list of them (a batch of images of one size) as a list."""
    return [scenes] if isinstance(scenes, Scene) else list(scenes)


def training_batch(scenes, max_instances: int, mask_size: int, divisor: int = 32) -> dict:
    """Our training batch of scenes (a Scene or a list of images of one size), built as the
    input pipeline builds it (boxes on the canvas, box-crop masks by
    transforms.box_crop_target) on a canvas of the image's size padded to a multiple of
    ``divisor`` with the mean colour (torchvision's batching)."""
    images = [_one_image(s, max_instances, mask_size, divisor) for s in as_batch(scenes)]
    return {k: np.concatenate([image[k] for image in images]) for k in images[0]}


def _one_image(scene: Scene, max_instances: int, mask_size: int, divisor: int) -> dict:
    pixels, resized_hw = tv.preprocess(scene.image, *_sizes(scene.image), divisor)
    n = len(scene.boxes)
    if n > max_instances:
        raise ValueError(f"{scene.name}: {n} instances, more than max_instances {max_instances}")
    gt_boxes = np.zeros((max_instances, 4), np.float32)
    gt_classes = np.zeros(max_instances, np.int32)
    gt_valid = np.zeros(max_instances, bool)
    gt_masks = np.zeros((max_instances, mask_size, mask_size), np.uint8)
    gt_boxes[:n] = scene.boxes
    gt_classes[:n] = scene.classes
    gt_valid[:n] = True
    for i in range(n):
        gt_masks[i] = box_crop_target(scene.masks[i], scene.boxes[i], mask_size)
    extra = {}
    if scene.keypoints is not None:
        keypoints = np.zeros((max_instances, scene.keypoints.shape[1], 3), np.float32)
        keypoints[:n] = scene.keypoints
        extra = {"gt_keypoints": keypoints[None], "flipped": np.zeros(1, bool)}
    return {
        **extra,
        "image": pixels[None],
        "image_hw": np.asarray([resized_hw], np.int32),
        "gt_boxes": gt_boxes[None],
        "gt_classes": gt_classes[None],
        "gt_valid": gt_valid[None],
        "gt_masks": gt_masks[None],
    }


def _sizes(image) -> tuple[int, int]:
    """(min_size, max_size) under which torchvision's resize keeps the image as it is."""
    return min(image.shape[:2]), max(image.shape[:2])


def mask_rcnn_loss_config(
    arch: dict, scene: Scene, num_proposals: int, max_instances: int, overrides=None
):
    """(MaskRCNNConfig of the converted weights under the torchvision preset and the loss
    mode's samplers, input.mask_size); ``overrides``: model fields to change (e.g. to show
    what a convention is worth)."""
    image = as_batch(scene)[0].image
    pixels, _ = tv.preprocess(image, *_sizes(image))
    config = tv.coco_config(arch, pixels.shape[:2])
    config.model.update(loss_overrides(pixels.shape[:2], num_proposals, max_instances))
    config.model.update(overrides or {})
    return builders.model_config(config, arch["num_classes"]), config.input.mask_size


class GivenMaskTargets(MaskRCNN):
    """Mask R-CNN whose mask loss may take given targets: batch["given_mask_targets"]
    float32[B, F, 28, 28] replace ours where batch["use_given_mask_targets"] is set (the loss
    mode's check of the mask head's gradient on torchvision's own targets)."""

    def mask_training(self, features, outputs: dict, batch: dict, key) -> dict:
        out = super().mask_training(features, outputs, batch, key)
        given = batch["use_given_mask_targets"]
        out["mask_targets"] = jnp.where(given, batch["given_mask_targets"], out["mask_targets"])
        return out


def head_gradient(apply_loss, heads):
    """(variables, batch) -> (gradients of the loss with respect to params[head] for each of
    `heads`, aux): apply_loss(variables, batch) -> (loss, aux). Only the heads are
    differentiated (the backbone's backward pass is never built: a faster compile)."""

    def step(variables, batch):
        def total(head_params):
            params = {**variables["params"], **head_params}
            return apply_loss({**variables, "params": params}, batch)

        return jax.grad(total, has_aux=True)({h: variables["params"][h] for h in heads})

    return step


@functools.cache
def _gradient_step(cfg, model_class=None, loss_fn=mask_rcnn.loss_fn, heads=HEADS):
    """jit((variables, batch) -> (head gradients, (metrics, outputs))) of one config (the model
    GivenMaskTargets unless model_class says otherwise)."""
    model = (model_class or GivenMaskTargets)(cfg)
    key = jax.random.PRNGKey(0)  # samplers keep every candidate: the key picks nothing

    def apply_loss(variables, batch):
        outputs = model.apply(variables, batch, train=True, key=key)
        loss, metrics = loss_fn(outputs, batch, cfg)
        return loss, (metrics, outputs)

    return jax.jit(head_gradient(apply_loss, heads))


def mask_rcnn_losses(
    variables,
    arch: dict,
    scene,
    num_proposals: int,
    max_instances: int = MAX_INSTANCES,
    given_mask_targets=None,
    overrides: dict | None = None,
    ours: dict | None = None,
) -> dict:
    """Our Mask R-CNN in training mode under the torchvision preset on a scene or a batch of
    them: {"losses": {torchvision's name: value}, "grads": {head: gradient of the total loss},
    "proposals": [float32[P, 4] each image's training proposals], "mask_rois": [float32[F, 4]
    each image's foreground RoIs of the mask loss], "mask_slots": [their slots]}.
    given_mask_targets = [(rois[F, 4], targets[F, 28, 28]) per image] (torchvision's; one
    pair for one scene): the mask loss takes these targets instead of ours, each paired with
    our foreground RoI of the same box (a missing pair raises); ours: this function's answer
    on the same arguments without given targets, where the caller has it (its RoIs pair the
    targets; else it is run here)."""
    cfg, mask_size = mask_rcnn_loss_config(arch, scene, num_proposals, max_instances, overrides)
    batch = training_batch(scene, max_instances, mask_size)
    b = batch["image"].shape[0]
    slots, side = cfg.mask_fg_per_image, 2 * cfg.mask_pool_size
    batch["given_mask_targets"] = np.zeros((b, slots, side, side), np.float32)
    batch["use_given_mask_targets"] = np.asarray(False)
    step = _gradient_step(cfg)
    if given_mask_targets is not None:
        if isinstance(given_mask_targets, tuple):
            given_mask_targets = [given_mask_targets]
        first = ours or mask_rcnn_losses(
            variables, arch, scene, num_proposals, max_instances, overrides=overrides
        )
        for i, (rois, targets) in enumerate(given_mask_targets):
            pairing = _pairing(first["mask_slots"][i], first["mask_rois"][i], rois)
            batch["given_mask_targets"][i, pairing] = targets
        batch["use_given_mask_targets"] = np.asarray(True)
    grads, (metrics, outputs) = jax.device_get(step(variables, batch))
    rois = outputs["rois"]
    fg = np.asarray(outputs["mask_valid"])
    return {
        "losses": {tv_name: float(metrics[ours]) for tv_name, ours in MASK_RCNN_TERMS.items()},
        "grads": {head: grads[head] for head in HEADS},
        "proposals": _per_image_proposals(outputs),
        "mask_slots": [np.flatnonzero(f) for f in fg],
        "mask_rois": [rois["boxes"][i, : fg.shape[1]][fg[i]] for i in range(b)],
    }


def _per_image_proposals(outputs) -> list:
    boxes, valid = np.asarray(outputs["proposal_boxes"]), np.asarray(outputs["proposal_valid"])
    return [image[keep] for image, keep in zip(boxes, valid, strict=True)]


def _pairing(slots, ours, theirs):
    """Our mask slot of each of torchvision's foreground RoIs theirs[F, 4] (same box within
    0.01 px; ours[F, 4] the boxes of our foreground slots)."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} foreground RoIs here, {len(theirs)} in torchvision")
    if not len(theirs):
        return np.zeros(0, np.int64)
    gap = np.abs(theirs[:, None, :] - ours[None]).max(-1)
    nearest = gap.argmin(1)
    if len(set(nearest.tolist())) != len(theirs) or gap.min(1).max() > 1e-2:
        raise ValueError("torchvision's foreground RoIs are not ours: no target pairing")
    return slots[nearest]


def tree_norm(tree) -> float:
    return float(
        np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(tree)))
    )


def compare_losses(ours: dict, theirs: dict, given: dict | None = None) -> dict:
    """Figures of one scene: each term's relative error, each head's gradient relative error,
    whether both sides trained on the same proposals; `failures` lists what is beyond the
    tolerances (the mask targets' declared difference within its own). ``given``: ours run
    on torchvision's mask targets (`mask_rcnn_losses` given_mask_targets), whose mask term
    and mask-head gradient are held to the float tolerance."""
    figures: dict = {"terms": {}, "grads": {}, "values": {}}
    for name, value in theirs["losses"].items():
        figures["terms"][name] = _relative(ours["losses"][name], value)
        figures["values"][name] = (ours["losses"][name], value)
    for head, grad in theirs["grads"].items():
        figures["grads"][head] = _relative_tree(ours["grads"][head], grad)
    if given is not None:
        figures["terms"][TV_TARGETS] = _relative(
            given["losses"]["loss_mask"], theirs["losses"]["loss_mask"]
        )
        figures["grads"][TV_TARGETS] = _relative_tree(
            given["grads"]["mask_head"], theirs["grads"]["mask_head"]
        )
    if "proposals" in theirs:  # a two-stage model
        figures["proposals"] = _same_set(ours["proposals"], theirs["proposals"])
    figures["failures"] = loss_failures(figures)
    return figures


def _relative(a: float, b: float) -> float:
    """|a - b| / |b|; 0 where both are 0 (an image without instances has no box loss)."""
    if b == 0:
        return 0.0 if a == 0 else float("inf")
    return abs(a - b) / abs(b)


def _relative_tree(a, b) -> float:
    diff = tree_norm(jax.tree.map(lambda x, y: np.asarray(x, np.float64) - y, a, b))
    return _relative(diff, 0.0) if tree_norm(b) == 0 else diff / tree_norm(b)


def _same_set(a, b) -> dict:
    """How far two proposal sets (arrays, or lists of them per image) are apart: counts and
    the largest distance (px) of a box of either set to the nearest of the other (in the
    same image)."""
    if isinstance(a, list) or isinstance(b, list):
        a = a if isinstance(a, list) else [a]
        b = b if isinstance(b, list) else [b]
        if len(a) != len(b):
            return {"count": (len(a), len(b)), "max_px": float("inf")}
        each = [_same_set(x, y) for x, y in zip(a, b, strict=True)]
        counts = tuple(sum(e["count"][k] for e in each) for k in (0, 1))
        unequal = any(e["count"][0] != e["count"][1] for e in each)  # in some image
        return {
            "count": counts,
            "max_px": float("inf") if unequal else max(e["max_px"] for e in each),
        }
    out = {"count": (len(a), len(b))}
    if len(a) and len(b):
        gap = np.abs(a[:, None, :] - b[None]).max(-1)
        out["max_px"] = float(max(gap.min(0).max(), gap.min(1).max()))
    else:
        out["max_px"] = 0.0 if len(a) == len(b) else float("inf")
    return out


def loss_failures(figures: dict) -> list[str]:
    out = []
    same = figures.get("proposals", {"count": (0, 0), "max_px": 0.0})
    if same["count"][0] != same["count"][1] or not same["max_px"] <= 1e-3:
        out.append(f"proposals differ: counts {same['count']}, {same['max_px']:.2e} px")
    for name, error in figures["terms"].items():
        bound = MASK_TARGET_TOLERANCE.get(name, LOSS_TOLERANCE)
        if not error <= bound:
            out.append(f"{name} relative error {error:.2e} > {bound:.0e}")
    for head, error in figures["grads"].items():
        bound = MASK_TARGET_TOLERANCE.get(head, GRADIENT_TOLERANCE)
        if not error <= bound:
            out.append(f"{head} gradient relative error {error:.2e} > {bound:.0e}")
    return out


def head_gradients_from_torch(state_dict: dict, grads: dict, source: str) -> dict:
    """torchvision's head gradients {key: array} in our parameter tree: the converter applied
    to the state_dict with the head entries replaced by their gradients (every head mapping is
    a reshape, transpose or reorder: linear)."""
    mixed = dict(state_dict)
    mixed.update(grads)
    variables, _ = tv.convert(mixed, source)
    return {head: variables["params"][head] for head in HEADS}


# ------------------------------------------------------------------------------------- FCOS

# torchvision's FCOS loss names -> ours.
FCOS_TERMS = {
    "classification": "loss_cls",
    "bbox_regression": "loss_box_reg",
    "bbox_ctrness": "loss_centerness",
}
FCOS_DIVISOR = 128  # the canvas multiple of weights/torchvision_fcos.py
# One rule is not reproduced: where several boxes claim a location, torchvision's
# FCOS.compute_loss ranks them by float32 (1e8 - area), which cannot tell areas within 8 px^2
# apart (the first box wins); ours takes the smallest area. The scenes here have no such tie.


def fcos_loss_config(arch: dict, scene: Scene, max_instances: int, overrides=None):
    """FCOSConfig of converted torchvision FCOS weights under its preset, on the canvas
    torchvision pads the scene's image to (a multiple of 128)."""
    pixels, _ = tv.preprocess(scene.image, *_sizes(scene.image), FCOS_DIVISOR)
    config = torchvision_fcos.coco_config(arch, pixels.shape[:2])
    config.input.max_instances = max_instances
    config.model.update(overrides or {})
    return builders.model_config(config, arch["num_classes"])


@functools.cache
def _fcos_gradient_step(cfg):
    model = FCOS(cfg)

    def apply_loss(variables, batch):
        outputs = model.apply(variables, batch, train=True)
        loss, metrics = fcos.loss_fn(outputs, batch, cfg)
        return loss, (metrics, outputs["targets"]["positives"])

    return jax.jit(head_gradient(apply_loss, ("head",)))


def fcos_losses(
    variables, arch: dict, scene: Scene, max_instances: int = MAX_INSTANCES, overrides=None
) -> dict:
    """Our FCOS in training mode under the torchvision preset on one scene: {"losses":
    {torchvision's name: value}, "grads": {"head": gradient of the total loss}, "positives":
    the positive locations}."""
    cfg = fcos_loss_config(arch, as_batch(scene)[0], max_instances, overrides)
    batch = training_batch(scene, max_instances, 1, FCOS_DIVISOR)
    del batch["gt_masks"]
    grads, (metrics, positives) = jax.device_get(_fcos_gradient_step(cfg)(variables, batch))
    return {
        "losses": {tv_name: float(metrics[ours]) for tv_name, ours in FCOS_TERMS.items()},
        "grads": {"head": grads["head"]},
        "positives": int(np.sum(positives)),
    }


def fcos_head_gradients_from_torch(state_dict: dict, grads: dict, source: str) -> dict:
    """torchvision's FCOS head gradients in our tree (`head_gradients_from_torch`'s rule)."""
    variables, _ = torchvision_fcos.convert({**state_dict, **grads}, source)
    return {"head": variables["params"]["head"]}


def state_dict_digest(state_dict: dict) -> str:
    """sha256 of a state_dict's keys, dtypes, shapes and values: a loss fixture names the
    output fixture whose weights it was made with (they are not stored twice)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = np.ascontiguousarray(state_dict[key])
        digest.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- Keypoint R-CNN

KEYPOINT_TERMS = {**{k: v for k, v in MASK_RCNN_TERMS.items() if k != "loss_mask"}}
KEYPOINT_TERMS["loss_keypoint"] = "loss_keypoint"
KEYPOINT_HEADS = ("rpn_head", "box_head", "keypoint_head")


def keypoint_rcnn_losses(
    variables,
    arch: dict,
    scene: Scene,
    num_proposals: int,
    max_instances: int = MAX_INSTANCES,
    overrides=None,
) -> dict:
    """Our Keypoint R-CNN in training mode under the torchvision preset on one scene (the
    loss mode's samplers, a keypoint slot for every RoI candidate): {"losses": {torchvision's
    name: value}, "grads": {head: gradient}, "proposals": the training proposals}."""
    image = as_batch(scene)[0].image
    pixels, _ = tv.preprocess(image, *_sizes(image))
    config = torchvision_keypoint.coco_config(arch, pixels.shape[:2])
    fields = loss_overrides(pixels.shape[:2], num_proposals, max_instances)
    fields["keypoint_fg_per_image"] = fields.pop("mask_fg_per_image")
    config.model.update({**fields, **(overrides or {})})
    cfg = builders.model_config(config, arch["num_classes"])
    batch = training_batch(scene, max_instances, config.input.mask_size)
    step = _gradient_step(cfg, KeypointRCNN, keypoint_rcnn.loss_fn, KEYPOINT_HEADS)
    grads, (metrics, outputs) = jax.device_get(step(variables, batch))
    return {
        "losses": {tv_name: float(metrics[ours]) for tv_name, ours in KEYPOINT_TERMS.items()},
        "grads": {head: grads[head] for head in KEYPOINT_HEADS},
        "proposals": _per_image_proposals(outputs),
        "keypoint_targets": int(np.sum(outputs["keypoint_valid"])),
    }


def keypoint_head_gradients_from_torch(state_dict: dict, grads: dict, source: str) -> dict:
    """torchvision's Keypoint R-CNN head gradients in our tree (`head_gradients_from_torch`'s
    rule)."""
    variables, _ = torchvision_keypoint.convert({**state_dict, **grads}, source)
    return {head: variables["params"][head] for head in KEYPOINT_HEADS}


# ------------------------------------------------------------------------------ nuclei crops


@dataclasses.dataclass(frozen=True)
class NucleiCrop:
    """A crop of a DSB 2018 stage1_train image (data/prepare_nuclei.py's source layout)
    resized to a loss fixture's canvas: image_id, crop (y0, x0, h, w) in source pixels,
    canvas (H, W). The fixtures store this and `scene_digest` of the result, never the
    pixels or masks (the data set is not copied into the repository)."""

    image_id: str
    crop: tuple[int, int, int, int]
    canvas: tuple[int, int]

    def as_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NucleiCrop:
        fields = json.loads(text)
        return cls(fields["image_id"], tuple(fields["crop"]), tuple(fields["canvas"]))


def resize_bilinear(array: np.ndarray, out_hw) -> np.ndarray:
    """float64 array[H, W, ...] resized to out_hw, bilinear at half-pixel centres (output pixel
    i samples source (i + 0.5) * H / out_H - 0.5, clamped at the edges; no antialiasing).
    Plain float64 NumPy: the same answer on every machine, which the fixtures' digests need."""

    def taps(size_in, size_out):
        position = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
        position = np.clip(position, 0, size_in - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, position - low

    array = np.asarray(array, np.float64)
    (y0, y1, wy), (x0, x1, wx) = taps(array.shape[0], out_hw[0]), taps(array.shape[1], out_hw[1])
    shape = (-1, 1) + (1,) * (array.ndim - 2)
    rows = array[y0] * (1 - wy.reshape(shape)) + array[y1] * wy.reshape(shape)
    shape = (1, -1) + (1,) * (array.ndim - 2)
    return rows[:, x0] * (1 - wx.reshape(shape)) + rows[:, x1] * wx.reshape(shape)


def nuclei_scene(source: Path, spec: NucleiCrop, name: str = "nuclei") -> Scene:
    """The Scene of a nuclei crop: the image's RGB pixels (PNG's alpha dropped) cropped and
    resized (`resize_bilinear`, rounded), each nucleus mask (files in name order) cropped,
    resized and thresholded at 0.5; nuclei with no pixel left are dropped; one class (0),
    tight boxes (+1 on the max side, as the synthetic scenes'). source: the stage1_train
    folder (tests/conftest.py SHARED_NUCLEI)."""
    from PIL import Image

    folder = Path(source) / spec.image_id
    y0, x0, h, w = spec.crop
    window = (slice(y0, y0 + h), slice(x0, x0 + w))
    with Image.open(folder / "images" / f"{spec.image_id}.png") as png:
        rgb = np.asarray(png.convert("RGB"))
    if y0 + h > rgb.shape[0] or x0 + w > rgb.shape[1]:
        raise ValueError(f"{folder}: crop {spec.crop} outside the {rgb.shape[:2]} image")
    image = np.round(resize_bilinear(rgb[window], spec.canvas)).astype(np.uint8)
    masks = []
    for path in sorted((folder / "masks").glob("*.png")):
        with Image.open(path) as png:
            nucleus = np.asarray(png.convert("L"))[window] > 0
        if nucleus.any():
            resized = resize_bilinear(nucleus, spec.canvas) >= 0.5
            if resized.any():
                masks.append(resized)
    masks = np.stack(masks) if masks else np.zeros((0, *spec.canvas), bool)
    boxes = np.asarray([mask_box(m) for m in masks], np.float32).reshape(-1, 4)
    return Scene(name, image, boxes, np.zeros(len(masks), np.int64), masks)


def scene_digest(scene: Scene) -> str:
    """sha256 of a scene's image, masks, boxes and classes: a fixture's check that a test
    re-read the same nuclei crop as the script that made it."""
    digest = hashlib.sha256()
    for array in (scene.image, scene.masks, scene.boxes, scene.classes):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
