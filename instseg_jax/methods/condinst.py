"""CondInst (Tian et al. 2020, "Conditional Convolutions for Instance Segmentation"): the method
module (methods/__init__.py). FCOS (methods/fcos.py) detects; every location also predicts,
through a controller conv on the regression tower, the 169 parameters of a small mask head of
its own: three 1x1 convolutions (8, 8, 1 channels, ReLU between) run over an 8-channel mask
feature map at stride 8 concatenated with the coordinates relative to the location. The mask
logits are upsampled to stride 4. Defaults follow AdelaiDet's configs/CondInst/
MS_R_50_1x.yaml; every one is a config field.

Static shapes:
  mask slots   training: at most `mask_instances_per_image` positive locations per image run
               the dynamic head (a uniform random subset when there are more: the reference's
               randperm over its 500 per GPU); the rest are counted in the metrics
               (`mask_positives_over_budget`, `..._fraction`).
  dynamic head one einsum per layer over [slots, h, w] with per-slot weights: no per-instance
               convolution, no Python loop over instances.
  test         FCOS's detections (K slots), then the masks of the K kept locations.

Relative coordinates: (location - cell centre of the mask feature map) / the location's level
size (the reference's sizes of interest 64, 128, ..., 1024 per level, `relative_scales`), the
two channels first. The stride-8 logits are upsampled 2x to stride 4 by `mask_upsampling`:
"aligned" (the default, the COCO recipe's) is the reference's aligned_bilinear (AdelaiDet
adet/utils/comm.py; mmdetection mmdet/models/utils/misc.py): replicate-pad the end, bilinear
with corners aligned, shift by factor // 2, so stride-4 pixel k samples the stride-8 grid at
canvas x = 4k, half a stride-4 pixel before its centre; "half_pixel" samples at the centres
(torch's align_corners=False; the nuclei experiment keeps it, as its RESULTS figures were
trained with it). The same switch takes the mask branch's P4 and P5 to P3's size (both
references call aligned_bilinear there too: AdelaiDet condinst/mask_branch.py forward,
mmdetection condinst_head.py MaskFeatModule.forward; found by the head-parameter parity,
weights/mmdet_condinst_head.py). Mask targets are the instance masks sampled at the centres
of the stride-4 cells, as the reference samples its bitmasks. Mass centres (for centre
sampling): the pipeline's gt_centers average pixel centres; the reference averages pixel
indices of its resized bitmask, half a pixel up and left, which `mass_centre_convention`
"pixel_index" (the default, the COCO recipe's) reproduces. Known difference from the
reference: GroupNorm in the mask branch (the reference uses BatchNorm, which this frame has no
running statistics for: frozen or GroupNorm only).

Loss normalisers: FCOS's are global (AdelaiDet all-reduces them); the dice loss is averaged
over the trained slots of each group of model.loss_normaliser_images images, then over the
groups, as the reference's per-GPU mean under DDP's gradient average (2 images per GPU in the
COCO recipe; 0: the whole global batch, the nuclei experiment's).

Training and test rules from AdelaiDet kept here (CondInstConfig): centre sampling about the
mask's mass centre (fcos_outputs.py get_sample_region with gt_bitmasks_full) and candidates
thresholded on class score x centerness (Base-CondInst.yaml FCOS.THRESH_WITH_CTR).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instseg_jax import config as config_lib
from instseg_jax import ops, structures
from instseg_jax.methods import fcos
from instseg_jax.methods.detector import loss_normaliser_group
from instseg_jax.nn.layers import (
    Conv,
    GroupNorm,
    kaiming_uniform_a1,
    torch_default_bias,
    torch_default_kernel,
)
from instseg_jax.ops import dense

MASK_STRIDE = 4  # of the output masks and targets
BRANCH_STRIDE = 8  # of the mask branch (P3)

INPUTS = structures.Inputs(full_mask_stride=MASK_STRIDE, centers=True)


@dataclasses.dataclass(frozen=True)
class CondInstConfig(fcos.FCOSConfig):
    mask_branch_channels: int = 128
    mask_branch_convs: int = 4
    mask_channels: int = 8  # the mask branch's output and the dynamic head's width
    dynamic_layers: int = 3
    relative_scales: tuple = (64, 128, 256, 512, 1024)  # per level P3..P7
    mask_instances_per_image: int = 250  # the reference's 500 per GPU of 2 images
    mask_loss_weight: float = 1.0
    # Images per mask-loss normaliser: the dice loss is averaged over the trained slots of each
    # group of this many consecutive images of the global batch, then over the groups; the
    # reference averages over its GPU's instances (dynamic_mask_head.py: mask_losses.mean()),
    # which DDP's gradient average turns into this with its 2 images per GPU. 0: one group,
    # the global batch. FCOS's normalisers are global in both (fcos_outputs.py reduce_mean).
    loss_normaliser_images: int = 2
    mask_threshold: float = 0.5
    # Base-CondInst.yaml FCOS.THRESH_WITH_CTR True: candidates above the threshold by class
    # score x centerness.
    score_threshold_on: str = "product"
    # Centre sampling about each instance's mass centre, as AdelaiDet's FCOS outputs do when
    # the instances carry full bitmasks (CondInst adds them): fcos_outputs.py
    # get_sample_region; False: about the box centre (plain FCOS).
    mass_centre_sampling: bool = True
    # Where that mass centre is: "pixel_index", the references' centroid of integer pixel
    # indices of the canvas-sized bitmask (AdelaiDet fcos_outputs.py get_sample_region's m10 /
    # m00; mmdetection condinst_head.py the same), half a pixel up and left of gt_centers (the
    # mean of pixel centres); "pixel_centre": gt_centers as they are.
    mass_centre_convention: str = "pixel_index"
    # The 2x upsampling of the stride-8 mask logits to stride 4 and the mask branch's of P4 and
    # P5 to P3 (module docstring): "aligned", the reference's aligned_bilinear (AdelaiDet
    # adet/utils/comm.py, mmdetection's copy in mmdet/models/utils/misc.py), or "half_pixel"
    # (torch's align_corners=False).
    mask_upsampling: str = "aligned"

    def __post_init__(self):
        super().__post_init__()
        config_lib.check_choice(
            "model.mass_centre_convention",
            self.mass_centre_convention,
            ("pixel_index", "pixel_centre"),
        )
        config_lib.check_choice(
            "model.mask_upsampling", self.mask_upsampling, ("aligned", "half_pixel")
        )
        if len(self.relative_scales) != len(fcos.LEVEL_STRIDES):
            raise config_lib.ConfigValueError(
                f"model.relative_scales needs one size per level P3..P7, got {self.relative_scales}"
            )
        if self.dynamic_layers < 1:
            raise config_lib.ConfigValueError(
                f"model.dynamic_layers must be >= 1, got {self.dynamic_layers}"
            )
        if self.loss_normaliser_images < 0:
            raise config_lib.ConfigValueError(
                "model.loss_normaliser_images must be >= 0 (0: the global batch), got "
                f"{self.loss_normaliser_images}"
            )

    def dynamic_shapes(self) -> list[tuple[int, int]]:
        """(in, out) channels of each dynamic layer: 2 coordinates + mask channels in, 1 out."""
        widths = [self.mask_channels + 2] + [self.mask_channels] * (self.dynamic_layers - 1) + [1]
        return list(zip(widths[:-1], widths[1:], strict=True))

    @property
    def num_dynamic_params(self) -> int:
        """169 for the defaults: (10 x 8 + 8) + (8 x 8 + 8) + (8 x 1 + 1)."""
        return sum(i * o + o for i, o in self.dynamic_shapes())

    def location_scales(self) -> np.ndarray:
        """float32[T]: each location's relative-coordinate scale (its level's entry)."""
        sizes = [h * w for h, w in self.level_shapes()]
        return np.repeat(np.asarray(self.relative_scales, np.float32), sizes)


class MaskBranch(nn.Module):
    """P3..P5 -> per level conv3x3 + GroupNorm + ReLU to `channels`, upsampled to P3 and summed;
    `convs` x (conv3x3 + GroupNorm + ReLU); with `upsampled_convs` > 0 a 2x bilinear upsampling
    and that many more (BlendMask's bottom module, stride 4); a 1x1 conv to `out_channels`:
    [B, H/8, W/8, out] (or [B, H/4, W/4, out]).

    Initialised as AdelaiDet's (condinst/mask_branch.py, blendmask/basis_module.py): the
    conv-norm-ReLU blocks by conv_with_kaiming_uniform (kaiming_uniform_(a=1), no bias), the
    last 1x1 conv, a plain nn.Conv2d, by torch's default."""

    channels: int
    convs: int
    out_channels: int
    dtype: jnp.dtype = jnp.float32
    upsampled_convs: int = 0
    # How P4 and P5 reach P3's size: "half_pixel" (torch's align_corners=False, as AdelaiDet's
    # blendmask/basis_module.py ProtoNet.forward) or "aligned" (CondInst's: AdelaiDet's
    # condinst/mask_branch.py forward and mmdetection's MaskFeatModule.forward both call
    # aligned_bilinear; `upsample_features`).
    level_upsampling: str = "half_pixel"

    @nn.compact
    def __call__(self, features: dict):
        def conv_norm_relu(x, name):
            x = Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                     dtype=self.dtype, kernel_init=kaiming_uniform_a1(),
                     name=f"{name}_conv")(x)  # fmt: skip
            return nn.relu(GroupNorm(32, self.dtype, name=f"{name}_norm")(x))

        x = None
        for level in (3, 4, 5):
            refined = conv_norm_relu(features[f"p{level}"], f"refine{level}")
            if x is None:
                x = refined
            else:
                x = x + upsample_features(refined, x.shape[1:3], self.level_upsampling)
        for i in range(self.convs):
            x = conv_norm_relu(x, f"tower{i}")
        if self.upsampled_convs:
            x = dense.resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
            for i in range(self.upsampled_convs):
                x = conv_norm_relu(x, f"upsampled{i}")
        return Conv(
            self.out_channels,
            (1, 1),
            dtype=self.dtype,
            kernel_init=torch_default_kernel(),
            bias_init=torch_default_bias(x.shape[-1]),
            name="out",
        )(x)


