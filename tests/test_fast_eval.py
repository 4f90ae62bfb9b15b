"""The default COCO evaluator (hotcoco) against pycocotools' own COCOeval: the same stats,
precision and recall arrays and per-category AP, bit for bit, on cases that reach every branch
of COCO's matching: crowd regions (RLE, matched by intersection over the detection's area),
maxDets above 100 with images holding more than 100 detections, images without detections and
without objects, a category without ground truth, a narrowed image set (eval_fraction), no
detections at all, keypoints with their own sigmas, a count of keypoints other than COCO's 17
and objects without labelled keypoints, and the nuclei val set (../shared/data, when present).

The reference is always pycocotools' COCOeval run here, never instseg_jax.evaluate. cocoapi's
own fake results (results/instances_val2014_fake*100_results.json) need COCO val2014's
annotations, which no test may download; the synthetic cases stand in for them.
"""

import contextlib
import io
import json
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg_jax import evaluate


def star_polygon(rng, cx, cy, radius, vertices=10):
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    radii = radius * rng.uniform(0.6, 1.0, vertices)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).ravel()


def compressed_rle(polygon, height, width):
    (rle,) = mask_utils.frPyObjects([polygon.tolist()], height, width)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def detection_case(seed=0, images=24, categories=5):
    """(ground-truth dataset, results): star-shaped objects of all three COCO sizes as polygons,
    1 in 8 a crowd region as RLE; per image jittered copies of the objects (some of the wrong
    class) and false positives, 150 detections on every 4th image (above maxDets 100), none on
    every 5th; image 3 has no object; category `categories` has no ground truth at all."""
    rng = np.random.default_rng(seed)
    dataset = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 10 * (i + 1), "name": f"c{i}"} for i in range(categories)],
    }
    used = [c["id"] for c in dataset["categories"][:-1]]
    results = []
    for image_id in range(1, images + 1):
        height, width = (120, 160) if image_id % 2 else (160, 120)
        dataset["images"].append({"id": image_id, "height": height, "width": width})
        objects = []
        for _ in range(0 if image_id == 3 else int(rng.integers(1, 8))):
            radius = float(np.exp(rng.uniform(np.log(3), np.log(70))))
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            polygon = star_polygon(rng, cx, cy, radius)
            rle = compressed_rle(polygon, height, width)
            crowd = rng.uniform() < 1 / 8
            category = int(rng.choice(used))
            dataset["annotations"].append(
                {
                    "id": len(dataset["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": rle if crowd else [polygon.round(2).tolist()],
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(crowd),
                }
            )
            objects.append((cx, cy, radius, category))
        if image_id % 5 == 0:
            continue
        count = 150 if image_id % 4 == 0 else int(rng.integers(1, 40))
        for d in range(count):
            if objects and d < 3 * len(objects):
                cx, cy, radius, category = objects[d % len(objects)]
                cx, cy = cx + rng.normal(0, 0.15 * radius), cy + rng.normal(0, 0.15 * radius)
                radius *= float(np.exp(rng.normal(0, 0.2)))
                if rng.uniform() < 0.15:
                    category = int(rng.choice(used))
            else:
                radius = float(np.exp(rng.uniform(np.log(3), np.log(50))))
                cx, cy = rng.uniform(0, width), rng.uniform(0, height)
                category = int(rng.choice(used))
            rle = compressed_rle(star_polygon(rng, cx, cy, radius), height, width)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                    # ties among scores, as a model's rounded scores have
                    "score": round(float(rng.uniform()), 2),
                    "segmentation": rle,
                }
            )
    return dataset, results


def pycocotools_gt(dataset) -> COCO:
    gt = COCO()
    gt.dataset = json.loads(json.dumps(dataset))  # a copy: COCOeval writes into annotations
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def reference(gt, results, iou_type, max_dets=None, sigmas=None) -> COCOeval:
    """pycocotools' COCOeval, run as cocoapi's demo runs it."""
    with contextlib.redirect_stdout(io.StringIO()):
        run = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iou_type)
        if max_dets is not None:
            run.params.maxDets = max_dets
        if sigmas is not None:
            run.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
        run.evaluate()
        run.accumulate()
        run.summarize()
    return run


