"""The COCO panoptic source: synthetic stuff scenes written in the panoptic format (PNG ids over
three channels, JSON segments) read back as the same instances, semantic map and panoptic ground
truth; bad files and segments fail or are counted, naming what to fix."""

import json

import numpy as np
import pytest
from PIL import Image

from instseg_jax import builders
from instseg_jax import config as config_lib
from instseg_jax.input import report
from instseg_jax.input.coco_panoptic import CocoPanopticSource, id_to_rgb, rgb_to_id
from instseg_jax.input.images import DataError
from instseg_jax.input.synthetic import SyntheticSource, write_coco_panoptic
from instseg_jax.panoptic import PanopticQuality


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    synthetic = SyntheticSource(4, (48, 56), seed=5, stuff=True)
    files = write_coco_panoptic(synthetic, tmp_path_factory.mktemp("panoptic"))
    return synthetic, files


def test_ids_survive_the_png_channels():
    ids = np.asarray([[0, 1, 255], [256, 70000, 256**3 - 1]])
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    assert rgb_to_id(np.asarray([[[1, 2, 3]]], np.uint8))[0, 0] == 1 + 2 * 256 + 3 * 65536


def test_written_scenes_read_back_as_the_synthetic_examples(written):
    synthetic, files = written
    source = CocoPanopticSource(*files)
    assert source.category_ids == [1, 2, 3] and source.stuff_category_ids == [4, 5]
    assert source.class_names == ["circle", "rectangle", "triangle"]
    assert source.stuff_names == ["sky", "ground"]
    categories = {1: True, 2: True, 3: True, 4: False, 5: False}
    for index in range(len(synthetic)):
        want, got = synthetic.load(index), source.load(index)
        assert np.array_equal(got["image"], want["image"])
        for key in ("masks", "boxes", "classes", "iscrowd", "semantic"):
            assert np.array_equal(got[key], want[key]), key
        image_id, gt, segments = source.panoptic_ground_truth(index)
        _, own, own_segments = synthetic.panoptic_ground_truth(index)
        assert image_id == want["image_id"]
        quality = PanopticQuality(categories)
        quality.add(gt, segments, own, own_segments)
        assert quality.summary()["All"]["PQ"] == pytest.approx(1.0)
    assert list(source.instances_per_image()) == [len(synthetic.load(i)["masks"]) for i in range(4)]


def test_builders_read_the_panoptic_splits(written):
    _, (annotations, images, panoptic) = written
    config = config_lib.load("experiments/panoptic_fpn_synthetic.py:smoke", [])
    config.input.source = "coco_panoptic"
    config.input.eval_split.update(
        {"annotations": str(annotations), "images": str(images), "panoptic": str(panoptic)}
    )
    assert len(builders.build_source(config.input, train=False)) == 4
    with pytest.raises(config_lib.ConfigValueError, match=r"input.train_split.annotations"):
        builders.build_source(config.input, train=True)


def test_unlisted_segment_ids_are_void_and_counted(written, tmp_path):
    _, (annotations, images, panoptic) = written
    document = json.loads(annotations.read_text())
    dropped = document["annotations"][0]["segments_info"].pop()  # the last stuff band
    path = tmp_path / "panoptic.json"
    path.write_text(json.dumps(document))
    source = CocoPanopticSource(path, images, panoptic)
    counts = report.new_counts()
    example = source.load(0, counts)
    assert report.as_dict(counts)["unlisted_panoptic_segment"] == 1
    ids = rgb_to_id(np.asarray(Image.open(panoptic / document["annotations"][0]["file_name"])))
    assert (example["semantic"][ids == dropped["id"]] == 255).all()
    _, gt, _ = source.panoptic_ground_truth(0)
    assert (gt[ids == dropped["id"]] == 0).all()


def test_bad_files_fail_naming_the_file_and_the_fix(written, tmp_path):
    _, (annotations, images, panoptic) = written
    document = json.loads(annotations.read_text())
    broken = dict(document, categories=[dict(c) for c in document["categories"]])
    del broken["categories"][4]["isthing"]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"a.json: category 5 \(ground\) has no 'isthing'"):
        CocoPanopticSource(path, images, panoptic)
    broken = dict(document, annotations=document["annotations"][1:])
    path.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"image id 0 .* has no entry in 'annotations'"):
        CocoPanopticSource(path, images, panoptic)
    with pytest.raises(DataError, match=r"panoptic PNG of image id 0 is missing"):
        CocoPanopticSource(annotations, images, tmp_path)
    broken = json.loads(annotations.read_text())
    broken["annotations"][2]["segments_info"][0]["category_id"] = 99
    path.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"category_id 99, which is not in 'categories'"):
        CocoPanopticSource(path, images, panoptic)


def test_training_drops_images_without_things(written, tmp_path):
    _, (annotations, images, panoptic) = written
    document = json.loads(annotations.read_text())
    first = document["annotations"][0]
    first["segments_info"] = [s for s in first["segments_info"] if s["category_id"] > 3]
    path = tmp_path / "panoptic.json"
    path.write_text(json.dumps(document))
    assert len(CocoPanopticSource(path, images, panoptic, keep_empty=False)) == 3
    assert len(CocoPanopticSource(path, images, panoptic)) == 4


def test_the_model_must_have_the_datas_stuff_classes():
    config = config_lib.load(
        "experiments/panoptic_fpn_synthetic.py:smoke", ["model.num_stuff_classes=53"]
    )
    source = builders.build_source(config.input, train=True)
    with pytest.raises(
        config_lib.ConfigValueError, match=r"has 2 stuff categories \['sky', 'ground'\]; set"
    ):
        builders.defaults_from_data(config, source)


def test_evaluation_against_the_written_files_scores_pq_100_for_the_ground_truth(written):
    from tests.test_panoptic import oracle_detections, oracle_quality

    synthetic, files = written
    source = CocoPanopticSource(*files)
    found, batch = oracle_detections(synthetic)
    report = oracle_quality(source, found, batch)
    assert report["PQ"] == pytest.approx(100.0) and report["n"] == 5


def test_instance_ground_truth_reads_the_pngs_only(written, tmp_path):
    import shutil

    from instseg_jax import evaluate

    synthetic, (annotations, images, panoptic) = written
    copied = tmp_path / "images"
    shutil.copytree(images, copied)
    (copied / "val_00001.png").write_bytes(b"not a png")  # never decoded for the ground truth
    pngs = tmp_path / "panoptic"
    shutil.copytree(panoptic, pngs)
    (pngs / "val_00002.png").write_bytes(b"not a png")  # left out, with a warning
    gt = evaluate.ground_truth(CocoPanopticSource(annotations, copied, pngs))
    assert sorted(gt.imgs) == [0, 1, 3]
    want = synthetic.load(1)
    got = gt.loadAnns(gt.getAnnIds(imgIds=[1]))
    assert len(got) == len(want["masks"])
    assert [a["category_id"] for a in got] == [int(c) + 1 for c in want["classes"]]
    assert all(np.array_equal(gt.annToMask(a), m) for a, m in zip(got, want["masks"], strict=True))
    only = evaluate.ground_truth(CocoPanopticSource(annotations, images, panoptic), [3])
    assert sorted(only.imgs) == [3]
