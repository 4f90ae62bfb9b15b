"""InstanceFCN (Dai et al., ECCV 2016, arXiv 1603.08678): the assembling module (section 3), the
positive and negative windows (section 4, DeepMask's definition) and their mask targets against
float64 NumPy loops of the paper's rules (tests/methods/instancefcn_reference.py), the loss of
eq. (1) with the declared normalisers, a planted window through inference, the smoke step, and
(slow) over-fitting 4 scenes and the COCO-scale step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import detections as host_detections
from instseg_jax.methods import instancefcn
from tests.methods import instancefcn_reference as reference
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step

SMOKE = "experiments/instancefcn_nuclei.py:smoke"


def config(**fields):
    base = dict(num_classes=2, canvas_hw=(128, 128), levels=(2, 3), window_cells=(7, 9))
    base.update(fields)
    return instancefcn.InstanceFCNConfig(**base)


def test_score_threshold_outside_0_1_names_the_field():
    from instseg_jax.config import ConfigValueError

    with pytest.raises(ConfigValueError, match=r"model\.score_threshold must be a probability"):
        config(score_threshold=1.5)


def layout_of(cfg):
    return instancefcn.window_layout(cfg.canvas_hw, cfg.levels, cfg.window_cells)


def test_a_21_cell_window_splits_into_the_papers_5_x_5_sub_windows():
    """Section 3: m = 21, k = 5: sub-window i spans [21 i / 5, 21 (i + 1) / 5), rows 0-4, 5-8,
    9-12, 13-16, 17-20."""
    channels = instancefcn.relative_position_channels(21, 5)
    rows = channels[:, 0] // 5
    np.testing.assert_array_equal(rows, [0] * 5 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4)
    np.testing.assert_array_equal(channels[0], rows)  # first row: columns give j
    assert channels[20, 20] == 24 and channels[10, 0] == 10


def test_assembling_matches_the_papers_loop():
    """assemble_windows against reference.assemble on random maps of two levels, windows at
    random centres including the borders (cells beyond the map are 0), for the paper's m = 21
    (smaller sides: the target and inference tests below)."""
    m = 21
    rng = np.random.default_rng(m)
    k = 5
    level_hw = ((12, 10), (6, 5))
    maps = [rng.normal(size=(h, w, k * k)) for h, w in level_hw]
    table = np.concatenate([x.reshape(-1, k * k) for x in maps])
    offsets = np.asarray([0, 12 * 10], np.int32)
    level = rng.integers(0, 2, 40)
    row = np.asarray([rng.integers(-2, level_hw[lv][0] + 2) for lv in level])
    col = np.asarray([rng.integers(-2, level_hw[lv][1] + 2) for lv in level])
    row = np.clip(row, 0, [level_hw[lv][0] - 1 for lv in level])
    col = np.clip(col, 0, [level_hw[lv][1] - 1 for lv in level])
    got, inside = jax.jit(
        lambda t, r, c, lv: instancefcn.assemble_windows(t, r, c, lv, m, k, level_hw, offsets)
    )(
        jnp.asarray(table, jnp.float32),
        jnp.asarray(row, jnp.int32),
        jnp.asarray(col, jnp.int32),
        jnp.asarray(level, jnp.int32),
    )
    for w in range(len(level)):
        want = reference.assemble(maps[level[w]], int(row[w]), int(col[w]), m, k)
        np.testing.assert_allclose(np.asarray(got[w]), want, rtol=1e-6, atol=1e-6)
        assert np.asarray(inside[w]).sum() == np.count_nonzero(
            reference.assemble(np.ones_like(maps[level[w]]), int(row[w]), int(col[w]), m, k)
        )


def labels_of(cfg, boxes, valid=None):
    valid = np.ones(len(boxes), bool) if valid is None else np.asarray(valid)
    layout = layout_of(cfg)
    labels, matched = jax.jit(lambda b, v: instancefcn.window_labels(b, v, layout, cfg))(
        jnp.asarray(boxes, jnp.float32), jnp.asarray(valid)
    )
    return np.asarray(labels), np.asarray(matched)


def test_the_positive_windows_of_a_hand_made_object():
    """The paper's window (m = 21 at stride 8, 168 px) and DeepMask's canonical object: a
    96 x 60 box centred at (101, 101) has the canonical larger side 168 x 128 / 224 = 96; the
    window centres within +-12 px (16 / 224 x 168) on both axes are those of cells 11-13 (at
    92, 100, 108): 9 positives. Centres within 24 px (32 / 224 x 168) on both axes, cells 10-15
    (84 to 124; 76 is 25 px away), are neither; every other window is a negative."""
    cfg = config(canvas_hw=(256, 256), levels=(3,), window_cells=(21,))
    labels, matched = labels_of(cfg, [[53, 71, 149, 131], [0, 0, 0, 0]], [True, False])
    grid = labels.reshape(32, 32)
    want = np.zeros((32, 32), int)
    want[10:16, 10:16] = -1
    want[11:14, 11:14] = 1
    np.testing.assert_array_equal(grid, want)
    assert (matched == 0).all()


def test_scale_rules_of_the_hand_made_object():
    """The same centre: a larger side of 114 px (under 2^(1/4) x 96 = 114.2) is still
    positive, 120 px is neither (off scale by less than a factor 2), 200 px (over a factor 2)
    makes every window a negative; a padding slot changes nothing."""
    cfg = config(canvas_hw=(256, 256), levels=(3,), window_cells=(21,))
    centre = 101
    for side, positives, nears in ((114.0, 9, 36), (120.0, 0, 36), (200.0, 0, 0)):
        half = side / 2
        box = [centre - half, centre - 10, centre + half, centre + 10]
        labels, _ = labels_of(cfg, [box, [10, 10, 200, 200]], [True, False])
        assert (labels == 1).sum() == positives, side
        assert (labels != 0).sum() == nears, side


def random_scene(rng, n, canvas=128, mask_stride=4):
    """n boxes of 10-60 px with masks (filled ellipses at the stride-4 cells inside each box)."""
    side = canvas // mask_stride
    boxes, masks = [], np.zeros((n, side, side), np.uint8)
    centres = (np.arange(side) + 0.5) * mask_stride
    for i in range(n):
        w, h = rng.uniform(10, 60, 2)
        x0, y0 = rng.uniform(0, canvas - w), rng.uniform(0, canvas - h)
        boxes.append([x0, y0, x0 + w, y0 + h])
        ey = ((centres[:, None] - (y0 + h / 2)) / (h / 2)) ** 2
        ex = ((centres[None, :] - (x0 + w / 2)) / (w / 2)) ** 2
        masks[i] = (ey + ex) <= 1.0
    return np.asarray(boxes, np.float32), masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_labels_match_the_reference_on_random_scenes(seed):
    """Every window of two levels and two sides against reference.window_label."""
    rng = np.random.default_rng(seed)
    cfg = config()
    boxes, _ = random_scene(rng, 6)
    valid = np.asarray([True] * 5 + [False])
    labels, matched = labels_of(cfg, boxes, valid)
    layout = layout_of(cfg)
    for t in range(labels.shape[0]):
        centre = (float(layout["centre_x"][t]), float(layout["centre_y"][t]))
        want, want_match = reference.window_label(centre, float(layout["extent"][t]), boxes, valid)
        assert labels[t] == want, t
        if want == 1:
            assert matched[t] == want_match, t


def test_sampled_windows_and_mask_targets_match_the_reference():
    """training_targets on a random scene: every sampled window is a reference positive or
    negative (positives first, as many as the budget allows), the class target is the matched
    instance's class, and each positive's mask target is the reference's pooled ground truth
    on the window's cells that lie on the map (the loss weights), for both window sides."""
    rng = np.random.default_rng(3)
    cfg = config(windows_per_image=128, positive_fraction=0.5)
    boxes, masks = random_scene(rng, 5)
    classes = np.asarray([0, 1, 1, 0, 1], np.int32)
    layout = layout_of(cfg)
    out = jax.jit(
        lambda b, c, v, fm, hw, key: instancefcn.training_targets(b, c, v, fm, hw, layout, cfg, key)
    )(
        jnp.asarray(boxes),
        jnp.asarray(classes),
        jnp.ones(5, bool),
        jnp.asarray(masks),
        jnp.asarray([128, 128], jnp.int32),
        jax.random.key(0),
    )
    ref = [
        reference.window_label(
            (float(layout["centre_x"][t]), float(layout["centre_y"][t])),
            float(layout["extent"][t]),
            boxes,
            np.ones(5, bool),
        )
        for t in range(len(layout["row"]))
    ]
    ref_positives = sum(label == 1 for label, _ in ref)
    assert ref_positives > 0
    window = np.asarray(out["window"])
    sampled, positive = np.asarray(out["sampled"]), np.asarray(out["positive"])
    assert positive.sum() == min(ref_positives, 64)
    assert sampled.sum() == 128
    for slot in np.flatnonzero(sampled):
        t = int(window[slot])
        label, match = ref[t]
        assert label == (1 if positive[slot] else 0), slot
        want_class = np.eye(2)[classes[match]] if label == 1 else np.zeros(2)
        np.testing.assert_array_equal(np.asarray(out["class_targets"][slot]), want_class)
        for si, m in enumerate(cfg.window_cells):
            weights = np.asarray(out[f"mask_weights_{m}"][slot])
            if label != 1 or layout["side"][t] != si:
                assert weights.sum() == 0
                continue
            row, col = int(layout["row"][t]), int(layout["col"][t])
            stride = int(layout["stride"][t])
            want = reference.window_mask_target(masks[match], 4, row, col, m, stride)
            on_map = reference.window_mask_target(
                np.ones_like(masks[match]), 4, row, col, m, stride
            )
            np.testing.assert_array_equal(weights, on_map)
            np.testing.assert_array_equal(np.asarray(out[f"mask_targets_{m}"][slot]), want)


