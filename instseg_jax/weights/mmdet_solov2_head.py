"""SOLOv2's head parameters against mmdetection 3.x's SOLOV2Head (issue 29 item 4, the head-
parameter half of the loss parity; mmdet_loss_parity.py holds the head-output half).

experiments/parity/solov2_loss.py builds mmdetection's SOLOV2Head at `head_config`'s sizes,
loads `random_state_dict` into it (load_state_dict strict: the key list here is mmdetection's),
runs it on random FPN maps and takes loss_by_feat and the gradient of each term with respect
to every parameter; tests/weights/test_mmdet_solov2_loss.py runs `head_losses` here (the state
dict through `convert_head`, our SOLOv2.heads, grid_targets and loss_fn) on the same maps and
compares.

The converter covers mmdetection's whole head (mmdet/models/dense_heads/solov2_head.py):
  kernel_convs.i (conv + gn)     -> kernel_tower conv{i} / norm{i}  (input: FPN + 2 CoordConv)
  cls_convs.i (conv + gn)        -> category_tower conv{i} / norm{i}
  conv_kernel, conv_cls          -> kernel_tower / category_tower predict
  mask_feature_head (MaskFeatModule) convs_all_levels.0.conv0 -> mask_branch level0,
    convs_all_levels.l.conv{j} -> mask_branch level{l}_{j}, conv_pred -> mask_branch fuse
(ConvModule with a norm has no conv bias, as ours). Gradients come back in mmdetection's names
and layouts through the same table (`to_state_dict_layout`).

GroupNorm: ours takes min(32, C) groups (nn/layers.py GroupNorm); mmdetection's norm_cfg gets
the same count (`norm_groups`: 32 in the towers, 16 in the mask branch). Epsilon: torch's 1e-5
on both sides (nn/layers.py GN_EPSILON; the head ran with flax's 1e-6 until this parity found it).

Nuclei ground truth (`nuclei_scene`): a crop of one DSB 2018 stage1_train image's masks, read
from the shared data at fixture time and at test time (the fixture stores a checksum only).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.methods import solov2
from instseg_jax.weights import mmdet_loss_parity
from instseg_jax.weights.state_dict import check_keys

FPN_CHANNELS = 16
TOWER_CHANNELS = 64  # 32 GroupNorm groups of two channels
TOWER_CONVS = 1  # one conv per tower (the smoke experiment's): the fixture stays small
MASK_FEATURE_CHANNELS = 16  # the mask branch's GroupNorms: 16 groups of one channel
MASK_CHANNELS = 16


def norm_groups(channels: int) -> int:
    """Our GroupNorm's groups at this width (nn/layers.py GroupNorm: min(32, C)): mmdetection's
    num_groups for the same norm."""
    return min(32, channels)


def head_config(num_classes: int, canvas: int):
    """The tiny SOLOv2 of the head-parameter parity (grids and scale ranges of
    mmdet_loss_parity.solov2_config)."""
    return mmdet_loss_parity.solov2_config(
        num_classes,
        canvas,
        MASK_CHANNELS,
        fpn_channels=FPN_CHANNELS,
        head_channels=TOWER_CHANNELS,
        head_convs=TOWER_CONVS,
        mask_feature_channels=MASK_FEATURE_CHANNELS,
    )


def _conv_norm_rows(torch_prefix, flax_conv, flax_norm, out_ch, in_ch, k):
    return [
        (f"{torch_prefix}.conv.weight", flax_conv + ("kernel",), "conv", (out_ch, in_ch, k, k)),
        (f"{torch_prefix}.gn.weight", flax_norm + ("gn", "scale"), "vector", (out_ch,)),
        (f"{torch_prefix}.gn.bias", flax_norm + ("gn", "bias"), "vector", (out_ch,)),
    ]


def conversion_table(cfg) -> list[tuple[str, tuple, str, tuple]]:
    """(mmdetection key, our parameter path, layout, torch shape) for every tensor of
    SOLOV2Head's state dict, in its module order."""
    rows = []
    c, t, e = cfg.fpn_channels, cfg.head_channels, cfg.mask_channels
    for i in range(cfg.head_convs):
        rows += _conv_norm_rows(
            f"cls_convs.{i}",
            ("category_tower", f"conv{i}"),
            ("category_tower", f"norm{i}"),
            t,
            c if i == 0 else t,
            3,
        )
    for i in range(cfg.head_convs):
        rows += _conv_norm_rows(
            f"kernel_convs.{i}",
            ("kernel_tower", f"conv{i}"),
            ("kernel_tower", f"norm{i}"),
            t,
            c + 2 if i == 0 else t,
            3,
        )
    for name, tower, out in (
        ("conv_cls", "category_tower", cfg.num_classes),
        ("conv_kernel", "kernel_tower", e),
    ):
        rows.append((f"{name}.weight", (tower, "predict", "kernel"), "conv", (out, t, 3, 3)))
        rows.append((f"{name}.bias", (tower, "predict", "bias"), "vector", (out,)))
    m = cfg.mask_feature_channels
    for level in range(4):
        for step in range(max(level, 1)):
            ours = "level0" if level == 0 else f"level{level}_{step}"
            in_ch = (c + 2 if level == 3 else c) if step == 0 else m
            rows += _conv_norm_rows(
                f"mask_feature_head.convs_all_levels.{level}.conv{step}",
                ("mask_branch", f"{ours}_conv"),
                ("mask_branch", f"{ours}_norm"),
                m,
                in_ch,
                3,
            )
    rows += _conv_norm_rows(
        "mask_feature_head.conv_pred",
        ("mask_branch", "fuse_conv"),
        ("mask_branch", "fuse_norm"),
        e,
        m,
        1,
    )
    return rows


