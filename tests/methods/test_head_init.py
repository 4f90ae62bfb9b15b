"""The heads' initial weights against the references' initialisation code: each method's COCO
recipe model initialises only its heads (flax `init` with a method that calls them on a tiny
input: no backbone, one small compilation), and every head tensor's statistics are compared
with the reference's rule: the standard deviation of a normal or uniform initialiser within 4%
or 4 of its standard errors (std / sqrt(2 n)) for the smaller tensors, the mean within 5
standard errors of 0, a uniform's bound, and constant biases exactly.

References, by method:
  Mask R-CNN  detectron2 modeling/proposal_generator/rpn.py StandardRPNHead._init_weights
              (normal 0.01, bias 0); roi_heads/box_head.py FastRCNNConvFCHead
              (weight_init.c2_xavier_fill: kaiming_uniform_(a=1), std 1/sqrt(fan_in), bias 0);
              roi_heads/fast_rcnn.py FastRCNNOutputLayers (cls_score normal 0.01, bbox_pred
              normal 0.001, biases 0); roi_heads/mask_head.py MaskRCNNConvUpsampleHead
              (c2_msra_fill on the convs and the deconv: kaiming_normal_ fan_out, relu, std
              sqrt(2 / fan_out); predictor normal 0.001; biases 0).
  FCOS        AdelaiDet adet/modeling/fcos/fcos.py FCOSHead.__init__ (towers and predictors
              normal 0.01, bias 0; cls_logits bias -log((1 - 0.01) / 0.01); Scale 1.0).
  CondInst    AdelaiDet adet/modeling/condinst/condinst.py (controller normal 0.01, bias 0);
              condinst/mask_branch.py (conv_with_kaiming_uniform blocks: kaiming_uniform_(a=1),
              std 1/sqrt(fan_in), no bias; the last 1x1 conv a plain nn.Conv2d: torch's default,
              std 1/sqrt(3 fan_in), bias U(+-1/sqrt(fan_in))).
  BlendMask   AdelaiDet adet/modeling/blendmask/blendmask.py (top_layer normal 0.01, bias 0);
              blendmask/basis_module.py (the bottom module as CondInst's mask branch; seg_head
              plain nn.Conv2d layers: torch's default).
  PolarMask   xieenze/PolarMask mmdet/models/anchor_heads/polarmask_head.py init_weights
              (cls, reg and mask tower convs normal 0.01, GroupNorm convs without bias;
              polar_cls normal 0.01 with bias bias_init_with_prob(0.01); polar_reg, polar_mask,
              polar_centerness normal 0.01, bias 0; scales_bbox and scales_mask Scale(1.0)).
  SOLOv2      WXinlong/SOLO mmdet/models/anchor_heads/solov2_head.py init_weights (tower convs
              and solo_kernel normal 0.01; solo_cate normal 0.01 with bias
              bias_init_with_prob(0.01)) and mask_heads/mask_feat_head.py (every conv normal
              0.01); the GroupNorm convs have no bias (ConvModule with a norm).
  YOLACT      mmdetection mmdet/models/dense_heads/yolact_head.py: YOLACTHead.init_weights
              (xavier_init uniform, bias 0, on head_convs, conv_cls, conv_reg, conv_coeff),
              YOLACTProtonet.init_weights (xavier uniform on every conv), YOLACTSegmHead
              (Xavier uniform on segm_conv): std sqrt(2 / (fan_in + fan_out)).
  PANet       ShuLiu1993/PANet lib/nn/init.py (XavierFill: uniform, fan_in = numel /
              weight.shape[0], std 1/sqrt(fan_in); MSRAFill: normal, fan_out = numel /
              weight.shape[1], std sqrt(2 / fan_out)); lib/modeling/FPN.py fpn._init_weights
              (XavierFill on the bottom-up path's convs, biases 0); fast_rcnn_heads.py
              roi_Xconv1fc_gn_head_panet and roi_2mlp_head_gn_panet (MSRAFill convs, XavierFill
              FCs with bias 0), fast_rcnn_outputs (cls_score normal 0.01, bbox_pred 0.001);
              mask_rcnn_heads.py mask_rcnn_fcn_head_v1upXconvs_gn_adp_ff._init_weights (under
              the recipe's MRCNN.CONV_INIT MSRAFill: MSRAFill convs and upconv, mask_fc normal
              0.01, biases 0) and mask_rcnn_outputs._init_weights (class-specific conv
              predictor: MSRAFill over NUM_CLASSES = 81 maps on COCO, tools/train_net_step.py);
              torch's GroupNorm: weight 1, bias 0.
  PointRend   detectron2 projects/PointRend/point_rend/mask_head.py ConvFCHead.__init__
              (c2_msra_fill on the 1x1 and 2x2 stride-2 convs, c2_xavier_fill on the FCs,
              prediction normal 0.001, bias 0); point_head.py StandardPointHead.__init__
              (c2_msra_fill on the kernel-1 Conv1d FCs, predictor normal 0.001, bias 0).
  Panoptic    detectron2 modeling/meta_arch/semantic_seg.py SemSegFPNHead.__init__
  FPN         (c2_msra_fill on every conv and on the 1x1 predictor, biases 0; GN convs have
              none).
  Keypoint    detectron2 modeling/roi_heads/keypoint_head.py
  R-CNN       KRCNNConvDeconvUpsampleHead.__init__ (kaiming_normal_ fan_out relu on the conv
              weights and on score_lowres, a ConvTranspose2d [in, out, 4, 4] whose torch fan_out
              is in x 16; biases 0).
  Mask2Former facebookresearch/Mask2Former mask2former/modeling/pixel_decoder/msdeformattn.py
              MSDeformAttnPixelDecoder.__init__ (input_proj: xavier_uniform_ gain 1, bias 0,
              then GroupNorm 32; mask_features, adapter_1 and layer_1: fvcore's c2_xavier_fill,
              kaiming_uniform_(a=1), std 1/sqrt(fan_in), bias 0, the GN convs without one) and
              MSDeformAttnTransformerEncoderOnly._reset_parameters (xavier_uniform_ on every
              p.dim() > 1, then each MSDeformAttn's own, then level_embed normal_(0, 1): the
              encoder layers' linear1 and linear2 biases keep nn.Linear's default
              U(+-1/sqrt(fan_in))); pixel_decoder/ops/modules/ms_deform_attn.py
              MSDeformAttn._reset_parameters (sampling_offsets weight 0 and bias the heads'
              direction grid x (point + 1); attention_weights weight and bias 0; value_proj and
              output_proj xavier_uniform_, bias 0); transformer_decoder/
              mask2former_transformer_decoder.py SelfAttentionLayer, CrossAttentionLayer and
              FFNLayer._reset_parameters (xavier_uniform_ on p.dim() > 1: nn.MultiheadAttention's
              packed in_proj_weight [3d, d], std sqrt(2 / 4d) for each of its q, k, v slices, and
              out_proj.weight [d, d]; in_proj_bias and out_proj.bias 0 from torch's
              nn.MultiheadAttention._reset_parameters; FFN biases nn.Linear's default),
              MultiScaleMaskedTransformerDecoder.__init__ (query_feat, query_embed, level_embed
              nn.Embedding: normal(0, 1); input_proj the identity as in_channels == hidden_dim;
              class_embed and the 3-layer mask_embed MLP plain nn.Linear: torch's default, std
              1/sqrt(3 fan_in), bias U(+-1/sqrt(fan_in))); LayerNorm and GroupNorm weight 1,
              bias 0.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import builders
from instseg_jax import config as config_lib

NUM_CLASSES = 80


def normal(std):
    return ("normal", std)


def uniform_with_std(std):
    return ("uniform", std)


def fan_in(shape):
    """torch's fan_in of a flax kernel [kh, kw, in, out] or [in, out]."""
    return math.prod(shape[:-2]) * shape[-2] if len(shape) > 2 else shape[0]