def test_loss_is_equation_1_with_the_declared_normalisers():
    """Eq. (1): logistic objectness over the sampled windows (mean over the batch's sampled
    windows, summed over classes) + per-cell logistic mask loss of the positives (mean over a
    window's cells on the map, then over the batch's positives), in float64 NumPy."""
    rng = np.random.default_rng(4)
    cfg = config(window_cells=(5, 7))
    b, w = 2, 6
    sampled = np.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    positive = np.asarray([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
    side = rng.integers(0, 2, (b, w))
    targets = {
        "sampled": sampled,
        "positive": positive,
        "class_targets": (rng.random((b, w, 2)) > 0.5) * positive[..., None],
        "positives": np.asarray([7, 3]),
        "negatives": np.asarray([70, 30]),
    }
    outputs = {"objectness_logits": rng.normal(size=(b, w, 2)), "targets": targets}
    for si, m in enumerate(cfg.window_cells):
        weights = (rng.random((b, w, m, m)) > 0.2) * (positive & (side == si))[..., None, None]
        targets[f"mask_weights_{m}"] = weights.astype(np.float64)
        targets[f"mask_targets_{m}"] = (rng.random((b, w, m, m)) > 0.5) * weights
        outputs[f"mask_logits_{m}"] = rng.normal(size=(b, w, m, m))

    def bce(x, t):
        return -(t * np.log(1 / (1 + np.exp(-x))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-x))))

    objectness = bce(outputs["objectness_logits"], targets["class_targets"]).sum(-1)
    want_objectness = objectness[sampled].sum() / sampled.sum()
    total_mask = 0.0
    for i, j in zip(*np.nonzero(positive), strict=True):
        m = cfg.window_cells[side[i, j]]
        cells = targets[f"mask_weights_{m}"][i, j] > 0
        total_mask += bce(
            outputs[f"mask_logits_{m}"][i, j][cells], targets[f"mask_targets_{m}"][i, j][cells]
        ).mean()
    want_mask = total_mask / positive.sum()
    as_jax = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), outputs)
    loss, metrics = jax.jit(lambda o: instancefcn.loss_fn(o, {}, cfg))(as_jax)
    assert float(metrics["loss_objectness"]) == pytest.approx(want_objectness, rel=1e-5)
    assert float(metrics["loss_mask"]) == pytest.approx(want_mask, rel=1e-5)
    assert float(loss) == pytest.approx(want_objectness + want_mask, rel=1e-5)