def random_state_dict(cfg, seed: int) -> dict[str, np.ndarray]:
    """A SOLOV2Head state dict of seeded draws (torch layouts): convs of variance 1 / fan in,
    norms 1 + 0.1 u and biases 0.1 u (u of unit variance), so that every parameter's gradient
    is well above float32 noise. The same numbers on both sides of the parity."""
    return mmdet_loss_parity.seeded_state_dict(
        conversion_table(cfg),
        seed,
        fan_in_scaled=lambda key, layout: layout == "conv",
        near_one=("gn.weight",),
    )


def random_fpn_maps(cfg, batch: int, seed: int) -> list[np.ndarray]:
    """P2..P6 maps float32[batch, H / s, W / s, fpn_channels] (s = 4..64 over cfg's canvas) of
    seeded unit-variance draws."""
    rng = np.random.default_rng(seed)
    h, w = cfg.canvas_hw
    return [
        mmdet_loss_parity.unit_uniform(rng, (batch, h // s, w // s, cfg.fpn_channels))
        for s in solov2.NATIVE_STRIDES
    ]


def convert_head(state_dict: dict, cfg) -> dict:
    """Our SOLOv2 head params (category_tower, kernel_tower, mask_branch) from mmdetection's
    SOLOV2Head state dict; StateDictError names the first missing or unexpected key."""
    table = conversion_table(cfg)
    check_keys(state_dict, [row[0] for row in table], "not a SOLOV2Head state dict")
    return mmdet_loss_parity.tree_from_table(state_dict, table)


def to_state_dict_layout(tree: dict, cfg) -> dict[str, np.ndarray]:
    """A tree shaped like convert_head's output (a gradient) in mmdetection's names and torch
    layouts: the converter's table run backwards."""
    return mmdet_loss_parity.state_dict_from_tree(tree, conversion_table(cfg))


def head_losses(state_dict, fpn_features, gt: dict, cfg, mask_rescale: float):
    """(outputs, terms, gradients, targets) of our head on the FPN maps fpn_features
    ([B, h, w, fpn_channels] each, P2..P6, on a canvas every image fills):
    outputs: category_logits [B, S, C], kernels [B, S, E], mask_features [B, h, w, E];
    terms: loss_cls and loss_mask; gradients: of loss_cls + mask_rescale x loss_mask with
    respect to every parameter, by mmdetection key in torch layout (mask_rescale: the dice
    normaliser's pairs / cells, mmdet_loss_parity's docstring); targets as solov2_losses'."""
    params = convert_head(state_dict, cfg)
    features = {f"p{i + 2}": jnp.asarray(x, jnp.float32) for i, x in enumerate(fpn_features)}
    gt = {name: jnp.asarray(value) for name, value in gt.items()}
    outputs, terms, grads, targets = _head_program(
        params, features, gt, jnp.float32(mask_rescale), cfg
    )
    return (
        {name: np.asarray(v) for name, v in outputs.items()},
        {name: float(v) for name, v in terms.items()},
        to_state_dict_layout(grads, cfg),
        {
            "cell_labels": np.asarray(targets["cell_labels"]),
            "positive_cells": np.asarray(targets["positive"].sum(axis=1)),
            "pairs": np.asarray(targets["pairs"]),
        },
    )


@functools.partial(jax.jit, static_argnums=4)
def _head_program(params, features, gt, mask_rescale, cfg):
    """One compiled program per shape: the head, the two terms and the gradient."""
    model = solov2.SOLOv2(cfg)
    b = features["p2"].shape[0]
    extent_hw = jnp.broadcast_to(jnp.asarray(cfg.canvas_hw, jnp.float32), (b, 2))

    def total(p):
        logits, kernels, mask_features = model.apply(
            {"params": p}, features, extent_hw, method=solov2.SOLOv2.heads
        )
        outputs = mmdet_loss_parity.solov2_outputs(logits, kernels, mask_features, gt, cfg)
        _, metrics = solov2.loss_fn(outputs, {}, cfg)
        terms = {"loss_cls": metrics["loss_cls"], "loss_mask": metrics["loss_mask"]}
        head = {"category_logits": logits, "kernels": kernels, "mask_features": mask_features}
        loss = terms["loss_cls"] + mask_rescale * terms["loss_mask"]
        return loss, (head, terms, outputs["targets"])

    grads, (head, terms, targets) = jax.grad(total, has_aux=True)(params)
    return head, terms, grads, targets


# ----------------------------------------------------------------------------- nuclei scene

# A grey fluorescence image of 256 x 256 with 57 nuclei, 4-27 px across (levels 0 and 1 of
# head_config): its top-left and bottom-right 128-pixel crops hold 20 and 22 of them.
NUCLEI_IMAGE = "0bf4b144167694b6846d584cf52c458f34f28fcae75328a2a096c8214e01c0d0"
NUCLEI_CROPS = ((0, 0), (128, 128))


def nuclei_scene(source: Path, image_id: str, top: int, left: int, canvas: int, stride: int):
    """(classes int64[N] (all 0), masks bool[N, canvas / stride, canvas / stride], checksum):
    the nuclei of stage1_train image `image_id` within the canvas x canvas crop at (top, left),
    each mask sampled at stride `stride` (the pixel at the centre of each stride x stride
    block: the parity's ground truth is a stride-4 raster upsampled by repetition), empty ones
    dropped, in the masks' file-name order. checksum: SHA-256 of the masks' bytes.

    FileNotFoundError names the folder when the image is not there."""
    full = mmdet_loss_parity.nuclei_crop(source, image_id, top, left, canvas)
    centre = stride // 2
    sampled = full[:, centre::stride, centre::stride]
    masks = sampled[sampled.any(axis=(1, 2))]
    return np.zeros(len(masks), np.int64), masks, mmdet_loss_parity.checksum([masks])


def ground_truth_arrays(images, max_instances: int, stride: int) -> dict:
    """Our padded ground truth of one batch of (classes int[N], masks bool[N, h, w] at stride
    `stride`) as the parity script builds it: boxes float32[B, M, 4] (the full-resolution
    masks' pixel-edge extents: the masks repeated stride x stride), classes int32[B, M], valid
    bool[B, M], centers float32[B, M, 2] (mmdetection's center_of_mass: the mean integer pixel
    index, mmdet/models/utils/misc.py) and masks bool[B, M, h, w]."""
    b = len(images)
    h, w = images[0][1].shape[1:]
    gt = {
        "boxes": np.zeros((b, max_instances, 4), np.float32),
        "classes": np.zeros((b, max_instances), np.int32),
        "valid": np.zeros((b, max_instances), bool),
        "centers": np.zeros((b, max_instances, 2), np.float32),
        "masks": np.zeros((b, max_instances, h, w), bool),
    }
    for i, (classes, masks) in enumerate(images):
        if len(classes) > max_instances:
            raise ValueError(f"{len(classes)} instances in image {i}, room for {max_instances}")
        for j, mask in enumerate(masks):
            ys, xs = np.nonzero(mask.repeat(stride, axis=0).repeat(stride, axis=1))
            gt["boxes"][i, j] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            gt["centers"][i, j] = [xs.mean(), ys.mean()]
        n = len(classes)
        gt["classes"][i, :n] = classes
        gt["valid"][i, :n] = True
        gt["masks"][i, :n] = masks
    return gt