def fan_out(shape):
    return math.prod(shape[:-2]) * shape[-1] if len(shape) > 2 else shape[1]


def xavier(shape):
    return uniform_with_std(math.sqrt(2.0 / (fan_in(shape) + fan_out(shape))))


def msra_fan_out(shape):
    return normal(math.sqrt(2.0 / fan_out(shape)))


def c2_xavier(shape):
    return uniform_with_std(1.0 / math.sqrt(fan_in(shape)))


PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


def features(channels, levels, size=2):
    return {f"p{level}": jnp.zeros((1, size, size, channels)) for level in levels}


def touch_mask_rcnn(model, cfg):
    d = cfg.fpn_channels
    model.rpn_head(features(d, range(2, 7)))
    model.box_head(jnp.zeros((1, 1, 7, 7, d)))
    model.mask_head(jnp.zeros((1, 1, 14, 14, d)))


def touch_fcos(model, cfg):
    model.head(jnp.zeros((1, 2, 2, cfg.fpn_channels)), 0)


def pyramid(channels, levels):
    """Zero maps of levels P3.. at sizes halving from 4 x 4 (P3)."""
    return {
        f"p{level}": jnp.zeros((1, 2 ** (5 - level), 2 ** (5 - level), channels))
        for level in levels
    }


def touch_condinst(model, cfg):
    touch_fcos(model, cfg)
    model.controller(jnp.zeros((1, 2, 2, cfg.fpn_channels)))
    model.mask_branch(pyramid(cfg.fpn_channels, (3, 4, 5)))


