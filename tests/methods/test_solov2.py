"""SOLOv2: grid targets and test-time selection against float64 NumPy loops of the reference's
rules (tests/methods/solo_reference.py), the smoke step, and (slow) over-fitting 4 scenes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.methods import solov2
from tests.methods import solo_reference as reference
from tests.methods.smoke import magnitude, smoke_step

SMOKE = "experiments/solov2_nuclei.py:smoke"

SCENE_CFG = solov2.SOLOv2Config(
    num_classes=3,
    canvas_hw=(64, 64),
    num_grids=(8, 6, 4, 2, 2),
    scale_ranges=((1, 16), (8, 32), (16, 64), (32, 128), (64, 256)),
    positive_slots_per_image=16,
)


# Two ignore slots, both padding: what the pipeline hands over when nothing was dropped (the
# reference comparisons below then also show that padding slots change nothing).
NO_IGNORE = ([[0, 0, 0, 0]] * 2, [False, False])


def targets(
    cfg,
    boxes,
    classes,
    centers,
    nonempty,
    valid=None,
    key=None,
    ignore=NO_IGNORE,
    extent=None,
    image_targets=solov2.grid_targets,
):
    """image_targets (grid_targets, or test_solo's solo.cell_targets) of one image whose grids
    span `extent` (h, w) (the canvas by default)."""
    n = len(boxes)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid)
    return jax.jit(image_targets, static_argnums=5)(
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(classes, jnp.int32),
        jnp.asarray(valid),
        jnp.asarray(centers, jnp.float32),
        jnp.asarray(nonempty),
        cfg,
        key,
        jnp.asarray(ignore[0], jnp.float32),
        jnp.asarray(ignore[1], bool),
        jnp.asarray(cfg.canvas_hw if extent is None else extent, jnp.float32),
    )


def reference_targets(cfg, boxes, classes, centers, nonempty, extent_hw):
    """solo_reference.grid_targets (labels, pairs) of a random scene (boxes and centres cast to
    float32, as `targets` hands them over) on grids spanning extent_hw, under cfg's grids."""
    return reference.grid_targets(
        boxes.astype(np.float32),
        classes,
        centers.astype(np.float32),
        nonempty,
        extent_hw,
        cfg.num_grids,
        cfg.scale_ranges,
        cfg.center_scale,
        3,
    )


def overfit_overrides() -> list[str]:
    """The over-fitting runs' flags (test_solo's too): AdamW, the reference's grids and COCO
    scale ranges halved (shapes of 32-230 px), 64 slots, the 4x canvas."""
    from tests.methods.overfit import CANVAS_4X

    return [
        "--config.optim.name=adamw",
        "--config.optim.lr=0.002",
        "--config.model.num_grids=(40, 36, 24, 16, 12)",
        "--config.model.scale_ranges=((1, 48), (24, 96), (48, 192), (96, 384), (192, 2048))",
        "--config.model.positive_slots_per_image=64",
        *CANVAS_4X,
    ]


def trained_pairs(out):
    valid = np.asarray(out["slot_valid"])
    return sorted(
        zip(
            np.asarray(out["slot_cell"])[valid].tolist(),
            np.asarray(out["slot_instance"])[valid].tolist(),
            strict=True,
        )
    )


# A 64x64 canvas; grids 8, 6, 4, 2, 2 (cells of 8, 10.7, 16, 32, 32 px); level offsets
# 0, 64, 100, 116, 120.
#   A class 0, box 10 px around (9, 9): sqrt area 10 is on levels 0 (1-16) and 1 (8-32); level 0
#     cell (1, 1) = 9, level 1 cell (0, 0) = 64.
#   B class 1, box 40 px, mass centre (36, 44) off the box centre: levels 2 (16-64) and 3
#     (32-128); centre region x 36 +- 4, y 44 +- 4: level 2 column 2 (32/16 .. 40/16), rows 2 and
#     3 (40/16 = 2.5 .. 48/16 = 3) -> cells 100 + 10 = 110 and 100 + 14 = 114; level 3 cell
#     (1, 1) = 119.
#   C class 2, 6 px box around (9.5, 9.5), after A: level 0 cell 9 again; the cell takes C's
#     class and both (9, A) and (9, C) train.
#   D class 1: an empty mask (no positives); E: padding (no positives).
SCENE = {
    "boxes": [
        [4, 4, 14, 14],
        [20, 20, 60, 60],
        [6.5, 6.5, 12.5, 12.5],
        [40, 4, 50, 14],
        [0, 0, 8, 8],
    ],
    "classes": [0, 1, 2, 1, 0],
    "centers": [[9, 9], [36, 44], [9.5, 9.5], [45, 9], [4, 4]],
    "nonempty": [True, True, True, False, True],
    "valid": [True, True, True, True, False],
}
SCENE_PAIRS = sorted([(9, 0), (64, 0), (9, 2), (110, 1), (114, 1), (119, 1)])


def test_grid_targets_of_a_hand_made_scene():
    out = targets(SCENE_CFG, **SCENE)
    labels = np.asarray(out["cell_labels"])
    expected = np.full(SCENE_CFG.num_cells, 3)
    expected[[9, 64, 110, 114, 119]] = [2, 0, 1, 1, 1]
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(np.asarray(out["positive"]), expected < 3)
    assert trained_pairs(out) == SCENE_PAIRS
    assert int(out["pairs"]) == 6 and int(out["overflow"]) == 0


def test_cells_centred_in_an_ignore_region_leave_the_focal_loss():
    """The hand-made scene with two ignore regions (instances beyond input.max_instances). Cell
    centres in [40, 56) x [40, 56): level 0 cells 45, 46, 53, 54, level 1 cell 92, level 2
    cell 110 (B's positive: stays positive), level 3 cell 119 (B's too), level 4 cell 123. In
    [0, 16) x [0, 16): level 0 cells 0, 1, 8, 9 (A's), level 1 cell 64 (A's), level 2 cell 100.
    The focal loss no longer sees the ignored cells; with the regions in padding slots nothing
    changes."""
    regions = [[40, 40, 56, 56], [0, 0, 16, 16]]
    out = targets(SCENE_CFG, **SCENE, ignore=(regions, [True, True]))
    plain = targets(SCENE_CFG, **SCENE, ignore=(regions, [False, False]))
    ignored = [0, 1, 8, 45, 46, 53, 54, 92, 100, 123]
    assert np.flatnonzero(np.asarray(out["ignored"])).tolist() == ignored
    assert not np.asarray(plain["ignored"]).any()
    for name in ("cell_labels", "positive", "slot_cell", "slot_instance", "slot_valid"):
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(plain[name]))

    @jax.jit
    def focal(targets, logits):  # one image, no mask slots worth a look
        p = SCENE_CFG.positive_slots_per_image
        outputs = {
            "targets": jax.tree.map(lambda x: x[None], targets),
            "category_logits": logits[None],
            "mask_logits": jnp.zeros((1, p, 4, 4)),
            "mask_targets": jnp.zeros((1, p, 4, 4), jnp.uint8),
        }
        return solov2.loss_fn(outputs, {}, SCENE_CFG)[1]["loss_cls"]

    def loss_cls(targets, logits):
        return float(focal(targets, logits))

    logits = np.random.default_rng(0).normal(0, 1, (SCENE_CFG.num_cells, 3)).astype(np.float32)
    confident = logits.copy()
    confident[ignored] = 5.0  # "foreground" where nothing is labelled
    assert loss_cls(out, confident) == pytest.approx(loss_cls(out, logits), rel=1e-6)
    assert loss_cls(plain, confident) > loss_cls(plain, logits) + 1.0


