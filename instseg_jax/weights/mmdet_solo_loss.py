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

The head-parameter half (`head_config`, `conversion_table`, `convert_head`, `head_losses`): the
branch's whole head from an mmdetection state dict (SOLOHead / DecoupledSOLOHead keys), run by
SOLO.heads on given FPN maps through the same targets and loss, gradients back in mmdetection's
names and layouts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.methods import solo, solov2
from instseg_jax.weights import mmdet_loss_parity
from instseg_jax.weights.mmdet_loss_parity import unit_uniform
from instseg_jax.weights.state_dict import check_keys


def solo_config(num_classes: int, canvas: int, mask_branch: str, head_channels: int, **overrides):
    """The tiny SOLO the parity runs: SOLOv2's parity grids and scale ranges (the smoke
    experiment's, mmdet_loss_parity.solov2_config) on a square canvas, the reference's strides
    (8, 8, 16, 32, 32: mask maps at strides 4, 4, 8, 16, 16), a positive-slot budget no scene
    fills."""
    fields = dict(
        num_classes=num_classes,
        canvas_hw=(canvas, canvas),
        num_grids=(12, 10, 8, 6, 4),
        scale_ranges=((1, 32), (16, 64), (32, 128), (64, 256), (128, 512)),
        positive_slots_per_image=1024,
        mask_branch=mask_branch,
        head_channels=head_channels,
    )
    fields.update(overrides)
    return solo.SOLOConfig(**fields)


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
    batch, extent_hw = _batch(gt, cfg)

    def terms(category_logits, inputs):
        if cfg.mask_branch == "vanilla":
            maps, weights = inputs["maps"], (inputs["kernels"], inputs["biases"])
        else:
            maps, weights = list(zip(inputs["x"], inputs["y"], strict=True)), ()
        return _loss_terms(category_logits, maps, weights, batch, extent_hw, cfg)

    values, pull_back, targets = jax.vjp(terms, logits, mask_inputs, has_aux=True)
    one, zero = jnp.ones_like(values[0]), jnp.zeros_like(values[0])
    grad_cls, _ = pull_back((one, zero))
    _, grad_mask = pull_back((zero, one))
    return values, grad_cls, grad_mask, targets


def _batch(gt: dict, cfg) -> tuple[dict, jnp.ndarray]:
    """(the batch fields training_outputs and loss_fn read, extent_hw) of images that fill
    the canvas."""
    b = gt["boxes"].shape[0]
    image_hw = jnp.broadcast_to(jnp.asarray(cfg.canvas_hw, jnp.int32), (b, 2))
    batch = {
        "image": jnp.zeros((b, 1, 1, 3), jnp.float32),  # only its batch size is read
        "gt_boxes": jnp.asarray(gt["boxes"], jnp.float32),
        "gt_classes": jnp.asarray(gt["classes"], jnp.int32),
        "gt_valid": jnp.asarray(gt["valid"], bool),
        "gt_centers": jnp.asarray(gt["centers"], jnp.float32),
        "gt_full_masks": jnp.asarray(gt["masks"]).astype(jnp.uint8),
    }
    return batch, solov2.grid_extents(image_hw, cfg)


def _loss_terms(category_logits, mask_maps, weights, batch, extent_hw, cfg):
    """((loss_cls, loss_mask), targets) of SOLO.__call__'s training outputs on given logits and
    mask maps (weights: the vanilla predictors' (kernels, biases) lists, () decoupled)."""
    outputs = solo.training_outputs(cfg, mask_maps, batch, extent_hw, jax.random.key(0), *weights)
    outputs["category_logits"] = category_logits
    _, metrics = solo.loss_fn(outputs, batch, cfg)
    return (metrics["loss_cls"], metrics["loss_mask"]), outputs["targets"]


# ----------------------------------------------------------------------- head parameters
# mmdetection's whole SOLOHead / DecoupledSOLOHead (one conv per tower) with a seeded state
# dict on seeded FPN maps, against SOLO.heads with that state dict converted.

