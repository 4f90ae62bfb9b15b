"""COCO evaluation: known answers through pycocotools, results conversion, the eval CLI."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg_jax import builders, detections, evaluate
from instseg_jax import train as train_lib
from instseg_jax.input.synthetic import SyntheticSource, write_coco
from instseg_jax.methods import mask_rcnn


@pytest.fixture(scope="module")
def synthetic_coco(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco")
    return write_coco(SyntheticSource(6, (64, 80), seed=5), folder)


def ground_truth_as_results(annotation_file):
    document = json.loads(open(annotation_file).read())
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in document["annotations"]
    ]


def test_ground_truth_as_predictions_scores_one(synthetic_coco):
    annotations, _ = synthetic_coco
    stats = evaluate.coco_evaluate(
        annotations, ground_truth_as_results(annotations), print_tables=False
    )
    assert set(stats) == {"bbox", "segm"}
    assert stats["bbox"][0] == pytest.approx(1.0) and stats["segm"][0] == pytest.approx(1.0)
    boxes_only = [
        {k: v for k, v in r.items() if k != "segmentation"}
        for r in ground_truth_as_results(annotations)
    ]
    assert set(evaluate.coco_evaluate(annotations, boxes_only, print_tables=False)) == {"bbox"}


def test_hand_made_case_has_the_known_ap(tmp_path):
    """2 objects; detections by score: hit, false positive, hit.

    Precision is 1 up to recall 0.5 and 2/3 from there to 1, so COCO's 101-point interpolated
    AP is (51 * 1 + 50 * 2/3) / 101 at every IoU threshold."""
    gt = {
        "images": [{"id": 1, "height": 100, "width": 100, "file_name": "x.png"}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 20, 20],
                "area": 400,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [60, 60, 30, 30],
                "area": 900,
                "iscrowd": 0,
            },
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [40, 0, 10, 10], "score": 0.8},
        {"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.7},
    ]
    stats = evaluate.coco_evaluate(path, results, print_tables=False)["bbox"]
    assert stats[0] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)
    assert stats[1] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)


def test_eval_results_equals_pycocotools(synthetic_coco, tmp_path, capsys):
    annotations, _ = synthetic_coco
    rng = np.random.default_rng(0)
    results = ground_truth_as_results(annotations)
    for r in results:  # perturb: scores and boxes
        r["score"] = float(rng.uniform())
        r["bbox"] = [v + float(rng.normal(0, 2)) for v in r["bbox"]]
    results_file = tmp_path / "preds.json"
    results_file.write_text(json.dumps(results))
    from instseg_jax import cli

    argv = ["eval", "--results", str(results_file), "--annotations", str(annotations)]
    assert cli.main([*argv, "--out", str(tmp_path / "report.json")]) == 0
    assert f"wrote {tmp_path / 'report.json'}" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    gt = COCO(str(annotations))
    for iou_type in ("bbox", "segm"):
        direct = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
        assert list(report[iou_type].values()) == [float(v) for v in direct.stats]


def host_batch(image_ids, orig_hw):
    """Batch geometry of original images placed unscaled on the canvas."""
    orig_hw = np.asarray(orig_hw, np.int32)
    return {
        "image": np.zeros((len(image_ids), 96, 96, 3), np.uint8),
        "image_id": np.asarray(image_ids, np.int64),
        "example_valid": np.asarray(image_ids) >= 0,
        "orig_hw": orig_hw,
        "image_hw": orig_hw,
        "scale": np.ones(len(image_ids), np.float32),
        "crop_offset": np.zeros((len(image_ids), 2), np.int32),
        "flipped": np.zeros(len(image_ids), bool),
    }


def test_detections_to_results_skips_padding_and_pastes_masks():
    found = {
        "boxes": np.array([[[10, 20, 30, 60], [0, 0, 0, 0]]], np.float32),
        "scores": np.array([[0.8, 0.0]], np.float32),
        "classes": np.array([[1, 0]], np.int32),
        "valid": np.array([[True, False]]),
        "masks": np.ones((1, 2, 28, 28), np.float32),
    }
    results = detections.detections_to_results(found, host_batch([7], [[80, 50]]), [3, 9])
    assert len(results) == 1
    (r,) = results
    assert r["image_id"] == 7 and r["category_id"] == 9
    assert r["bbox"] == [10.0, 20.0, 20.0, 40.0]
    from pycocotools import mask as mask_utils

    pasted = mask_utils.decode(
        {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
    )
    assert pasted.shape == (80, 50)
    assert pasted[20:60, 10:30].all() and pasted.sum() == 20 * 40
    assert detections.detections_to_results(found, host_batch([-1], [[80, 50]]), [3, 9]) == []


def test_evaluate_model_runs_a_split_and_writes_the_report(synthetic_coco, tmp_path):
    import jax

    from instseg_jax import config as config_lib

    annotations, images = synthetic_coco
    config = config_lib.load(
        "experiments/maskrcnn_nuclei.py:smoke",
        [
            "--config.input.source=coco",
            f"--config.input.eval_split.annotations={annotations}",
            f"--config.input.eval_split.images={images}",
            "--config.eval.global_batch=4",
            "--config.model.score_threshold=0.0",
        ],
    )
    source = builders.build_source(config.input, train=False)
    cfg = builders.model_config(config, source.num_classes)
    model = mask_rcnn.Model(cfg)
    batch = next(
        train_lib.InputPipeline(
            source, builders.transform_config(config, False), 4, process_index=0, process_count=1
        )
    )
    batch = builders.device_fields(batch)
    # One jit each: eager, the init and the forward compile op by op (minutes on this CPU).
    variables = jax.jit(
        lambda b: model.init(jax.random.key(0), b, train=True, key=jax.random.key(1))
    )(batch)
    found = jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)["detections"]
    k = cfg.detections_per_image
    assert found["boxes"].shape == (4, k, 4) and found["masks"].shape == (4, k, 28, 28)
    valid = np.asarray(found["valid"])
    assert valid.any()
    boxes = np.asarray(found["boxes"])
    orig = np.asarray(batch["orig_hw"])
    assert (boxes[..., 2] <= orig[:, None, 1] + 1e-3).all() and (boxes[~valid] == 0).all()
    report = evaluate.evaluate_model(config, variables, tmp_path, step=3, print_tables=False)
    assert set(report) == {"bbox", "segm", "timing"} and len(report["segm"]) == 12
    saved = json.loads((tmp_path / "eval_3.json").read_text())
    assert saved["step"] == 3 and saved["bbox"] == report["bbox"]


def test_periodic_evaluation_keeps_the_best_checkpoint_and_plots(synthetic_coco, tmp_path):
    from PIL import Image

    from instseg_jax import config as config_lib

    annotations, images = synthetic_coco
    config = config_lib.load(
        "experiments/maskrcnn_nuclei.py:smoke",
        [
            f"--config.input.eval_split.annotations={annotations}",
            f"--config.input.eval_split.images={images}",
            "--config.eval.every_steps=2",
            "--config.eval.global_batch=4",
            "--config.model.score_threshold=0.0",
            "--config.input.eval_source=coco",
        ],
    )  # train on synthetic scenes, eval their COCO export
    train_lib.train(config, tmp_path, max_steps=4, progress=False)
    reports = {s: json.loads((tmp_path / f"eval_{s}.json").read_text()) for s in (2, 4)}
    best = json.loads((tmp_path / "best.json").read_text())
    aps = {s: r["segm"]["AP"] for s, r in reports.items()}
    assert best["AP"] == max(aps.values()) and aps[best["step"]] == best["AP"]
    assert (tmp_path / "best" / "checkpoints" / str(best["step"])).is_dir()
    assert Image.open(tmp_path / "ap_vs_step.png").size == (640, 400)
