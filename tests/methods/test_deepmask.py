"""DeepMask (instseg_jax/methods/deepmask.py): the window rules and mask targets against float64
NumPy encodings of facebookresearch/deepmask's DataSampler.lua (tests/methods/
deepmask_reference.py: jitterBox, createBBstruct, negSamplingBB, cropMask), window crops and the
loss on known answers, one smoke step, and (slow) over-fitting 4 scenes and the COCO
experiment's step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.methods import deepmask
from tests.methods import deepmask_reference as ref
from tests.methods.smoke import assert_total_is_the_sum, magnitude, smoke_step

SMOKE = "experiments/deepmask_nuclei.py:smoke"

# The reference's window geometry (train.lua): iSz 160, wSz 192, objSz 92, shift 16, scale .25.
CFG = deepmask.DeepMaskConfig(
    num_classes=1, windows_per_image=6, positive_fraction=0.5, negative_tries=3
)


def test_mask_threshold_outside_0_1_names_the_field():
    from instseg_jax.config import ConfigValueError

    with pytest.raises(ConfigValueError, match=r"model\.mask_threshold must be in \(0, 1\)"):
        dataclasses.replace(CFG, mask_threshold=1.0)


def scene():
    """Four slots: a 100 x 60 box, a 9 x 9 box (area 81 < 100: never a positive, still blocks
    negatives), a 300 x 200 box, and padding."""
    boxes = np.array(
        [[100, 120, 200, 180], [400, 50, 409, 59], [250, 300, 550, 500], [0, 0, 0, 0]],
        np.float32,
    )
    valid = np.array([True, True, True, False])
    return boxes, valid


def test_positive_windows_are_jitterbox_about_the_eligible_objects():
    boxes, valid = scene()
    rng = np.random.default_rng(0)
    draws = {k: rng.random(v.shape).astype(np.float32) for k, v in _draw_shapes().items()}
    draws["instance"] = np.array([0.1, 0.6, 0.99], np.float32)  # eligible: slots 0 and 2
    out = jax.jit(lambda d: deepmask.sample_windows(d, boxes, valid, jnp.array([640, 640]), CFG))(
        draws
    )
    assert np.asarray(out["instance"][:3]).tolist() == [0, 2, 2]
    for p, instance in enumerate([0, 2, 2]):
        x, y, w, h = ref.jitter_box(
            boxes[instance].astype(np.float64),
            draws["scale"][p],
            draws["dx"][p],
            draws["dy"][p],
            CFG.object_size,
            CFG.window,
            CFG.scale_jitter,
            CFG.shift,
        )
        np.testing.assert_allclose(out["windows"][p], [x, y, x + w, y + h], rtol=1e-5, atol=1e-3)
        inner = 160 / 192 * w
        centre = (x + w / 2, y + h / 2)
        np.testing.assert_allclose(
            out["inner"][p],
            [
                centre[0] - inner / 2,
                centre[1] - inner / 2,
                centre[0] + inner / 2,
                centre[1] + inner / 2,
            ],
            rtol=1e-5,
            atol=1e-3,
        )
    assert np.asarray(out["positive"]).tolist() == [True] * 3 + [False] * 3
    assert np.asarray(out["valid"]).all()
    # No eligible object (only the small one): the positive slots are invalid.
    alone = jax.jit(
        lambda d: deepmask.sample_windows(
            d, boxes, np.array([False, True, False, False]), jnp.array([640, 640]), CFG
        )
    )(draws)
    assert np.asarray(alone["valid"]).tolist() == [False] * 3 + [True] * 3


def _draw_shapes():
    return jax.eval_shape(lambda k: deepmask.window_draws(k, CFG), jax.random.key(0))


def test_canonical_scales_are_createbbstructs_quantisation():
    sides = np.array([92.0, 92.1, 100.0, 46.0, 45.0, 300.0, 5.0, 1000.0])
    boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides / 2], 1)
    boxes = boxes.astype(np.float32)
    got = np.asarray(jax.jit(lambda b: deepmask.canonical_scales(b, CFG))(boxes))
    expected = [ref.quantised_scale(b, CFG.object_size, CFG.scale_jitter) for b in boxes]
    np.testing.assert_allclose(got, expected)
    assert expected[0] == 0.25  # objSz itself is filed a step up: the first fitting s wins


def test_negative_windows_follow_negsamplingbb():
    """Tries placed at, near and far from objects, at scales that do and do not see them:
    the first negative try is kept, else the last, as the reference's loop."""
    boxes, valid = scene()
    grid = CFG.negative_scale_grid()  # -3 .. 2 by 0.25: 21 scales

    def u_of_scale(log2_scale):
        return (np.argmin(np.abs(grid - log2_scale)) + 0.5) / len(grid)

    # (x, y, scale) tries of the three negative slots, canvas pixels (the image is 640 x 640).
    tries = [
        # at the first object's centre, then 40 px off at scale 0 (40 < 48: blocked), then far
        [(150.0, 150.0, 0.0), (190.0, 150.0, 0.0), (600.0, 600.0, 0.0)],
        # 40 px off at scale -1 (20 in the window's frame: blocked); 60 px off at scale 0: free
        [(190.0, 150.0, -1.0), (150.0, 210.0, 0.0), (10.0, 10.0, 0.0)],
        # every try on an object: the last is kept and counted
        [(404.0, 54.0, 1.0), (400.0, 400.0, -1.0), (150.0, 150.0, 2.0)],
    ]
    draws = {k: np.zeros(v.shape, np.float32) for k, v in _draw_shapes().items()}
    draws["negative_scale"] = np.array([[u_of_scale(t[2]) for t in slot] for slot in tries])
    draws["negative_x"] = np.array([[t[0] / 640 for t in slot] for slot in tries])
    draws["negative_y"] = np.array([[t[1] / 640 for t in slot] for slot in tries])
    draws = {k: np.asarray(v, np.float32) for k, v in draws.items()}
    out = jax.jit(lambda d: deepmask.sample_windows(d, boxes, valid, jnp.array([640, 640]), CFG))(
        draws
    )
    found = []
    for n, slot in enumerate(tries):
        slot = [
            (float(np.float32(x / 640) * 640), float(np.float32(y / 640) * 640), s)
            for x, y, s in slot
        ]
        (x, y, w, h), ok = ref.negative_window(
            slot,
            boxes[valid].astype(np.float64),
            CFG.object_size,
            CFG.window,
            CFG.scale_jitter,
            CFG.shift,
        )
        np.testing.assert_allclose(out["windows"][3 + n], [x, y, x + w, y + h], rtol=1e-5)
        found.append(ok)
    assert found == [True, True, False]  # the scene exercises each branch
    assert np.asarray(out["negative_found"]).tolist() == [True] * 3 + found
    chosen_x = np.asarray(out["windows"][3:, 0] + out["windows"][3:, 2]) / 2
    np.testing.assert_allclose(chosen_x, [600.0, 150.0, 150.0], atol=1e-3)