def hotcoco_run(dataset, results, iou_type, max_dets=None, sigmas=None):
    """hotcoco's COCOeval as instseg_jax.evaluate drives it, arrays for comparison."""
    import hotcoco

    gt = hotcoco.COCO(json.loads(json.dumps(dataset)))
    run = hotcoco.COCOeval(gt, gt.load_res([dict(r) for r in results]), iou_type)
    if max_dets is not None:
        run.params.maxDets = max_dets
    if sigmas is not None:
        run.params.kpt_oks_sigmas = list(sigmas)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hotcoco's note that sigmas other than COCO's are set
        run.evaluate()
        run.accumulate()
    return run


@pytest.fixture(scope="module")
def detection_data():
    return detection_case()


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_stats_equal_pycocotools_with_crowds_empty_images_and_200_detections(
    detection_data, iou_type
):
    dataset, results = detection_data
    assert max(np.bincount([r["image_id"] for r in results])) == 150
    gt = pycocotools_gt(dataset)
    expected = reference(gt, results, iou_type, [1, 10, 100, 200])
    for evaluator in evaluate.EVALUATORS:
        stats = evaluate.coco_evaluate(
            pycocotools_gt(dataset), results, (iou_type,), False, 200, evaluator=evaluator
        )[iou_type]
        assert len(stats) == 15
        # COCO's 12 at maxDets 100 exactly as pycocotools summarises them
        assert stats[:12] == [float(v) for v in expected.stats], evaluator
        precision = expected.eval["precision"][:, :, :, 0, -1]  # area all, maxDets 200
        recall = expected.eval["recall"][:, :, 0, -1]
        assert stats[12] == float(precision[precision > -1].mean())
        assert stats[13] == float(precision[0][precision[0] > -1].mean())  # IoU 0.50
        assert stats[14] == float(recall[recall > -1].mean())
    # pycocotools' 12 at maxDets (1, 10, 100) are the same numbers
    assert stats[:12] == [float(v) for v in reference(gt, results, iou_type).stats]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_accumulated_arrays_and_per_category_ap_are_pycocotools(detection_data, iou_type):
    dataset, results = detection_data
    expected = reference(pycocotools_gt(dataset), results, iou_type, [1, 10, 100, 200])
    fast = hotcoco_run(dataset, results, iou_type, [1, 10, 100, 200])
    assert list(fast.params.catIds) == list(expected.params.catIds)
    for array in ("precision", "recall", "scores"):
        assert np.array_equal(fast.eval[array], expected.eval[array]), array
    per_category = evaluate.per_category_ap(fast)
    assert per_category.keys() == evaluate.per_category_ap(expected).keys()
    for category_id, ap in evaluate.per_category_ap(expected).items():
        assert ap == per_category[category_id] or (
            np.isnan(ap) and np.isnan(per_category[category_id])
        )
    assert np.isnan(per_category[50])  # the category without ground truth shows "-"


def test_a_narrowed_image_set_and_no_detections(detection_data):
    """gt.imgs narrowed as input.eval_fraction narrows it: both score those images only; and
    no detections at all give pycocotools' values (0, -1 for a size without objects)."""
    dataset, results = detection_data
    kept = [1, 2, 3, 4, 5, 8, 13]

    def narrowed():
        gt = pycocotools_gt(dataset)
        gt.imgs = {i: gt.imgs[i] for i in kept}
        return gt

    subset = [r for r in results if r["image_id"] in kept]
    expected = reference(narrowed(), subset, "segm")
    assert expected.params.imgIds == kept
    for evaluator in evaluate.EVALUATORS:
        stats = evaluate.coco_evaluate(narrowed(), subset, ("segm",), False, evaluator=evaluator)
        assert stats["segm"] == [float(v) for v in expected.stats], evaluator
    empty = {
        evaluator: evaluate.coco_evaluate(
            narrowed(), [], ("bbox", "segm"), False, evaluator=evaluator
        )
        for evaluator in evaluate.EVALUATORS
    }
    assert empty["hotcoco"] == empty["pycocotools"]
    assert empty["hotcoco"]["segm"][0] == 0.0 and -1.0 in empty["hotcoco"]["segm"]