def dynamic_mask_logits(mask_features, params, points, scales, cfg: CondInstConfig):
    """Each slot's mask logits from its own dynamic head.

    mask_features [h, w, Cm] (stride 8); params [P, num_dynamic_params] (all weights, then all
    biases, layer by layer; a weight is [out, in] row-major); points [P, 2] canvas (x, y) of
    each slot's location; scales [P] its relative-coordinate scale. Returns [P, h, w] logits.
    """
    h, w, _ = mask_features.shape
    ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) * BRANCH_STRIDE
    xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) * BRANCH_STRIDE
    rel_x = (points[:, 0, None, None] - xs[None, None, :]) / scales[:, None, None]  # [P, 1, w]
    rel_y = (points[:, 1, None, None] - ys[None, :, None]) / scales[:, None, None]  # [P, h, 1]
    p = params.shape[0]
    coords = jnp.stack(
        [jnp.broadcast_to(rel_x, (p, h, w)), jnp.broadcast_to(rel_y, (p, h, w))], axis=-1
    )
    x = jnp.concatenate(
        [coords, jnp.broadcast_to(mask_features[None], (p, h, w, mask_features.shape[-1]))],
        axis=-1,
    )  # [P, h, w, 2 + Cm]
    shapes = cfg.dynamic_shapes()
    weight_sizes = [i * o for i, o in shapes]
    offsets = np.cumsum([0] + weight_sizes + [o for _, o in shapes])
    for layer, (fan_in, fan_out) in enumerate(shapes):
        weight = params[:, offsets[layer] : offsets[layer + 1]].reshape(p, fan_out, fan_in)
        bias_start = offsets[len(shapes) + layer]
        bias = params[:, bias_start : bias_start + fan_out]
        x = jnp.einsum("phwi,poi->phwo", x, weight) + bias[:, None, None, :]
        if layer < len(shapes) - 1:
            x = nn.relu(x)
    return x[..., 0]