def test_the_reference_loop_agrees_on_the_hand_made_scene():
    # The NumPy loop is the independent side of the random scenes below: check it too.
    keep = np.asarray(SCENE["valid"])
    labels, pairs = reference.grid_targets(
        np.asarray(SCENE["boxes"])[keep],
        np.asarray(SCENE["classes"])[keep],
        np.asarray(SCENE["centers"])[keep],
        np.asarray(SCENE["nonempty"])[keep],
        SCENE_CFG.canvas_hw,
        SCENE_CFG.num_grids,
        SCENE_CFG.scale_ranges,
        SCENE_CFG.center_scale,
        3,
    )
    assert sorted(pairs) == SCENE_PAIRS
    assert labels[9] == 2 and labels[64] == 0


def test_a_positive_budget_takes_a_random_subset_and_counts_the_rest():
    cfg = dataclasses.replace(SCENE_CFG, positive_slots_per_image=4)
    seen = set()
    for seed in range(6):
        out = targets(cfg, **SCENE, key=jax.random.key(seed))
        chosen = trained_pairs(out)
        assert len(chosen) == 4 and len(set(chosen)) == 4
        assert set(chosen) <= set(SCENE_PAIRS)
        assert int(out["overflow"]) == 2 and int(out["pairs"]) == 6
        seen |= set(chosen)
    assert seen == set(SCENE_PAIRS)  # every pair gets its turn