def keypoint_case(seed=1, images=16, keypoints=5):
    """Objects with `keypoints` keypoints (not COCO's 17): some labelled only in part, some with
    none (ignored by OKS matching), one crowd; two detections per object, jittered."""
    rng = np.random.default_rng(seed)
    names = [f"k{i}" for i in range(keypoints)]
    dataset = {
        "images": [{"id": i, "height": 200, "width": 300} for i in range(1, images + 1)],
        "categories": [
            {"id": 1, "name": "a", "keypoints": names},
            {"id": 2, "name": "b", "keypoints": names},
            {"id": 9, "name": "never annotated", "keypoints": names},
        ],
        "annotations": [],
    }
    results = []
    for image in dataset["images"]:
        for j in range(int(rng.integers(1, 5))):
            x, y = rng.uniform(0, 200), rng.uniform(0, 120)
            w, h = rng.uniform(8, 90, 2)
            points = np.stack(
                [x + rng.uniform(0, w, keypoints), y + rng.uniform(0, h, keypoints),
                 rng.integers(0, 3, keypoints)], 1
            )  # fmt: skip
            if j == 2:
                points[:, 2] = 0  # no labelled keypoint
            points[points[:, 2] == 0, :2] = 0
            category = int(rng.integers(1, 3))
            dataset["annotations"].append(
                {
                    "id": len(dataset["annotations"]) + 1,
                    "image_id": image["id"],
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": float(w * h * rng.uniform(0.3, 0.9)),  # areas of all sizes
                    "iscrowd": int(image["id"] == 4 and j == 0),
                    "keypoints": points.ravel().tolist(),
                    "num_keypoints": int((points[:, 2] > 0).sum()),
                }
            )
            for _ in range(2):
                found = np.stack(
                    [x + rng.uniform(0, w, keypoints), y + rng.uniform(0, h, keypoints),
                     np.ones(keypoints)], 1
                )  # fmt: skip
                labelled = points[:, 2] > 0
                found[labelled, :2] = points[labelled, :2] + rng.normal(0, 3, (labelled.sum(), 2))
                results.append(
                    {
                        "image_id": image["id"],
                        "category_id": category,
                        "keypoints": found.ravel().tolist(),
                        "bbox": [x, y, w, h],
                        "score": round(float(rng.uniform()), 3),
                    }
                )
    return dataset, results


def test_keypoints_with_their_own_count_and_sigmas_equal_pycocotools():
    sigmas = (0.026, 0.079, 0.05, 0.107, 0.062)
    dataset, results = keypoint_case()
    expected = reference(pycocotools_gt(dataset), results, "keypoints", sigmas=sigmas)
    assert len(expected.stats) == 10 and expected.stats[0] > 0
    for evaluator in evaluate.EVALUATORS:
        stats = evaluate.coco_evaluate(
            pycocotools_gt(dataset), results, ("keypoints",), False, 100, sigmas, evaluator
        )
        assert stats["keypoints"] == [float(v) for v in expected.stats], evaluator
    fast = hotcoco_run(dataset, results, "keypoints", sigmas=sigmas)
    assert np.array_equal(fast.eval["precision"], expected.eval["precision"])
    # other sigmas give other numbers: the sigmas reach the evaluator
    other = evaluate.coco_evaluate(
        pycocotools_gt(dataset), results, ("keypoints",), False, 100, (0.2,) * 5
    )
    assert other["keypoints"] != [float(v) for v in expected.stats]


def test_coco_person_keypoints_by_default_equal_pycocotools():
    """17 keypoints with no sigmas given: both use COCO's person sigmas."""
    dataset, results = keypoint_case(seed=2, images=8, keypoints=17)
    expected = reference(pycocotools_gt(dataset), results, "keypoints")
    stats = evaluate.coco_evaluate(pycocotools_gt(dataset), results, ("keypoints",), False)
    assert stats["keypoints"] == [float(v) for v in expected.stats]