def touch_blendmask(model, cfg):
    touch_fcos(model, cfg)
    model.top_layer(jnp.zeros((1, 2, 2, cfg.fpn_channels)))
    model.bottom(pyramid(cfg.fpn_channels, (3, 4, 5)))
    model.semantic_head(jnp.zeros((1, 2, 2, cfg.fpn_channels)))


def touch_solov2(model, cfg):
    grid = jnp.zeros((1, 4, 4, cfg.fpn_channels + 2))
    model.kernel_tower(grid)
    model.category_tower(grid[..., :-2])
    pyramid = {
        f"p{level}": jnp.zeros((1, 2 ** (6 - level), 2 ** (6 - level), cfg.fpn_channels))
        for level in range(2, 6)
    }
    # The mask branch's CoordConv spans each image's grid extent when it takes one.
    takes_extent = "extent_hw" in inspect.signature(type(model.mask_branch).__call__).parameters
    extent = (jnp.full((1, 2), 64.0),) if takes_extent else ()
    model.mask_branch(pyramid, *extent)


def touch_yolact(model, cfg):
    model.head(jnp.zeros((1, 2, 2, cfg.fpn_channels)))
    model.protonet(jnp.zeros((1, 2, 2, cfg.fpn_channels)))
    model.semantic(jnp.zeros((1, 2, 2, cfg.fpn_channels)))


def head_params(experiment, overrides, touch):
    """{path: array} of the parameters `touch` creates on the experiment's model."""
    config = config_lib.load(experiment, overrides)
    module = builders.method(config)
    cfg = builders.model_config(config, NUM_CLASSES)
    model = module.Model(cfg)
    # XLA's RngBitGenerator ("rbg") compiles in half threefry's time on CPU (FCOS's heads: 2.2
    # against 4.8 s); the statistics checked do not depend on the generator.
    params = jax.jit(lambda key: model.init(key, method=lambda m: touch(m, cfg))["params"])(
        jax.random.key(0, impl="rbg")
    )
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(k.key for k in path): np.asarray(v, np.float64) for path, v in flat}, cfg


def expected_mask_rcnn(path, shape, cfg, kernel_shape=None):
    if path.startswith("rpn_head/"):
        return normal(0.01) if path.endswith("kernel") else 0.0
    if path.endswith("bias"):
        return 0.0
    if path.startswith("box_head/fc"):
        return c2_xavier(shape)
    if path == "box_head/cls_score/kernel":
        return normal(0.01)
    if path in ("box_head/bbox_pred/kernel", "mask_head/predictor/kernel"):
        return normal(0.001)
    if path == "mask_head/deconv/kernel":
        # torch's ConvTranspose2d weight is [in, out, kh, kw]: its fan_out is in x kh x kw.
        return normal(math.sqrt(2.0 / (shape[0] * shape[1] * shape[2])))
    if path.startswith("mask_head/conv"):
        return msra_fan_out(shape)
    raise KeyError(path)


def torch_default(shape):
    """torch.nn.Conv2d's own init: kaiming_uniform_(a=sqrt(5)), std 1 / sqrt(3 fan_in)."""
    return uniform_with_std(1.0 / math.sqrt(3 * fan_in(shape)))


