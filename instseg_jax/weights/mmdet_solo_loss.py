"""Our side of the SOLO and Decoupled SOLO loss parity with mmdetection 3.3 (issue 31 item 1):
methods/solo.py's targets and loss (training_outputs, loss_fn) on given head outputs.

experiments/parity/solo_loss.py (the `make peer-mmdet` environment) feeds the same head outputs
and ground truth to mmdetection's SOLOHead.loss_by_feat and DecoupledSOLOHead.loss_by_feat and
to `solo_losses` here; tests/weights/test_mmdet_solo_loss.py compares ours with mmdetection's
answers stored in tests/fixtures/mmdet_solo_loss_tiny.npz (no torch needed there).

Head outputs (`random_head_outputs`, seeded draws the fixture keeps a checksum of): category
logits float32[B, S, C] (cells level by level, row-major; mmdetection's per-level [B, C, g, g])
and the mask branch's outputs per level at its mask stride (level stride / 2):
  vanilla    the upsampled tower map [B, h, w, E] and the level's 1x1 predictor, kernel
             [E, S_l^2] and bias [S_l^2] (our SOLO never forms the S_l^2-channel map; the
             parity script forms mmdetection's mask predictions [B, S_l^2, h, w] from the same
             three in torch, so that the gradients reach the same inputs on both sides);
  decoupled  X and Y logits [B, h, w, S_l] each (mmdetection's [B, S_l, h, w]).
Ground truth as weights/mmdet_solov2_head.ground_truth_arrays builds it (stride-4 masks; boxes
and mmdetection's integer-index mass centres of the masks repeated 4 x 4). Every image spans the
whole canvas (model.grid_extent "image", image_hw = canvas: mmdetection's padded batch); the
batch is one mmdetection GPU's (one loss normaliser group).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.methods import solo, solov2
from instseg_jax.weights.mmdet_loss_parity import unit_uniform


def solo_config(num_classes: int, canvas: int, mask_branch: str, head_channels: int):
    """The tiny SOLO the parity runs: SOLOv2's parity grids and scale ranges (the smoke
    experiment's, mmdet_loss_parity.solov2_config) on a square canvas, the reference's strides
    (8, 8, 16, 32, 32: mask maps at strides 4, 4, 8, 16, 16), a positive-slot budget no scene
    fills."""
    return solo.SOLOConfig(
        num_classes=num_classes,
        canvas_hw=(canvas, canvas),
        num_grids=(12, 10, 8, 6, 4),
        scale_ranges=((1, 32), (16, 64), (32, 128), (64, 256), (128, 512)),
        positive_slots_per_image=1024,
        mask_branch=mask_branch,
        head_channels=head_channels,
    )


def mask_map_sides(cfg) -> tuple[int, ...]:
    """Each level's mask map side (canvas / mask stride)."""
    return tuple(cfg.canvas_hw[0] // s for s in cfg.mask_strides())


def random_head_outputs(cfg, batch: int, seed: int) -> dict:
    """Seeded head outputs (unit_uniform draws, in this order): "logits" [B, S, C] (u - 2, most
    cells background-like), then per level: vanilla "maps" [B, h, w, E] (u), "kernels" [E, S^2]
    (0.5 u) and "biases" [S^2] (0.5 u - 1); decoupled "x" and "y" [B, h, w, S_l] (1.5 u)."""
    rng = np.random.default_rng(seed)
    out = {"logits": unit_uniform(rng, (batch, cfg.num_cells, cfg.num_classes)) - 2.0}
    names = ("maps", "kernels", "biases") if cfg.mask_branch == "vanilla" else ("x", "y")
    out.update({name: [] for name in names})
    for side, grid in zip(mask_map_sides(cfg), cfg.num_grids, strict=True):
        if cfg.mask_branch == "vanilla":
            e = cfg.head_channels
            out["maps"].append(unit_uniform(rng, (batch, side, side, e)))
            out["kernels"].append(np.float32(0.5) * unit_uniform(rng, (e, grid * grid)))
            out["biases"].append(np.float32(0.5) * unit_uniform(rng, (grid * grid,)) - 1.0)
        else:
            for name in ("x", "y"):
                out[name].append(np.float32(1.5) * unit_uniform(rng, (batch, side, side, grid)))
    return out


def flat_arrays(outputs: dict) -> list[np.ndarray]:
    """random_head_outputs' arrays in their order (for a checksum)."""
    arrays = [outputs["logits"]]
    for level in range(len(outputs.get("maps", outputs.get("x")))):
        for name in ("maps", "kernels", "biases", "x", "y"):
            if name in outputs:
                arrays.append(outputs[name][level])
    return arrays


def solo_losses(outputs: dict, gt: dict, cfg) -> tuple[dict, dict]:
    """(terms, targets): our loss_cls and loss_mask on the head outputs (random_head_outputs'
    layout), the gradient of loss_cls with respect to the logits ("grad_logits") and of
    loss_mask with respect to each mask input ("grad_<name>": a list per level, the names of
    random_head_outputs), and our targets (cell_labels int32[B, S], positive_cells int32[B],
    trained int32[B]: the slots the dice loss averages over)."""
    names = ("maps", "kernels", "biases") if cfg.mask_branch == "vanilla" else ("x", "y")
    logits = jnp.asarray(outputs["logits"], jnp.float32)
    mask_inputs = {n: [jnp.asarray(a, jnp.float32) for a in outputs[n]] for n in names}
    gt = {name: jnp.asarray(value) for name, value in gt.items()}
    (loss_cls, loss_mask), grad_cls, grad_mask, targets = _terms_and_gradients(
        logits, mask_inputs, gt, cfg
    )
    terms = {
        "loss_cls": float(loss_cls),
        "loss_mask": float(loss_mask),
        "grad_logits": np.asarray(grad_cls),
        **{f"grad_{n}": [np.asarray(g) for g in grad_mask[n]] for n in names},
    }
    return terms, {
        "cell_labels": np.asarray(targets["cell_labels"]),
        "positive_cells": np.asarray(targets["positive"].sum(axis=1)),
        "trained": np.asarray(targets["slot_valid"].sum(axis=1)),
    }


@functools.partial(jax.jit, static_argnums=3)
def _terms_and_gradients(logits, mask_inputs, gt, cfg):
    """(loss_cls, loss_mask), d loss_cls / d logits, d loss_mask / d mask_inputs, our targets:
    one compiled program per branch and batch shape."""
    b = logits.shape[0]
    image_hw = jnp.broadcast_to(jnp.asarray(cfg.canvas_hw, jnp.int32), (b, 2))
    extent_hw = solov2.grid_extents(image_hw, cfg)
    batch = {
        "image": jnp.zeros((b, 1, 1, 3), jnp.float32),  # only its batch size is read
        "gt_boxes": jnp.asarray(gt["boxes"], jnp.float32),
        "gt_classes": jnp.asarray(gt["classes"], jnp.int32),
        "gt_valid": jnp.asarray(gt["valid"], bool),
        "gt_centers": jnp.asarray(gt["centers"], jnp.float32),
        "gt_full_masks": jnp.asarray(gt["masks"]).astype(jnp.uint8),
    }

    def terms(category_logits, inputs):
        if cfg.mask_branch == "vanilla":
            maps, weights = inputs["maps"], (inputs["kernels"], inputs["biases"])
        else:
            maps, weights = list(zip(inputs["x"], inputs["y"], strict=True)), ()
        outputs = solo.training_outputs(cfg, maps, batch, extent_hw, jax.random.key(0), *weights)
        outputs["category_logits"] = category_logits
        _, metrics = solo.loss_fn(outputs, batch, cfg)
        return (metrics["loss_cls"], metrics["loss_mask"]), outputs["targets"]

    values, pull_back, targets = jax.vjp(terms, logits, mask_inputs, has_aux=True)
    one, zero = jnp.ones_like(values[0]), jnp.zeros_like(values[0])
    grad_cls, _ = pull_back((one, zero))
    _, grad_mask = pull_back((zero, one))
    return values, grad_cls, grad_mask, targets
