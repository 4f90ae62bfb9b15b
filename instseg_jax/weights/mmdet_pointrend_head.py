"""PointRend's mask-side parameters against mmdetection 3.x's CoarseMaskHead and MaskPointHead
(issue 29 item 4, the head-parameter half of the PointRend loss parity; mmdet_pointrend_loss.py
holds the head-output half).

experiments/parity/pointrend_loss.py builds mmdetection's two heads at `head_config`'s sizes,
loads `random_state_dict` into them (load_state_dict strict: the key list here is
mmdetection's, prefixed as PointRendRoIHead names them: mask_head., point_head.), runs
CoarseMaskHead on seeded RoI features and PointRendRoIHead._mask_point_loss with its fine-
grained point features replaced by seeded ones (`random_features`: both stand in for the
network's RoIAlign / point_sample of P2), takes both terms and the gradient of their sum with
respect to every parameter; tests/weights/test_mmdet_pointrend_loss.py runs `head_losses` here
(the state dict through `convert_heads`, our PointRend.coarse_head and point_head_logits,
training_points_and_targets' point selection and point_losses) on the same numbers and compares.

The converter (mmdet/models/roi_heads/mask_heads/coarse_mask_head.py, mask_point_head.py):
  mask_head.downsample_conv.conv (2x2, stride 2) -> coarse_head reduce_spatial (ours a
    space-to-depth matmul: rows in (dy, dx, channel) order)
  mask_head.fcs.i, fc_logits                    -> coarse_head fc{i+1}, prediction
  point_head.fcs.i.conv (Conv1d 1), fc_logits    -> point_head fc{i+1}, predictor
Layouts: mmdetection flattens the downsampled map channel-first (c, y, x) into fcs.0 and views
fc_logits' outputs as (class, y, x); ours flattens and reshapes (y, x, c): the two matrices'
rows / columns are permuted accordingly (`_to_ours`, `_to_torch`). The point head concatenates
[fine, coarse] and [hidden, coarse] in the same order on both sides. No 1x1 channel reduction:
mmdetection has none (our reduce_channels exists only when the pooled width exceeds
coarse_conv_dim, detectron2's case, which the parity's widths avoid).

Training points: mmdetection's are given to ours (as its targets are): both sides select them
from the same uniform draws, but from coarse logits that now differ by float32 rounding, so two
near-tied candidates may change places and the fine features, given per point slot, would then
meet another point. The test checks our own points are mmdetection's set (point_order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax.methods import pointrend
from instseg_jax.ops.sampling import uncertain_points
from instseg_jax.weights import mmdet_loss_parity, mmdet_pointrend_loss
from instseg_jax.weights.state_dict import check_keys

ROI_FEATURE_CHANNELS = 8  # D: the RoI and fine-grained point features' width
COARSE_CONV_DIM = 8  # as D: mmdetection's downsample conv takes the features directly
COARSE_FC_DIM = 16
POINT_FC_DIM = 16


def head_config():
    """The tiny PointRend of the head-parameter parity (mmdet_pointrend_loss's, narrower)."""
    return mmdet_pointrend_loss.pointrend_config(
        coarse_conv_dim=COARSE_CONV_DIM, coarse_fc_dim=COARSE_FC_DIM, point_fc_dim=POINT_FC_DIM
    )


def conversion_table(cfg) -> list[tuple[str, tuple, str, tuple]]:
    """(mmdetection key, our parameter path, layout, torch shape) for every tensor of the two
    heads' state dicts, in module order."""
    d, conv, fc, c = ROI_FEATURE_CHANNELS, cfg.coarse_conv_dim, cfg.coarse_fc_dim, cfg.num_classes
    area = cfg.coarse_side**2
    rows = [
        (
            "mask_head.downsample_conv.conv.weight",
            ("coarse_head", "reduce_spatial", "kernel"),
            "conv2x2",
            (conv, d, 2, 2),
        ),
        (
            "mask_head.downsample_conv.conv.bias",
            ("coarse_head", "reduce_spatial", "bias"),
            "vector",
            (conv,),
        ),
    ]
    for i in range(cfg.coarse_num_fc):
        layout, fan_in = ("linear_from_map", conv * area) if i == 0 else ("linear", fc)
        rows.append(
            (
                f"mask_head.fcs.{i}.weight",
                ("coarse_head", f"fc{i + 1}", "kernel"),
                layout,
                (fc, fan_in),
            )
        )
        rows.append(
            (f"mask_head.fcs.{i}.bias", ("coarse_head", f"fc{i + 1}", "bias"), "vector", (fc,))
        )
    rows.append(
        (
            "mask_head.fc_logits.weight",
            ("coarse_head", "prediction", "kernel"),
            "linear_to_map",
            (c * area, fc),
        )
    )
    rows.append(
        (
            "mask_head.fc_logits.bias",
            ("coarse_head", "prediction", "bias"),
            "bias_to_map",
            (c * area,),
        )
    )
    width = d + c
    for i in range(cfg.point_num_fc):
        rows.append(
            (
                f"point_head.fcs.{i}.conv.weight",
                ("point_head", f"fc{i + 1}", "kernel"),
                "conv1d",
                (cfg.point_fc_dim, width, 1),
            )
        )
        rows.append(
            (
                f"point_head.fcs.{i}.conv.bias",
                ("point_head", f"fc{i + 1}", "bias"),
                "vector",
                (cfg.point_fc_dim,),
            )
        )
        width = cfg.point_fc_dim + c
    rows.append(
        (
            "point_head.fc_logits.weight",
            ("point_head", "predictor", "kernel"),
            "conv1d",
            (c, width, 1),
        )
    )
    rows.append(("point_head.fc_logits.bias", ("point_head", "predictor", "bias"), "vector", (c,)))
    return rows


def _to_ours(layout: str, value: np.ndarray, cfg) -> np.ndarray:
    """One torch tensor in our layout (module docstring)."""
    s, c = cfg.coarse_side, cfg.num_classes
    value = np.asarray(value, np.float32)
    if layout == "vector":
        return value
    if layout == "bias_to_map":  # (class, y, x) -> (y, x, class)
        return value.reshape(c, s, s).transpose(1, 2, 0).reshape(-1)
    if layout == "conv2x2":  # [out, in, dy, dx] -> rows (dy, dx, in)
        return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    if layout == "conv1d":
        return value[:, :, 0].T
    if layout == "linear":
        return value.T
    if layout == "linear_from_map":  # columns (channel, y, x) -> rows (y, x, channel)
        out = value.shape[0]
        return value.reshape(out, -1, s, s).transpose(2, 3, 1, 0).reshape(-1, out)
    if layout == "linear_to_map":  # rows (class, y, x) -> columns (y, x, class)
        fan_in = value.shape[1]
        return value.reshape(c, s, s, fan_in).transpose(3, 1, 2, 0).reshape(fan_in, -1)
    raise ValueError(f"unknown layout {layout!r}")


def _to_torch(layout: str, value: np.ndarray, shape: tuple, cfg) -> np.ndarray:
    """_to_ours run backwards: one of our arrays (a gradient) in torch's layout `shape`."""
    s, c = cfg.coarse_side, cfg.num_classes
    value = np.asarray(value, np.float32)
    if layout == "vector":
        return value
    if layout == "bias_to_map":
        return value.reshape(s, s, c).transpose(2, 0, 1).reshape(shape)
    if layout == "conv2x2":
        out, fan_in, kh, kw = shape
        return value.reshape(kh, kw, fan_in, out).transpose(3, 2, 0, 1)
    if layout == "conv1d":
        return value.T[:, :, None]
    if layout == "linear":
        return value.T
    if layout == "linear_from_map":
        out = shape[0]
        return value.reshape(s, s, -1, out).transpose(3, 2, 0, 1).reshape(shape)
    if layout == "linear_to_map":
        fan_in = shape[1]
        return value.reshape(fan_in, s, s, c).transpose(3, 1, 2, 0).reshape(shape)
    raise ValueError(f"unknown layout {layout!r}")


def random_state_dict(cfg, seed: int) -> dict[str, np.ndarray]:
    """Both heads' state dict of seeded draws (torch layouts): weights of variance 1 / fan in,
    biases 0.1 u (u of unit variance), so that the coarse logits spread over a few units (the
    training points' uncertainties well apart) and every gradient is well above float32 noise."""
    return mmdet_loss_parity.seeded_state_dict(
        conversion_table(cfg), seed, fan_in_scaled=lambda key, layout: key.endswith(".weight")
    )


def random_features(cfg, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(roi_features float32[batch, F, S, S, D], fine float32[batch, F, P, D]) of seeded unit
    draws in our RoI slots (S = mask_pool_size, P = train_num_points): the coarse head's input
    and the fine-grained features at each training point's slot."""
    rng = np.random.default_rng(seed)
    f, side, p = cfg.mask_fg_per_image, cfg.mask_pool_size, cfg.train_num_points
    roi = mmdet_loss_parity.unit_uniform(rng, (batch, f, side, side, ROI_FEATURE_CHANNELS))
    fine = mmdet_loss_parity.unit_uniform(rng, (batch, f, p, ROI_FEATURE_CHANNELS))
    return roi, fine


def convert_heads(state_dict: dict, cfg) -> dict:
    """Our coarse_head and point_head params from mmdetection's CoarseMaskHead (mask_head.*)
    and MaskPointHead (point_head.*) state dicts; StateDictError names the first missing or
    unexpected key."""
    table = conversion_table(cfg)
    check_keys(state_dict, [row[0] for row in table], "not a CoarseMaskHead + MaskPointHead")
    # NumPy arrays: jit takes them as they are
    return mmdet_loss_parity.tree_from_table(
        state_dict, table, lambda layout, value: _to_ours(layout, value, cfg)
    )


def to_state_dict_layout(tree: dict, cfg) -> dict[str, np.ndarray]:
    """A tree shaped like convert_heads' output (a gradient) by mmdetection key, torch layout."""
    return mmdet_loss_parity.state_dict_from_tree(
        tree,
        conversion_table(cfg),
        lambda layout, value, shape: _to_torch(layout, value, shape, cfg),
    )


def head_losses(state_dict, roi_features, fine, rois, draws, cfg, given: dict):
    """(outputs, terms, gradients, our points) of our two heads:
    outputs: coarse_logits [B, F, s, s, C] of roi_features, point_logits [B, F, P, C] of fine
    and the coarse logits at given["points"] (mmdetection's training points, box-relative
    [B, F, P, 2]); terms: loss_mask and loss_mask_point on given["mask_targets"] and
    given["point_labels"]; gradients: of their sum with respect to every parameter, by
    mmdetection key in torch layout; points: the training points ours selects from its own
    coarse logits and `draws` (uncertain_points' uniform draws), for the set check."""
    params = convert_heads(state_dict, cfg)
    rois, draws, given = mmdet_pointrend_loss.jax_inputs(rois, draws, given)
    outputs, terms, grads, points = _head_program(
        params,
        jnp.asarray(roi_features, jnp.float32),
        jnp.asarray(fine, jnp.float32),
        rois,
        draws,
        given,
        cfg,
    )
    return (
        {name: np.asarray(v) for name, v in outputs.items()},
        {name: float(v) for name, v in terms.items()},
        to_state_dict_layout(grads, cfg),
        np.asarray(points),
    )


@functools.partial(jax.jit, static_argnums=6)
def _head_program(params, roi_features, fine, rois, draws, given, cfg):
    """One compiled program per shape: both heads, both terms and the parameter gradient."""
    model = pointrend.PointRend(cfg)

    def total(p):
        coarse = model.apply(
            {"params": p}, roi_features, method=lambda module, x: module.coarse_head(x)
        )
        # training_points_and_targets' selection (its targets, given here, are left out: the
        # RoIAlign of the crops would double this program's tracing for nothing compared).
        b, fg, side = coarse.shape[0], coarse.shape[1], cfg.coarse_side
        classes = jnp.clip(rois["classes"], 0, cfg.num_classes - 1)
        points = uncertain_points(
            jax.random.key(0),
            pointrend.of_class(coarse, classes).reshape(b * fg, side, side),
            cfg.train_num_points,
            cfg.oversample_ratio,
            cfg.importance_sample_ratio,
            draws,
        ).reshape(b, fg, cfg.train_num_points, 2)
        logits = model.apply(
            {"params": p},
            fine,
            coarse,
            given["points"],
            method=pointrend.PointRend.point_head_logits,
        )
        outputs = {
            "rois": rois,
            "mask_logits": coarse,
            "point_logits": logits,
            "mask_targets": given["mask_targets"],
            "mask_valid": rois["foreground"],  # ops.mask_targets' validity
            "point_labels": given["point_labels"],
        }
        losses = pointrend.point_losses(outputs, cfg)
        terms = {"loss_mask": losses["loss_mask"], "loss_mask_point": losses["loss_mask_point"]}
        head = {"coarse_logits": coarse, "point_logits": logits}
        return terms["loss_mask"] + terms["loss_mask_point"], (head, terms, points)

    grads, (head, terms, points) = jax.grad(total, has_aux=True)(params)
    return head, terms, grads, points
