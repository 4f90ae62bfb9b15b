"""Panoptic FPN's combination and panoptic quality on hand-made cases with answers worked out
by hand (panopticapi is not on the package index; its rules are the module docstring's) and on
stored random cases against torchmetrics' implementation; the panoptic map of evaluation and
prediction from ground-truth detections."""

import numpy as np
import pytest

from instseg_jax.panoptic import PanopticQuality, combine

THING, STUFF = 1, 2
CATEGORIES = {THING: True, STUFF: False}


def two_blocks():
    gt = np.zeros((4, 8), np.int32)
    gt[:, :4] = 1  # a thing, 16 px
    gt[:, 4:] = 2  # stuff, 16 px
    segments = [{"id": 1, "category_id": THING}, {"id": 2, "category_id": STUFF}]
    return gt, segments


def test_matched_segments_score_their_iou():
    gt, gt_segments = two_blocks()
    pred = np.zeros_like(gt)
    pred[:, :3] = 5  # 12 of the thing's 16 px: IoU 0.75
    pred[:, 3:] = 6  # the stuff and one more column: IoU 16 / 20 = 0.8
    pq = PanopticQuality(CATEGORIES)
    pq.add(
        gt, gt_segments, pred, [{"id": 5, "category_id": THING}, {"id": 6, "category_id": STUFF}]
    )
    s = pq.summary()
    assert s["Things"]["PQ"] == pytest.approx(0.75) and s["Stuff"]["PQ"] == pytest.approx(0.8)
    assert s["All"]["PQ"] == pytest.approx(0.775) and s["All"]["RQ"] == 1.0
    assert s["All"]["SQ"] == pytest.approx(0.775) and s["All"]["n"] == 2