def test_scale_negatives_are_about_objects_one_to_two_octaves_off():
    """The paper's second negative rule (model.scale_negative_fraction): centred within the
    shift, the window's scale 1 to 2 octaves from the object's canonical one, either way."""
    boxes, valid = scene()
    cfg = deepmask.DeepMaskConfig(
        num_classes=1, windows_per_image=40, negative_tries=1, scale_negative_fraction=1.0
    )
    draws = jax.jit(lambda k: deepmask.window_draws(k, cfg))(jax.random.key(3))
    out = jax.jit(lambda d: deepmask.sample_windows(d, boxes, valid, jnp.array([640, 640]), cfg))(
        draws
    )
    windows = np.asarray(out["windows"][20:], np.float64)
    side = windows[:, 2] - windows[:, 0]
    centre = (windows[:, :2] + windows[:, 2:]) / 2
    eligible = boxes[[0, 2]].astype(np.float64)  # the 9 x 9 box is too small
    max_dim = np.maximum(eligible[:, 2] - eligible[:, 0], eligible[:, 3] - eligible[:, 1])
    offset = np.log2(side[:, None] / (cfg.window * max_dim[None] / cfg.object_size))  # [20, 2]
    shift = np.abs(centre[:, None] - (eligible[None, :, :2] + eligible[None, :, 2:]) / 2).max(-1)
    about = (shift <= cfg.shift * side[:, None] / cfg.window + 1e-3) & (
        (np.abs(offset) >= 1 - 1e-5) & (np.abs(offset) <= 2 + 1e-5)
    )
    assert about.any(axis=1).all()
    assert (offset[about] > 0).any() and (offset[about] < 0).any()
    assert not np.asarray(out["positive"][20:]).any() and np.asarray(out["negative_found"]).all()