def random_scene_cfg(center_scale):
    return dataclasses.replace(
        SCENE_CFG,
        center_scale=center_scale,
        canvas_hw=(128, 192),
        num_grids=(20, 12, 8, 6, 4),
        scale_ranges=((1, 24), (12, 48), (24, 96), (48, 192), (96, 512)),
        positive_slots_per_image=512,
    )


def random_scene(rng, image_hw, n=24):
    """n instances inside an image of image_hw (h, w): (boxes, classes, centres, nonempty)."""
    h, w = image_hw
    # Elongated boxes too: their centre regions span more than the 3x3 cells around the centre.
    size = np.minimum(rng.uniform(3, 90, (n, 2)) * rng.choice([1.0, 0.2], (n, 2)), [w, h])
    size[: n // 4, 1] = rng.uniform(60 / 128 * h, 127 / 128 * h, n // 4)
    x0 = rng.uniform(0, w - size[:, 0])
    y0 = rng.uniform(0, h - size[:, 1])
    boxes = np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], 1)
    # Mass centres anywhere inside the box (occluded shapes are lopsided).
    centers = np.stack(
        [rng.uniform(boxes[:, 0], boxes[:, 2]), rng.uniform(boxes[:, 1], boxes[:, 3])], 1
    )
    return boxes, rng.integers(0, 3, n), centers, rng.random(n) > 0.1


@pytest.mark.parametrize("seed,center_scale", [(0, 0.2), (1, 0.2), (2, 0.6), (3, 0.6)])
def test_grid_targets_match_the_reference_loop_on_random_scenes(seed, center_scale):
    rng = np.random.default_rng(seed)
    cfg = random_scene_cfg(center_scale)
    n = 24
    boxes, classes, centers, nonempty = random_scene(rng, cfg.canvas_hw, n)
    out = targets(cfg, boxes, classes, centers, nonempty)
    labels, pairs = reference_targets(cfg, boxes, classes, centers, nonempty, cfg.canvas_hw)
    assert len(pairs) > n  # the scene exercises several cells per instance and shared cells
    clamped = sum(
        1 for b in boxes if 0.5 * (b[3] - b[1]) * center_scale > 1.5 * 128 / cfg.num_grids[1]
    )
    assert clamped > 0 or center_scale < 0.5  # some centre regions reach past the 3x3 cells
    np.testing.assert_array_equal(np.asarray(out["cell_labels"]), labels)
    assert trained_pairs(out) == sorted(pairs)


def test_grids_span_the_padded_image_on_a_non_square_image():
    """A 75 x 130 image on the 128 x 192 canvas: with grid_extent "image" its grids span the
    image padded to multiples of 32 (96 x 160, the reference pipelines' Pad size_divisor=32),
    and cells are assigned by dividing by that (WXinlong/SOLO solov2_head.py
    solov2_target_single: upsampled_size, the padded input; the NumPy loop of
    solo_reference.grid_targets), not by the canvas."""
    cfg = random_scene_cfg(0.2)  # the random scenes' program: no new compile
    image_hw = (75, 130)
    padded = (reference.padded_size(75), reference.padded_size(130))
    # (0, 0): an evaluation batch's padding example, given one unit so that nothing is 0 / 0.
    extents = solov2.grid_extents(jnp.asarray([image_hw, cfg.canvas_hw, (0, 0)]), cfg)
    np.testing.assert_array_equal(np.asarray(extents), [padded, cfg.canvas_hw, (32, 32)])
    canvas_cfg = dataclasses.replace(cfg, grid_extent="canvas")
    np.testing.assert_array_equal(
        np.asarray(solov2.grid_extents(jnp.asarray([image_hw]), canvas_cfg)), [cfg.canvas_hw]
    )

    boxes, classes, centers, nonempty = random_scene(np.random.default_rng(7), image_hw)
    out = targets(cfg, boxes, classes, centers, nonempty, extent=extents[0])
    expected = [
        reference_targets(cfg, boxes, classes, centers, nonempty, hw)
        for hw in (padded, cfg.canvas_hw)
    ]
    labels, pairs = expected[0]
    np.testing.assert_array_equal(np.asarray(out["cell_labels"]), labels)
    assert trained_pairs(out) == sorted(pairs)
    assert sorted(pairs) != sorted(expected[1][1])  # the canvas-wide grid assigns otherwise