def expected_fcos(path, shape, cfg, kernel_shape=None):
    if path == "head/scales":
        return 1.0
    if "_norm" in path or "/norm" in path:
        return 1.0 if path.endswith("scale") else 0.0
    # CondInst's mask branch and BlendMask's bottom module (AdelaiDet mask_branch.py,
    # basis_module.py): conv_with_kaiming_uniform blocks, then a plain nn.Conv2d; BlendMask's
    # semantic head (basis_module.py seg_head): plain nn.Conv2d layers.
    if path.startswith(("mask_branch/", "bottom/", "semantic_head/")):
        plain = path.startswith("semantic_head/") or path.split("/")[1] == "out"
        if path.endswith("bias"):  # only the plain 1x1 convs have one: U(+-1 / sqrt(fan_in))
            return ("uniform_bias", 1.0 / math.sqrt(fan_in(kernel_shape)))
        return torch_default(shape) if plain else c2_xavier(shape)
    if path == "head/cls_logits/bias":
        return PRIOR_BIAS
    if path.startswith(("head/", "controller/", "top_layer/")):
        return normal(0.01) if path.endswith("kernel") else 0.0
    raise KeyError(path)


def expected_polarmask(path, shape, cfg, kernel_shape=None):
    """FCOS's rules on the three towers and four predictors (the box branch's ray tower and
    predictor included); the rays' level scales start at 1.0 as the boxes' (Scale(1.0))."""
    if path == "head/ray_scales":
        return 1.0
    return expected_fcos(path, shape, cfg, kernel_shape)


def expected_solov2(path, shape, cfg, kernel_shape=None):
    if "norm" in path:
        return 1.0 if path.endswith("scale") else 0.0
    if path == "category_tower/predict/bias":
        return PRIOR_BIAS
    if path.endswith("bias"):
        return 0.0
    return normal(0.01)


def expected_yolact(path, shape, cfg, kernel_shape=None):
    if path.endswith("bias"):
        return 0.0
    return xavier(shape)


def halving(channels, levels, finest):
    """Zero maps of the levels, P{levels[0]} finest x finest and each next one half as wide."""
    return {
        f"p{level}": jnp.zeros((1, finest >> i, finest >> i, channels))
        for i, level in enumerate(levels)
    }


def touch_panet(model, cfg):
    d = cfg.fpn_channels
    model.bottom_up(halving(d, range(2, 6), 8))
    # [B, R, L, S, S, D]: the four levels' RoI features of adaptive pooling, at a 4 x 4 pooled
    # size (the rules do not depend on it; the FCs' fan-in does and is read from the shape).
    model.box_head(jnp.zeros((1, 1, 4, 4, 4, d)))
    model.mask_head(jnp.zeros((1, 1, 4, 4, 4, d)))


def xavier_fill(shape):
    """PANet lib/nn/init.py XavierFill: fan_in = numel / weight.shape[0] (torch's weight
    [out, in, kh, kw] or [out, in]: in x kh x kw), uniform, std 1 / sqrt(fan_in)."""
    return uniform_with_std(1.0 / math.sqrt(fan_in(shape)))


def msra_fill_transposed(shape):
    """MSRAFill's fan_out = numel / weight.shape[1] on a ConvTranspose2d weight [in, out, kh,
    kw]: in x kh x kw, here the flax kernel's [kh, kw, in] axes."""
    return normal(math.sqrt(2.0 / (shape[0] * shape[1] * shape[2])))


def expected_panet(path, shape, cfg, kernel_shape=None):
    if "norm" in path:
        return 1.0 if path.endswith("scale") else 0.0
    if path.endswith("bias"):
        return 0.0
    if path.startswith("bottom_up/"):
        return xavier_fill(shape)
    if path == "box_head/cls_score/kernel":
        return normal(0.01)
    if path == "box_head/bbox_pred/kernel":
        return normal(0.001)
    if path.startswith("box_head/fc"):
        return xavier_fill(shape)
    if path == "mask_head/deconv/kernel":
        return msra_fill_transposed(shape)
    if path == "mask_head/predictor/kernel":
        if cfg.mask_predictor_init == "normal":
            return normal(0.001)
        # A 1x1 Conv2d [NUM_CLASSES, D, 1, 1] with background counted: fan_out 1 + C.
        return normal(math.sqrt(2.0 / (1 + cfg.num_classes)))
    if path == "mask_head/fc_branch_fc/kernel":
        return normal(0.01)
    if path.startswith(("box_head/conv", "mask_head/conv", "mask_head/fc_branch_conv")):
        return msra_fan_out(shape)  # torch's Conv2d [out, in, kh, kw]: out x kh x kw
    raise KeyError(path)