def detect_on_a_128_canvas(maps, objectness, cfg):
    """instancefcn.detect of hand-made P3 score maps float32[16, 16, k²] and objectness
    float32[1, 256, C] for one 128 x 128 image at scale 1 on its canvas."""
    batch = {
        "image_hw": jnp.asarray([[128, 128]], jnp.int32),
        "orig_hw": jnp.asarray([[128, 128]], jnp.int32),
        "scale": jnp.ones((1,), jnp.float32),
        "crop_offset": jnp.zeros((1, 2), jnp.int32),
    }
    table = jnp.asarray(maps.reshape(1, -1, maps.shape[-1]))
    return jax.jit(lambda t, o, bt: instancefcn.detect(t, o, bt, cfg))(
        table, jnp.asarray(objectness), batch
    )


def test_a_planted_window_comes_out_as_its_mask_and_box():
    """Inference on hand-made maps: one 9-cell window of P3 (centre cell (8, 8), canvas pixels
    32-104) scores high, and the score maps make its assembled mask the cells 2-6 of the window
    (canvas pixels 48-88). Slot 0 is that window, its box the window [32, 32, 104, 104] in
    original pixels (scale 1), and its box-relative mask pasted back is that square (less
    its corners)."""
    cfg = config(num_classes=1, levels=(3,), window_cells=(9,), detections_per_image=4)
    k = cfg.grid_k
    maps = np.full((16, 16, k * k), -10.0, np.float32)
    channels = instancefcn.relative_position_channels(9, k)
    for a in range(2, 7):
        for b in range(2, 7):
            maps[4 + a, 4 + b, channels[a, b]] = 10.0
    objectness = np.full((1, 256, 1), -10.0, np.float32)
    objectness[0, 8 * 16 + 8, 0] = 10.0
    det = detect_on_a_128_canvas(maps, objectness, cfg)
    assert bool(det["valid"][0, 0]) and float(det["scores"][0, 0]) > 0.99
    np.testing.assert_allclose(np.asarray(det["boxes"][0, 0]), [32, 32, 104, 104])
    region, top, left = host_detections.paste_box_mask(
        np.asarray(det["masks"][0, 0]), np.asarray(det["boxes"][0, 0]), (128, 128)
    )
    pasted = np.zeros((128, 128), bool)
    pasted[top : top + region.shape[0], left : left + region.shape[1]] = region
    want = np.zeros((128, 128), bool)
    want[48:88, 48:88] = True
    # Bilinear at 8 px cells rounds the square's corners (a corner pixel samples 0.56^2 of
    # the corner cell): all else is the square, every row and column of it reached.
    assert not pasted[~want].any()
    assert pasted[48:88, 48:88].any(axis=0).all() and pasted[48:88, 48:88].any(axis=1).all()
    assert pasted[want].mean() > 0.98