def test_grid_inputs_are_the_reference_resizes_over_each_image_extent():
    """level_on_grid against solo_reference.grid_inputs (WXinlong/SOLO solov2_head.py
    split_feats and forward_single: F.interpolate bilinear, align_corners False, CoordConv
    linspace(-1, 1)) on two images of one canvas 128 x 192, one padded to 96 x 160, one filling
    the canvas: P2 halved, P4 as it is, P6 (3 of its 2 x 3 cells in the extent, P5's 3 x 5)."""
    canvas = (128, 192)
    extents = np.array([[96.0, 160.0], [128.0, 192.0]], np.float32)
    rng = np.random.default_rng(3)
    levels = ((4, 8, 12), (16, 16, 5), (64, 32, 4))  # (native stride, level stride, grid)
    features = [
        rng.normal(0, 1, (2, -(-canvas[0] // native), -(-canvas[1] // native), 3))
        for native, _, _ in levels
    ]
    on_grid = jax.jit(
        lambda features, extents: [
            solov2.level_on_grid(f, extents, *level)
            for f, level in zip(features, levels, strict=True)
        ]
    )([jnp.asarray(f, jnp.float32) for f in features], jnp.asarray(extents))
    for (native, level, grid), feature, out in zip(levels, features, on_grid, strict=True):
        feature = feature.astype(np.float32)
        out = np.asarray(out)
        for b in range(2):
            expected = reference.grid_inputs(
                feature[b], tuple(int(v) for v in extents[b]), native, level, grid
            )
            np.testing.assert_allclose(out[b], expected, atol=1e-5, err_msg=f"{native} {b}")
    # The mask branch's CoordConv channels on P5 (stride 32): linspace(-1, 1) over the extent.
    coords = np.asarray(solov2.coordinates(4, 6, jnp.asarray(extents), 32, jnp.float32))
    np.testing.assert_allclose(coords[0, 0, :5, 0], np.linspace(-1, 1, 5), atol=1e-6)
    np.testing.assert_allclose(coords[0, :3, 0, 1], np.linspace(-1, 1, 3), atol=1e-6)
    np.testing.assert_allclose(coords[1, 0, :, 0], np.linspace(-1, 1, 6), atol=1e-6)


def detect_inputs(cfg, seed=1, e=6):
    """(logits [S, C], kernels [S, E], features [h, w, E]) of a random image: smooth feature
    blobs, so masks are regions that overlap each other partly."""
    rng = np.random.default_rng(seed)
    s, c = cfg.num_cells, cfg.num_classes
    h, w = (v // 4 for v in cfg.canvas_hw)
    yy, xx = np.mgrid[0:h, 0:w] / 16.0
    features = np.stack(
        [np.cos(3 * xx + k) + np.sin(2 * yy * (k + 1)) for k in range(e)], -1
    ).astype(np.float32)
    kernels = rng.normal(0, 1.5, (s, e)).astype(np.float32)
    logits = rng.normal(-3.0, 1.5, (s, c)).astype(np.float32)
    return logits, kernels, features


def peak_filtered(logits, cfg):
    """Category probabilities float64[S, C] through the reference's peak filter."""
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    filtered, start = [], 0
    for grid in cfg.num_grids:
        level = probs[start : start + grid * grid].reshape(grid, grid, -1)
        filtered.append(reference.points_nms(level).reshape(grid * grid, -1))
        start += grid * grid
    return np.concatenate(filtered)


def assert_detections(out, expected, cfg, region=None):
    """Our slots against the reference's [(score, class, binary mask)]; masks compared inside
    region (h, w) at stride 4 (zero beyond it)."""
    valid = np.asarray(out["valid"][0])
    assert valid.sum() == len(expected) and valid[: len(expected)].all()
    for slot, (score, cls, mask) in enumerate(expected):
        assert float(out["scores"][0, slot]) == pytest.approx(score, rel=1e-4)
        assert int(out["classes"][0, slot]) == cls
        probability = np.asarray(out["canvas_masks"][0, slot])
        if region is not None:
            assert not probability[region[0] :].any() and not probability[:, region[1] :].any()
            probability = probability[: region[0], : region[1]]
        decided = np.abs(probability - 0.5) > 1e-5
        np.testing.assert_array_equal((probability > 0.5)[decided], mask[decided])


def test_detect_keeps_the_best_nms_pre_after_maskness_within_the_image():
    """nms_pre 12 of the ~100 candidates left after the area filter: the reference (WXinlong/SOLO
    solov2_head.py get_seg_single; mmdetection's _predict_by_feat_single passes nms_pre to
    mask_matrix_nms) rescores by maskness first and then keeps the best nms_pre for Matrix NMS,
    on the mask feature map of its padded image only: here the extent 48 x 32 of the 64 x 64
    canvas, the reference loop given the features cropped to it."""
    cfg = dataclasses.replace(SCENE_CFG, test_candidates=10_000, nms_pre=12)
    logits, kernels, features = detect_inputs(cfg)
    region = (48 // 4, 32 // 4)
    out = jax.jit(solov2.detect, static_argnums=4)(
        jnp.asarray(logits)[None],
        jnp.asarray(kernels)[None],
        jnp.asarray(features)[None],
        {},
        cfg,
        jnp.asarray([[48.0, 32.0]]),
    )
    probs = peak_filtered(logits, cfg)
    cropped = features[: region[0], : region[1]].astype(np.float64)
    strides = cfg.cell_strides().astype(np.float64)
    expected = reference.detect(probs, kernels.astype(np.float64), cropped, strides, cfg)
    assert 3 <= len(expected)
    assert_detections(out, expected, cfg, region)
    # The test can tell the orders apart: the cut changes the result, and ranking by category
    # score before maskness (the same 12 kept, as test_candidates 12 would) gives another.
    uncut = dataclasses.replace(cfg, nms_pre=10_000)
    ranked_first = np.where(probs >= np.sort(probs.ravel())[-12], probs, 0.0)
    for other in (
        reference.detect(probs, kernels.astype(np.float64), cropped, strides, uncut),
        reference.detect(ranked_first, kernels.astype(np.float64), cropped, strides, cfg),
    ):
        assert [(round(float(s), 6), c) for s, c, _ in other] != [
            (round(float(s), 6), c) for s, c, _ in expected
        ]


def test_detect_masks_only_the_best_test_candidates_by_category_score():
    """The declared deviation (module docstring): only the test_candidates best (cell, class)
    scores get masks; the rest follows the reference (solo_reference.detect) on that pool."""
    cfg = dataclasses.replace(SCENE_CFG, test_candidates=30)
    logits, kernels, features = detect_inputs(cfg, seed=2)
    out = jax.jit(solov2.detect, static_argnums=4)(
        jnp.asarray(logits)[None], jnp.asarray(kernels)[None], jnp.asarray(features)[None], {}, cfg
    )
    probs = peak_filtered(logits, cfg)
    assert (probs > cfg.score_threshold).sum() > 2 * cfg.test_candidates  # the bound cuts
    pool = np.where(probs >= np.sort(probs.ravel())[-cfg.test_candidates], probs, 0.0)
    strides = cfg.cell_strides().astype(np.float64)
    kernels, features = kernels.astype(np.float64), features.astype(np.float64)
    expected = reference.detect(pool, kernels, features, strides, cfg)
    assert 3 <= len(expected)
    assert_detections(out, expected, cfg)
    everything = reference.detect(probs, kernels, features, strides, cfg)
    assert [c for _, c, _ in everything] != [c for _, c, _ in expected]  # what the bound costs


def one_pixel_masks(rng, b, p, side, background_mean, foreground_range):
    """(targets uint8[b, p, side, side], logits float32[b, p, side, side]) for the dice-eps tests
    (here and tests/methods/test_condinst.py): each target one random pixel, predicted
    confidently (logits N(background_mean, 0.5) off it, uniform(*foreground_range) on it), so the
    dice loss is of the order of its eps."""
    targets = np.zeros((b, p, side, side), np.uint8)
    logits = rng.normal(background_mean, 0.5, (b, p, side, side)).astype(np.float32)
    for i in range(b):
        for j in range(p):
            y, x = rng.integers(0, side, 2)
            targets[i, j, y, x] = 1
            logits[i, j, y, x] = rng.uniform(*foreground_range)
    return targets, logits


def test_dice_loss_is_the_references_with_its_eps():
    """loss_fn's mask term against WXinlong/SOLO solov2_head.py dice_loss (0.001 added to each
    squared sum of the denominator, none to the numerator), averaged over the trained pairs and
    x 3 (loss_ins loss_weight). One-pixel targets predicted confidently make the loss of order
    eps: 2e-3 on the denominator gives ~1e-3 per mask, 1e-3 gives ~5e-4."""
    rng = np.random.default_rng(4)
    b, p, h, w = 2, SCENE_CFG.positive_slots_per_image, 4, 4
    mask_targets, mask_logits = one_pixel_masks(rng, b, p, h, -12.0, (8.0, 14.0))
    mask_logits[0, :3] = rng.normal(0, 2, (3, h, w))  # and a few poor predictions
    slot_valid = np.zeros((b, p), bool)
    slot_valid[0, :5], slot_valid[1, :7] = True, True
    targets = {
        "cell_labels": jnp.full((b, SCENE_CFG.num_cells), 3, jnp.int32),
        "positive": jnp.zeros((b, SCENE_CFG.num_cells), bool).at[:, :6].set(True),
        "ignored": jnp.zeros((b, SCENE_CFG.num_cells), bool),
        "slot_valid": jnp.asarray(slot_valid),
        "pairs": jnp.asarray([5, 7]),
        "overflow": jnp.zeros(b, jnp.int32),
    }
    outputs = {
        "targets": targets,
        "category_logits": jnp.zeros((b, SCENE_CFG.num_cells, 3)),
        "mask_logits": jnp.asarray(mask_logits),
        "mask_targets": jnp.asarray(mask_targets),
    }
    loss_mask = float(
        jax.jit(solov2.loss_fn, static_argnums=2)(outputs, {}, SCENE_CFG)[1]["loss_mask"]
    )
    probs = 1.0 / (1.0 + np.exp(-mask_logits.astype(np.float64)))
    per_mask = reference.dice_loss(probs[slot_valid], mask_targets[slot_valid])
    expected = 3.0 * per_mask.mean()
    assert loss_mask == pytest.approx(expected, rel=1e-4)
    confident = per_mask[3:]  # the confident ones alone sit near 1e-3
    assert np.all((confident > 5e-4) & (confident < 2e-3))


def test_points_nms_matches_the_reference_peak_filter():
    rng = np.random.default_rng(0)
    scores = rng.random((2, 7, 7, 3)).astype(np.float32)
    scores[0, 2:4, 2:4, 0] = 0.5  # ties keep every tied cell
    out = np.asarray(solov2.points_nms(jnp.asarray(scores)))
    for b in range(2):
        np.testing.assert_array_equal(out[b], reference.points_nms(scores[b]))


def test_detect_matches_the_reference_test_procedure():
    cfg = dataclasses.replace(SCENE_CFG, test_candidates=10_000, detections_per_image=30)
    logits, kernels, features = detect_inputs(cfg)
    out = solov2.detect(
        jnp.asarray(logits)[None],
        jnp.asarray(kernels)[None],
        jnp.asarray(features)[None],
        {},
        cfg,
    )
    expected = reference.detect(
        peak_filtered(logits, cfg),
        kernels.astype(np.float64),
        features.astype(np.float64),
        cfg.cell_strides().astype(np.float64),
        cfg,
    )
    valid = np.asarray(out["valid"][0])
    assert 5 <= len(expected) <= cfg.detections_per_image
    assert valid.sum() == len(expected) and valid[: len(expected)].all()
    for slot, (score, cls, mask) in enumerate(expected):
        assert float(out["scores"][0, slot]) == pytest.approx(score, rel=1e-4)
        assert int(out["classes"][0, slot]) == cls
        probability = np.asarray(out["canvas_masks"][0, slot])
        decided = np.abs(probability - 0.5) > 1e-5
        np.testing.assert_array_equal((probability > 0.5)[decided], mask[decided])


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(solov2, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert np.isfinite(step.total)
    assert step.total == pytest.approx(float(metrics["loss_cls"] + metrics["loss_mask"]))
    assert float(metrics["positive_cells"]) > 0 and float(metrics["positive_pairs"]) > 0
    for name in ("fpn", "category_tower", "kernel_tower", "mask_branch"):
        assert magnitude(grads[name]) > 0, name
    for name, group in grads["backbone"].items():
        assert (magnitude(group) > 0) == (name != "stem"), name  # smoke: freeze_at=1

    k, (h, w) = cfg.detections_per_image, (v // 4 for v in cfg.canvas_hw)
    assert det["canvas_masks"].shape == (2, k, h, w)
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)
    assert "boxes" not in det  # the host derives them from the masks


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipes' compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import overfit_report

    report = overfit_report(
        "experiments/solov2_nuclei.py",
        tmp_path / "overfit",
        steps=300,
        overrides=[f"--config.model.compute_dtype={dtype}", *overfit_overrides()],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("solov2")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
