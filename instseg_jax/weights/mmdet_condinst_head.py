"""CondInst's head parameters against mmdetection 3.x's CondInstBboxHead and CondInstMaskHead
(issue 29 item 4, the head-parameter half of the loss parity; mmdet_condinst_loss.py holds the
head-output half and the scenes).

experiments/parity/condinst_loss.py builds mmdetection's two heads at `head_config`'s sizes,
loads `random_state_dict` into them (load_state_dict strict: the key list here is
mmdetection's), runs them on random FPN maps P3..P7 and takes loss_by_feat and the gradient of
the total loss with respect to every parameter; tests/weights/test_mmdet_condinst_loss.py runs
`head_losses` here (the state dict through `convert_head`, our CondInst.heads, assign, the
given mask slots' dynamic heads and loss_fn) on the same maps and compares.

The converter covers every parameter of both heads (keys as in mmdetection's CondInst
detector, under bbox_head. and mask_head.; mmdet/models/dense_heads/fcos_head.py,
anchor_free_head.py, condinst_head.py):
  bbox_head.cls_convs.i (conv + gn), reg_convs.i  -> head cls_conv{i} / cls_norm{i},
                                                     box_conv{i} / box_norm{i}
  bbox_head.conv_cls, conv_reg, conv_centerness   -> head cls_logits, bbox_pred, centerness
  bbox_head.scales.l.scale (a scalar each)        -> head scales[l]
  bbox_head.controller                            -> controller
  mask_head.mask_feature_head (MaskFeatModule): convs_all_levels.l.conv{l} (conv + gn, no
    bias) -> mask_branch refine{l + 3}, conv_branch.j -> mask_branch tower{j}, conv_pred ->
    mask_branch out
The dynamic mask head has no parameters of its own (the controller predicts them). Gradients
come back in mmdetection's names and layouts through the same table (`to_state_dict_layout`).

GroupNorm: ours takes min(32, C) groups (nn/layers.py GroupNorm), epsilon 1e-5 (torch's) in
the FCOS towers and the mask branch; mmdetection's norm_cfg gets the same groups
(`norm_groups`). mmdetection's COCO config uses BatchNorm in the mask branch (AdelaiDet's
too); ours has GroupNorm there (methods/condinst.py docstring), so the parity builds
mmdetection's MaskFeatModule with GroupNorm.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.methods import condinst, fcos
from instseg_jax.weights import mmdet_condinst_loss
from instseg_jax.weights import mmdet_loss_parity as parity
from instseg_jax.weights.state_dict import check_keys, f32

FPN_CHANNELS = 64  # the FCOS towers' width too: 32 GroupNorm groups of two channels
MASK_BRANCH_CHANNELS = 16  # 16 groups of one channel
TOWER_CONVS = 1  # per tower; the mask branch one conv after the level sum


def norm_groups(channels: int) -> int:
    """Our GroupNorm's groups at this width (nn/layers.py GroupNorm: min(32, C)): mmdetection's
    num_groups for the same norm."""
    return min(32, channels)


def head_config(mask_slots: int, **overrides):
    """The tiny CondInst of the head-parameter parity: mmdet_condinst_loss.condinst_config's
    scenes and loss rules at wider layers."""
    fields = dict(
        fpn_channels=FPN_CHANNELS,
        head_convs=TOWER_CONVS,
        mask_branch_channels=MASK_BRANCH_CHANNELS,
        mask_branch_convs=TOWER_CONVS,
    )
    fields.update(overrides)
    return mmdet_condinst_loss.condinst_config(
        mmdet_condinst_loss.NUM_CLASSES, mmdet_condinst_loss.CANVAS, mask_slots, **fields
    )


def _conv_norm_rows(torch_prefix, flax_conv, flax_norm, out_ch, in_ch, bias):
    rows = [(f"{torch_prefix}.conv.weight", flax_conv + ("kernel",), "conv", (out_ch, in_ch, 3, 3))]
    if bias:
        rows.append((f"{torch_prefix}.conv.bias", flax_conv + ("bias",), "vector", (out_ch,)))
    return rows + [
        (f"{torch_prefix}.gn.weight", flax_norm + ("gn", "scale"), "vector", (out_ch,)),
        (f"{torch_prefix}.gn.bias", flax_norm + ("gn", "bias"), "vector", (out_ch,)),
    ]


def conversion_table(cfg) -> list[tuple[str, tuple, str, tuple]]:
    """(mmdetection key, our parameter path, layout, torch shape) for every tensor of the two
    heads' state dicts, in their module order. Layouts: "conv" (torch [O, I, kh, kw]),
    "vector", and "scale" (a scalar: entry path[-1] of our per-level scales)."""
    c, m = cfg.fpn_channels, cfg.mask_branch_channels
    rows = []
    for torch_tower, ours in (("cls_convs", "cls"), ("reg_convs", "box")):
        for i in range(cfg.head_convs):
            rows += _conv_norm_rows(
                f"bbox_head.{torch_tower}.{i}",
                ("head", f"{ours}_conv{i}"),
                ("head", f"{ours}_norm{i}"),
                c,
                c,
                bias=True,  # mmdetection's conv_bias=True, AdelaiDet's towers
            )
    for name, ours, out in (
        ("conv_cls", "cls_logits", cfg.num_classes),
        ("conv_reg", "bbox_pred", 4),
        ("conv_centerness", "centerness", 1),
    ):
        rows.append((f"bbox_head.{name}.weight", ("head", ours, "kernel"), "conv", (out, c, 3, 3)))
        rows.append((f"bbox_head.{name}.bias", ("head", ours, "bias"), "vector", (out,)))
    for level in range(len(fcos.LEVEL_STRIDES)):
        rows.append((f"bbox_head.scales.{level}.scale", ("head", "scales", level), "scale", ()))
    n = cfg.num_dynamic_params
    rows.append(("bbox_head.controller.weight", ("controller", "kernel"), "conv", (n, c, 3, 3)))
    rows.append(("bbox_head.controller.bias", ("controller", "bias"), "vector", (n,)))
    branch = "mask_head.mask_feature_head"
    for level in range(3):
        rows += _conv_norm_rows(
            f"{branch}.convs_all_levels.{level}.conv{level}",
            ("mask_branch", f"refine{level + 3}_conv"),
            ("mask_branch", f"refine{level + 3}_norm"),
            m,
            c,
            bias=False,
        )
    for j in range(cfg.mask_branch_convs):
        rows += _conv_norm_rows(
            f"{branch}.conv_branch.{j}",
            ("mask_branch", f"tower{j}_conv"),
            ("mask_branch", f"tower{j}_norm"),
            m,
            m,
            bias=False,
        )
    e = cfg.mask_channels
    rows.append(
        (f"{branch}.conv_pred.weight", ("mask_branch", "out", "kernel"), "conv", (e, m, 1, 1))
    )
    rows.append((f"{branch}.conv_pred.bias", ("mask_branch", "out", "bias"), "vector", (e,)))
    return rows


def random_state_dict(cfg, seed: int) -> dict[str, np.ndarray]:
    """Both heads' state dict of seeded draws (torch layouts): convs of variance 1 / fan in,
    norm weights and level scales 1 + 0.1 u, biases 0.1 u (u of unit variance), conv_reg's
    bias 1 + 0.1 u (most distances above the clamp at 0). The same numbers on both sides."""
    return parity.seeded_state_dict(
        conversion_table(cfg),
        seed,
        fan_in_scaled=lambda key, layout: layout == "conv",
        near_one=("gn.weight", ".scale", "conv_reg.bias"),
    )


def random_fpn_maps(cfg, batch: int, seed: int) -> list[np.ndarray]:
    """P3..P7 maps float32[batch, h, w, fpn_channels] (cfg.level_shapes()) of seeded
    unit-variance draws."""
    rng = np.random.default_rng(seed)
    shapes = cfg.level_shapes()
    return [parity.unit_uniform(rng, (batch, h, w, cfg.fpn_channels)) for h, w in shapes]


def convert_head(state_dict: dict, cfg) -> dict:
    """Our CondInst head params (head, controller, mask_branch) from mmdetection's
    CondInstBboxHead and CondInstMaskHead state dict (keys under bbox_head. and mask_head.);
    StateDictError names the first missing or unexpected key."""
    table = conversion_table(cfg)
    check_keys(state_dict, [row[0] for row in table], "not a CondInst heads' state dict")
    rows = [row for row in table if row[2] != "scale"]
    params = parity.tree_from_table(state_dict, rows)
    scales = np.zeros(len(fcos.LEVEL_STRIDES), np.float32)
    for key, path, layout, _ in table:
        if layout == "scale":  # one entry of our per-level vector
            scales[path[-1]] = f32(state_dict[key]).reshape(())
    params["head"]["scales"] = scales
    return params


def to_state_dict_layout(tree: dict, cfg) -> dict[str, np.ndarray]:
    """A tree shaped like convert_head's output (a gradient) in mmdetection's names and torch
    layouts: the converter's table run backwards."""
    return parity.state_dict_from_tree(tree, conversion_table(cfg))


