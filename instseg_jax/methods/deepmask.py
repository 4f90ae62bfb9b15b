"""DeepMask (Pinheiro, Collobert and Dollar, NeurIPS 2015, "Learning to Segment Object
Candidates"), in the updated form of facebookresearch/deepmask (the SharpMask paper's DeepMask:
a ResNet-50 trunk): the method module (methods/__init__.py). Class-agnostic segment proposals:
every detection is class 0 (nuclei has one class; on COCO the 80 classes are one "object" and
evaluated class-agnostically, see "Evaluation").

Reference files and what each rule here follows:
  DeepMask.lua       the trunk (ResNet-50 to res4, stride 16, BatchNorm fixed), its border cell
                     cropped (SpatialZeroPadding(-1)), a 1x1 conv to 128 + ReLU, a fully
                     connected layer over the fSz x fSz x 128 map to 512 (fSz = iSz / 16); the
                     mask branch one linear layer 512 -> 56 x 56 (with the 512 the low-rank
                     factorisation of the paper), bilinearly upsampled to gSz = 112 for the loss;
                     the score branch Dropout(.5), linear 512 -> 1024, Threshold(0, 1e-6),
                     Dropout(.5), linear 1024 -> 1.
  modelUtils.lua     linear2convTrunk / linear2convHead: at test the fully connected layer is
                     an fSz x fSz convolution run densely over the feature map (stride 16).
  DataSampler.lua    windows of wSz = iSz + 32 pixels whose central iSz x iSz region carries
                     the mask (`jitterBox`: scale log2(maxDim / objSz) jittered by +-`scale`
                     octaves, centre by +-`shift` x 2^s pixels, objSz = ceil(iSz 128 / 224));
                     `cropMask`: the object's mask in the central region at gSz x gSz, the
                     crop's origin rounded at the target resolution, > 0.5; `maskSampling`'s
                     object filter (area >= 100, sides >= 5); `negSamplingBB`: a random scale of
                     2^-3 .. 2^2 in steps of 2^0.25 and a random centre, negative unless an
                     object whose quantised canonical scale (`createBBstruct`) lies within 10
                     steps of it has its centre within 3 x shift pixels; retried up to a budget,
                     the last try kept.
  TrainerDeepMask.lua  soft-margin (logistic) loss on both branches, the mask loss only on
                     windows with a centred object, its gradient multiplied by the batch
                     (`gradOutputs:mul(batch)`: the paper's lambda = 1/32 on the score term).
  InferDeepMask.lua, computeProposals.lua, evalPerImage.lua
                     the image at scales 2^-2.5 .. 2^0.5 in steps of 2^0.5, each padded by
                     iSz / 2 on every side with grey (0.5); the trunk and both heads run densely;
                     scores are sigmoid probabilities; the best `np` windows over all scales;
                     window (i, j) of scale s covers [16 j - iSz / 2, 16 j + iSz / 2) / s; masks
                     are the upsampled logits thresholded at logit(0.2).

Static shapes:
  training   per image `windows_per_image` windows, the first `positive_fraction` of them
             positive (jittered about an object drawn uniformly among the image's eligible
             ones; none eligible: the slot is invalid and counted), the rest negative (each
             from `negative_tries` random draws, the first negative one, else the last, as
             negSamplingBB's loop, and counted). Window pixels are sampled from the canvas
             (bilinear at the window's cell centres, grey outside the image), so the trunk sees a
             batch of B x windows_per_image crops of wSz x wSz. Mask targets come from the
             instances' box crops (INPUTS.box_masks, input.mask_size), sampled at the central
             region's gSz x gSz cell centres.
  test       every scale of `test_scales` is a static resize of the canvas; the dense score of
             every window, the best `candidates` over all scales (a fixed top_k), their masks
             (the mask branch on those windows only: T x 3136 logits would not fit), tight
             boxes of the thresholded masks, greedy NMS on them at `nms_threshold` (1.0 keeps
             every window: the reference has no NMS; with `nms_mask_stride` s > 0 on the masks'
             IoU, the masks read on a canvas grid of stride s), the best `detections_per_image`.

Deviations from the reference, and why:
  - One joint step: every window trains the score branch and the positives also the mask
    branch (the paper's equation 1), where the code alternates mask batches (jittered
    objects) and score batches (half exact object centres at the quantised canonical scale,
    half negatives, `hfreq` 0.5). A score positive here is a jittered window, which the paper's
    definition of a positive (centred within +-16 px, scale within 2^+-1/4) admits.
  - negSamplingBB compares the window centre, in the frame of the window's scale, with object
    centres in the frame of each object's own canonical scale; here both are in the window's
    frame (the two agree when the scales are equal; the reference's mix looks unintended).
  - `scale_negative_fraction` (0 in the COCO recipe, as the code; the nuclei experiment 0.5)
    draws that fraction of the negatives by the paper's second rule (section 3.1: an object at
    least 2^1 off the canonical scale), which the code lacks: without it no window centred on
    an object at a wrong scale is ever a negative, and zoomed-in windows inside objects outrank
    the right ones at test.
  - `train_context` (0 in the COCO recipe, as the reference; the nuclei experiment 2) crops
    that many feature cells of context around each training window, so that its features are
    those the dense test computes (on the over-fitting scenes, with none, the dense windows'
    masks had IoU 0.31 and 0.78 with their targets where the same windows cropped had 0.63 and
    0.93).
  - The positive object is drawn uniformly among the image's eligible instances, where the
    reference draws a category, then an annotation of it, from the whole dataset (class-balanced).
    The object filter reads box areas (the batch has no mask areas) in canvas pixels.
    Negatives are blocked by the batch's instances (crowd regions are dropped for training; the
    reference's bbStruct keeps them).
  - The trunk pads with zeros (the reference swaps 3x3 zero padding for symmetric padding,
    modelUtils.updatePadding); crops and the test pyramid resample bilinearly with half-pixel
    centres (torch's image.scale and nnx's SpatialReSamplingEx are not reproduced).
  - Detections carry tight boxes of the thresholded masks, cut to the image (getTopMasks
    writes only pixels inside it), and the window mask resampled into them (box-relative
    masks, pasted as Mask R-CNN's at >= 0.5): probabilities are sigmoid(logit -
    logit(mask_threshold)), so the paste's 0.5 is the reference's threshold.
    Windows whose mask is empty are not kept (the reference returns them as empty proposals).
  - Optional NMS (the reference has none): the nuclei experiment uses it, since COCOeval's AP
    counts the many near-identical windows on one object as false positives. On the masks'
    tight boxes, or (model.nms_mask_stride) on the masks: off-centre windows' masks carry stray
    blobs that widen their tight boxes (on the over-fitting scenes near-duplicates with 4 to 11
    components escaped box NMS at 0.5).
  - SharpMask's refinement (SharpMask.lua) is not built.

Evaluation: class-agnostic (eval.class_agnostic, COCOeval with useCats 0, set by base_config):
on COCO the 80 classes only count as objects: the reference's evalPerImage.lua writes every
proposal with category_id 1, and the papers' AR is over all objects.
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
from instseg_jax.backbones.resnet import normalize
from instseg_jax.methods.detector import DetectorConfig, build_backbone, smoke_backbone
from instseg_jax.nn.layers import Conv, Dense
from instseg_jax.ops.dense import resize_bilinear

INPUTS = structures.Inputs(box_masks=True)

LEVEL_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
GREY = 127.5  # the reference pads windows and the test pyramid with 0.5 (0-1 pixels)


@dataclasses.dataclass(frozen=True)
class DeepMaskConfig(DetectorConfig):
    canvas_hw: tuple[int, int] = (640, 640)  # COCO images at their own size (long side <= 640)
    freeze_at: int = 0  # TrainerDeepMask.lua updates the whole trunk (its BatchNorm fixed)
    trunk_level: str = "res4"  # the feature map the heads read: res4, stride 16 (DeepMask.lua)
    window_inner: int = 160  # iSz: the central region the mask covers (train.lua -iSz)
    object_size: int = 92  # objSz: canonical max side of a centred object, ceil(iSz 128 / 224)
    trunk_channels: int = 128  # the 1x1 conv after the trunk
    embedding: int = 512  # the fully connected layer both branches read
    score_hidden: int = 1024
    dropout: float = 0.5  # before each linear layer of the score branch
    mask_size: int = 56  # oSz: the mask branch's output side
    mask_target_size: int = 112  # gSz: the side the loss compares at (output upsampled)
    shift: float = 16.0  # centre jitter of positives, in window pixels (train.lua -shift)
    scale_jitter: float = 0.25  # scale jitter of positives, octaves (train.lua -scale)
    windows_per_image: int = 4
    positive_fraction: float = 0.5  # DataSampler's 50/50 draw
    negative_scales: tuple = (-3.0, 2.0, 0.25)  # log2 image scales (first, last, step)
    negative_distance: float = 48.0  # 3 x shift: a negative's centre this far from objects
    negative_scale_steps: int = 10  # objects within this many scale steps block a negative
    negative_tries: int = 16  # draws per negative slot (negSamplingBB: up to 100)
    # Feature cells of image context around each training window (0: the reference's crops of
    # wSz). The test runs the trunk densely, where a window's border cells see its neighbours'
    # pixels; a training crop sees the trunk's zero padding there instead.
    train_context: int = 0
    # The fraction of negatives drawn by the paper's second rule (section 3.1: a window about an
    # object whose scale is off by 2^1 or more; here 1 to 2 octaves), absent from the code (0).
    scale_negative_fraction: float = 0.0
    min_object_area: float = 100.0  # maskSampling's filter (ann.area < 100 refused)
    min_object_side: float = 5.0  # maskSampling's filter (bbox sides < 5 refused)
    mask_loss_scale: float = 32.0  # TrainerDeepMask.lua: gradOutputs:mul(batch of 32)
    test_scales: tuple = (-2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5)  # log2 (evalPerImage.lua)
    candidates: int = 1000  # best windows over all scales whose masks are computed
    mask_threshold: float = 0.2  # evalPerImage.lua -thr
    nms_threshold: float = 1.0  # > 1 - 1e-6: no NMS (the reference has none)
    # 0: NMS compares the masks' tight boxes; s > 0: it compares the masks themselves (their
    # IoU on a grid of one cell per s canvas pixels). A stray blob of a thresholded window mask
    # widens its tight box, so near-duplicates of one object escape box NMS.
    nms_mask_stride: int = 0
    detections_per_image: int = 1000
    box_rescale: str = "scale"

    COARSEST_LEVEL = ("res4", 16)

    def __post_init__(self):
        super().__post_init__()
        config_lib.check_choice("model.trunk_level", self.trunk_level, tuple(LEVEL_STRIDES))
        config_lib.check_choice("model.box_rescale", self.box_rescale, ("scale",))
        if self.window_inner % self.stride:
            raise config_lib.ConfigValueError(
                f"model.window_inner {self.window_inner} must be a multiple of the trunk's "
                f"stride {self.stride} (model.trunk_level {self.trunk_level!r})"
            )
        if not 0.0 < self.mask_threshold < 1.0:  # compared as a logit on the mask logits
            raise config_lib.ConfigValueError(
                f"model.mask_threshold must be in (0, 1), got {self.mask_threshold}"
            )
        if not 0 < self.positive_fraction < 1 or self.positive_windows < 1:
            raise config_lib.ConfigValueError(
                "model.positive_fraction must leave at least one positive and one negative of "
                f"model.windows_per_image {self.windows_per_image}, got {self.positive_fraction}"
            )
        if self.windows_per_image - self.positive_windows < 1:
            raise config_lib.ConfigValueError(
                "model.windows_per_image needs a negative window: raise it or lower "
                "model.positive_fraction"
            )
        if self.candidates < self.detections_per_image:
            raise config_lib.ConfigValueError(
                f"model.candidates {self.candidates} must be >= model.detections_per_image "
                f"{self.detections_per_image}"
            )

    @property
    def stride(self) -> int:
        return LEVEL_STRIDES[self.trunk_level]

    @property
    def window(self) -> int:
        """wSz: the window the trunk sees, the central region and one feature cell each side."""
        return self.window_inner + 2 * self.stride

    @property
    def feature_side(self) -> int:
        """fSz: the feature cells of the central region."""
        return self.window_inner // self.stride

    @property
    def positive_windows(self) -> int:
        return round(self.windows_per_image * self.positive_fraction)

    def negative_scale_grid(self) -> np.ndarray:
        first, last, step = self.negative_scales
        return np.arange(first, last + step / 2, step)


# ----------------------------------------------------------------------------- window sampling


def window_draws(key: jax.Array, cfg: DeepMaskConfig) -> dict:
    """The uniform draws in [0, 1) of one image's windows (`sample_windows` reads them)."""
    p, n, t = cfg.positive_windows, cfg.windows_per_image - cfg.positive_windows, cfg.negative_tries
    keys = jax.random.split(key, 12)
    return {
        "instance": jax.random.uniform(keys[0], (p,)),
        "scale": jax.random.uniform(keys[1], (p,)),
        "dx": jax.random.uniform(keys[2], (p,)),
        "dy": jax.random.uniform(keys[3], (p,)),
        "negative_scale": jax.random.uniform(keys[4], (n, t)),
        "negative_x": jax.random.uniform(keys[5], (n, t)),
        "negative_y": jax.random.uniform(keys[6], (n, t)),
        # the paper's scale negatives (`scale_negative_fraction`)
        "off_instance": jax.random.uniform(keys[7], (n,)),
        "off_scale": jax.random.uniform(keys[8], (n,)),
        "off_sign": jax.random.uniform(keys[9], (n,)),
        "off_dx": jax.random.uniform(keys[10], (n,)),
        "off_dy": jax.random.uniform(keys[11], (n,)),
    }


