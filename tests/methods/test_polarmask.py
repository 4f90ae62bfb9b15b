"""PolarMask: ray targets (the input pipeline's boundary points binned by angle on the device)
against float64 ray casting through the mask on hand-drawn shapes (square, disc, concave L);
boundary points and polygon rasterisation against hand-computed pixels; the polar losses; the
smoke step; and (slow) over-fitting 4 scenes and the COCO experiment's step. FCOS's parts are
tested in test_fcos.py."""

import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import config as config_lib
from instseg_jax.detections import polygon_region
from instseg_jax.input.contours import outer_contour_pixels
from instseg_jax.methods import polarmask
from tests.methods.smoke import assert_total_is_the_sum, smoke_step
from tests.methods.test_mask_rcnn import first_batch

SMOKE = "experiments/polarmask_nuclei.py:smoke"
CFG = polarmask.PolarMaskConfig(num_classes=3, canvas_hw=(128, 128))


def cast_ray(mask, origin, direction, step=0.01):
    """float64: distance from origin (x, y) along the unit (x, y) direction to where the ray
    last leaves the mask (pixel (r, c) covers [c, c + 1) x [r, r + 1)), marching in `step` px."""
    h, w = mask.shape
    reach = math.hypot(h, w)
    t = np.arange(0.0, reach, step)
    x = origin[0] + t * direction[0]
    y = origin[1] + t * direction[1]
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    hit = np.zeros_like(t, bool)
    hit[inside] = mask[y[inside].astype(int), x[inside].astype(int)]
    return float(t[np.flatnonzero(hit)[-1]]) if hit.any() else 0.0


def shapes():
    square = np.zeros((48, 48), bool)
    square[10:38, 12:40] = True
    yy, xx = np.mgrid[:48, :48]
    disc = (xx + 0.5 - 24) ** 2 + (yy + 0.5 - 22) ** 2 <= 15**2
    ell = np.zeros((48, 48), bool)  # an L: a vertical bar and a foot to the right
    ell[6:42, 8:20] = True
    ell[30:42, 8:40] = True
    return {"square": square, "disc": disc, "L": ell}


@pytest.mark.parametrize("name", ["square", "disc", "L"])
def test_nearest_ray_rule_matches_ray_casting(name):
    """ray_rule "nearest" on the outer contour's pixel centres against float64 ray casting
    (the exit lies on a pixel edge, half a pixel past the centres)."""
    mask = shapes()[name]
    ys, xs = np.nonzero(mask)
    centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    if name == "L":
        # Points 5+ px inside: one in the corner square seeing both arms, one in the bar
        # seeing the concave corner.
        origins = [np.array([14.0, 36.0]), np.array([13.2, 20.7])]
    else:
        origins = [centre, centre + np.array([3.3, -2.2])]
    rows, cols = outer_contour_pixels(mask)
    contour = np.stack([cols + 0.5, rows + 0.5], axis=1)
    padded = contour[np.arange(polarmask.CONTOUR_POINTS) % len(contour)]
    cfg = dataclasses.replace(CFG, ray_rule="nearest")
    ours = jax.jit(polarmask.ray_targets, static_argnums=2)(
        jnp.asarray(np.stack(origins), jnp.float32),
        jnp.asarray(np.stack([padded, padded]), jnp.float32),
        cfg,
    )
    directions = cfg.ray_directions().astype(np.float64)
    for o, origin in enumerate(origins):
        assert mask[int(origin[1]), int(origin[0])], "the test's origin must lie in the shape"
        expected = np.array([cast_ray(mask, origin, d) for d in directions])
        error = np.abs(np.asarray(ours[o]) - expected)
        assert np.median(error) < 0.75, (name, o, error)
        assert error.max() < 1.6, (name, o, error)


# The 8-neighbours of a pixel clockwise on the screen (y down), from west: (row, col) steps.
_CLOCKWISE = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))