def test_mask_targets_are_cropmasks_of_the_central_region():
    """An ellipse and a rectangle, their box crops rasterised at 112 (what the input pipeline
    gives), against cropMask's target of the analytic shapes: equal away from the outlines."""
    mc, size = 112, 112
    ellipse_box = np.array([40.0, 60.0, 140.0, 120.0])  # centre (90, 90), radii 50 and 30

    def ellipse(x, y):
        return ((x - 90.0) / 50.0) ** 2 + ((y - 90.0) / 30.0) ** 2 <= 1.0

    rect_box = np.array([200.0, 30.0, 230.0, 100.0])

    def rect(x, y):
        return (x >= 200) & (x < 230) & (y >= 30) & (y < 100)

    def box_crop(inside, box):
        c = (np.arange(mc) + 0.5) / mc
        yy, xx = np.meshgrid(
            box[1] + c * (box[3] - box[1]), box[0] + c * (box[2] - box[0]), indexing="ij"
        )
        return inside(xx, yy).astype(np.uint8)

    gt_masks = np.stack([box_crop(ellipse, ellipse_box), box_crop(rect, rect_box)])
    gt_boxes = np.stack([ellipse_box, rect_box]).astype(np.float32)
    # Central regions: about the ellipse (off-centre, 1.37 px per cell), about the rectangle at
    # a fine scale, and one that holds nothing of the ellipse.
    inner = np.array(
        [[20.3, 17.9, 173.7, 171.3], [195.0, 40.0, 235.0, 80.0], [300.0, 300.0, 400.0, 400.0]],
        np.float32,
    )
    instance = np.array([0, 1, 0], np.int32)
    got = np.asarray(
        jax.jit(lambda: deepmask.window_mask_targets(gt_masks, gt_boxes, instance, inner, size))()
    )
    for w, (shape, outline) in enumerate([(ellipse, ellipse), (rect, rect), (ellipse, ellipse)]):
        x0, y0 = float(inner[w, 0]), float(inner[w, 1])
        side = float(inner[w, 2] - inner[w, 0])
        expected = ref.crop_mask(shape, (x0, y0, side), size)
        disagree = got[w] != expected
        # Away from the outline (the box crop's own resolution: a crop cell), they agree.
        per_pixel = size / side
        c = np.arange(size) + 0.5
        yy, xx = np.meshgrid(
            (np.round(y0 * per_pixel) + c) / per_pixel,
            (np.round(x0 * per_pixel) + c) / per_pixel,
            indexing="ij",
        )
        reach = max((gt_boxes[instance[w], 2] - gt_boxes[instance[w], 0]) / mc, 1 / per_pixel)
        near = np.zeros_like(disagree)
        for dy in (-1.5, 0, 1.5):
            for dx in (-1.5, 0, 1.5):
                near |= outline(xx + dx * reach, yy + dy * reach) != outline(xx, yy)
        assert not (disagree & ~near).any(), w
        assert disagree.mean() < 0.02, (w, disagree.mean())
    assert got[0].sum() > 2000 and got[1].sum() > 3000 and got[2].sum() == 0


