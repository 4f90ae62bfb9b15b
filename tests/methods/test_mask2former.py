"""Mask2Former: the matching cost, the per-layer matching (against scipy), the losses, masked
attention and the test-time selection against float64 NumPy; optimizer groups; smoke step;
over-fitting and the COCO step (slow)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from instseg_jax import config as config_lib
from instseg_jax import train as train_lib
from instseg_jax.methods import mask2former as m2f
from instseg_jax.nn.transformer import Attention, attend_everywhere_if_empty
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step
from tests.ops.test_sampling import grid_sample_point

SMOKE = "experiments/mask2former_nuclei.py:smoke"
CFG = m2f.Mask2FormerConfig(num_classes=4, canvas_hw=(64, 64), train_points=64, match_points=64)


def softplus(x):
    return np.logaddexp(0.0, x)


def numpy_cost(class_logits, point_logits, point_labels, gt_classes, cfg):
    logits = class_logits.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    q, g = len(point_logits), len(point_labels)
    cost = np.zeros((q, g))
    for i in range(q):
        x = point_logits[i].astype(np.float64)
        p = 1 / (1 + np.exp(-x))
        for j in range(g):
            t = point_labels[j].astype(np.float64)
            bce = np.mean(t * softplus(-x) + (1 - t) * softplus(x))
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            cost[i, j] = (
                -cfg.class_weight * probs[i, gt_classes[j]]
                + cfg.mask_weight * bce
                + cfg.dice_weight * dice
            )
    return cost


def test_match_cost_matches_numpy():
    rng = np.random.default_rng(0)
    class_logits = rng.normal(size=(7, 5)).astype(np.float32)
    point_logits = rng.normal(0, 3, (7, 40)).astype(np.float32)
    point_labels = (rng.uniform(size=(3, 40)) < 0.4).astype(np.float32)
    gt_classes = np.array([0, 3, 3])
    got = m2f.match_cost(class_logits, point_logits, point_labels, gt_classes, CFG)
    want = numpy_cost(class_logits, point_logits, point_labels, gt_classes, CFG)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("match_points", [64, 0])
def test_every_layer_is_matched_to_scipy_optimum_and_padding_never(match_points):
    """Each prediction layer's matching against scipy on a cost NumPy rebuilds from the same
    matching points (grid_sample's rule; 0: every cell); distinct classes identify the ground
    truth a query was matched to; padded slots sit between valid ones."""
    cfg = dataclasses.replace(CFG, match_points=match_points)
    rng = np.random.default_rng(1)
    layers, b, q, g = 3, 2, 6, 4
    class_logits = rng.normal(size=(layers, b, q, CFG.num_classes + 1)).astype(np.float32)
    mask_logits = rng.normal(0, 2, (layers, b, q, 8, 8)).astype(np.float32)
    gt_valid = np.array([[True, True, True, False], [True, False, True, False]])
    gt_classes = np.array([[2, 0, 3, 1], [1, 2, 0, 3]], np.int32)
    gt_masks = (rng.uniform(size=(b, g, 8, 8)) < 0.4) & gt_valid[..., None, None]
    batch = {"gt_valid": gt_valid, "gt_classes": gt_classes, "gt_full_masks": gt_masks}
    key = jax.random.key(0)
    targets = jax.jit(lambda c, m: m2f.set_targets(c, m, batch, cfg, key))(
        class_logits, mask_logits
    )
    # The matching points: the first half of the key's split, uniform over the canvas.
    match_key, _ = jax.random.split(key)
    if match_points:
        points = np.asarray(jax.random.uniform(match_key, (layers, b, match_points, 2)))
    else:  # the cell centres
        centres = (np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1).reshape(-1, 2) + 0.5) / 8
        points = np.broadcast_to(centres, (layers, b, 64, 2))
    query_classes = np.asarray(targets["query_classes"])
    for layer in range(layers):
        for i in range(b):
            valid = np.flatnonzero(gt_valid[i])
            sample = lambda image, pts=points[layer, i]: np.array(
                [grid_sample_point(image.astype(np.float64), *p) for p in pts]
            )
            logits = np.stack([sample(m) for m in mask_logits[layer, i]])
            labels = np.stack([sample(gt_masks[i, j].astype(np.float64)) for j in valid])
            cost = numpy_cost(class_logits[layer, i], logits, labels, gt_classes[i, valid], cfg)
            rows, cols = linear_sum_assignment(cost)
            want = np.full(q, CFG.num_classes)
            want[rows] = gt_classes[i, valid][cols]
            assert query_classes[layer, i].tolist() == want.tolist(), (layer, i)
    pair_valid = np.asarray(targets["pair_valid"])
    assert pair_valid.sum((1, 2)).tolist() == [5] * layers  # 3 + 2 valid, none padded
    assert np.asarray(targets["point_labels"]).shape[-1] == CFG.train_points


def test_losses_match_numpy():
    rng = np.random.default_rng(2)
    layers, b, q, k, n = 2, 2, 5, 3, 16
    c = CFG.num_classes
    class_logits = rng.normal(size=(layers, b, q, c + 1)).astype(np.float32)
    query_classes = rng.integers(0, c + 1, (layers, b, q)).astype(np.int32)
    pair_valid = rng.uniform(size=(layers, b, k)) < 0.7
    point_logits = rng.normal(0, 2, (layers, b, k, n)).astype(np.float32)
    point_labels = (rng.uniform(size=(layers, b, k, n)) < 0.5).astype(np.float32)
    gt_valid = np.array([[True, True, False], [True, False, False]])
    outputs = {
        "class_logits": class_logits,
        "targets": {
            "query_classes": query_classes,
            "pair_valid": pair_valid,
            "pairs_over_budget": np.zeros(layers, np.int32),
            "point_logits": point_logits,
            "point_labels": point_labels,
        },
    }
    total, metrics = m2f.loss_fn(outputs, {"gt_valid": gt_valid}, CFG)
    want = 0.0
    num_masks = gt_valid.sum()
    for layer in range(layers):
        ce_sum = weight_sum = 0.0
        for i in range(b):
            for j in range(q):
                x = class_logits[layer, i, j].astype(np.float64)
                log_p = x - np.log(np.exp(x - x.max()).sum()) - x.max()
                label = query_classes[layer, i, j]
                w = CFG.no_object_weight if label == c else 1.0
                ce_sum += -w * log_p[label]
                weight_sum += w
        bce = dice = 0.0
        for i in range(b):
            for j in range(k):
                if not pair_valid[layer, i, j]:
                    continue
                x = point_logits[layer, i, j].astype(np.float64)
                t = point_labels[layer, i, j]
                p = 1 / (1 + np.exp(-x))
                bce += np.mean(t * softplus(-x) + (1 - t) * softplus(x))
                dice += 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
        want += (
            CFG.class_weight * ce_sum / weight_sum
            + CFG.mask_weight * bce / num_masks
            + CFG.dice_weight * dice / num_masks
        )
    assert float(total) == pytest.approx(want, rel=1e-5)
    parts = ("loss_ce", "loss_mask", "loss_dice", "loss_deep_supervision")
    assert float(total) == pytest.approx(sum(float(metrics[p]) for p in parts), rel=1e-5)


def test_masked_attention_and_a_query_whose_mask_is_empty():
    rng = np.random.default_rng(3)
    dim, heads, q, k = 8, 2, 3, 5
    query = rng.normal(size=(1, q, dim)).astype(np.float32)
    query_pos = rng.normal(size=(1, q, dim)).astype(np.float32)
    keys = rng.normal(size=(1, k, dim)).astype(np.float32)
    key_pos = rng.normal(size=(1, k, dim)).astype(np.float32)
    blocked = np.array([[[True, False, True, False, True], [True] * 5, [False] * 5]])
    layer = Attention(dim, heads)
    variables = layer.init(jax.random.key(0), query, query_pos, keys, key_pos, blocked)
    cleared = attend_everywhere_if_empty(jnp.asarray(blocked))
    got = np.asarray(layer.apply(variables, query, query_pos, keys, key_pos, cleared))

    p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables["params"])

    def linear(name, x):
        return x @ p[name]["kernel"] + p[name]["bias"]

    qh = linear("q_proj", query[0] + query_pos[0]).reshape(q, heads, -1)
    kh = linear("k_proj", keys[0] + key_pos[0]).reshape(k, heads, -1)
    vh = linear("v_proj", keys[0]).reshape(k, heads, -1)
    out = np.zeros((q, heads, dim // heads))
    for i in range(q):
        allowed = ~blocked[0, i] if (~blocked[0, i]).any() else np.ones(k, bool)
        for h in range(heads):
            logits = kh[allowed, h] @ qh[i, h] / np.sqrt(dim // heads)
            w = np.exp(logits - logits.max())
            out[i, h] = (w / w.sum()) @ vh[allowed, h]
    y = query[0] + linear("out_proj", out.reshape(q, dim))
    mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    want = (y - mean) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
    np.testing.assert_allclose(got[0], want, atol=1e-5)


def test_detections_are_the_best_query_class_pairs_scored_by_their_masks():
    rng = np.random.default_rng(4)
    cfg = m2f.Mask2FormerConfig(num_classes=3, canvas_hw=(64, 64), detections_per_image=5)
    class_logits = rng.normal(size=(1, 4, 4)).astype(np.float32)
    mask_logits = rng.normal(0, 2, (1, 4, 6, 6)).astype(np.float32)
    mask_logits[0, 2] = -5.0  # an empty mask
    det = jax.jit(lambda c, m: m2f.detect(c, m, cfg))(class_logits, mask_logits)
    x = class_logits[0].astype(np.float64)
    probs = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    flat = probs[:, :3].ravel()
    order = np.argsort(-flat, kind="stable")[:5]
    for slot, index in enumerate(order):
        query, cls = divmod(int(index), 3)
        m = mask_logits[0, query].astype(np.float64)
        inside = m > 0
        assert int(det["classes"][0, slot]) == cls
        assert bool(det["valid"][0, slot]) == bool(inside.any())
        if inside.any():
            score = flat[index] * (1 / (1 + np.exp(-m)))[inside].mean()
            assert float(det["scores"][0, slot]) == pytest.approx(score, rel=1e-5)
        else:
            assert float(det["scores"][0, slot]) == 0.0


def test_optimizer_backbone_multiplier_clips_over_all_groups_and_spares_embeddings():
    config = config_lib.load(SMOKE)
    with config.unlocked():
        config.optim.name = "sgd"
        config.optim.momentum = 0.0
        config.optim.weight_decay = 0.0
        config.optim.backbone_lr_multiplier = 0.1
        config.optim.clip_norm = 1.0
        config.schedule.warmup_steps = 0
        config.model.freeze_at = 0
    params = {
        "backbone": {"res3_0": {"kernel": jnp.ones(4)}},
        "head": {"kernel": jnp.ones(4), "query_feat": {"embedding": jnp.ones(4)}},
    }
    grads = {
        "backbone": {"res3_0": {"kernel": jnp.full(4, 3.0)}},
        "head": {"kernel": jnp.full(4, 4.0), "query_feat": {"embedding": jnp.zeros(4)}},
    }
    tx = train_lib.optimizer(config, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Global norm over both groups: sqrt(4 x 9 + 4 x 16) = 10, clipped to 1.
    lr = config.optim.lr
    np.testing.assert_allclose(updates["head"]["kernel"], -lr * 4.0 / 10.0, rtol=1e-6)
    np.testing.assert_allclose(
        updates["backbone"]["res3_0"]["kernel"], -0.1 * lr * 3.0 / 10.0, rtol=1e-6
    )
    with config.unlocked():
        config.optim.weight_decay = 0.5
        config.optim.clip_norm = 0.0
    tx = train_lib.optimizer(config, params)
    zero = jax.tree.map(jnp.zeros_like, grads)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(updates["head"]["query_feat"]["embedding"]).sum()) == 0
    assert float(jnp.abs(updates["head"]["kernel"]).sum()) > 0


def test_smoke_step():
    step = smoke_step(m2f, SMOKE)
    assert np.isfinite(step.total)
    assert_total_is_the_sum(step, ("loss_ce", "loss_mask", "loss_dice", "loss_deep_supervision"))
    assert float(step.metrics["matched_per_image"]) > 0
    for name in ("backbone", "pixel_decoder", "transformer_decoder"):
        assert magnitude(step.grads[name]) > 0, name
    k = step.cfg.detections_per_image
    det = step.detections
    assert det["canvas_masks"].shape == (2, k, 32, 32) and "boxes" not in det
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)


@pytest.mark.slow
def test_maskformer_variant_smoke_step():
    step = smoke_step(
        m2f,
        SMOKE,
        ["--config.model.pixel_decoder=fpn", "--config.model.transformer_decoder=detr"],
    )
    assert np.isfinite(step.total)
    assert magnitude(step.grads["transformer_decoder"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipes' compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import CANVAS_4X, overfit_report

    report = overfit_report(
        SMOKE.split(":")[0],
        tmp_path / "overfit",
        steps=300,
        overrides=[
            f"--config.model.compute_dtype={dtype}",
            *CANVAS_4X,
            "--config.optim.lr=0.001",
            "--config.optim.clip_norm=0.0",
        ],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("mask2former")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