def canonical_scales(gt_boxes, cfg: DeepMaskConfig):
    """float32[N] each object's quantised canonical scale (DataSampler.createBBstruct): the
    first s of -32..32 with objSz 2^((s-1)q) < maxDim <= objSz 2^((s+1)q), as -s q (q the scale
    jitter): the log2 image scale that brings the object to about objSz."""
    q = cfg.scale_jitter
    max_dim = jnp.maximum(gt_boxes[:, 2] - gt_boxes[:, 0], gt_boxes[:, 3] - gt_boxes[:, 1])
    ratio = jnp.log2(jnp.maximum(max_dim, 1e-6) / cfg.object_size)
    s = jnp.clip(jnp.ceil(ratio / q - 1.0 - 1e-6), -32, 32)
    return -s * q


def sample_windows(draws: dict, gt_boxes, gt_valid, image_hw, cfg: DeepMaskConfig) -> dict:
    """One image's training windows from its draws (`window_draws`).

    gt_boxes float32[N, 4] canvas xyxy; gt_valid bool[N]; image_hw int32[2]. Returns windows
    float32[W, 4] (the wSz window, canvas xyxy), inner float32[W, 4] (its central iSz region),
    positive bool[W], valid bool[W], instance int32[W] (the positive's object, 0 otherwise),
    negative_found bool[W] (False on a negative whose every try was blocked; True elsewhere).
    """
    gt_boxes, gt_valid, image_hw = (jnp.asarray(a) for a in (gt_boxes, gt_valid, image_hw))
    w_side, i_side = float(cfg.window), float(cfg.window_inner)
    widths = gt_boxes[:, 2] - gt_boxes[:, 0]
    heights = gt_boxes[:, 3] - gt_boxes[:, 1]
    eligible = (
        gt_valid
        & (widths * heights >= cfg.min_object_area)
        & (widths >= cfg.min_object_side)
        & (heights >= cfg.min_object_side)
    )
    count = eligible.sum()
    rank = jnp.cumsum(eligible) - 1  # [N] rank of each eligible object

    def about_an_object(u_instance, scale_offset, u_dx, u_dy):
        """(object int32[n], centres [n, 2], window side factors 2^s [n]) of windows about the
        floor(u count)-th eligible object, at its log2(maxDim / objSz) + scale_offset, the
        centre jittered by +-shift 2^s (jitterBox)."""
        k = jnp.minimum(jnp.floor(u_instance * count), jnp.maximum(count - 1, 0))
        hit = eligible[None, :] & (rank[None, :] == k[:, None].astype(rank.dtype))
        instance = jnp.argmax(hit, axis=1).astype(jnp.int32)
        box = gt_boxes[instance]
        max_dim = jnp.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
        factor = 2.0 ** (jnp.log2(jnp.maximum(max_dim, 1e-6) / cfg.object_size) + scale_offset)
        xc = (box[:, 0] + box[:, 2]) / 2 + cfg.shift * (2.0 * u_dx - 1.0) * factor
        yc = (box[:, 1] + box[:, 3]) / 2 + cfg.shift * (2.0 * u_dy - 1.0) * factor
        return instance, jnp.stack([xc, yc], axis=1), factor

    instance, positive_centres, positive_sides = about_an_object(
        draws["instance"],
        cfg.scale_jitter * (2.0 * draws["scale"] - 1.0),
        draws["dx"],
        draws["dy"],
    )

    # Negatives: try t of slot n is scale grid[floor(u G)] and a centre uniform in the image.
    grid = jnp.asarray(cfg.negative_scale_grid(), jnp.float32)
    g = grid.shape[0]
    index = jnp.minimum(jnp.floor(draws["negative_scale"] * g), g - 1).astype(jnp.int32)
    scale = grid[index]  # [Nn, T] log2 image scale
    h, w = image_hw[0].astype(jnp.float32), image_hw[1].astype(jnp.float32)
    x, y = draws["negative_x"] * w, draws["negative_y"] * h  # [Nn, T] canvas
    centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # [N, 2]
    object_scale = canonical_scales(gt_boxes, cfg)  # [N]
    near_scale = jnp.abs(object_scale[None, None, :] - scale[..., None]) <= (
        cfg.negative_scale_steps * cfg.scale_jitter + 1e-6
    )
    distance = jnp.hypot(x[..., None] - centres[:, 0], y[..., None] - centres[:, 1]) * (
        2.0 ** scale[..., None]
    )  # [Nn, T, N] in the window's frame
    blocked = (near_scale & (distance < cfg.negative_distance) & gt_valid).any(axis=-1)
    tries = blocked.shape[1]
    free = ~blocked
    first = jnp.where(free.any(axis=1), jnp.argmax(free, axis=1), tries - 1)  # [Nn]
    pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
    negative_centres = jnp.stack([pick(x), pick(y)], axis=1)
    negative_sides = 2.0 ** -pick(scale)

    n_neg = negative_sides.shape[0]
    # The paper's scale negatives: the first slots, when the image has an eligible object, are
    # about one at 1 to 2 octaves off its scale (either way), in place of the random draw.
    off = jnp.where(draws["off_sign"] < 0.5, -1.0, 1.0) * (1.0 + draws["off_scale"])
    _, off_centres, off_sides = about_an_object(
        draws["off_instance"], off, draws["off_dx"], draws["off_dy"]
    )
    n_off = round(n_neg * cfg.scale_negative_fraction)
    use_off = (jnp.arange(n_neg) < n_off) & (count > 0)
    negative_centres = jnp.where(use_off[:, None], off_centres, negative_centres)
    negative_sides = jnp.where(use_off, off_sides, negative_sides)
    free = free | use_off[:, None]
    centres_all = jnp.concatenate([positive_centres, negative_centres])  # [W, 2]
    factors = jnp.concatenate([positive_sides, negative_sides])  # [W]

    def square(side):
        half = (side * factors / 2)[:, None]
        return jnp.concatenate([centres_all - half, centres_all + half], axis=1)

    p = positive_centres.shape[0]
    return {
        "windows": square(w_side),
        "inner": square(i_side),
        "positive": jnp.arange(p + n_neg) < p,
        "valid": jnp.concatenate([jnp.full((p,), count > 0), jnp.ones((n_neg,), bool)]),
        "instance": jnp.concatenate([instance, jnp.zeros((n_neg,), jnp.int32)]),
        "negative_found": jnp.concatenate([jnp.ones((p,), bool), free.any(axis=1)]),
    }