def touch_pointrend(model, cfg):
    d = cfg.fpn_channels
    model.coarse_head(jnp.zeros((1, 1, 4, 4, d)))
    model.point_head(None, (jnp.zeros((1, 4, d)), jnp.zeros((1, 4, cfg.num_classes))))


def expected_pointrend(path, shape, cfg, kernel_shape=None):
    if path.endswith("bias"):
        return 0.0
    if path in ("coarse_head/prediction/kernel", "point_head/predictor/kernel"):
        return normal(0.001)
    if path.startswith("coarse_head/fc"):
        return c2_xavier(shape)
    if path == "coarse_head/reduce_spatial/kernel":
        # A 2x2 stride-2 Conv2d, fan_out out x 4, here a matmul kernel [4 x in, out].
        return normal(math.sqrt(2.0 / (4 * shape[1])))
    if path == "coarse_head/reduce_channels/kernel" or path.startswith("point_head/fc"):
        return msra_fan_out(shape)  # kernel-1 convs (Conv2d, Conv1d) as [in, out]: fan_out out
    raise KeyError(path)


def touch_panoptic_fpn(model, cfg):
    model.semantic_head(halving(cfg.fpn_channels, range(2, 6), 8))


def expected_panoptic_fpn(path, shape, cfg, kernel_shape=None):
    if "norm" in path:
        return 1.0 if path.endswith("scale") else 0.0
    if path.endswith("bias"):
        return 0.0
    if path.startswith("semantic_head/"):
        return msra_fan_out(shape)  # the 3x3 convs and the 1x1 predictor ([in, out]) alike
    raise KeyError(path)


def touch_keypoint_rcnn(model, cfg):
    model.keypoint_head(jnp.zeros((1, 1, 4, 4, cfg.fpn_channels)))


def expected_keypoint_rcnn(path, shape, cfg, kernel_shape=None):
    if path.endswith("bias"):
        return 0.0
    if path == "keypoint_head/score_lowres/kernel":
        return msra_fill_transposed(shape)  # [4, 4, in, out]: torch's fan_out in x 16
    if path.startswith("keypoint_head/conv"):
        return msra_fan_out(shape)
    raise KeyError(path)


def touch_mask2former(model, cfg):
    """The pixel decoder on zero ResNet-50-wide res2-res5 maps (16 x 16 down to 2 x 2), then the
    masked transformer decoder on its outputs."""
    features = {
        f"res{level}": jnp.zeros((1, 2 ** (6 - level), 2 ** (6 - level), 64 * 2**level))
        for level in range(2, 6)
    }
    mask_features, multi_scale = model.pixel_decoder(features)
    model.transformer_decoder(multi_scale, mask_features)


def offset_grid(heads, levels, points):
    """MSDeformAttn._reset_parameters' sampling_offsets bias, computed as torch does (float32):
    head h's direction (cos, sin)(2 pi h / heads) over its larger |component|, x (point + 1),
    laid out [heads, levels, points, 2]."""
    thetas = np.arange(heads, dtype=np.float32) * np.float32(2.0 * math.pi / heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, levels, points, 1))
    grid = grid * (np.arange(points, dtype=np.float32) + 1)[None, None, :, None]
    return grid.reshape(-1).astype(np.float64)