def test_window_crops_read_the_image_and_grey_outside_it():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    windows = np.array([[8.0, 16.0, 24.0, 32.0], [56.0, -4.0, 72.0, 12.0]], np.float32)
    crops = np.asarray(
        jax.jit(lambda: deepmask.crop_windows(image, jnp.array([40, 60]), windows, 16))()
    )
    np.testing.assert_allclose(crops[0], image[16:32, 8:24], atol=1e-4)  # one pixel per cell
    # The second window: rows -4..11 (4 above the image grey), columns 56..71 (60 on grey).
    expected = np.full((16, 16, 3), 127.5)
    expected[4:, :4] = image[0:12, 56:60]
    np.testing.assert_allclose(crops[1], expected, atol=1e-4)


def test_losses_are_soft_margin_with_the_references_weighting():
    rng = np.random.default_rng(2)
    b, w, g = 2, 4, 8
    cfg = deepmask.DeepMaskConfig(num_classes=1, windows_per_image=w, mask_target_size=g)
    mask_logits = rng.normal(size=(b, w, g, g)).astype(np.float32)
    masks = (rng.random((b, w, g, g)) > 0.5).astype(np.float32)
    score_logits = rng.normal(size=(b, w)).astype(np.float32)
    positive = np.array([[True, True, False, False]] * 2)
    valid = np.array([[True, False, True, True], [True, True, True, True]])
    outputs = {
        "mask_logits": mask_logits,
        "score_logits": score_logits,
        "targets": {
            "masks": masks,
            "positive": positive,
            "valid": valid,
            "negative_found": np.ones((b, w), bool),
        },
    }
    total, metrics = jax.jit(lambda o: deepmask.loss_fn(o, {}, cfg))(outputs)

    def soft_margin(f, y):  # log(1 + exp(-y f)), y in {-1, 1}: nn.SoftMarginCriterion
        return np.log1p(np.exp(-y * f.astype(np.float64)))

    pos = positive & valid
    per_window = soft_margin(mask_logits, 2 * masks - 1).mean(axis=(2, 3))
    expected_mask = 32.0 * per_window[pos].mean()
    expected_score = soft_margin(score_logits, np.where(pos, 1.0, -1.0))[valid].mean()
    assert float(metrics["loss_mask"]) == pytest.approx(expected_mask, rel=1e-5)
    assert float(metrics["loss_score"]) == pytest.approx(expected_score, rel=1e-5)
    assert float(total) == pytest.approx(expected_mask + expected_score, rel=1e-5)


def test_proposals_take_tight_boxes_and_the_threshold_lands_at_one_half():
    cfg = deepmask.DeepMaskConfig(num_classes=1, candidates=3, detections_per_image=2)
    m = cfg.mask_size
    logits = np.full((3, m, m), -5.0, np.float32)
    logits[0, 10:30, 20:50] = 5.0  # rows 10..29, columns 20..49
    logits[1, 0:56, 0:28] = 5.0
    scores = np.array([2.0, 1.0, 0.5], np.float32)
    regions = np.array(
        [[0.0, 0.0, 112.0, 112.0], [100.0, 100.0, 156.0, 156.0], [0, 0, 56, 56]], np.float32
    )
    ok = np.array([True, True, True])  # the third window's mask is empty: never kept
    image_hw = np.array([200, 200], np.int32)  # every box inside the image
    out = jax.jit(lambda: deepmask.select_proposals(logits, scores, ok, regions, cfg, image_hw))()
    np.testing.assert_allclose(out["boxes"], [[40, 20, 100, 60], [100, 100, 128, 156]])
    np.testing.assert_allclose(out["scores"], 1 / (1 + np.exp(-scores[:2])), rtol=1e-6)
    assert np.asarray(out["valid"]).all()
    assert (np.asarray(out["masks"]) >= 0.5).all()  # each box is its mask's tight box