def _bilinear(grid, ys, xs, fill):
    """grid[h, w, C] sampled bilinearly at pixel coordinates ys, xs [...] (pixel centres at
    integers); taps outside the grid read `fill`. Returns [..., C]."""
    h, w = grid.shape[:2]
    y0, x0 = jnp.floor(ys), jnp.floor(xs)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    out = 0.0
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            yy, xx = (y0 + dy).astype(jnp.int32), (x0 + dx).astype(jnp.int32)
            inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
            tap = grid[jnp.clip(yy, 0, h - 1), jnp.clip(xx, 0, w - 1)].astype(jnp.float32)
            out = out + wy * wx * jnp.where(inside, tap, fill)
    return out


def crop_windows(image, image_hw, windows, size: int):
    """float32[W, size, size, 3] pixels of square canvas windows float32[W, 4] from
    image uint8[H, W, 3]: bilinear at the window's cell centres, grey outside the valid
    region image_hw int32[2] (DataSampler pads its crops with 0.5)."""
    image, image_hw, windows = (jnp.asarray(a) for a in (image, image_hw, windows))
    h, w = image_hw[0], image_hw[1]
    rows = jnp.arange(image.shape[0])[:, None, None]
    cols = jnp.arange(image.shape[1])[None, :, None]
    greyed = jnp.where((rows < h) & (cols < w), image.astype(jnp.float32), GREY)
    cells = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size  # [S]
    xs = windows[:, 0:1] + cells[None] * (windows[:, 2:3] - windows[:, 0:1]) - 0.5  # [W, S]
    ys = windows[:, 1:2] + cells[None] * (windows[:, 3:4] - windows[:, 1:2]) - 0.5
    return _bilinear(greyed, ys[:, :, None], xs[:, None, :], GREY)  # [W, S, S, 3]