@pytest.mark.slow  # pycocotools on real crowded images (and preparing the set): the fast tier
# proves the equality on the synthetic cases above
def test_the_nuclei_val_set_equals_pycocotools(nuclei_dir):
    """The nuclei val set (up to 101 nuclei an image) with results made from its own masks:
    each nucleus moved by a few pixels, 1 in 10 dropped, false positives added, more than 100 on
    some images, at maxDets 200 as the nuclei experiments evaluate."""
    annotations = nuclei_dir / "annotations" / "val.json"
    gt = pycocotools_gt(json.loads(annotations.read_text()))
    # a fifth of the images and the most crowded one (101 nuclei): pycocotools' matching loop
    # takes 40 s over all 79 on this machine, hotcoco 0.5 s
    crowded = max(gt.imgs, key=lambda i: len(gt.imgToAnns[i]))
    gt.imgs = {i: gt.imgs[i] for i in sorted(gt.imgs)[::5] + [crowded]}
    rng = np.random.default_rng(3)
    (nucleus,) = gt.getCatIds()
    results = []

    def results_of(image_id):
        return [r for r in results if r["image_id"] == image_id]

    for image_id, image in gt.imgs.items():
        height, width = image["height"], image["width"]
        for ann in gt.imgToAnns[image_id]:
            if rng.uniform() < 0.1:
                continue
            mask = np.roll(gt.annToMask(ann), tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
            rle = mask_utils.encode(np.asfortranarray(mask))
            results.append(
                {
                    "image_id": image_id,
                    "category_id": ann["category_id"],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "score": round(float(rng.uniform(0.3, 1.0)), 3),
                }
            )
        # 10 false positives an image; every 3rd image filled up to 110 detections
        filled = image_id % 3 == 0
        for _ in range(max(10, 110 - len(results_of(image_id))) if filled else 10):
            polygon = star_polygon(rng, rng.uniform(0, width), rng.uniform(0, height), 8)
            rle = compressed_rle(polygon, height, width)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": nucleus,
                    "segmentation": rle,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "score": round(float(rng.uniform(0.0, 0.5)), 3),
                }
            )
    assert max(np.bincount([r["image_id"] for r in results])) > 100
    for iou_type in ("bbox", "segm"):
        expected = reference(gt, results, iou_type, [1, 10, 100, 200])
        stats = evaluate.coco_evaluate(gt, results, (iou_type,), False, 200)[iou_type]
        assert stats[:12] == [float(v) for v in expected.stats], iou_type
        precision = expected.eval["precision"][:, :, :, 0, -1]  # area all, maxDets 200
        assert stats[12] == float(precision[precision > -1].mean())


def test_eval_cli_takes_either_evaluator_and_reports_the_same(detection_data, tmp_path, capsys):
    from instseg_jax import cli

    dataset, results = detection_data
    (tmp_path / "gt.json").write_text(json.dumps(dataset))
    (tmp_path / "preds.json").write_text(json.dumps(results))
    argv = ["eval", "--results", str(tmp_path / "preds.json")]
    argv += ["--annotations", str(tmp_path / "gt.json"), "--max-dets", "200"]
    reports = {}
    for evaluator in ("hotcoco", "pycocotools"):
        out = tmp_path / f"{evaluator}.json"
        assert cli.main([*argv, "--evaluator", evaluator, "--out", str(out)]) == 0
        reports[evaluator] = json.loads(out.read_text())
        printed = capsys.readouterr().out
        assert "per-category segm AP:" in printed and "Average Precision" in printed
    assert reports["hotcoco"] == reports["pycocotools"]
    assert set(reports["hotcoco"]["segm"]) >= {"AP", "AR100", "AP@200", "AR@200"}
    with pytest.raises(SystemExit):
        cli.main([*argv, "--evaluator", "cocoapi"])
    assert "invalid choice: 'cocoapi'" in capsys.readouterr().err  # argparse lists the choices


def test_config_names_the_evaluator():
    from instseg_jax import config as config_lib

    config = config_lib.load("experiments/maskrcnn_nuclei.py:smoke")
    assert config.eval.evaluator == "hotcoco"
    with pytest.raises(config_lib.ConfigValueError, match=r"eval\.evaluator must be one of"):
        config_lib.load("experiments/maskrcnn_nuclei.py:smoke", ["--config.eval.evaluator=fast"])


def test_eval_workdir_passes_the_evaluator_to_the_model_evaluation(monkeypatch, capsys):
    """`eval --workdir DIR --evaluator pycocotools` sets the restored config's eval.evaluator,
    which evaluate_model (periodic evaluation too) reads; without the flag the config's stays."""
    from instseg_jax import cli
    from instseg_jax import config as config_lib

    seen = []

    def restore(workdir, checkpoint, overrides, **options):
        config = config_lib.load("experiments/maskrcnn_nuclei.py:smoke", overrides)
        config.lock()
        return config, {}, 7

    monkeypatch.setattr(evaluate.workdir_lib, "restore_variables", restore)
    monkeypatch.setattr(
        evaluate, "evaluate_model", lambda config, *a, **k: seen.append(config.eval.evaluator)
    )
    assert cli.main(["eval", "--workdir", "w", "--evaluator", "pycocotools"]) == 0
    assert cli.main(["eval", "--workdir", "w"]) == 0
    assert cli.main(["eval", "--workdir", "w", "--config.eval.evaluator=pycocotools"]) == 0
    assert seen == ["pycocotools", "hotcoco", "pycocotools"]
