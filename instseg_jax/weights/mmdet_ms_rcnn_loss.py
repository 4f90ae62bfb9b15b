"""Our side of the mmdetection 3.x loss parity of Mask Scoring R-CNN's MaskIoU head
(methods/ms_rcnn.py MaskIoUHead, area_ratios, maskiou_targets, mask_scoring_losses).

experiments/parity/ms_rcnn_loss.py (the `make peer-mmdet` environment) feeds the same positive
RoIs, RoI features, mask logits and ground truth, and a seeded state dict of mmdetection's
MaskIoUHead, to MaskScoringRoIHead.mask_loss's MaskIoU sequence (the head on the gt class's
mask logits, MaskIoUHead.loss_and_target) and to `maskiou_terms` here;
tests/weights/test_mmdet_ms_rcnn_loss.py compares ours with mmdetection's answers stored in
tests/fixtures/mmdet_ms_rcnn_loss_tiny.npz (no torch there).

Scenes, RoIs and ground truth are PointRend's parity's (weights/mmdet_pointrend_loss.py: 128 x
128 masks, synthetic and one nuclei crop; per instance its tight box and a jittered one), the
crops at the COCO recipe's input.mask_size (112).

Layouts (ours): RoIs in F slots per image (boxes float32[B, F, 4], classes and gt_index
int32[B, F], foreground bool[B, F], positives first); roi_features float32[B, F, 14, 14, D];
mask_logits float32[B, F, 28, 28, C]. mmdetection's are the batch's positives concatenated:
[K, D, 14, 14] and [K, C, 28, 28]. The head's parameters convert by `conversion_table`: conv
kernels [O, I, 3, 3] -> [3, 3, I, O], the first FC's input from torch's (C, H, W) flattening
to ours (H, W, C), FC weights transposed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from instseg_jax import ops
from instseg_jax.methods import ms_rcnn
from instseg_jax.weights import mmdet_loss_parity
from instseg_jax.weights.mmdet_pointrend_loss import CANVAS, NUM_CLASSES, ROI_SLOTS

CROP_SIZE = 112  # Mc: the COCO recipe's input.mask_size
ROI_FEATURE_CHANNELS = 8  # D
MASK_SIDE = 28


def ms_rcnn_config(**overrides) -> ms_rcnn.MSRCNNConfig:
    """The tiny Mask Scoring R-CNN whose MaskIoU head the parity runs: mmdetection's 4 convs
    (the last stride 2) and 2 FCs at 16 and 32 channels, its mask_thr_binary 0.5 on the logits,
    loss weight 0.5; the COCO recipe's adaptive mask targets."""
    fields = dict(
        num_classes=NUM_CLASSES,
        canvas_hw=(CANVAS, CANVAS),
        mask_fg_per_image=ROI_SLOTS,
        maskiou_conv_dim=16,
        maskiou_fc_dim=32,
        mask_target_sampling_ratio=0,
    )
    fields.update(overrides)
    return ms_rcnn.MSRCNNConfig(**fields)


def conversion_table(cfg) -> list[tuple[str, tuple, str, tuple]]:
    """(mmdetection key, our path, layout, torch shape) of every MaskIoUHead parameter."""
    rows = []
    channels = ROI_FEATURE_CHANNELS + 1
    for i in range(cfg.maskiou_num_convs):
        shape = (cfg.maskiou_conv_dim, channels, 3, 3)
        rows.append((f"convs.{i}.weight", (f"conv{i + 1}", "kernel"), "conv", shape))
        rows.append((f"convs.{i}.bias", (f"conv{i + 1}", "bias"), "vector", shape[:1]))
        channels = cfg.maskiou_conv_dim
    side = cfg.mask_pool_size // 2
    width = channels * side * side
    for i in range(cfg.maskiou_num_fcs):
        layout = "fc_chw" if i == 0 else "fc"
        shape = (cfg.maskiou_fc_dim, width)
        rows.append((f"fcs.{i}.weight", (f"fc{i + 1}", "kernel"), layout, shape))
        rows.append((f"fcs.{i}.bias", (f"fc{i + 1}", "bias"), "vector", shape[:1]))
        width = cfg.maskiou_fc_dim
    rows.append(("fc_mask_iou.weight", ("fc_mask_iou", "kernel"), "fc", (cfg.num_classes, width)))
    rows.append(("fc_mask_iou.bias", ("fc_mask_iou", "bias"), "vector", (cfg.num_classes,)))
    return rows


def _to_ours(layout: str, value, cfg) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if layout == "fc":
        return value.T
    if layout == "fc_chw":  # torch flattens the 7 x 7 maps as (C, H, W), ours as (H, W, C)
        side = cfg.mask_pool_size // 2
        out = value.shape[0]
        return value.reshape(out, -1, side, side).transpose(2, 3, 1, 0).reshape(-1, out)
    return mmdet_loss_parity.conv_or_vector_to_ours(layout, value)


def _to_torch(layout: str, value, shape, cfg) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if layout == "fc":
        return value.T
    if layout == "fc_chw":
        side = cfg.mask_pool_size // 2
        out = shape[0]
        return value.reshape(side, side, -1, out).transpose(3, 2, 0, 1).reshape(shape)
    return mmdet_loss_parity.conv_or_vector_to_torch(layout, value, shape)


def random_state_dict(cfg, seed: int) -> dict[str, np.ndarray]:
    """MaskIoUHead's state dict of seeded draws (torch layouts): weights of variance 1 / fan
    in, biases 0.1 u, so that every gradient is well above float32 noise."""
    return mmdet_loss_parity.seeded_state_dict(
        conversion_table(cfg), seed, fan_in_scaled=lambda key, layout: key.endswith(".weight")
    )