def aligned_bilinear_matrix(in_size: int, factor: int) -> np.ndarray:
    """float32[factor x in_size, in_size]: the reference's aligned_bilinear on one axis as a
    matrix. It pads the input's end by one (replicate), resizes bilinearly with corners aligned
    to factor x in_size + 1 samples (sample j at input position j / factor), replicate-pads
    factor // 2 at the start and keeps the first factor x in_size: output k samples input
    position max(k - factor // 2, 0) / factor, the end's neighbour being the last entry."""
    source = np.maximum(np.arange(factor * in_size) - factor // 2, 0) / factor
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low
    matrix = np.zeros((factor * in_size, in_size), np.float64)
    matrix[np.arange(len(source)), low] += 1.0 - frac
    matrix[np.arange(len(source)), high] += frac
    return matrix.astype(np.float32)


def upsample_features(x, out_hw, mode: str = "half_pixel"):
    """[B, h, w, C] -> [B, oh, ow, C] bilinear, as `upsample_logits` ("aligned": out_hw a
    whole multiple of (h, w))."""
    if mode == "half_pixel":
        return dense.resize_bilinear(x, out_hw)
    return jax.vmap(lambda image: upsample_logits(image.transpose(2, 0, 1), out_hw, mode))(
        x
    ).transpose(0, 2, 3, 1)


def upsample_logits(logits, out_hw, mode: str = "half_pixel"):
    """[P, h, w] -> [P, oh, ow] bilinear: "half_pixel" (torch's align_corners=False) or
    "aligned" (the reference's aligned_bilinear; out_hw a whole multiple of (h, w))."""
    if mode == "half_pixel":
        x = jnp.moveaxis(logits, 0, -1)[None]
        return dense.resize_bilinear(x, out_hw)[0].transpose(2, 0, 1)
    (h, w), (oh, ow) = logits.shape[1:], out_hw
    if oh % h or ow % w or oh // h != ow // w:
        raise ValueError(f"aligned_bilinear needs one whole factor: {(h, w)} -> {(oh, ow)}")
    rows = jnp.asarray(aligned_bilinear_matrix(h, oh // h), logits.dtype)
    cols = jnp.asarray(aligned_bilinear_matrix(w, ow // w), logits.dtype)
    return jnp.einsum("oh,phw,qw->poq", rows, logits, cols)


class CondInst(fcos.FCOS):
    """FCOS plus the controller (a conv3x3 on each level's regression tower) and the mask
    branch."""

    cfg: CondInstConfig

    def setup(self):
        super().setup()
        cfg = self.cfg
        self.controller = Conv(
            cfg.num_dynamic_params,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=cfg.dtype,
            kernel_init=nn.initializers.normal(0.01),
        )
        self.mask_branch = MaskBranch(
            cfg.mask_branch_channels,
            cfg.mask_branch_convs,
            cfg.mask_channels,
            cfg.dtype,
            level_upsampling=cfg.mask_upsampling,
        )

    def assign(self, batch: dict) -> dict:
        """FCOS's assignment, with centre sampling about the mass centres (the config's
        mass_centre_sampling)."""
        centres = None
        if self.cfg.mass_centre_sampling:
            shift = 0.5 if self.cfg.mass_centre_convention == "pixel_index" else 0.0
            centres = batch["gt_centers"] - shift
        return fcos.batch_targets(batch, self.cfg, centres=centres)

    def heads(self, features: dict) -> dict:
        """FCOS's head outputs plus "dynamic_params" [B, T, 169] per location and
        "mask_features" [B, H/8, W/8, mask_channels] (FCOS.predict runs this on its pyramid)."""
        predictions = super().heads(features)
        b, n = features["p3"].shape[0], self.cfg.num_dynamic_params
        params = jnp.concatenate(
            [self.controller(tower).reshape(b, -1, n) for tower in predictions["towers"]], axis=1
        ).astype(jnp.float32)
        mask_features = self.mask_branch(predictions["features"]).astype(jnp.float32)
        return {**predictions, "dynamic_params": params, "mask_features": mask_features}

    def prediction_outputs(self, predictions: dict) -> dict:
        return {name: predictions[name] for name in fcos.LOCATION_OUTPUTS}

    def mask_logits(self, predictions: dict, location):
        """[B, P, H/4, W/4] mask logits of the dynamic heads of P locations int32[B, P]."""
        cfg = self.cfg
        points = jnp.asarray(cfg.locations()[0])
        scales = jnp.asarray(cfg.location_scales())
        out_hw = tuple(v // MASK_STRIDE for v in cfg.canvas_hw)
        return jax.vmap(
            lambda feats, p, loc: upsample_logits(
                dynamic_mask_logits(feats, p[loc], points[loc], scales[loc], cfg),
                out_hw,
                cfg.mask_upsampling,
            )
        )(predictions["mask_features"], predictions["dynamic_params"], location)

    def payloads(self, predictions: dict, kept: dict, batch: dict) -> dict:
        """The canvas masks of the kept locations."""
        masks = jax.nn.sigmoid(self.mask_logits(predictions, kept["location"]))
        return {"canvas_masks": jnp.where(kept["valid"][..., None, None], masks, 0.0)}

    def head_training(self, predictions: dict, targets: dict, batch: dict, key) -> dict:
        """The mask logits of the trained slots and their targets (the matched instances' masks
        at stride 4)."""
        slots = fcos.positive_slots(targets, self.cfg.mask_instances_per_image, key)
        return {
            "targets": {**targets, "slot_valid": slots["valid"], "overflow": slots["overflow"]},
            "mask_logits": self.mask_logits(predictions, slots["location"]),
            "mask_targets": jnp.take_along_axis(
                batch["gt_full_masks"], slots["gt"][..., None, None], axis=1
            ),
        }


def loss_fn(outputs: dict, batch: dict, cfg: CondInstConfig) -> tuple[jnp.ndarray, dict]:
    """FCOS's losses plus the dice loss (squared, eps 1e-5) of the trained mask slots, averaged
    over them within each group of model.loss_normaliser_images images, then over the
    groups."""
    total, metrics = fcos.loss_fn(outputs, batch, cfg)
    targets = outputs["targets"]
    slot_valid = targets["slot_valid"]  # [B, P]
    logits = outputs["mask_logits"]
    b, p = slot_valid.shape
    group = loss_normaliser_group(cfg.loss_normaliser_images, b)
    scale = ops.group_normalizer_scale(slot_valid.sum(axis=1), group)
    loss_mask = cfg.mask_loss_weight * ops.dice_loss(
        logits.reshape(b * p, *logits.shape[2:]),
        outputs["mask_targets"].reshape(b * p, *logits.shape[2:]),
        weights=(slot_valid * scale[:, None]).reshape(-1),
        smooth=0.0,
        squared=True,
        eps=1e-5,
    )
    metrics = {**metrics, "loss_mask": loss_mask, **fcos.slot_budget_metrics(targets)}
    return total + loss_mask, metrics


# ----------------------------------------------------------------------------- method interface

Config = CondInstConfig
Model = CondInst


def base_config() -> ml_collections.ConfigDict:
    """AdelaiDet's CondInst MS_R_50_1x COCO settings (FCOS's schedule and input: multi-scale
    short side 640..800, 800 x 1333 at test, batch 16, lr 0.01, 90k steps)."""
    c = fcos.base_config()
    c.method = "condinst"
    c.model = config_lib.model_section(CondInstConfig)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a CondInst config to seconds on a CPU: FCOS's smoke shrink plus a narrow mask
    branch and 16 mask slots."""
    c = fcos.smoke(c)
    m = c.model
    m.mask_branch_channels = 32
    m.mask_branch_convs = 2
    m.mask_instances_per_image = 16
    m.relative_scales = (32, 64, 128, 256, 512)
    return c