def window_mask_targets(gt_masks, gt_boxes, instance, inner, size: int):
    """float32[W, size, size] {0, 1} mask targets (DataSampler.cropMask): object instance[W]'s
    mask over the central region inner float32[W, 4] at size x size, the crop's origin rounded
    at the target resolution (cropTensor's round), read from the box crops gt_masks
    uint8[N, Mc, Mc] of gt_boxes float32[N, 4] bilinearly at the cells' centres, > 0.5."""
    gt_masks, gt_boxes, instance, inner = (
        jnp.asarray(a) for a in (gt_masks, gt_boxes, instance, inner)
    )
    mc = gt_masks.shape[-1]
    side = inner[:, 2] - inner[:, 0]  # [W]
    per_pixel = size / jnp.maximum(side, 1e-6)  # target cells per canvas pixel
    origin_x = jnp.round(inner[:, 0] * per_pixel) / per_pixel
    origin_y = jnp.round(inner[:, 1] * per_pixel) / per_pixel
    cells = jnp.arange(size, dtype=jnp.float32) + 0.5
    xs = origin_x[:, None] + cells[None] / per_pixel[:, None]  # [W, S] canvas
    ys = origin_y[:, None] + cells[None] / per_pixel[:, None]
    box = gt_boxes[instance]  # [W, 4]
    u = (xs - box[:, 0:1]) / jnp.maximum(box[:, 2:3] - box[:, 0:1], 1e-6) * mc - 0.5
    v = (ys - box[:, 1:2]) / jnp.maximum(box[:, 3:4] - box[:, 1:2], 1e-6) * mc - 0.5
    crops = gt_masks[instance].astype(jnp.float32)[..., None]  # [W, Mc, Mc, 1]
    sampled = jax.vmap(lambda g, yy, xx: _bilinear(g, yy[:, None], xx[None, :], 0.0))(crops, v, u)[
        ..., 0
    ]
    return (sampled > 0.5).astype(jnp.float32)