def test_proposals_keep_the_masks_part_inside_the_image():
    """A window across the image's left border (InferDeepMask.lua getTopMasks writes only the
    pixels within the image): the box is the mask's part inside the image and the pasted mask
    is that part unsqueezed. Before the fix the box reached past the border and the later clip
    of boxes to the image squeezed a 26-pixel mask into 14 pixels."""
    from instseg_jax.detections import paste_box_mask

    cfg = deepmask.DeepMaskConfig(num_classes=1, candidates=1, detections_per_image=1)
    m = cfg.mask_size
    logits = np.full((1, m, m), -5.0, np.float32)
    logits[0, 10:40, 4:30] = 5.0  # one pixel per cell: canvas x -12..13, y 50..79
    regions = np.array([[-16.0, 40.0, 40.0, 96.0]], np.float32)
    image_hw = np.array([100, 120], np.int32)
    out = jax.jit(
        lambda: deepmask.select_proposals(
            logits, np.array([1.0], np.float32), np.array([True]), regions, cfg, image_hw
        )
    )()
    np.testing.assert_allclose(out["boxes"][0], [0, 50, 14, 80], atol=1e-4)
    region, top, left = paste_box_mask(np.asarray(out["masks"][0]), out["boxes"][0], (100, 120))
    pasted = np.zeros((100, 120), bool)
    pasted[top : top + region.shape[0], left : left + region.shape[1]] = region
    expected = np.zeros((100, 120), bool)
    expected[50:80, 0:14] = True
    assert (pasted == expected).all(), np.argwhere(pasted != expected)[:5]


def test_mask_nms_drops_a_duplicate_whose_stray_blob_widens_its_box():
    """Two windows' masks of one 20 x 20 square, the second with a 3 x 3 stray blob (tight boxes
    IoU 400 / 1849 = 0.22, masks IoU 400 / 409 = 0.98), and a third, disjoint square: box NMS
    at 0.5 keeps all three, NMS on the masks (model.nms_mask_stride) drops the duplicate."""
    m = 56
    logits = np.full((3, m, m), -5.0, np.float32)
    logits[0, 10:30, 10:30] = 5.0
    logits[1, 10:30, 10:30] = 5.0
    logits[1, 50:53, 50:53] = 5.0
    logits[2, 35:46, 35:46] = 5.0
    regions = np.tile(np.array([[0.0, 0.0, 56.0, 56.0]], np.float32), (3, 1))  # 1 px per cell
    scores = np.array([3.0, 2.0, 1.0], np.float32)
    ok = np.ones(3, bool)
    image_hw = np.array([64, 64], np.int32)
    kept = {}
    for stride in (0, 1):
        cfg = deepmask.DeepMaskConfig(
            num_classes=1,
            canvas_hw=(64, 64),
            candidates=3,
            detections_per_image=3,
            nms_threshold=0.5,
            nms_mask_stride=stride,
        )
        out = jax.jit(
            lambda cfg=cfg: deepmask.select_proposals(logits, scores, ok, regions, cfg, image_hw)
        )()
        kept[stride] = np.asarray(out["scores"])[np.asarray(out["valid"])]
    np.testing.assert_allclose(kept[0], 1 / (1 + np.exp(-scores)), rtol=1e-6)
    np.testing.assert_allclose(kept[1], 1 / (1 + np.exp(-scores[[0, 2]])), rtol=1e-6)


