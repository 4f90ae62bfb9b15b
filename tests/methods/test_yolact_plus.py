"""YOLACT++: the deformable blocks, anchors, mask IoU targets, head and loss against float64
NumPy encodings of dbolya/yolact's rules (backbone.py ResNetBackbone._make_layer, yolact.py
make_priors and FastMaskIoUNet, layers/modules/multibox_loss.py lincomb_mask_loss / _mask_iou
/ mask_iou_loss), the deformable ResNet started from torchvision weights, the smoke step, and
(slow) over-fitting 4 scenes and the COCO experiment's step. YOLACT's own pieces are tested in
test_yolact.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.backbones.resnet import ResNet, deformable_blocks
from instseg_jax.methods import yolact_plus
from instseg_jax.weights.resnet import load_backbone
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step
from tests.weights.test_resnet_backbone import FIXTURE, model_section, write_state_dict

SMOKE = "experiments/yolact_plus_nuclei.py:smoke"


def reference_dcn_placement(layers, dcn_layers, dcn_interval):
    """backbone.py _make_layer, per stage: the first block's use_dcn = dcn_layers >= blocks,
    then for i in 1..blocks-1: use_dcn = (i + dcn_layers) >= blocks and i % dcn_interval == 0."""
    out = []
    for blocks, d in zip(layers, dcn_layers, strict=True):
        stage = [d >= blocks]
        for i in range(1, blocks):
            stage.append((i + d) >= blocks and i % dcn_interval == 0)
        out.append(tuple(stage))
    return tuple(out)


def test_deformable_blocks_follow_the_reference_backbones():
    # resnet50_dcnv2_backbone: every block of res3..res5.
    r50 = deformable_blocks((3, 4, 6, 3), (0, 4, 6, 3), 1)
    assert r50 == ((False,) * 3, (True,) * 4, (True,) * 6, (True,) * 3)
    # resnet101_dcn_inter3_backbone: blocks 0 and 3 of res3, every third of res4, res5's first.
    r101 = deformable_blocks((3, 4, 23, 3), (0, 4, 23, 3), 3)
    assert [tuple(np.flatnonzero(s)) for s in r101] == [
        (),
        (0, 3),
        tuple(range(0, 23, 3)),
        (0,),
    ]
    for layers, dcn, interval in [
        ((3, 4, 23, 3), (0, 4, 23, 3), 3),
        ((2, 2, 2, 2), (0, 1, 2, 1), 2),
    ]:
        assert deformable_blocks(layers, dcn, interval) == reference_dcn_placement(
            layers, dcn, interval
        )
    assert deformable_blocks((3, 4, 6, 3)) == tuple((False,) * n for n in (3, 4, 6, 3))


def reference_priors(conv_h, conv_w, scales, aspect_ratios, max_size=550.0):
    """yolact.py make_priors with use_pixel_scales, preapply_sqrt False, use_square_anchors
    False: per location (row-major) per scale per ratio (w / h), [x, y, w, h] relative to the
    image, here in pixels of the 550 x 550 image as xyxy."""
    out = []
    for j in range(conv_h):
        for i in range(conv_w):
            x, y = (i + 0.5) / conv_w, (j + 0.5) / conv_h
            for scale in scales:
                for ar in aspect_ratios:
                    ar = math.sqrt(ar)
                    w, h = scale * ar / max_size, scale / ar / max_size
                    out.append([x - w / 2, y - h / 2, x + w / 2, y + h / 2])
    return np.asarray(out).reshape(conv_h, conv_w, -1, 4) * max_size


def test_anchors_are_the_references_priors():
    """yolact_plus_base_config's pred_scales [[i * 2 ** (j / 3.0) for j in range(3)] for i in
    24..384] and pred_aspect_ratios [1, 1/2, 2] on the 550 x 550 image (conv sizes 69, 35, 18,
    9, 5), where our levels of the 640 canvas overlap it."""
    cfg = yolact_plus.YOLACTPlusConfig(
        num_classes=80, canvas_hw=(640, 640), anchor_extent_hw=(550, 550)
    )
    assert cfg.anchors_per_cell() == 9
    for level, (anchors, size, conv) in enumerate(
        zip(cfg.anchors(), (24, 48, 96, 192, 384), (69, 35, 18, 9, 5), strict=True)
    ):
        grid = 640 // 8 // 2**level
        ours = np.asarray(anchors).reshape(grid, grid, 9, 4)[:conv, :conv]
        scales = [size * 2 ** (j / 3.0) for j in range(3)]
        want = reference_priors(conv, conv, scales, [1, 1 / 2, 2])
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-3)


def test_mask_iou_training_inputs_targets_and_area_rule():
    """Hand-made 8 x 8 slots (stride 4, 32 px canvas): the cropped sigmoid, the IoU of the
    prediction > 0.5 with the ground truth (multibox_loss.py _mask_iou) and discard_mask_area."""
    logits = np.full((1, 3, 8, 8), -5.0, np.float32)
    logits[0, 0, 2:6, 2:6] = 5.0  # 16 cells
    logits[0, 0, 0, 7] = 5.0  # outside box 0's crop (cells 1..6): cropped away
    logits[0, 1, 1:3, 1:3] = 5.0
    logits[0, 2, :, :] = 0.0  # sigmoid 0.5 everywhere: not above 0.5, an empty prediction
    gt = np.zeros((1, 3, 8, 8), np.uint8)
    gt[0, 0, 2:6, 3:7] = 1  # 16 cells, 12 shared with prediction 0
    gt[0, 1, 1:3, 1:4] = 1  # 6 cells
    gt[0, 2, 0:5, 0:5] = 1  # 25 cells
    boxes = np.array([[[8, 8, 20, 20], [0, 0, 32, 32], [0, 0, 32, 32]]], np.float32)
    valid = np.array([[True, True, True]])
    pred, iou, trained = yolact_plus.mask_iou_training(
        jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(gt), jnp.asarray(valid), 6.0
    )
    pred = np.asarray(pred)
    assert pred[0, 0, 0, 7] == 0.0 and pred[0, 0, 3, 3] == pytest.approx(1 / (1 + np.exp(-5)))
    np.testing.assert_allclose(np.asarray(iou), [[12 / 20, 4 / 6, 0.0]], rtol=1e-6)
    assert np.asarray(trained).tolist() == [[True, False, True]]  # areas above 6: 16 and 25
    for discard, valid, want in [
        (5.0, [True, True, False], [True, True, False]),
        (16.0, [True] * 3, [False, False, True]),
    ]:
        _, _, trained = yolact_plus.mask_iou_training(
            jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(gt), jnp.asarray([valid]), discard
        )
        assert np.asarray(trained).tolist() == [want], discard


def test_fast_mask_iou_net_is_the_references_conv_stack():
    """yolact.py FastMaskIoUNet: make_net(1, maskiou_net + [(C, 1, {})], include_last_relu):
    3x3 convolutions of stride 2 without padding, a 1x1 to C, ReLU after each, then max_pool2d
    over the whole map; written as float64 loops on 15 x 15 masks (15 -> 7 -> 3)."""
    rng = np.random.default_rng(0)
    net = yolact_plus.FastMaskIoUNet(num_classes=3, channels=(4, 5))
    masks = rng.uniform(0, 1, (2, 15, 15)).astype(np.float32)
    params = net.init(jax.random.key(0), masks)["params"]
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.1, p.shape).astype(np.float32), params)
    got = np.asarray(net.apply({"params": params}, masks))

    x = masks[..., None].astype(np.float64)
    for name in ("conv0", "conv1", "predict"):
        kernel = np.asarray(params[name]["kernel"], np.float64)
        bias = np.asarray(params[name]["bias"], np.float64)
        k, stride = kernel.shape[0], (2 if name != "predict" else 1)
        side = (x.shape[1] - k) // stride + 1
        y = np.zeros((x.shape[0], side, side, kernel.shape[-1]))
        for i in range(side):
            for j in range(side):
                window = x[:, i * stride : i * stride + k, j * stride : j * stride + k]
                y[:, i, j] = np.einsum("nhwc,hwco->no", window, kernel) + bias
        x = np.maximum(y, 0.0)
    np.testing.assert_allclose(got, x.max(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_mask_iou_loss_is_the_references_sum_over_positives():
    rng = np.random.default_rng(1)
    pred = rng.uniform(0, 2, (2, 5)).astype(np.float32)
    target = rng.uniform(0, 1, (2, 5)).astype(np.float32)
    trained = rng.uniform(size=(2, 5)) > 0.4
    positives = np.array([7, 0], np.int32)
    got = yolact_plus.mask_iou_loss(pred, target, trained, positives, 25.0)
    diff = np.abs(pred.astype(np.float64) - target)
    smooth = np.where(diff < 1.0, 0.5 * diff**2, diff - 0.5)  # F.smooth_l1_loss, beta 1
    assert float(got) == pytest.approx(25.0 * smooth[trained].sum() / 7, rel=1e-5)


def test_deformable_resnet_from_torchvision_weights_starts_as_the_plain_one():
    """weights/resnet.py with model.dcn_layers: the tiny torchvision bottleneck ResNet's tree
    gains zero offset layers and biases (the model's own parameter tree), and with the
    modulation's logits pushed to +30 (sigmoid 1) the deformable ResNet reproduces
    torchvision's stage outputs (tests/fixtures/resnet_tiny.npz): zero offsets read the plain
    3x3 windows, strided ones included."""
    import pathlib
    import tempfile

    dcn = (0, 1, 1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_state_dict(pathlib.Path(tmp), "bottleneck")
        params, frozen, _ = load_backbone(path, model_section("bottleneck", dcn_layers=dcn))
    model = ResNet(50, 4, "frozen_bn", 0, stage_blocks=(1, 1, 1, 1), dcn_layers=dcn)
    with np.load(FIXTURE) as arrays:
        image = jnp.asarray(arrays["input"].transpose(0, 2, 3, 1))
        expected = {i: arrays[f"bottleneck/out/layer{i}"].transpose(0, 2, 3, 1) for i in (1, 4)}
    shapes = jax.eval_shape(model.init, jax.random.key(0), image)["params"]
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, params)
    offset = params["res4_0"]["conv2"]["conv"]["offset"]
    assert not np.any(offset["kernel"]) and offset["bias"].shape == (27,)
    for stage in ("res3_0", "res4_0", "res5_0"):
        bias = np.array(params[stage]["conv2"]["conv"]["offset"]["bias"])
        bias[18:] = 30.0
        params[stage]["conv2"]["conv"]["offset"]["bias"] = bias
    outputs = jax.jit(model.apply)({"params": params, "frozen": frozen}, image)
    for i in (1, 4):
        np.testing.assert_allclose(
            np.asarray(outputs[f"res{i + 1}"]), expected[i], rtol=1e-4, atol=1e-4
        )


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(yolact_plus, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert np.isfinite(step.total)
    terms = ("loss_cls", "loss_box_reg", "loss_mask", "loss_semantic", "loss_mask_iou")
    assert_total_is_the_sum(step, terms)
    assert float(metrics["mask_iou_trained"]) > 0 and float(metrics["loss_mask_iou"]) > 0
    for name in ("fpn", "head", "protonet", "semantic", "maskiou"):
        assert magnitude(grads[name]) > 0, name
    for name, group in grads["backbone"].items():
        assert (magnitude(group) > 0) == (name != "stem"), name
    for block in ("res4_1", "res5_1"):  # smoke: the last block of res4 and res5 deformable
        assert magnitude(grads["backbone"][block]["conv1"]["conv"]["offset"]) > 0, block

    k, (h, w) = cfg.detections_per_image, (v // 4 for v in cfg.canvas_hw)
    assert det["canvas_masks"].shape == (2, k, h, w) and det["boxes"].shape == (2, k, 4)
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)
    # Rescored: score x predicted IoU (ReLU outputs), 0 in the empty slots.
    scores = np.asarray(det["scores"])
    assert (scores >= 0).all() and not scores[~np.asarray(det["valid"])].any()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipe's compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import overfit_report
    from tests.methods.test_yolact import overfit_overrides

    report = overfit_report(
        "experiments/yolact_plus_nuclei.py",
        tmp_path / "overfit",
        steps=300,
        overrides=[f"--config.model.compute_dtype={dtype}", *overfit_overrides()],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("yolact_plus")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