def moore_outer_contour(mask):
    """(col, row) int pixels of the outer border of the 8-connected part holding mask's first
    pixel in raster order, traced by Moore-neighbour border following (clockwise, stopping when
    the first move repeats): the border cv2.findContours(CHAIN_APPROX_NONE) lists, written
    for this test and independent of input/contours.py."""
    padded = np.pad(np.asarray(mask, bool), 1)
    rows, cols = np.nonzero(padded)
    start = (int(rows[0]), int(cols[0]))
    back = (start[0], start[1] - 1)  # the raster-first pixel's west is background
    current, points, first_move = start, [start], None
    while True:
        k = _CLOCKWISE.index((back[0] - current[0], back[1] - current[1]))
        for j in range(1, 9):
            dr, dc = _CLOCKWISE[(k + j) % 8]
            candidate = (current[0] + dr, current[1] + dc)
            if padded[candidate]:
                break
        else:
            break  # a lone pixel
        pr, pc = _CLOCKWISE[(k + j - 1) % 8]
        move = (current, candidate)
        if first_move is None:
            first_move = move
        elif move == first_move:
            break
        back = (current[0] + pr, current[1] + pc)
        current = candidate
        points.append(current)
    return np.array([(c - 1, r - 1) for r, c in points], np.int64)


def reference_ray_lengths(contour, cx, cy):
    """float64[36]: xieenze/PolarMask mmdet/datasets/coco_seg.py get_36_coordinates, in NumPy:
    each contour point's angle atan2(x, y) in degrees (+360 below 0) truncated to an integer;
    ray i (i = 0, 10, ..., 350) takes the largest distance among the points at degree i, else
    i + 1, i - 1, i + 2, i - 2, i + 3, i - 3 (no wrap below 0), else 1e-6. Coordinates are
    pixel indices (the reference's points are pixels, its locations x * stride + stride // 2)."""
    x = contour[:, 0].astype(np.float64) - cx
    y = contour[:, 1].astype(np.float64) - cy
    angle = np.arctan2(x, y) * 180 / np.pi
    angle[angle < 0] += 360
    angle = angle.astype(np.int64)
    dist = np.sqrt(x**2 + y**2)
    out = np.full(36, 1e-6)
    for i in range(0, 360, 10):
        for a in (i, i + 1, i - 1, i + 2, i - 2, i + 3, i - 3):
            if (angle == a).any():
                out[i // 10] = dist[angle == a].max()
                break
    return out


def thin_armed_shape():
    """(mask, main part): a disc of radius 40 with a 20 x 12 hole, four arms 1-2 px wide
    reaching 35 px past it (one a diagonal chain of pixels), and a separate 10 x 10 blob; its
    main part's outer contour has over 256 points."""
    h = w = 160
    yy, xx = np.mgrid[:h, :w]
    main = (xx - 80) ** 2 + (yy - 78) ** 2 <= 40**2
    main[60:72, 70:90] = False  # a hole
    main[77:79, 115:155] = True  # arms: right, 2 px
    main[5:40, 80] = True  # up, 1 px
    main[78:80, 5:42] = True  # left, 2 px
    for t in range(28, 62):  # down-right diagonal, pixels touching only at corners
        main[78 + t, 80 + t] = True
    blob = np.zeros((h, w), bool)
    blob[140:150, 5:15] = True
    return main | blob, main


def test_reference_ray_rule_on_a_contour_of_over_256_points():
    """Targets of the whole path (input pipeline's contour at scale 1, device ray rule) against
    the reference's rule in float64 NumPy (`reference_ray_lengths`, coco_seg.py
    get_36_coordinates) on its largest contour (`moore_outer_contour`, get_single_centerpoint:
    cv2.findContours sorted by area), from locations in the disc, on the hole's edge and at
    an arm's root. The thin arms are what the former 256-point subsampling lost."""
    from instseg_jax.input.instances import InstanceMasks, tight_crop
    from instseg_jax.input.transforms import _contours

    mask, main = thin_armed_shape()
    contour = moore_outer_contour(main)
    blob = moore_outer_contour(mask & ~main)

    def shoelace(c):
        return 0.5 * abs(
            np.dot(c[:, 0], np.roll(c[:, 1], 1)) - np.dot(c[:, 1], np.roll(c[:, 0], 1))
        )

    assert shoelace(contour) > shoelace(blob)  # the reference keeps the main part's contour
    assert 256 < len(np.unique(contour, axis=0)) <= polarmask.CONTOUR_POINTS

    crop, origin = tight_crop(mask)
    masks = InstanceMasks([crop], [origin], mask.shape)
    ours = _contours(masks, [0], 1, polarmask.CONTOUR_POINTS, 1.0, (0, 0), mask.shape, False, None)
    expected_points = {(c + 0.5, r + 0.5) for c, r in contour}
    assert {tuple(p) for p in ours[0].astype(np.float64)} == expected_points

    # Our locations (continuous, pixel (r, c) spans [c, c + 1)); the reference's pixel-index
    # location is 0.5 less on each axis.
    locations = np.array([[80.0, 78.0], [84.0, 92.0], [76.0, 73.0], [108.0, 76.0], [60.0, 100.0]])
    for x, y in locations:
        assert main[int(y), int(x)]
    rays = jax.jit(polarmask.ray_targets, static_argnums=2)(
        jnp.asarray(locations, jnp.float32),
        jnp.asarray(np.repeat(ours, len(locations), axis=0)),
        CFG,
    )
    for i, (x, y) in enumerate(locations):
        expected = reference_ray_lengths(contour, x - 0.5, y - 0.5)
        np.testing.assert_allclose(np.asarray(rays[i]), expected, rtol=1e-5, err_msg=f"{x}, {y}")


def test_pipeline_contours_lie_in_each_instances_box_through_resize_and_flip():
    """The contour is the largest part's outer border at canvas resolution: every point is a
    canvas pixel centre inside the instance's canvas box (within the nearest-pixel sampling's
    pixel), mirrored with the canvas."""
    for hflip in (0.0, 1.0):
        config = config_lib.load(SMOKE, [f"--config.input.hflip={hflip}"])
        _, batch = first_batch(config)
        contours = np.asarray(batch["gt_contours"])  # [B, N, L, 2]
        boxes, valid = np.asarray(batch["gt_boxes"]), np.asarray(batch["gt_valid"])
        assert np.asarray(batch["flipped"]).all() == bool(hflip) and valid.sum() >= 4
        for b, n in zip(*np.nonzero(valid), strict=True):
            points, box = contours[b, n], boxes[b, n]
            assert (points >= box[:2] - 1.0).all() and (points <= box[2:] + 1.0).all(), (b, n)
            widest = points[:, 0].max() - points[:, 0].min()
            assert widest >= 0.5 * (box[2] - box[0]) - 2, (b, n)
        assert not contours[~valid].any()


def test_instance_filter_drops_what_coco_seg_drops_and_counts_it():
    """xieenze/PolarMask coco_seg.py _parse_ann_info (line 139): an annotation is skipped when
    area <= 15, or w < 10 and h < 10, or its mask has fewer than 15 pixels, crowd or not."""
    from instseg_jax.input import report
    from instseg_jax.input.transforms import TransformConfig, transform

    image = np.zeros((64, 64, 3), np.uint8)
    masks = np.zeros((5, 64, 64), bool)
    masks[0, 2:5, 2:7] = True  # 15 px, 5 x 3: dropped
    masks[1, 10:22, 2:11] = True  # 9 wide, 12 high: kept
    masks[2, 30:39, 30:39] = True  # 9 x 9 = 81 px: dropped (both sides < 10)
    masks[3, 40:44, 2:30] = True  # 28 x 4: kept
    masks[4, 50:53, 50:55] = True  # a crowd region of 15 px: dropped by the filter
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    example = {
        "image": image, "masks": masks, "boxes": np.array(boxes, np.float32),
        "classes": np.zeros(5, np.int32), "iscrowd": np.array([0, 0, 0, 0, 1], bool),
        "image_id": 1,
    }  # fmt: skip

    def reference_keeps(m, box):
        w, h = box[2] - box[0], box[3] - box[1]
        return not (m.sum() <= 15 or (w < 10 and h < 10) or m.sum() < 15)

    expected = [
        reference_keeps(m, b) and not c
        for m, b, c in zip(masks, boxes, example["iscrowd"], strict=True)
    ]
    config = TransformConfig(
        canvas_hw=(64, 64), short_side=(64,), max_long_side=64, hflip=0.0,
        instance_filter="coco_seg", box_masks=False,
    )  # fmt: skip
    counts = report.new_counts()
    out = transform(example, config, np.random.default_rng(0), counts)
    kept = out["gt_boxes"][out["gt_valid"]]
    np.testing.assert_allclose(kept, np.array(boxes, np.float32)[expected])
    assert report.as_dict(counts)["small_instance_dropped"] == 3
    assert report.as_dict(counts)["crowd_dropped"] == 0
    off = transform(example, dataclasses.replace(config, instance_filter="none"),
                    np.random.default_rng(0), report.new_counts())  # fmt: skip
    assert off["gt_valid"].sum() == 4  # every non-crowd instance


def test_box_iou_loss_is_mmdetections_iou_loss():
    """mmdet/models/losses/iou_loss.py iou_loss (-log IoU, IoU >= 1e-6) with bbox_overlaps'
    inclusive pixel boxes (+1 on widths, mmdet/core/bbox/geometry.py): a continuous box
    [x1, x2) is the inclusive box (x1, x2 - 1)."""

    def mmdet_iou(a, b):
        lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
        wh = np.clip(rb - lt + 1, 0, None)
        inter = wh[0] * wh[1]
        area = [(v[2] - v[0] + 1) * (v[3] - v[1] + 1) for v in (a, b)]
        return max(inter / (area[0] + area[1] - inter), 1e-6)

    point = np.array([50.0, 40.0])
    predicted = np.array([[10.0, 5.0, 20.0, 8.0], [3.0, 4.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    target = np.array([[12.0, 6.0, 15.0, 9.0], [3.0, 4.0, 2.0, 1.0], [30.0, 30.0, 30.0, 30.0]])
    weights = np.array([0.7, 0.2, 0.5])

    def inclusive(d):
        return np.array(
            [point[0] - d[0], point[1] - d[1], point[0] + d[2] - 1, point[1] + d[3] - 1]
        )

    losses = [
        -math.log(mmdet_iou(inclusive(p), inclusive(t)))
        for p, t in zip(predicted, target, strict=True)
    ]
    expected = float(np.dot(losses, weights) / weights.sum())
    got = polarmask.box_iou_loss(
        jnp.asarray(predicted), jnp.asarray(target), weights, weights.sum()
    )
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_detections_score_class_times_centerness_plus_half_and_nms_the_branch_boxes():
    """polarmask_head.py get_bboxes_single: candidates above score_thr 0.05 on the class score,
    scored class x (centerness + 0.5) (line 463, score_factors), NMS at 0.5 on the box branch's
    boxes clipped to the image (distance2bbox max_shape; mask_nms False), not on the polygons.
    Two candidates of one class whose branch boxes overlap (IoU 0.81) but whose ray polygons
    do not: one survives; a third of another class stays."""
    cfg = polarmask.PolarMaskConfig(
        num_classes=2, canvas_hw=(128, 128), detections_per_image=5, candidates_per_level=20
    )
    points = cfg.locations()[0]
    t = len(points)
    first, second, third = (int(np.flatnonzero((points == p).all(1))[0]) for p in
                            ([36.0, 36.0], [44.0, 36.0], [100.0, 100.0]))  # fmt: skip
    logits = np.full((1, t, 2), -9.0, np.float32)
    ctr = np.full((1, t), -9.0, np.float32)
    boxes = np.full((1, t, 4), 1.0, np.float32)
    rays = np.full((1, t, cfg.num_rays), 1.0, np.float32)
    probs, ctrs = {first: 0.6, second: 0.8, third: 0.3}, {first: 0.9, second: 0.2, third: 0.5}
    for loc, p in probs.items():
        logits[0, loc, 0 if loc != third else 1] = math.log(p / (1 - p))
        ctr[0, loc] = math.log(ctrs[loc] / (1 - ctrs[loc]))
        boxes[0, loc] = [20.0, 20.0, 20.0, 20.0]  # 40 x 40 about the location
        rays[0, loc] = 3.0  # small polygons: no overlap between first and second
    boxes[0, third] = [10.0, 10.0, 40.0, 40.0]  # reaches past the 128 x 128 image
    predictions = {"class_logits": logits, "distances": boxes, "centerness_logits": ctr,
                   "rays": rays}  # fmt: skip
    batch = {"image_hw": np.array([[128, 128]], np.int32)}
    kept = jax.jit(polarmask.PolarMask(cfg).select_detections)(predictions, batch)
    valid = np.asarray(kept["valid"][0])
    scores = np.asarray(kept["scores"][0])[valid]
    locations = np.asarray(kept["location"][0])[valid]
    expected = {loc: probs[loc] * (ctrs[loc] + 0.5) for loc in probs}
    # first: 0.6 x 1.4 = 0.84 beats second: 0.8 x 0.7 = 0.56 (the plain product ranks alike)
    assert sorted(locations.tolist()) == sorted([first, third])
    for loc, score in zip(locations, scores, strict=True):
        assert score == pytest.approx(expected[int(loc)], rel=1e-5)
    third_box = np.asarray(kept["boxes"][0])[valid][locations == third][0]
    np.testing.assert_allclose(third_box, [90.0, 90.0, 128.0, 128.0], atol=1e-4)


def test_polygon_region_rasterises_inside_the_polygons_box():
    square = np.array([[2.0, 3.0], [7.0, 3.0], [7.0, 9.0], [2.0, 9.0]])
    region, top, left = polygon_region(square, (12, 10))
    full = np.zeros((12, 10), bool)
    full[top : top + region.shape[0], left : left + region.shape[1]] = region
    expected = np.zeros((12, 10), bool)
    expected[3:9, 2:7] = True  # pixel (r, c) covers [c, c + 1) x [r, r + 1)
    np.testing.assert_array_equal(full, expected)
    clamped, _, _ = polygon_region(square + [-5.0, 0.0], (12, 10))  # x < 0 clamps to 0
    assert clamped.shape == (6, 2) and clamped.all()
    empty, _, _ = polygon_region(np.zeros((36, 2)), (12, 10))
    assert empty.size == 0


def test_polar_iou_loss_and_centerness():
    target = np.array([[2.0, 4.0, 4.0, 1.0]])
    predicted = np.array([[1.0, 4.0, 8.0, 1.0]])
    expected = math.log((2 + 4 + 8 + 1) / (1 + 4 + 4 + 1))
    loss = polarmask.polar_iou_loss(jnp.asarray(predicted), jnp.asarray(target), 1.0, 1.0)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(polarmask.polar_iou_loss(target, target, 1.0, 1.0)) == pytest.approx(0.0)
    assert float(polarmask.polar_centerness(jnp.asarray(target))[0]) == pytest.approx(0.5)


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(polarmask, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert step.batch["gt_contours"].shape[-2:] == (polarmask.CONTOUR_POINTS, 2)
    assert np.isfinite(step.total)
    assert_total_is_the_sum(step, ("loss_cls", "loss_mask", "loss_centerness", "loss_box_reg"))
    assert float(metrics["loss_mask"]) > 0 and float(metrics["loss_box_reg"]) > 0
    assert float(jnp.abs(grads["head"]["bbox_pred"]["kernel"]).sum()) > 0  # the box branch
    assert float(jnp.abs(grads["head"]["ray_pred"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["head"]["mask_conv0"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["head"]["centerness"]["kernel"]).sum()) > 0

    k = cfg.detections_per_image
    assert det["polygons"].shape == (2, k, cfg.num_rays, 2) and det["boxes"].shape == (2, k, 4)
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)


OVERFIT = [
    "--config.input.synthetic_length=4",
    "--config.input.global_batch=4",
    "--config.eval.global_batch=4",
    "--config.input.hflip=0.0",
]


def oracle_polygon_ap(overrides) -> float:
    """segm AP of the polygons PolarMask's own targets draw on the 4 over-fitting scenes
    (experiments/benchmarks/polarmask_ray_ceiling.py). The synthetic scenes occlude: an instance
    cut into a crescent or an L by the one drawn over it is no polygon of rays from one centre,
    so this is the representation's ceiling there, whatever the training."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"))
    import polarmask_ray_ceiling

    return polarmask_ray_ceiling.ceiling(SMOKE, overrides)["segm"][0]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipes' compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    """Trained to 0.9 of the ceiling its polygons have on these scenes (`oracle_polygon_ap`,
    measured 0.784 under the reference's ray rule, 0.889 under the every-edge rule before
    bead53c; the issue's absolute 0.9 is above it). Centre sampling within 0.5 strides
    of the mass centre, not the reference's 1.5: farther locations of an occluded instance cast
    their rays from elsewhere in its shape (measured with 1.5: segm AP 0.676 after 300 steps and
    0.677 after 1000, two occluded instances at IoU 0.27 and 0.44 whose mass-centre polygons
    reach 0.77 and 0.95; with 0.5: 0.856)."""
    from tests.methods.overfit import overfit_report

    ceiling = oracle_polygon_ap(OVERFIT)
    report = overfit_report(
        SMOKE.split(":")[0],
        tmp_path / "overfit",
        steps=300,
        overrides=[
            f"--config.model.compute_dtype={dtype}",
            "--config.optim.name=adamw",
            "--config.optim.lr=0.002",
            "--config.model.center_sampling_radius=0.5",
        ],
    )
    assert report["segm"]["AP"] >= 0.9 * ceiling, (ceiling, report["segm"])


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("polarmask")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0


def test_coco_recipe_trains_conv_biases_at_twice_the_rate_without_decay():
    """mmdet/apis/train.py build_optimizer with polar_768_1x_r50.py's paramwise_options
    (bias_lr_mult 2, bias_decay_mult 0): a parameter named *.bias outside the norm layers
    trains at 2 x lr with no weight decay; weights at lr with decay 1e-4. First SGD step
    (momentum trace = gradient): update = -lr x (gradient + decay x parameter)."""
    from instseg_jax import train as train_lib

    config = config_lib.load("experiments/polarmask_r50_fpn_coco_1x.py")
    with config.unlocked():
        config.optim.clip_norm = 0.0
    ones = {"kernel": jnp.ones(3), "bias": jnp.ones(3)}
    params = {"head": {"cls_conv0": dict(ones), "cls_norm0": {"scale": jnp.ones(3)}}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    tx = train_lib.optimizer(config, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    lr = float(train_lib.learning_rate(config)(0))
    assert lr == pytest.approx(0.01 / 3)  # warmup_ratio 1/3 at the first step
    conv = updates["head"]["cls_conv0"]
    np.testing.assert_allclose(conv["kernel"], -lr * (0.5 + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(conv["bias"], -2 * lr * 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["cls_norm0"]["scale"], -lr * 0.5, rtol=1e-6)


def test_contours_over_the_maximum_keep_a_point_near_every_contour_pixel():
    """The thin-armed shape at 3x: its canvas contour exceeds CONTOUR_POINTS; the grid keeps at
    most that many, every contour pixel within a few pixels of a kept one (the arms' tips
    included), and the instance is counted as contour_subsampled."""
    from instseg_jax.input import report
    from instseg_jax.input.contours import outer_contour_pixels
    from instseg_jax.input.instances import InstanceMasks, tight_crop
    from instseg_jax.input.transforms import _contours

    mask, _ = thin_armed_shape()
    crop, origin = tight_crop(mask)
    masks = InstanceMasks([crop], [origin], mask.shape)
    counts = report.new_counts()
    length = polarmask.CONTOUR_POINTS
    ours = _contours(masks, [0], 1, length, 3.0, (0, 0), (480, 480), False, counts)[0]
    big = np.kron(mask, np.ones((3, 3), bool))  # nearest upsampling by 3
    rows, cols = outer_contour_pixels(big)
    full = np.stack([cols + 0.5, rows + 0.5], axis=1)
    assert len(full) > length and len(np.unique(ours, axis=0)) <= length
    assert report.as_dict(counts)["contour_subsampled"] == 1
    gap = np.sqrt(((full[:, None, :] - ours[None, :, :]) ** 2).sum(-1)).min(axis=1)
    side = len(full) // length + 1  # the cell side the grid needs for this contour
    assert gap.max() <= side * math.sqrt(2), (gap.max(), side)