# ----------------------------------------------------------------------------- the model


class Heads(nn.Module):
    """The layers after the trunk: 1x1 conv + ReLU, the fSz x fSz "fully connected" layer
    (a VALID convolution: one output on a training window, one per window position at test,
    modelUtils.linear2convTrunk), the mask and score branches."""

    cfg: DeepMaskConfig

    def setup(self):
        cfg = self.cfg
        f = cfg.feature_side
        self.reduce = Conv(cfg.trunk_channels, (1, 1), dtype=cfg.dtype, name="reduce")
        self.embed = Conv(cfg.embedding, (f, f), dtype=cfg.dtype, name="embed")
        self.mask = Dense(cfg.mask_size**2, dtype=cfg.dtype, name="mask")
        self.score_hidden = Dense(cfg.score_hidden, dtype=cfg.dtype, name="score_hidden")
        self.score = Dense(1, dtype=cfg.dtype, name="score")

    def embedding(self, features):
        """features [..., h, w, D] -> [..., h - fSz + 1, w - fSz + 1, embedding]."""
        return self.embed(nn.relu(self.reduce(features)))

    def mask_logits(self, embedding):
        """[..., E] -> float32[..., oSz, oSz]."""
        m = self.cfg.mask_size
        out = self.mask(embedding).astype(jnp.float32)
        return out.reshape(*out.shape[:-1], m, m)

    def score_logits(self, embedding, key=None):
        """[..., E] -> float32[...]; with a key, the reference's dropout before each layer."""
        rate = self.cfg.dropout

        def drop(x, k):
            if k is None or rate == 0:
                return x
            keep = jax.random.bernoulli(k, 1.0 - rate, x.shape)
            return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

        keys = (None, None) if key is None else tuple(jax.random.split(key))
        hidden = self.score_hidden(drop(embedding, keys[0]))
        hidden = jnp.where(hidden > 0, hidden, 1e-6).astype(hidden.dtype)  # Threshold(0, 1e-6)
        return self.score(drop(hidden, keys[1]))[..., 0].astype(jnp.float32)

    def __call__(self, features, key=None):
        e = self.embedding(features)
        return e, self.mask_logits(e), self.score_logits(e, key)


