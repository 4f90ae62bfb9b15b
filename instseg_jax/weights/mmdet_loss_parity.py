"""Our side of the mmdetection 3.x loss parity check (issue 29 item 4): SOLOv2's targets and
loss (methods/solov2.py grid_targets and loss_fn) on given head outputs.

experiments/parity/solov2_loss.py (the `make peer-mmdet` environment) feeds the same category
logits, kernels and mask feature map, and the same ground truth, to mmdetection's
SOLOV2Head.loss_by_feat and to `solov2_losses` here; tests/weights/test_mmdet_solov2_loss.py
compares ours with mmdetection's answers stored in tests/fixtures/mmdet_solov2_loss_tiny.npz
(no torch needed there).

Layouts (ours): category_logits float32[B, S, C] and kernels float32[B, S, E] with the cells
level by level, row-major within a level's grid (mmdetection's per-level [B, C, g, g] and
[B, E, g, g] flattened the same way); mask_features float32[B, h, w, E] at stride 4 (theirs
[B, E, h, w]). Ground truth: boxes float32[B, N, 4] canvas xyxy, classes int32[B, N], valid
bool[B, N], centers float32[B, N, 2] (x, y) canvas mass centres, masks bool[B, N, h, w] at
stride 4 (the pipeline's gt_full_masks). Every image spans the whole canvas (image_hw = canvas),
so the grids span the canvas under model.grid_extent "image", as mmdetection's span its padded
batch; the batch is one mmdetection GPU's (one loss normaliser group).

The module's last part serves every mmdetection parity module (SOLOv2, YOLACT, CondInst,
PointRend): seeded state dicts and features, checksums, the converter tables' walks both ways,
the nuclei crop reader and the relative-difference figure.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.methods import solov2
from instseg_jax.ops import dense
from instseg_jax.weights.state_dict import conv_kernel, f32


def solov2_config(num_classes: int, canvas: int, mask_channels: int, **overrides):
    """The tiny SOLOv2 the parity runs: the smoke experiment's grids and scale ranges (methods/
    solov2.py smoke) on a square canvas, a positive-slot budget no scene fills."""
    fields = dict(
        num_classes=num_classes,
        canvas_hw=(canvas, canvas),
        num_grids=(12, 10, 8, 6, 4),
        scale_ranges=((1, 32), (16, 64), (32, 128), (64, 256), (128, 512)),
        mask_channels=mask_channels,
        positive_slots_per_image=1024,
    )
    fields.update(overrides)
    return solov2.SOLOv2Config(**fields)


def solov2_outputs(logits, kernels, mask_features, gt: dict, cfg) -> dict:
    """The training outputs SOLOv2.__call__ assembles (targets, the trained pairs' mask logits
    and targets), on given head outputs instead of the network's."""
    b = logits.shape[0]
    image_hw = jnp.broadcast_to(jnp.asarray(cfg.canvas_hw, jnp.int32), (b, 2))
    extent_hw = solov2.grid_extents(image_hw, cfg)
    masks = jnp.asarray(gt["masks"])
    targets = jax.vmap(
        lambda extent, boxes, classes, valid, centers, image_masks, key: solov2.grid_targets(
            boxes,
            classes,
            valid,
            centers,
            image_masks.any(axis=(1, 2)),
            cfg,
            key,
            extent_hw=extent,
        )
    )(
        extent_hw,
        jnp.asarray(gt["boxes"], jnp.float32),
        jnp.asarray(gt["classes"], jnp.int32),
        jnp.asarray(gt["valid"], bool),
        jnp.asarray(gt["centers"], jnp.float32),
        masks,
        jax.random.split(jax.random.key(0), b),
    )
    slot_kernels = jnp.take_along_axis(kernels, targets["slot_cell"][..., None], axis=1)
    return {
        "category_logits": logits,
        "mask_logits": dense.dynamic_masks(mask_features, slot_kernels),
        "mask_targets": jnp.take_along_axis(
            masks, targets["slot_instance"][..., None, None], axis=1
        ),
        "targets": targets,
    }


def solov2_losses(logits, kernels, mask_features, gt: dict, cfg) -> tuple[dict, dict]:
    """(terms, targets): our loss_cls and loss_mask, and the gradient of each with respect
    to the three head outputs (grad_cls_logits; grad_mask_kernels, grad_mask_features), and
    our targets (cell_labels int32[B, S], pairs int32[B])."""
    inputs = tuple(jnp.asarray(x, jnp.float32) for x in (logits, kernels, mask_features))
    gt = {name: jnp.asarray(value) for name, value in gt.items()}
    (loss_cls, loss_mask), (grad_cls, _, _), (_, grad_kernels, grad_features), targets = (
        _terms_and_gradients(inputs, gt, cfg)
    )
    terms = {
        "loss_cls": float(loss_cls),
        "loss_mask": float(loss_mask),
        "grad_cls_logits": np.asarray(grad_cls),
        "grad_mask_kernels": np.asarray(grad_kernels),
        "grad_mask_features": np.asarray(grad_features),
    }
    return terms, {
        "cell_labels": np.asarray(targets["cell_labels"]),
        "positive_cells": np.asarray(targets["positive"].sum(axis=1)),
        "pairs": np.asarray(targets["pairs"]),
    }