def test_one_step_has_finite_loss_gradients_everywhere_and_static_detections():
    step = smoke_step(deepmask, SMOKE)
    metrics, grads, det, cfg = step.metrics, step.grads, step.detections, step.cfg
    assert np.isfinite(step.total)
    assert_total_is_the_sum(step, ("loss_mask", "loss_score"))
    assert float(metrics["positive_windows"]) == cfg.positive_windows
    for name in ("reduce", "embed", "mask", "score_hidden", "score"):
        assert magnitude(grads["heads"][name]) > 0, name
    assert magnitude(grads["backbone"]) > 0
    k, m = cfg.detections_per_image, cfg.mask_size
    assert det["masks"].shape == (2, k, m, m) and det["boxes"].shape == (2, k, 4)
    assert det["scores"].shape == det["classes"].shape == det["valid"].shape == (2, k)
    assert not np.asarray(det["classes"]).any()


@pytest.mark.parametrize("evaluator", ["hotcoco", "pycocotools"])
def test_class_agnostic_evaluation_matches_any_class(evaluator):
    """eval.class_agnostic (the COCO recipe's): proposals of class 0 recall objects of every
    class; per class, the second object is missed."""
    from pycocotools.coco import COCO

    from instseg_jax.evaluate import coco_evaluate

    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 30, 30],
                "area": 900,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 2,
                "bbox": [50, 50, 40, 20],
                "area": 800,
                "iscrowd": 0,
            },
        ],
    }
    gt.createIndex()
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 20], "score": 0.8},
    ]
    agnostic = coco_evaluate(
        gt, results, ("bbox",), False, evaluator=evaluator, class_agnostic=True
    )
    per_class = coco_evaluate(gt, results, ("bbox",), False, evaluator=evaluator)
    assert agnostic["bbox"][0] == pytest.approx(1.0)
    assert per_class["bbox"][0] == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.xfail(
    reason="measured 2026-12-07 with these settings: segm AP 0.662 (AP50 0.966, AP75 0.718, "
    "AR@100 0.743; 0.183 before the fixes of c61c4ff and 6ddef88), short of the 0.9 bar: mask "
    "precision on thin and occluded shapes in the smoke's 32 px window (4 x 4 feature cells; best "
    "window IoU 0.59-0.79 for 5 of 14 objects) and no score preference among positive-band "
    "windows (experiments/benchmarks/RESULTS.md, DeepMask over-fitting: diagnosis and fixes)",
    strict=False,
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the COCO recipe's compute dtype
def test_overfits_four_scenes(tmp_path, dtype):
    from tests.methods.overfit import overfit_report

    report = overfit_report(
        SMOKE.split(":")[0],
        tmp_path / "overfit",
        steps=600,
        overrides=[
            f"--config.model.compute_dtype={dtype}",
            "--config.optim.name=adamw",
            "--config.optim.lr=0.002",
            "--config.model.windows_per_image=32",
            # The reference's head (DeepMask.lua: a 1x1 conv to 128, a 512-d embedding) in
            # place of the smoke's 16 and 64, whose masks of thin shapes stayed coarse.
            "--config.model.trunk_channels=128",
            "--config.model.embedding=512",
            # The reference's rule for test scales: the half-octave steps that bring the
            # objects to objSz. The 4 scenes' objects have larger sides of 13 to 73 px, so
            # 19 / 73 .. 19 / 13 = 2^-1.94 .. 2^0.55: 2^-2 .. 2^0.5. Finer scales only add
            # windows on object parts (at 2^1 and 2^1.5 such windows scored as high as the
            # right ones, with fragment masks).
            "--config.model.test_scales=(-2.0, -1.5, -1.0, -0.5, 0.0, 0.5)",
            # NMS on the masks, not their tight boxes (model.nms_mask_stride).
            "--config.model.nms_mask_stride=1",
        ],
    )
    assert report["segm"]["AP"] >= 0.9, report["segm"]


@pytest.mark.slow
def test_the_coco_experiment_compiles_and_steps_at_its_real_input_size():
    from tests.methods.overfit import coco_step_result

    result = coco_step_result("deepmask")
    assert np.isfinite(result["loss"]) and result["step_s"] > 0