def convert_head(state_dict: dict, cfg) -> dict:
    """Our MaskIoUHead params from mmdetection's MaskIoUHead state dict."""
    table = conversion_table(cfg)
    missing = sorted({row[0] for row in table} ^ set(state_dict))
    if missing:
        raise KeyError(f"not a MaskIoUHead state dict of this config: keys {missing} differ")
    return mmdet_loss_parity.tree_from_table(
        state_dict, table, lambda layout, value: _to_ours(layout, value, cfg)
    )


def to_state_dict_layout(tree: dict, cfg) -> dict[str, np.ndarray]:
    """A gradient shaped like our params by mmdetection key, in torch's layouts."""
    return mmdet_loss_parity.state_dict_from_tree(
        tree,
        conversion_table(cfg),
        lambda layout, value, shape: _to_torch(layout, value, shape, cfg),
    )


def random_inputs(cfg, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(roi_features float32[batch, F, 14, 14, D], mask_logits float32[batch, F, 28, 28, C])
    of seeded draws in our RoI slots; the logits spread over about 0.5 +- 3.5, so the head's
    threshold (0.5 on the logits) splits every mask."""
    rng = np.random.default_rng(seed)
    f, side = cfg.mask_fg_per_image, cfg.mask_pool_size
    features = mmdet_loss_parity.unit_uniform(rng, (batch, f, side, side, ROI_FEATURE_CHANNELS))
    logits = 0.5 + 2.0 * mmdet_loss_parity.unit_uniform(
        rng, (batch, f, MASK_SIDE, MASK_SIDE, cfg.num_classes)
    )
    return features, logits.astype(np.float32)


def maskiou_terms(rois: dict, features, logits, params, gt: dict, cfg, given: dict):
    """(terms on the given targets, terms on ours, our targets), one compiled program. terms:
    loss_mask_iou, the head's output of every class (mask_iou float32[B, F, C]) and the loss's
    gradient with respect to every parameter (grad_params, our tree), the RoI features
    (grad_features) and the mask logits (grad_logits); with their targets (iou_targets and
    trained [B, F]). Our targets: mask_targets [B, F, 28, 28] and area_ratios [B, F]. given:
    {mask_targets, area_ratios} (mmdetection's, our layout)."""
    rois = {name: jnp.asarray(value) for name, value in rois.items()}
    gt = {name: jnp.asarray(gt[name]) for name in ("boxes", "crops")}
    given = {name: jnp.asarray(value, jnp.float32) for name, value in given.items()}
    on_given, on_ours, targets = _terms(
        rois,
        jnp.asarray(features, jnp.float32),
        jnp.asarray(logits, jnp.float32),
        jax.tree.map(jnp.asarray, params),
        gt,
        given,
        cfg,
    )

    def host(terms):
        loss, output, grads, iou_targets, trained = terms
        return {
            "loss_mask_iou": float(loss),
            "mask_iou": np.asarray(output),
            "grad_params": jax.tree.map(np.asarray, grads[0]),
            "grad_features": np.asarray(grads[1]),
            "grad_logits": np.asarray(grads[2]),
            "iou_targets": np.asarray(iou_targets),
            "trained": np.asarray(trained),
        }

    return host(on_given), host(on_ours), {k: np.asarray(v) for k, v in targets.items()}


@functools.partial(jax.jit, static_argnums=6)
def _terms(rois, features, logits, params, gt, given, cfg):
    """The loss, the head's output, the gradients and the IoU targets on the given targets and
    on ours, and our targets: one program per shape."""
    fg = cfg.mask_fg_per_image
    mask_targets, valid = ops.mask_targets(
        gt["crops"], gt["boxes"], rois, fg, MASK_SIDE, cfg.mask_target_sampling_ratio
    )
    ratios = ms_rcnn.area_ratios(
        gt["crops"], gt["boxes"], rois["gt_index"], rois["boxes"], cfg.canvas_hw
    )
    head = ms_rcnn.MaskIoUHead(
        cfg.num_classes,
        cfg.maskiou_conv_dim,
        cfg.maskiou_num_convs,
        cfg.maskiou_fc_dim,
        cfg.maskiou_num_fcs,
    )

    def loss(params, features, logits, targets, area_ratios):
        class_logits = ms_rcnn.of_class(logits, rois["classes"])  # [B, F, 28, 28]
        iou_targets, trained = ms_rcnn.maskiou_targets(
            jax.lax.stop_gradient(class_logits),
            targets,
            area_ratios,
            valid,
            cfg.maskiou_logit_threshold,
        )
        output = head.apply({"params": params}, features, class_logits)  # [B, F, C]
        outputs = {
            "rois": rois,
            "mask_logits": logits,
            "mask_targets": targets,
            "mask_valid": valid,
            "mask_iou": ms_rcnn.of_class(output, rois["classes"]),
            "mask_iou_targets": iou_targets,
            "mask_iou_trained": trained,
        }
        value = ms_rcnn.mask_scoring_losses(outputs, cfg)["loss_mask_iou"]
        return value, (output, iou_targets, trained)

    def terms(targets, area_ratios):
        (value, (output, iou_targets, trained)), grads = jax.value_and_grad(
            loss, argnums=(0, 1, 2), has_aux=True
        )(params, features, logits, targets, area_ratios)
        return value, output, grads, iou_targets, trained

    ours = {"mask_targets": mask_targets, "area_ratios": ratios}
    return (
        terms(given["mask_targets"], given["area_ratios"]),
        terms(mask_targets, ratios),
        ours,
    )