@functools.partial(jax.jit, static_argnums=2)
def _terms_and_gradients(inputs, gt, cfg):
    """(loss_cls, loss_mask), the gradient of each with respect to the three inputs, and our
    targets: one compiled program for every batch of one shape."""

    def terms(*args):
        outputs = solov2_outputs(*args, gt, cfg)
        _, metrics = solov2.loss_fn(outputs, {}, cfg)
        return (metrics["loss_cls"], metrics["loss_mask"]), outputs["targets"]

    values, pull_back, targets = jax.vjp(terms, *inputs, has_aux=True)
    one, zero = jnp.ones_like(values[0]), jnp.zeros_like(values[0])
    return values, pull_back((one, zero)), pull_back((zero, one)), targets


def relative_difference(ours, theirs) -> float:
    """|ours - theirs| / |theirs| (norms for arrays); 0 when both are 0."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = np.linalg.norm(theirs)
    diff = np.linalg.norm(ours - theirs)
    return float(diff / scale) if scale > 0 else float(diff)


# ------------------------------------------------- shared by the mmdetection parity modules
# (mmdet_solov2_head, mmdet_condinst_head, mmdet_pointrend_head and the loss modules): the
# seeded inputs both sides of a parity run on, their checksums, the converter tables' walks.


def unit_uniform(rng, shape) -> np.ndarray:
    """Zero-mean unit-variance uniform draws: Generator.random's stream (plain 53-bit doubles)
    is the part of NumPy's generator least likely to change across releases, where normal's
    algorithm may (NEP 19); the fixtures store a checksum of what came out (`checksum`)."""
    return (np.sqrt(3.0) * (2.0 * rng.random(shape) - 1.0)).astype(np.float32)


def seeded_state_dict(table, seed: int, fan_in_scaled, near_one=()) -> dict[str, np.ndarray]:
    """A state dict of seeded draws over a converter table's rows (key, path, layout, torch
    shape), in the table's order: the rows fan_in_scaled(key, layout) picks get u / sqrt(fan
    in) (fan in: the shape's product past the first axis), keys ending in one of near_one
    (norm weights, scales) 1 + 0.1 u, the rest 0.1 u (u of unit variance), so that every
    parameter's gradient is well above float32 noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, _, layout, shape in table:
        if fan_in_scaled(key, layout):
            fan_in = int(np.prod(shape[1:]))
            out[key] = unit_uniform(rng, shape) / np.float32(np.sqrt(fan_in))
        elif near_one and key.endswith(tuple(near_one)):
            out[key] = np.float32(1.0) + np.float32(0.1) * unit_uniform(rng, shape)
        else:
            out[key] = np.float32(0.1) * unit_uniform(rng, shape)
    return out


def checksum(arrays) -> str:
    """SHA-256 of the arrays' bytes in order (a state dict: in key order)."""
    if isinstance(arrays, dict):
        arrays = [arrays[k] for k in sorted(arrays)]
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def conv_or_vector_to_ours(layout: str, value) -> np.ndarray:
    """One torch tensor in our layout: "conv" [O, I, kh, kw] -> [kh, kw, I, O]; anything else
    as float32."""
    return conv_kernel(value) if layout == "conv" else f32(value)


def conv_or_vector_to_torch(layout: str, value, shape) -> np.ndarray:
    """One of our arrays (a gradient) in torch's layout: "conv" kernels [kh, kw, I, O] ->
    [O, I, kh, kw]; anything else (vectors, scalars) as it is."""
    value = np.asarray(value, np.float32)
    return np.transpose(value, (3, 2, 0, 1)) if layout == "conv" else value


def tree_from_table(state_dict: dict, table, to_ours=conv_or_vector_to_ours) -> dict:
    """Our nested params from a state dict: each table row's tensor, to_ours(layout, value),
    at its path (the caller checks the keys first)."""
    params: dict = {}
    for key, path, layout, _ in table:
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = to_ours(layout, state_dict[key])
    return params


def state_dict_from_tree(tree: dict, table, to_torch=conv_or_vector_to_torch) -> dict:
    """A tree shaped like tree_from_table's output (a gradient) by mmdetection key in torch
    layout: the converter's table run backwards, to_torch(layout, value, torch shape)."""
    out = {}
    for key, path, layout, shape in table:
        value = tree
        for part in path:
            value = value[part]
        out[key] = to_torch(layout, value, shape)
    return out


def nuclei_crop(stage1_train: Path, image_id: str, top: int, left: int, size: int) -> np.ndarray:
    """bool[N, size, size]: the nuclei of one DSB 2018 stage1_train image (stage1_train/<id>/
    masks/*.png, one nucleus each, data/prepare_nuclei.py's layout) inside the size x size crop
    at (top, left), in file-name order, those with no pixel in the crop left out.

    FileNotFoundError names the folder when the image is not there; ValueError names the mask
    when the image has no such crop."""
    from PIL import Image  # only the nuclei scenes read images

    folder = Path(stage1_train) / image_id / "masks"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no nuclei masks (the DSB 2018 stage1_train set)")
    kept = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 0
        crop = mask[top : top + size, left : left + size]
        if crop.shape != (size, size):
            raise ValueError(f"{path}: {mask.shape} has no {size}-pixel crop at {top, left}")
        if crop.any():
            kept.append(crop)
    return np.stack(kept) if kept else np.zeros((0, size, size), bool)
