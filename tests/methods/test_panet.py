"""PANet: adaptive feature pooling and the per-level fused box head against a float64 NumPy loop
over levels, the bottom-up path against NumPy convolutions, the mask head's FC fusion as one
class-agnostic non-negative map, the smoke step; and (slow) over-fitting 4 scenes and the COCO
experiment's step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.methods import panet
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step
from tests.ops import reference

SMOKE = "experiments/panet_nuclei.py:smoke"


def pyramid(rng, canvas=64, depth=4, batch=2):
    return {
        f"p{level}": rng.normal(size=(batch, canvas >> level, canvas >> level, depth)).astype(
            np.float32
        )
        for level in (2, 3, 4, 5)
    }


def boxes_in(rng, canvas=64, batch=2, num=5):
    xy = rng.uniform(0, canvas * 0.7, (batch, num, 2))
    wh = rng.uniform(3, canvas * 0.5, (batch, num, 2))
    return np.concatenate([xy, np.minimum(xy + wh, canvas)], -1).astype(np.float32)


def test_adaptive_pooling_and_the_fused_first_layer_match_a_loop_over_levels():
    rng = np.random.default_rng(0)
    features, boxes = pyramid(rng), boxes_in(rng)
    pooled = np.asarray(panet.adaptive_pool(features, jnp.asarray(boxes), 7, 2, True))
    assert pooled.shape == (2, 5, 4, 7, 7, 4)
    for i, level in enumerate((2, 3, 4, 5)):
        want = reference.roi_align(features[f"p{level}"], boxes, 7, 2.0**-level, 2, True)
        assert np.allclose(pooled[:, :, i], want, atol=1e-5), level

    head = panet.FusedBoxHead(num_classes=3, kind="2fc", fc_dim=16, norm="none")
    params = head.init(jax.random.key(0), jnp.asarray(pooled))["params"]
    logits, deltas = head.apply({"params": params}, jnp.asarray(pooled))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    rows = pooled.astype(np.float64).reshape(2 * 5, 4, -1)
    per_level = [
        np.maximum(rows[:, i] @ p[f"fc1_level{i}"]["kernel"] + p[f"fc1_level{i}"]["bias"], 0)
        for i in range(4)
    ]
    fused = np.max(per_level, axis=0)
    hidden = np.maximum(fused @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
    want_logits = hidden @ p["cls_score"]["kernel"] + p["cls_score"]["bias"]
    want_deltas = hidden @ p["bbox_pred"]["kernel"] + p["bbox_pred"]["bias"]
    assert np.allclose(np.asarray(logits).reshape(10, -1), want_logits, atol=1e-4)
    assert np.allclose(np.asarray(deltas).reshape(10, -1), want_deltas, atol=1e-4)
    # Every level reaches the output: the fusion is not one level's pass-through.
    winners = np.argmax(per_level, axis=0)
    assert len(np.unique(winners)) == 4


def conv3x3(x, kernel, bias, stride):
    """float64 NHWC convolution, padding 1."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    oh, ow = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
    out = np.zeros((b, oh, ow, kernel.shape[-1]))
    for i in range(oh):
        for j in range(ow):
            patch = padded[:, i * stride : i * stride + 3, j * stride : j * stride + 3]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel) + bias
    return out


def test_bottom_up_path_matches_numpy_convolutions():
    rng = np.random.default_rng(1)
    features = pyramid(rng, canvas=64, depth=3)
    features["p6"] = features["p5"][:, ::2, ::2]
    path = panet.BottomUpPath(channels=3, norm="none")
    params = path.init(jax.random.key(0), features)["params"]
    got = path.apply({"params": params}, features)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    relu = lambda x: np.maximum(x, 0)
    level = features["p2"].astype(np.float64)
    assert np.array_equal(np.asarray(got["p2"]), features["p2"])  # N2 = P2
    for n in (3, 4, 5):
        down = relu(
            conv3x3(level, p[f"down{n}"]["conv"]["kernel"], p[f"down{n}"]["conv"]["bias"], 2)
        )
        summed = down + features[f"p{n}"]
        level = relu(
            conv3x3(summed, p[f"out{n}"]["conv"]["kernel"], p[f"out{n}"]["conv"]["bias"], 1)
        )
        assert np.allclose(np.asarray(got[f"p{n}"]), level, atol=1e-4), n
    assert np.array_equal(np.asarray(got["p6"]), np.asarray(got["p5"])[:, ::2, ::2])


def test_fc_fusion_adds_one_non_negative_class_agnostic_map():
    rng = np.random.default_rng(2)
    pooled = jnp.asarray(rng.normal(size=(1, 3, 4, 14, 14, 8)).astype(np.float32))
    fused = panet.FusedMaskHead(num_classes=3, channels=8, num_convs=2, fc_fusion=True)
    params = fused.init(jax.random.key(0), pooled)["params"]
    with_branch = np.asarray(fused.apply({"params": params}, pooled))
    plain = panet.FusedMaskHead(num_classes=3, channels=8, num_convs=2, fc_fusion=False)
    without = {k: v for k, v in params.items() if not k.startswith("fc_branch")}
    added = with_branch - np.asarray(plain.apply({"params": without}, pooled))
    assert with_branch.shape == (1, 3, 28, 28, 3)
    assert np.allclose(added, added[..., :1], atol=1e-6) and (added >= -1e-6).all()
    assert added.max() > 0


def test_one_step_trains_every_part():
    step = smoke_step(panet, SMOKE)
    terms = ["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"]
    assert all(np.isfinite(float(step.metrics[k])) for k in terms)
    assert_total_is_the_sum(step, terms)
    for part in ("bottom_up", "box_head", "mask_head", "fpn", "backbone"):
        assert magnitude(step.grads[part]) > 0, part
    # Each level's first layer of both heads is trained (adaptive pooling reaches them all).
    for level in range(4):
        assert magnitude(step.grads["box_head"][f"fc1_level{level}"]) > 0
        assert magnitude(step.grads["mask_head"][f"conv1_level{level}"]) > 0
    assert step.detections["masks"].shape[-2:] == (28, 28)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipes' compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import overfit_report

    report = overfit_report(
        SMOKE.split(":")[0],
        tmp_path / "overfit",
        steps=300,
        overrides=[
            f"--config.model.compute_dtype={dtype}",
            "--config.optim.name=adamw",
            "--config.optim.lr=0.002",
        ],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("panet")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