FPN_CHANNELS = 16
TOWER_CHANNELS = 32  # our GroupNorm: min(32, C) groups (nn/layers.py), here of one channel


def head_config(num_classes: int, canvas: int, mask_branch: str):
    """The tiny SOLO of the head-parameter parity: solo_config's grids, one conv per tower."""
    return solo_config(
        num_classes, canvas, mask_branch, TOWER_CHANNELS, fpn_channels=FPN_CHANNELS, head_convs=1
    )


def _conv_norm_rows(torch_prefix, tower, i, out_ch, in_ch):
    return [
        (
            f"{torch_prefix}.conv.weight",
            (tower, f"conv{i}", "kernel"),
            "conv",
            (out_ch, in_ch, 3, 3),
        ),
        (f"{torch_prefix}.gn.weight", (tower, f"norm{i}", "gn", "scale"), "vector", (out_ch,)),
        (f"{torch_prefix}.gn.bias", (tower, f"norm{i}", "gn", "bias"), "vector", (out_ch,)),
    ]


def conversion_table(cfg) -> list[tuple[str, tuple, str, tuple]]:
    """(mmdetection key, our parameter path, layout, torch shape) for every tensor of the
    branch's head (mmdet/models/dense_heads/solo_head.py SOLOHead._init_layers: mask_convs,
    cls_convs, conv_mask_list (1x1, S^2 outputs: ours mask_predict{l}_kernel [E, S^2], layout
    "matrix"), conv_cls; DecoupledSOLOHead: mask_convs_x / _y (FPN + 1 CoordConv channel),
    conv_mask_list_x / _y (3x3, S outputs: ours predict_x_{l} / predict_y_{l}))."""
    c, t = cfg.fpn_channels, cfg.head_channels
    rows = []
    if cfg.mask_branch == "vanilla":
        for i in range(cfg.head_convs):
            rows += _conv_norm_rows(f"mask_convs.{i}", "mask_tower", i, t, c + 2 if i == 0 else t)
    else:
        for axis in ("x", "y"):
            for i in range(cfg.head_convs):
                rows += _conv_norm_rows(
                    f"mask_convs_{axis}.{i}", f"mask_tower_{axis}", i, t, c + 1 if i == 0 else t
                )
    for i in range(cfg.head_convs):
        rows += _conv_norm_rows(f"cls_convs.{i}", "category_tower", i, t, c if i == 0 else t)
    for level, g in enumerate(cfg.num_grids):
        if cfg.mask_branch == "vanilla":
            key = f"conv_mask_list.{level}"
            rows.append(
                (f"{key}.weight", (f"mask_predict{level}_kernel",), "matrix", (g * g, t, 1, 1))
            )
            rows.append((f"{key}.bias", (f"mask_predict{level}_bias",), "vector", (g * g,)))
        else:
            for axis in ("x", "y"):
                key, ours = f"conv_mask_list_{axis}.{level}", f"predict_{axis}_{level}"
                rows.append((f"{key}.weight", (ours, "kernel"), "conv", (g, t, 3, 3)))
                rows.append((f"{key}.bias", (ours, "bias"), "vector", (g,)))
    rows.append(
        (
            "conv_cls.weight",
            ("category_tower", "predict", "kernel"),
            "conv",
            (cfg.num_classes, t, 3, 3),
        )
    )
    rows.append(
        ("conv_cls.bias", ("category_tower", "predict", "bias"), "vector", (cfg.num_classes,))
    )
    return rows


def _to_ours(layout, value):
    if layout == "matrix":  # a 1x1 conv [O, I, 1, 1] -> [I, O]
        return np.ascontiguousarray(np.asarray(value, np.float32)[:, :, 0, 0].T)
    return mmdet_loss_parity.conv_or_vector_to_ours(layout, value)


def _to_torch(layout, value, shape):
    if layout == "matrix":
        return np.ascontiguousarray(np.asarray(value, np.float32).T[:, :, None, None])
    return mmdet_loss_parity.conv_or_vector_to_torch(layout, value, shape)