def test_windows_beyond_float32_saturation_rank_by_logit():
    """Two planted 9-cell windows of P3 (centre cells (4, 4) and (11, 11), disjoint masks) with
    objectness logits 20 and 30: both probabilities are exactly 1.0 in float32, so ranking by
    probability would keep them in index order (the first window first). The more confident
    window (logit 30, the later index) takes slot 0."""
    cfg = config(num_classes=1, levels=(3,), window_cells=(9,), detections_per_image=4)
    k = cfg.grid_k
    assert float(jax.nn.sigmoid(jnp.float32(20.0))) == float(jax.nn.sigmoid(jnp.float32(30.0)))
    maps = np.full((16, 16, k * k), -10.0, np.float32)
    channels = instancefcn.relative_position_channels(9, k)
    objectness = np.full((1, 256, 1), -10.0, np.float32)
    for centre, logit in ((4, 20.0), (11, 30.0)):
        for a in range(2, 7):
            for b in range(2, 7):
                maps[centre - 4 + a, centre - 4 + b, channels[a, b]] = 10.0
        objectness[0, centre * 16 + centre, 0] = logit
    det = detect_on_a_128_canvas(maps, objectness, cfg)
    # Slots 2-3 are windows at logit -10 (probability > score_threshold 0) that overlap the
    # planted cells: valid, and behind both planted windows.
    assert np.asarray(det["valid"][0, :2]).all()
    np.testing.assert_allclose(
        np.asarray(det["boxes"][0, :2]), [[56, 56, 128, 128], [0, 0, 72, 72]]
    )


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(instancefcn, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert np.isfinite(step.total)
    assert_total_is_the_sum(step, ("loss_objectness", "loss_mask"))
    assert float(metrics["sampled_positives"]) > 0
    for name in ("fpn", "score1", "score2", "obj1", "obj2"):
        assert magnitude(grads[name]) > 0, name
    for name, group in grads["backbone"].items():
        assert (magnitude(group) > 0) == (name != "stem"), name  # smoke: freeze_at=1
    k, side = cfg.detections_per_image, cfg.output_side
    assert det["masks"].shape == (2, k, side, side)
    assert det["boxes"].shape == (2, k, 4)
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)


@pytest.mark.slow
@pytest.mark.xfail(
    reason="not reached: segm AP 0.723 (AP50 = AP75 = 0.80, AR100 0.93) at pre_nms_topk 4000 "
    "with the logit ranking of dcb998b, 400 steps, 2026-12-07 (0.658 before it); RESULTS.md",
    strict=False,
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipe's compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import CANVAS_4X, overfit_report

    report = overfit_report(
        "experiments/instancefcn_nuclei.py",
        tmp_path / "overfit",
        steps=400,
        overrides=[
            f"--config.model.compute_dtype={dtype}",
            "--config.optim.name=adamw",
            "--config.optim.lr=0.001",
            # Shapes of 32-230 px on the 512 canvas: windows on P2 and P3 whose canonical
            # objects (34-261 px, half an octave apart) cover them with masks at stride 4-8.
            "--config.model.levels=(2, 3)",
            "--config.model.window_cells=(15, 21, 29, 41, 57)",
            "--config.model.branch_channels=64",
            "--config.model.windows_per_image=256",
            # Each object has many high-scoring windows (neighbour positions and sides, the
            # never-sampled band between positives and negatives): 200 candidates missed
            # whole objects.
            "--config.model.pre_nms_topk=4000",
            *CANVAS_4X,
        ],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("instancefcn")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