class DeepMask(nn.Module):
    cfg: DeepMaskConfig

    def setup(self):
        self.backbone = build_backbone(self.cfg)
        self.heads = Heads(self.cfg)

    def trunk(self, pixels):
        """float pixels [n, h, w, 3] (0-255) -> the trunk's feature map [n, h/S, w/S, D]."""
        return self.backbone(normalize(pixels, self.cfg.dtype))[self.cfg.trunk_level]

    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        if train:
            return self.train_outputs(batch, key)
        return {"detections": self.detect(batch)}

    def train_outputs(self, batch: dict, key) -> dict:
        cfg = self.cfg
        if key is None:
            raise ValueError("training needs a key for the windows' draws and the dropout")
        b = batch["image"].shape[0]
        sample_key, drop_key = jax.random.split(key)
        draws = jax.vmap(lambda k: window_draws(k, cfg))(jax.random.split(sample_key, b))
        windows = jax.lax.stop_gradient(
            jax.vmap(lambda d, g, v, hw: sample_windows(d, g, v, hw, cfg))(
                draws, batch["gt_boxes"], batch["gt_valid"], batch["image_hw"]
            )
        )
        # The crop reaches train_context feature cells beyond the window on every side.
        crop = cfg.window + 2 * cfg.train_context * cfg.stride
        centre = (windows["windows"][..., :2] + windows["windows"][..., 2:]) / 2
        half = (windows["windows"][..., 2:] - windows["windows"][..., :2]) * (crop / cfg.window / 2)
        crops = jnp.concatenate([centre - half, centre + half], axis=-1)
        pixels = jax.vmap(lambda im, hw, w: crop_windows(im, hw, w, crop))(
            batch["image"], batch["image_hw"], crops
        )  # [B, W, crop, crop, 3]
        targets = jax.lax.stop_gradient(
            jax.vmap(
                lambda m, g, i, inner: window_mask_targets(m, g, i, inner, cfg.mask_target_size)
            )(batch["gt_masks"], batch["gt_boxes"], windows["instance"], windows["inner"])
        )  # [B, W, gSz, gSz]
        w = cfg.windows_per_image
        features = self.trunk(pixels.reshape(b * w, crop, crop, 3))
        first, f = 1 + cfg.train_context, cfg.feature_side
        # [B W, fSz, fSz, D]: SpatialZeroPadding(-1), past the context
        features = features[:, first : first + f, first : first + f]
        _, mask_logits, score_logits = self.heads(features, drop_key)  # one position each
        mask_logits = mask_logits[:, 0, 0]  # [B W, oSz, oSz]
        score_logits = score_logits[:, 0, 0]
        g = cfg.mask_target_size
        upsampled = resize_bilinear(mask_logits[..., None], (g, g))[..., 0]  # [B W, gSz, gSz]
        return {
            "mask_logits": upsampled.reshape(b, w, g, g),
            "score_logits": score_logits.reshape(b, w),
            "targets": {**windows, "masks": targets},
        }

    # ------------------------------------------------------------------------- test

    def level_windows(self, level_hw, scaled_hw):
        """float32[P, Q, 4] canvas xyxy central regions of the window positions of one scale
        (InferDeepMask.getTopMasks): position (i, j) is centred at (S j, S i) of the scaled
        image, iSz wide there; scaled_hw / canvas_hw is the scale per axis."""
        cfg = self.cfg
        sy, sx = (scaled_hw[a] / cfg.canvas_hw[a] for a in range(2))
        p, q = level_hw
        cy = cfg.stride * np.arange(p, dtype=np.float64) / sy
        cx = cfg.stride * np.arange(q, dtype=np.float64) / sx
        hy, hx = cfg.window_inner / 2 / sy, cfg.window_inner / 2 / sx
        yy, xx = np.meshgrid(cy, cx, indexing="ij")
        return np.stack([xx - hx, yy - hy, xx + hx, yy + hy], axis=-1).astype(np.float32)

    def dense(self, batch: dict):
        """Every window of every scale: (embeddings [B, T, E], score logits float32[B, T],
        central regions float32[T, 4] canvas xyxy, valid bool[B, T] (centre in the image))."""
        cfg = self.cfg
        image = batch["image"].astype(jnp.float32)
        hgt, wid = cfg.canvas_hw
        rows = jnp.arange(hgt)[None, :, None, None]
        cols = jnp.arange(wid)[None, None, :, None]
        hw = batch["image_hw"]
        image = jnp.where(
            (rows < hw[:, 0, None, None, None]) & (cols < hw[:, 1, None, None, None]), image, GREY
        )
        pad = cfg.window_inner // 2
        embeddings, scores, regions, valid = [], [], [], []
        for log_scale in cfg.test_scales:
            scaled = tuple(max(1, round(v * 2.0**log_scale)) for v in cfg.canvas_hw)
            x = resize_bilinear(image, scaled)  # [B, hs, ws, 3]
            padded = [-(-(v + 2 * pad) // cfg.stride) * cfg.stride for v in scaled]
            x = jnp.pad(
                x,
                (
                    (0, 0),
                    (pad, padded[0] - scaled[0] - pad),
                    (pad, padded[1] - scaled[1] - pad),
                    (0, 0),
                ),
                constant_values=GREY,
            )
            e = self.heads.embedding(self.trunk(x))  # [B, P, Q, E]
            level_hw = e.shape[1:3]
            box = self.level_windows(level_hw, scaled)  # [P, Q, 4]
            centre_x = (box[..., 0] + box[..., 2]) / 2
            centre_y = (box[..., 1] + box[..., 3]) / 2
            inside = (jnp.asarray(centre_x)[None] < hw[:, 1, None, None]) & (
                jnp.asarray(centre_y)[None] < hw[:, 0, None, None]
            )
            b = e.shape[0]
            embeddings.append(e.reshape(b, -1, e.shape[-1]))
            scores.append(self.heads.score_logits(e).reshape(b, -1))
            regions.append(box.reshape(-1, 4))
            valid.append(inside.reshape(b, -1))
        return (
            jnp.concatenate(embeddings, axis=1),
            jnp.concatenate(scores, axis=1),
            jnp.asarray(np.concatenate(regions)),
            jnp.concatenate(valid, axis=1),
        )

    def detect(self, batch: dict) -> dict:
        cfg = self.cfg
        embeddings, scores, regions, valid = self.dense(batch)
        ranked = jnp.where(valid, scores, -jnp.inf)
        best, index = jax.vmap(lambda s: ops.top_k(s, cfg.candidates))(ranked)  # [B, C]
        chosen = jnp.take_along_axis(embeddings, index[..., None], axis=1)  # [B, C, E]
        logits = self.heads.mask_logits(chosen)  # [B, C, oSz, oSz]
        kept = jax.vmap(lambda lg, s, ok, r, hw: select_proposals(lg, s, ok, r, cfg, hw))(
            logits, best, jnp.isfinite(best), regions[index], batch["image_hw"]
        )
        boxes = ops.canvas_to_original_boxes(
            kept["boxes"],
            batch["image_hw"],
            batch["orig_hw"],
            batch["scale"],
            batch["crop_offset"],
            batch.get("flipped"),
        )
        masks = kept["masks"]
        if batch.get("flipped") is not None:
            masks = ops.mirror_box_masks(masks, batch["flipped"])
        k_valid = kept["valid"]
        return {
            "boxes": jnp.where(k_valid[..., None], boxes, 0.0),
            "scores": kept["scores"],
            "classes": jnp.zeros(k_valid.shape, jnp.int32),
            "valid": k_valid,
            "masks": masks,
        }


def window_masks_on_grid(logits, regions, image_hw, cfg: DeepMaskConfig):
    """bool[C, H / s, W / s] the thresholded window masks (logits float32[C, oSz, oSz] over
    regions float32[C, 4] canvas xyxy) on a grid of the canvas, one cell per s =
    nms_mask_stride pixels, read bilinearly at the cells' centres; cells outside the window or
    the image image_hw int32[2] are off."""
    s, m = cfg.nms_mask_stride, cfg.mask_size
    cut = ops.probability_logit(cfg.mask_threshold)
    gy = (jnp.arange(-(-cfg.canvas_hw[0] // s), dtype=jnp.float32) + 0.5) * s  # canvas
    gx = (jnp.arange(-(-cfg.canvas_hw[1] // s), dtype=jnp.float32) + 0.5) * s
    side_w = (regions[:, 2] - regions[:, 0]) / m
    side_h = (regions[:, 3] - regions[:, 1]) / m
    u = (gx[None] - regions[:, 0:1]) / side_w[:, None] - 0.5  # [C, Gw] window cells
    v = (gy[None] - regions[:, 1:2]) / side_h[:, None] - 0.5  # [C, Gh]
    outside = -1e4  # far below any threshold
    sampled = jax.vmap(lambda g, yy, xx: _bilinear(g, yy[:, None], xx[None, :], outside))(
        logits[..., None], v, u
    )[..., 0]  # [C, Gh, Gw]
    inside = (gy[:, None] < image_hw[0]) & (gx[None, :] < image_hw[1])
    return (sampled > cut) & inside[None]


def greedy_nms_by_overlap(overlap, ok, threshold: float, k: int):
    """int32[k] indices of the candidates greedy NMS keeps, in order, -1 after the last: the
    candidates are in descending score order, overlap float32[C, C] their pairwise IoU, ok
    bool[C]; a candidate is dropped when its overlap with a kept one is > threshold."""
    c = ok.shape[0]

    def visit(i, kept):
        suppressed = jnp.any(kept & (overlap[:, i] > threshold))
        return kept.at[i].set(ok[i] & ~suppressed)

    kept = jax.lax.fori_loop(0, c, visit, jnp.zeros((c,), bool))
    order = jnp.argsort(~kept, stable=True)[:k]  # the kept ones first, in score order
    return jnp.where(kept[order], order, -1).astype(jnp.int32)


def select_proposals(logits, score_logits, ok, regions, cfg: DeepMaskConfig, image_hw) -> dict:
    """One image's proposals from its best windows: logits float32[C, oSz, oSz], score_logits
    float32[C] (descending), ok bool[C], regions float32[C, 4] canvas xyxy central regions,
    image_hw int32[2] the image's valid part of the canvas. Returns boxes float32[K, 4] canvas
    (tight boxes of the masks at mask_threshold, cut to the image), scores float32[K]
    (sigmoid), valid bool[K], masks float32[K, oSz, oSz] probabilities relative to the boxes,
    shifted so that 0.5 is the mask threshold."""
    logits, score_logits, ok, regions, image_hw = (
        jnp.asarray(a) for a in (logits, score_logits, ok, regions, image_hw)
    )
    m = cfg.mask_size
    cut = ops.probability_logit(cfg.mask_threshold)
    cells = ops.masks_to_boxes(logits > cut)  # [C, 4] in mask cells
    cell_w = (regions[:, 2] - regions[:, 0]) / m
    cell_h = (regions[:, 3] - regions[:, 1]) / m
    # The mask's part inside the image (InferDeepMask.lua getTopMasks writes only the pixels
    # within the image): cut here, before the mask is resampled into its box, since a box cut
    # later (the detections' clip to the image) would squeeze the mask into the smaller box.
    hgt, wid = image_hw[0].astype(jnp.float32), image_hw[1].astype(jnp.float32)
    boxes = jnp.stack(
        [
            jnp.clip(regions[:, 0] + cells[:, 0] * cell_w, 0.0, wid),
            jnp.clip(regions[:, 1] + cells[:, 1] * cell_h, 0.0, hgt),
            jnp.clip(regions[:, 0] + cells[:, 2] * cell_w, 0.0, wid),
            jnp.clip(regions[:, 1] + cells[:, 3] * cell_h, 0.0, hgt),
        ],
        axis=1,
    )
    # The cut box in mask cells, the frame the logits are resampled into.
    cells = jnp.stack(
        [
            (boxes[:, 0] - regions[:, 0]) / cell_w,
            (boxes[:, 1] - regions[:, 1]) / cell_h,
            (boxes[:, 2] - regions[:, 0]) / cell_w,
            (boxes[:, 3] - regions[:, 1]) / cell_h,
        ],
        axis=1,
    )
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    ok = ok & nonempty
    k = cfg.detections_per_image
    if cfg.nms_threshold < 1.0 - 1e-6 and cfg.nms_mask_stride > 0:
        grid = window_masks_on_grid(logits, regions, image_hw, cfg)
        keep = greedy_nms_by_overlap(ops.mask_iou(grid, grid), ok, cfg.nms_threshold, k)
    elif cfg.nms_threshold < 1.0 - 1e-6:
        keep, _ = ops.nms(boxes, score_logits, cfg.nms_threshold, k, ok)
    else:  # no NMS: the best k windows with a mask, in score order
        _, keep = ops.top_k(jnp.where(ok, score_logits, -jnp.inf), k)
        keep = jnp.where(ok[keep], keep, -1)
    valid = keep >= 0
    index = jnp.maximum(keep, 0)
    # The window's logits resampled into the tight box: output cell i reads window cell
    # coordinate box_start + (i + 0.5) box_side / oSz - 0.5.
    c = cells[index]  # [K, 4]
    centres = (jnp.arange(m, dtype=jnp.float32) + 0.5) / m
    xs = c[:, 0:1] + centres[None] * (c[:, 2:3] - c[:, 0:1]) - 0.5  # [K, m]
    ys = c[:, 1:2] + centres[None] * (c[:, 3:4] - c[:, 1:2]) - 0.5
    xs, ys = jnp.clip(xs, 0, m - 1), jnp.clip(ys, 0, m - 1)
    resampled = jax.vmap(lambda g, yy, xx: _bilinear(g, yy[:, None], xx[None, :], 0.0))(
        logits[index][..., None], ys, xs
    )[..., 0]
    return {
        "boxes": jnp.where(valid[:, None], boxes[index], 0.0),
        "scores": jnp.where(valid, jax.nn.sigmoid(score_logits[index]), 0.0),
        "valid": valid,
        "masks": jnp.where(valid[:, None, None], jax.nn.sigmoid(resampled - cut), 0.0),
    }


def loss_fn(outputs: dict, batch: dict, cfg: DeepMaskConfig) -> tuple[jnp.ndarray, dict]:
    """Soft-margin losses (TrainerDeepMask.lua's criterion; log(1 + exp(-y f)) is the logistic
    loss of the {0, 1} target): the mask term the mean over positive windows (global batch) of
    each window's pixel mean, times `mask_loss_scale`; the score term the mean over windows."""
    del batch
    t = outputs["targets"]
    valid = t["valid"]  # [B, W]
    positive = valid & t["positive"]
    windows = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
    positives = jnp.maximum(positive.sum().astype(jnp.float32), 1.0)
    g = cfg.mask_target_size
    per_pixel = positive[..., None, None] / (positives * g * g)
    loss_mask = cfg.mask_loss_scale * ops.binary_cross_entropy_with_logits(
        outputs["mask_logits"], t["masks"], weights=jnp.broadcast_to(per_pixel, t["masks"].shape)
    )
    loss_score = ops.binary_cross_entropy_with_logits(
        outputs["score_logits"], positive.astype(jnp.float32), weights=valid, normalizer=windows
    )
    b = valid.shape[0]
    negative = valid & ~t["positive"]
    metrics = {
        "loss_mask": loss_mask,
        "loss_score": loss_score,
        "positive_windows": positive.sum().astype(jnp.float32) / b,
        "images_without_positives": (~t["valid"][:, 0]).sum().astype(jnp.float32) / b,
        "negatives_not_found": (negative & ~t["negative_found"]).sum().astype(jnp.float32) / b,
    }
    return loss_mask + loss_score, metrics


# ----------------------------------------------------------------------------- method interface

Config = DeepMaskConfig
Model = DeepMask


def base_config() -> ml_collections.ConfigDict:
    """facebookresearch/deepmask's train.lua settings: ResNet-50 (ImageNet, BatchNorm fixed)
    to res4, iSz 160, windows of 192, objects of 92, oSz 56, gSz 112, shift 16, scale 0.25;
    SGD momentum 0.9, weight decay 5e-4, lr 1e-3 then 5e-4 and 1e-4 (updateScheduler at epochs
    51 and 121 of 4000 batches of 32 windows; here 2.5e-4 last: one gamma); test at
    2^-2.5 .. 2^0.5, 1000 proposals, no NMS.
    COCO images at their own size: the long side at most 640 on a 640 canvas."""
    c = config_lib.base()
    c.method = "deepmask"
    c.model = config_lib.model_section(DeepMaskConfig)
    c.input.canvas_hw = (640, 640)
    c.input.short_side = (640,)
    c.input.max_long_side = 640
    c.input.test_short_side = 640
    c.input.test_max_long_side = 640
    c.input.mask_size = 112
    c.input.global_batch = 16
    c.optim.lr = 1e-3
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.schedule.warmup_steps = 0
    # A step trains both branches on 16 x 4 windows: two reference iterations (a mask batch
    # and a score batch of 32), so epochs of 2000 steps.
    c.schedule.total_steps = 600_000
    c.schedule.steps = (100_000, 240_000)
    # One gamma for both decays: 1e-3, 5e-4, then 2.5e-4 where the reference's last is 1e-4.
    c.schedule.gamma = 0.5
    c.eval.max_detections = 1000
    c.eval.class_agnostic = True  # proposals: every ground truth is an object to recall
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a DeepMask config to seconds on a CPU: synthetic scenes, ResNet-18 of width 16
    read at res3 (stride 8), windows of 32 + 16 px about objects of 19, two test scales."""
    c = config_lib.smoke_common(c)
    m = c.model
    smoke_backbone(m)
    m.stage_blocks = (2, 2, 0, 0)  # res4 and res5 unread: no blocks
    m.trunk_level = "res3"
    m.window_inner = 32
    m.object_size = 19
    m.trunk_channels = 16
    m.embedding = 64
    m.score_hidden = 64
    m.min_object_area = 0.0
    m.min_object_side = 2.0
    m.shift = 4.0  # the reference's 16 px of a 160 window, for a 32 px one
    m.negative_distance = 12.0
    m.windows_per_image = 8
    m.test_scales = (-1.0, 0.0)  # two trunk programs at test: the smoke step's compile
    m.candidates = 100
    m.detections_per_image = 50
    m.nms_threshold = 0.5
    m.scale_negative_fraction = 0.5
    m.train_context = 2
    c.input.mask_size = 56
    c.optim.weight_decay = 1e-4
    return c