def head_losses(state_dict, fpn_features, gt: dict, slot_location, slot_valid, cfg, loss_cfg):
    """(outputs, terms, gradients, targets) of our heads on the FPN maps fpn_features (P3..P7,
    [B, h, w, fpn_channels] each) with the given mask slots (mmdetection's randperm draw):
    outputs in mmdet_condinst_loss.HEAD_OUTPUTS' layouts; terms its TERMS; gradients of their
    sum with respect to every parameter, by mmdetection key in torch layout; targets
    location_classes and matched.

    The gradient runs the chain rule through the head outputs: mmdet_condinst_loss.
    condinst_losses gives the total's gradient with respect to them (at loss_cfg: cfg's loss
    rules on the head-output parity's narrow layers, so that the CI test reuses that compiled
    program), then the heads' vector-Jacobian product takes it to the parameters."""
    widths = ("fpn_channels", "head_convs", "mask_branch_channels", "mask_branch_convs")
    if dataclasses.replace(loss_cfg, **{f: getattr(cfg, f) for f in widths}) != cfg:
        raise ValueError("loss_cfg must differ from cfg in the layer widths only")
    params = convert_head(state_dict, cfg)
    features = {f"p{i + 3}": jnp.asarray(x, jnp.float32) for i, x in enumerate(fpn_features)}
    b, t = len(fpn_features[0]), sum(h * w for h, w in cfg.level_shapes())
    h, w = (v // condinst.BRANCH_STRIDE for v in cfg.canvas_hw)
    zeros = {  # the outputs' shapes (mmdet_condinst_loss's docstring), without a second trace
        "class_logits": jnp.zeros((b, t, cfg.num_classes)),
        "distances": jnp.zeros((b, t, 4)),
        "centerness_logits": jnp.zeros((b, t)),
        "dynamic_params": jnp.zeros((b, t, cfg.num_dynamic_params)),
        "mask_features": jnp.zeros((b, h, w, cfg.mask_channels)),
    }
    outputs, _ = _heads_vjp(params, features, zeros, cfg)
    outputs = {name: np.asarray(v) for name, v in outputs.items()}
    terms, targets = mmdet_condinst_loss.condinst_losses(
        outputs, gt, slot_location, slot_valid, loss_cfg
    )
    cotangents = {name: jnp.asarray(terms[f"grad_{name}"]) for name in outputs}
    _, grads = _heads_vjp(params, features, cotangents, cfg)
    return (
        outputs,
        {name: terms[name] for name in mmdet_condinst_loss.TERMS},
        to_state_dict_layout(grads, cfg),
        {name: targets[name] for name in ("location_classes", "matched")},
    )


def _heads(params, features, cfg) -> dict:
    """Our CondInst.heads' outputs (mmdet_condinst_loss.HEAD_OUTPUTS) on the FPN maps."""
    predictions = condinst.CondInst(cfg).apply(
        {"params": params}, features, method=condinst.CondInst.heads
    )
    return {name: predictions[name] for name in mmdet_condinst_loss.HEAD_OUTPUTS}


@functools.partial(jax.jit, static_argnums=3)
def _heads_vjp(params, features, cotangents, cfg):
    """(the heads' outputs, the parameters' cotangent of `cotangents` on them): one compiled
    program, run once for the outputs (zero cotangents) and once for the gradient."""
    outputs, pullback = jax.vjp(lambda p: _heads(p, features, cfg), params)
    return outputs, pullback(cotangents)[0]