def expected_mask2former(path, shape, cfg, kernel_shape=None):
    parts = path.split("/")
    layer, name = parts[-2], parts[-1]
    if any(p.endswith("norm") or p == "gn" for p in parts):  # LayerNorm and GroupNorm
        return 1.0 if name == "scale" else 0.0
    if name == "embedding":  # both level_embeds, query_feat, query_embed
        return normal(1.0)
    if layer == "sampling_offsets":
        if name == "kernel":
            return 0.0
        return offset_grid(cfg.encoder_heads, 3, cfg.encoder_points)
    if layer == "attention_weights":
        return 0.0
    if layer.startswith("input_proj") or layer in ("value_proj", "output_proj", "out_proj"):
        return xavier(shape) if name == "kernel" else 0.0
    if layer in ("q_proj", "k_proj", "v_proj"):
        # Slices of nn.MultiheadAttention's in_proj_weight [3d, d]: xavier over d + 3d.
        return uniform_with_std(math.sqrt(2.0 / (4 * shape[0]))) if name == "kernel" else 0.0
    if layer in ("linear1", "linear2"):  # xavier on the weight; the bias nn.Linear's default
        if name == "kernel":
            return xavier(shape)
        return ("uniform_bias", 1.0 / math.sqrt(fan_in(kernel_shape)))
    if layer in ("adapter1", "layer1", "mask_features"):
        return c2_xavier(shape) if name == "kernel" else 0.0
    if layer == "class_embed" or layer.startswith("mask_embed"):  # plain nn.Linear
        if name == "kernel":
            return torch_default(shape)
        return ("uniform_bias", 1.0 / math.sqrt(fan_in(kernel_shape)))
    raise KeyError(path)


# The COCO recipes, the widest layers narrowed where drawing their millions of weights would
# cost seconds (the rules do not depend on the width).
CASES = {
    "maskrcnn": (
        "experiments/maskrcnn_r50_fpn_coco_1x.py",
        ["model.box_fc_dim=256"],
        touch_mask_rcnn,
        expected_mask_rcnn,
    ),
    "fcos": ("experiments/fcos_r50_fpn_coco_1x.py", [], touch_fcos, expected_fcos),
    "condinst": ("experiments/condinst_r50_fpn_coco_1x.py", [], touch_condinst, expected_fcos),
    "blendmask": ("experiments/blendmask_r50_fpn_coco_1x.py", [], touch_blendmask, expected_fcos),
    "solov2": (
        "experiments/solov2_r50_fpn_coco_1x.py",
        ["model.head_channels=128"],
        touch_solov2,
        expected_solov2,
    ),
    "yolact": ("experiments/yolact_r50_coco.py", [], touch_yolact, expected_yolact),
    "polarmask": (
        "experiments/polarmask_r50_fpn_coco_1x.py",
        [],
        touch_fcos,
        expected_polarmask,
    ),
    # Two convs per stack (each stack's layers share one rule) keep PANet's compile short.
    "panet": (
        "experiments/panet_r50_fpn_coco_2x.py",
        [
            "model.fpn_channels=64",
            "model.box_conv_dim=64",
            "model.box_fc_dim=256",
            "model.box_num_convs=2",
            "model.mask_head_convs=2",
        ],
        touch_panet,
        expected_panet,
    ),
    # A coarse conv_dim under the features' width brings in the 1x1 channel reduction.
    "pointrend": (
        "experiments/pointrend_r50_fpn_coco_1x.py",
        ["model.coarse_conv_dim=128", "model.coarse_fc_dim=128"],
        touch_pointrend,
        expected_pointrend,
    ),
    "panoptic_fpn": (
        "experiments/panoptic_fpn_r50_coco_1x.py",
        ["model.fpn_channels=64"],
        touch_panoptic_fpn,
        expected_panoptic_fpn,
    ),
    "keypoint_rcnn": (
        "experiments/keypoint_rcnn_r50_fpn_coco_1x.py",
        ["model.keypoint_head_dim=128"],
        touch_keypoint_rcnn,
        expected_keypoint_rcnn,
    ),
    # One encoder and one decoder layer (every layer has the same rules) and a narrower decoder
    # FFN; conv_dim and hidden_dim stay 256 so that each [3, 256] level_embed has the 500
    # entries a statistic needs.
    "mask2former": (
        "experiments/mask2former_r50_coco_50ep.py",
        ["model.encoder_layers=1", "model.decoder_layers=1", "model.decoder_feedforward=512"],
        touch_mask2former,
        expected_mask2former,
    ),
}