def random_state_dict(cfg, seed: int) -> dict[str, np.ndarray]:
    """The head's state dict of seeded draws (torch layouts; mmdet_loss_parity.seeded_state_dict:
    convs of variance 1 / fan in, GroupNorm weights 1 + 0.1 u, biases 0.1 u)."""
    return mmdet_loss_parity.seeded_state_dict(
        conversion_table(cfg),
        seed,
        fan_in_scaled=lambda key, layout: layout in ("conv", "matrix"),
        near_one=("gn.weight",),
    )


def convert_head(state_dict: dict, cfg) -> dict:
    """Our SOLO head params from mmdetection's head state dict; StateDictError names the first
    missing or unexpected key."""
    table = conversion_table(cfg)
    check_keys(
        state_dict, [row[0] for row in table], "not a SOLOHead / DecoupledSOLOHead state dict"
    )
    return mmdet_loss_parity.tree_from_table(state_dict, table, _to_ours)


def head_losses(state_dict, fpn_features, gt: dict, cfg):
    """(outputs, terms, gradients, targets) of our head (SOLO.heads on the converted state
    dict) on FPN maps P2..P6 ([B, h, w, fpn_channels] each) of images that fill the canvas:
    outputs "logits" [B, S, C] and per level "mask_<l>" (vanilla: the S^2 mask logits
    [B, h, w, S^2] the 1x1 predictor gives, mmdetection's forward output; decoupled: "x_<l>",
    "y_<l>" [B, h, w, S_l]); terms loss_cls, loss_mask; gradients of their sum by mmdetection
    key in torch layout; targets as solo_losses'."""
    params = convert_head(state_dict, cfg)
    features = {f"p{i + 2}": jnp.asarray(x, jnp.float32) for i, x in enumerate(fpn_features)}
    gt = {name: jnp.asarray(value) for name, value in gt.items()}
    outputs, terms, grads, targets = _head_program(params, features, gt, cfg)
    return (
        {name: np.asarray(v) for name, v in outputs.items()},
        {name: float(v) for name, v in terms.items()},
        mmdet_loss_parity.state_dict_from_tree(grads, conversion_table(cfg), _to_torch),
        {
            "cell_labels": np.asarray(targets["cell_labels"]),
            "positive_cells": np.asarray(targets["positive"].sum(axis=1)),
            "trained": np.asarray(targets["slot_valid"].sum(axis=1)),
        },
    )


@functools.partial(jax.jit, static_argnums=3)
def _head_program(params, features, gt, cfg):
    model = solo.SOLO(cfg)
    batch, extent_hw = _batch(gt, cfg)

    def total(p):
        logits, mask_maps = model.apply({"params": p}, features, extent_hw, method=solo.SOLO.heads)
        outputs = {"logits": logits}
        weights = ()
        if cfg.mask_branch == "vanilla":
            kernels = [p[f"mask_predict{lv}_kernel"] for lv in range(len(cfg.num_grids))]
            biases = [p[f"mask_predict{lv}_bias"] for lv in range(len(cfg.num_grids))]
            weights = (kernels, biases)
            for lv, m in enumerate(mask_maps):
                outputs[f"mask_{lv}"] = jnp.einsum("bhwe,es->bhws", m, kernels[lv]) + biases[lv]
        else:
            for lv, (x, y) in enumerate(mask_maps):
                outputs[f"x_{lv}"], outputs[f"y_{lv}"] = x, y
        (loss_cls, loss_mask), targets = _loss_terms(
            logits, mask_maps, weights, batch, extent_hw, cfg
        )
        terms = {"loss_cls": loss_cls, "loss_mask": loss_mask}
        return loss_cls + loss_mask, (outputs, terms, targets)

    grads, (outputs, terms, targets) = jax.grad(total, has_aux=True)(params)
    return outputs, terms, grads, targets