def test_false_positives_and_negatives_halve_the_recognition_quality():
    gt, gt_segments = two_blocks()
    gt[0, 6:] = 3  # a second thing, missed: a false negative
    gt_segments.append({"id": 3, "category_id": THING})
    pred = np.zeros_like(gt)
    pred[:, :3] = 5  # IoU 0.75 with thing 1
    pred[3, 5:] = 7  # a thing where there is only stuff: a false positive
    pq = PanopticQuality(CATEGORIES)
    pq.add(
        gt, gt_segments, pred, [{"id": 5, "category_id": THING}, {"id": 7, "category_id": THING}]
    )
    thing = pq.summary()["per_category"][THING]
    assert thing["RQ"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert thing["SQ"] == pytest.approx(0.75)
    assert thing["PQ"] == pytest.approx(0.75 / 2)
    stuff = pq.summary()["per_category"][STUFF]
    assert stuff["PQ"] == 0.0 and stuff["RQ"] == 0.0  # unmatched stuff: a false negative


def test_void_pixels_leave_the_union_and_excuse_predictions_on_them():
    gt = np.zeros((4, 8), np.int32)
    gt[:2, :4] = 1  # 8 px; the rest is void
    pred = np.zeros_like(gt)
    pred[:3, :4] = 4  # the 8 px and 4 void px: IoU 8 / (12 + 8 - 8 - 4) = 1
    pred[:, 5:] = 9  # entirely on void: neither a match nor a false positive
    pq = PanopticQuality(CATEGORIES)
    pq.add(gt, [{"id": 1, "category_id": THING}], pred,
           [{"id": 4, "category_id": THING}, {"id": 9, "category_id": THING}])  # fmt: skip
    assert pq.summary()["Things"] == {"PQ": 1.0, "SQ": 1.0, "RQ": 1.0, "n": 1}


def test_crowd_regions_match_nothing_and_excuse_predictions_on_them():
    gt = np.zeros((4, 8), np.int32)
    gt[:, :4] = 1
    gt[:, 4:] = 2
    segments = [
        {"id": 1, "category_id": THING},
        {"id": 2, "category_id": THING, "iscrowd": 1},
    ]
    pred = np.zeros_like(gt)
    pred[:, :4] = 3  # exact
    pred[:, 5:] = 4  # on the crowd region: ignored, and the crowd is no false negative
    pq = PanopticQuality(CATEGORIES)
    pq.add(gt, segments, pred, [{"id": 3, "category_id": THING}, {"id": 4, "category_id": THING}])
    assert pq.summary()["Things"] == {"PQ": 1.0, "SQ": 1.0, "RQ": 1.0, "n": 1}


def test_a_segment_id_without_its_record_is_an_error():
    gt, gt_segments = two_blocks()
    with pytest.raises(ValueError, match="without segments"):
        PanopticQuality(CATEGORIES).add(gt, gt_segments, gt, gt_segments[:1])


def test_combination_follows_score_order_overlap_and_stuff_area():
    h, w = 10, 10
    masks = np.zeros((4, h, w), bool)
    masks[0, 0:5, 0:5] = True  # score 0.9: first, 25 px
    masks[1, 2:7, 2:7] = True  # score 0.8: 9 of 25 px taken (0.36): keeps its 16 free px
    masks[2, 0:4, 0:4] = True  # score 0.7: all taken (1.0 > 0.5): dropped
    masks[3, 8:10, 8:10] = True  # score 0.3: below the score threshold
    scores = np.array([0.9, 0.8, 0.7, 0.3])
    semantic = np.zeros((h, w), np.int32)
    semantic[:, 7:] = 1  # stuff class 1: 30 px, of which instance 1 takes none (cols 2..6)
    semantic[9, :2] = 2  # stuff class 2: 2 px, below the area threshold
    panoptic, segments = combine(
        masks, scores, np.array([0, 1, 0, 0]), semantic, [11, 12], [21, 22], stuff_area=5
    )
    assert [s["category_id"] for s in segments] == [11, 12, 21]
    assert [s.get("instance_index") for s in segments] == [0, 1, None]
    assert (panoptic == 1).sum() == 25
    assert (panoptic == 2).sum() == 16 and not (panoptic[masks[0]] == 2).any()
    assert (panoptic == 3).sum() == 30
    assert (panoptic == 0).sum() == 100 - 25 - 16 - 30


def test_semantic_classes_map_back_to_original_pixels_through_scale_crop_and_flip():
    from instseg_jax.panoptic import semantic_to_original
    from instseg_jax.structures import ImageGeometry

    classes = np.arange(16 * 16, dtype=np.int64).reshape(16, 16)  # stride 4 on a 64 canvas
    for flipped in (False, True):
        geometry = ImageGeometry(
            orig_hw=(20, 30), image_hw=(40, 60), canvas_hw=(64, 64), scale=2.0,
            crop_offset=(0, 0), flipped=flipped,
        )  # fmt: skip
        out = semantic_to_original(classes, geometry)
        assert out.shape == (20, 30)
        for y, x in ((0, 0), (7, 11), (19, 29)):
            cx = (x + 0.5) * 2.0
            cx = 60 - cx if flipped else cx
            assert out[y, x] == classes[int((y + 0.5) * 2.0 // 4), int(cx // 4)]


def test_ground_truth_map_of_a_synthetic_scene_scores_pq_1_against_itself():
    from instseg_jax.input.synthetic import SyntheticSource, ground_truth_map

    example = SyntheticSource(2, (64, 80), seed=4, stuff=True).load(1)
    panoptic, segments = ground_truth_map(example, [1, 2, 3], [4, 5])
    things = [s for s in segments if s["category_id"] <= 3]
    assert len(things) == len(example["masks"])
    assert {s["category_id"] for s in segments} - {1, 2, 3} <= {4, 5}
    assert ((panoptic > 0) == (example["semantic"] != 255)).all()
    pq = PanopticQuality({1: True, 2: True, 3: True, 4: False, 5: False})
    pq.add(panoptic, segments, panoptic, segments)
    assert pq.summary()["All"]["PQ"] == pytest.approx(1.0)


def oracle_detections(source, slots: int = 12):
    """Host detections and batch that are a synthetic source's ground truth: full canvas masks
    and the semantic classes at stride 1 on an identity geometry (scale 1, no crop)."""
    examples = [source.load(i) for i in range(len(source))]
    height, width = source.canvas_hw
    n = len(examples)
    found = {
        "valid": np.zeros((n, slots), bool),
        "scores": np.zeros((n, slots), np.float32),
        "classes": np.zeros((n, slots), np.int32),
        "canvas_masks": np.zeros((n, slots, height, width), np.float32),
        "semantic_classes": np.zeros((n, height, width), np.uint8),
    }
    for b, example in enumerate(examples):
        k = len(example["masks"])
        found["valid"][b, :k] = True
        found["scores"][b, :k] = np.linspace(0.99, 0.6, k)
        found["classes"][b, :k] = example["classes"]
        found["canvas_masks"][b, :k] = example["masks"]
        found["semantic_classes"][b] = np.where(example["semantic"] == 255, 0, example["semantic"])
    batch = {
        "image": np.zeros((n, height, width, 3), np.uint8),
        "image_id": np.asarray([e["image_id"] for e in examples]),
        "example_valid": np.ones(n, bool),
        "orig_hw": np.tile([height, width], (n, 1)),
        "image_hw": np.tile([height, width], (n, 1)),
        "scale": np.ones(n, np.float32),
        "crop_offset": np.zeros((n, 2), np.int32),
    }
    return found, batch


ORACLE_CFG = dict(combine_score=0.5, combine_overlap=0.5, combine_stuff_area=1.0)


def oracle_quality(source, found, batch, subset=False) -> dict:
    """evaluate.PanopticEvaluation's report of host detections against a source."""
    from types import SimpleNamespace

    from instseg_jax import detections, evaluate

    cfg = SimpleNamespace(**ORACLE_CFG, num_stuff_classes=len(source.stuff_category_ids))
    evaluation = evaluate.PanopticEvaluation(source, [1, 2, 3], cfg)
    for b, image_id, geometry in detections.batch_examples(batch):
        instances = detections.image_instances(found, b, geometry)
        evaluation.add_image(image_id, instances, found["semantic_classes"][b], geometry)
    return evaluation.finish(subset, print_table=False)


def test_evaluation_scores_pq_100_for_ground_truth_detections_and_0_for_swapped_stuff():
    from instseg_jax.input.synthetic import SyntheticSource

    source = SyntheticSource(3, (48, 64), seed=2, stuff=True)
    found, batch = oracle_detections(source)
    report = oracle_quality(source, found, batch)
    assert report["PQ"] == pytest.approx(100.0) and report["n_st"] == 2
    assert report["PQ_th"] == pytest.approx(100.0) and report["RQ_st"] == pytest.approx(100.0)
    assert report["images"] == 3 and report["images_without_prediction"] == 0
    semantic = found["semantic_classes"]
    found["semantic_classes"] = np.where(semantic > 0, 3 - semantic, 0).astype(np.uint8)
    report = oracle_quality(source, found, batch)
    assert report["PQ_st"] == 0.0 and report["PQ_th"] == pytest.approx(100.0)


def test_images_without_a_prediction_count_as_missed_unless_a_subset_was_run():
    from instseg_jax.input.synthetic import SyntheticSource

    source = SyntheticSource(3, (48, 64), seed=2, stuff=True)
    found, batch = oracle_detections(source)
    batch["example_valid"][1] = False  # as the pipeline marks an unusable example
    report = oracle_quality(source, found, batch)
    assert report["images_without_prediction"] == 1 and report["images"] == 3
    assert report["RQ"] < 100.0 and report["SQ"] == pytest.approx(100.0)
    subset = oracle_quality(source, found, batch, subset=True)
    assert subset["PQ"] == pytest.approx(100.0) and subset["images"] == 2


def test_evaluation_refuses_data_with_another_number_of_stuff_classes():
    from types import SimpleNamespace

    from instseg_jax import evaluate
    from instseg_jax.config import UserError
    from instseg_jax.input.synthetic import SyntheticSource

    cfg = SimpleNamespace(**ORACLE_CFG, num_stuff_classes=53)
    source = SyntheticSource(3, (48, 64), seed=2, stuff=True)
    with pytest.raises(UserError, match="2 stuff categories but the model predicts"):
        evaluate.PanopticEvaluation(source, [1, 2, 3], cfg)
    with pytest.raises(UserError, match="has none"):
        evaluate.PanopticEvaluation(SyntheticSource(3, (48, 64)), [1, 2, 3], cfg)


def test_predict_writes_the_panoptic_map_its_segments_and_an_overlay(tmp_path):
    import json
    from types import SimpleNamespace

    from PIL import Image

    from instseg_jax import detections, predict, structures
    from instseg_jax.input.coco_panoptic import rgb_to_id
    from instseg_jax.input.synthetic import SyntheticSource

    source = SyntheticSource(2, (128, 160), seed=2, stuff=True)
    found, batch = oracle_detections(source)
    cfg = SimpleNamespace(combine_score=0.5, combine_overlap=0.5, combine_stuff_area=1.0)
    class_map = ([1, 2, 3], ["circle", "rectangle", "triangle"])
    stuff_map = ([4, 5], ["sky", "ground"])
    geometry = structures.ImageGeometry.of_batch(batch, 1)
    things, (ids, segments) = predict._panoptic(
        found, 1, geometry, detections.MaskPaste(), cfg, class_map, stuff_map
    )
    example = source.load(1)
    image_path = tmp_path / "scene.png"
    Image.fromarray(example["image"]).save(image_path)
    predict._write(image_path, tmp_path, (128, 160), things, class_map[1], (), (ids, segments))
    record = json.loads((tmp_path / "scene.json").read_text())
    written = rgb_to_id(np.asarray(Image.open(tmp_path / record["panoptic_png"])))
    assert np.array_equal(written, ids)
    names = sorted(s["category"] for s in record["panoptic_segments"])
    want = sorted([class_map[1][c] for c in example["classes"]] + ["ground", "sky"])
    assert names == want and len(record["detections"]) == len(example["masks"])
    picture = np.asarray(Image.open(tmp_path / "scene.png"), np.float64)
    sky = example["semantic"] == 1
    tint = 0.5 * example["image"][sky] + 0.5 * predict.STUFF_PALETTE[0]
    # Box outlines and labels cover some sky pixels; most show the tint.
    assert np.median(np.abs(picture[sky] - tint).max(axis=1)) <= 0.5


def test_panoptic_quality_agrees_with_torchmetrics_on_stored_random_cases():
    """Cases and torchmetrics' figures from experiments/parity/panoptic_quality.py
    (--make-fixture): its docstring says where torchmetrics and panopticapi agree."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "pq_parity", root / "experiments" / "parity" / "panoptic_quality.py"
    )
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    stored = np.load(root / "tests" / "fixtures" / "panoptic_quality_torchmetrics.npz")
    ours = parity.ours(stored["gts"].astype(np.int64), stored["preds"].astype(np.int64))
    for key, value in zip(stored["keys"].tolist(), stored["values"], strict=True):
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert 0.3 < ours["All_PQ"] < 0.9  # the cases mix matches, misses and false segments