def check(path, value, expected):
    if isinstance(expected, float):
        constant = np.float64(np.float32(expected))  # the parameters are float32
        np.testing.assert_array_equal(value, np.full_like(value, constant), err_msg=path)
        return
    if isinstance(expected, np.ndarray):  # a fixed tensor (MSDeformAttn's sampling-offset grid)
        # torch builds the grid in float32 (-3.9999986 where float64 gives -4): 1e-5 holds both.
        np.testing.assert_allclose(value, expected.reshape(value.shape), atol=1e-5, err_msg=path)
        return
    kind, std = expected
    n = value.size
    if kind == "uniform_bias":  # a few entries: inside the bound, and spread over it
        bound = std
        assert np.abs(value).max() <= bound * (1 + 1e-6), path
        assert np.abs(value).max() >= 0.3 * bound, path
        return
    assert n >= 500, f"{path}: {n} entries are too few for a statistic"
    # The sample standard deviation's own standard error is about std / sqrt(2 n).
    assert value.std() == pytest.approx(std, rel=max(0.04, 4 / math.sqrt(2 * n))), path
    assert abs(value.mean()) < 5 * std / math.sqrt(n), path
    if kind == "uniform":  # bound sqrt(3) std, reached within a few hundredths
        assert np.abs(value).max() <= math.sqrt(3) * std * (1 + 1e-6), path
        assert np.abs(value).max() >= 0.95 * math.sqrt(3) * std, path
    else:  # an untruncated normal: 1.2% beyond 2.5 std (jax's truncated normal stops at 2.27)
        assert np.mean(np.abs(value) > 2.5 * std) > 0.004, path


# FCOS's in the fast tier (its head is also CondInst's and BlendMask's) and PANet's (the rules
# its module sets itself: XavierFill bottom-up path, MSRAFill mask predictor); the others,
# YOLACT's config-chosen predictors included, in the slow one; each compiles one init of a few
# seconds.
FAST = ("fcos", "panet")


@pytest.mark.parametrize(
    "method", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in sorted(CASES)]
)
def test_head_initialisation_follows_the_reference(method):
    experiment, overrides, touch, expected = CASES[method]
    params, cfg = head_params(experiment, overrides, touch)
    assert params, method
    if method == "yolact":
        assert cfg.predictor_init == "xavier"  # the COCO recipe's: mmdetection's rule
    if method == "panet":
        assert cfg.mask_predictor_init == "msra_fill"  # the authors' MRCNN.CONV_INIT
    if method == "mask2former":
        assert (cfg.pixel_decoder, cfg.transformer_decoder) == ("msdeform", "masked")
    for path, value in params.items():
        kernel = params.get(path.rsplit("/", 1)[0] + "/kernel")
        check(path, value, expected(path, value.shape, cfg, getattr(kernel, "shape", None)))


@pytest.mark.slow
def test_yolact_nuclei_predictors_are_normal_and_the_rest_xavier():
    """The nuclei experiment's predictor_init "normal" (std 0.01, its backbone is trained from
    scratch) leaves the head convs, the protonet and the semantic conv Xavier."""

    def expected(path, shape, cfg, kernel_shape=None):
        if path.endswith("bias"):
            return 0.0
        if path.split("/")[:2] in (
            ["head", "classes"],
            ["head", "boxes"],
            ["head", "coefficients"],
        ):
            return normal(0.01)
        return xavier(shape)

    params, cfg = head_params("experiments/yolact_nuclei.py", [], touch_yolact)
    assert cfg.predictor_init == "normal"
    for path, value in params.items():
        kernel = params.get(path.rsplit("/", 1)[0] + "/kernel")
        check(path, value, expected(path, value.shape, cfg, getattr(kernel, "shape", None)))


@pytest.mark.slow
def test_panet_nuclei_heads_2fc_and_a_normal_mask_predictor():
    """The nuclei experiment's "2fc" box head (fast_rcnn_heads.py roi_2mlp_head_gn_panet:
    XavierFill FCs, GroupNorm) and its mask predictor at detectron2's normal 0.001 (the authors'
    MSRAFill would be std 1.0 over its 2 maps); the rest as the COCO recipe's."""
    params, cfg = head_params("experiments/panet_nuclei.py", ["model.fpn_channels=64"], touch_panet)
    assert cfg.box_head == "2fc" and cfg.mask_predictor_init == "normal"
    assert "box_head/fc1_level3/kernel" in params and "box_head/fc2/kernel" in params
    for path, value in params.items():
        kernel = params.get(path.rsplit("/", 1)[0] + "/kernel")
        check(path, value, expected_panet(path, value.shape, cfg, getattr(kernel, "shape", None)))
