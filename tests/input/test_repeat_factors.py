"""Repeat-factor sampling against a NumPy / plain-Python encoding of detectron2's
detectron2/data/samplers/distributed_sampler.py: RepeatFactorTrainingSampler.
repeat_factors_from_category_frequency (f(c) = fraction of images with c, r(c) = max(1,
sqrt(t / f(c))), r(I) = max over I's categories, 1 without) and _get_epoch_indices (stochastic
rounding: trunc(r) + (rand < frac(r)) copies per image and epoch)."""

import json
import logging
import math
from collections import defaultdict

import numpy as np
import pytest

from instseg_jax.input.pipeline import InputPipeline, StreamOrder
from instseg_jax.input.repeat_factors import repeat_factors
from instseg_jax.input.synthetic import SyntheticSource
from instseg_jax.input.transforms import TransformConfig

# Category ids of each image's annotations (repeats within an image count once).
CATEGORY_TABLE = [[0, 0, 1], [1], [1, 2], [3], [], [1, 1], [0, 3, 4], [1], [1], [1]]


def detectron2_repeat_factors(table, threshold):
    """repeat_factors_from_category_frequency, step by step on dicts."""
    frequency = defaultdict(int)
    for categories in table:
        for c in set(categories):
            frequency[c] += 1
    for c in frequency:
        frequency[c] /= len(table)
    by_category = {c: max(1.0, math.sqrt(threshold / f)) for c, f in frequency.items()}
    return [max({by_category[c] for c in set(categories)}, default=1.0) for categories in table]


@pytest.mark.parametrize("threshold", [0.001, 0.3, 0.75])
def test_repeat_factors_match_detectron2(threshold):
    ours = repeat_factors([np.asarray(c, np.int64) for c in CATEGORY_TABLE], threshold)
    np.testing.assert_allclose(ours, detectron2_repeat_factors(CATEGORY_TABLE, threshold))
    if threshold == 0.75:  # category 4 in 1 of 10 images: sqrt(0.75 / 0.1) for image 6
        assert ours[6] == pytest.approx(math.sqrt(7.5)) and ours[4] == 1.0


def test_epochs_repeat_each_image_its_factor_on_average():
    """Over 3000 epochs each image's mean copies per epoch is its factor: a Bernoulli's
    standard error is at most 0.5 / sqrt(3000) = 0.009; tolerance 0.04. Every epoch lists
    floor(r) or floor(r) + 1 copies of each image, shuffled, and lengths vary."""
    factors = np.array([1.0, 1.5, 2.25, 3.7, 1.05])
    order = StreamOrder(len(factors), seed=4, factors=factors)
    copies = np.zeros((3000, len(factors)))
    for epoch in range(3000):
        listed = order.order(epoch)
        assert len(listed) == order.epoch_length(epoch)
        copies[epoch] = np.bincount(listed, minlength=len(factors))
    assert ((copies == np.floor(factors)) | (copies == np.floor(factors) + 1)).all()
    np.testing.assert_allclose(copies.mean(axis=0), factors, atol=0.04)
    assert len({order.epoch_length(e) for e in range(20)}) > 1
    assert not np.array_equal(order.order(0), np.sort(order.order(0)))


def test_stream_positions_follow_cumulative_epoch_lengths():
    """Position g of the stream is the g-th entry of the epochs' orders laid end to end,
    whichever position is asked first (a resumed run asks a late one first)."""
    factors = np.array([1.0, 2.5, 1.2, 3.0])
    stream = np.concatenate([StreamOrder(4, 9, factors).order(e) for e in range(30)])
    late_first = StreamOrder(4, 9, factors)
    positions = [len(stream) - 1, 0, 37, 5, len(stream) - 20]
    for g in positions + list(range(len(stream))):
        assert late_first.index_at(g) == stream[g]
    plain = StreamOrder(10, 9)
    assert plain.locate(23) == (2, 3) and plain.epoch_length(5) == 10


def source():
    return SyntheticSource(10, (40, 56), seed=2, max_shapes=5)


def test_pipeline_logs_the_mean_factor_and_reports_epochs_of_varying_length(caplog):
    config = TransformConfig(
        canvas_hw=(48, 48), short_side=(40,), max_long_side=48, max_instances=6, mask_size=4
    )
    with caplog.at_level(logging.INFO, logger="instseg_jax.input.pipeline"):
        pipeline = InputPipeline(
            source(),
            config,
            4,
            seed=1,
            process_index=0,
            process_count=1,
            repeat_factor_threshold=0.9,
        )
    factors = pipeline.order.factors
    categories = [c.tolist() for c in source().image_categories()]
    np.testing.assert_allclose(factors, detectron2_repeat_factors(categories, 0.9))
    assert (factors > 1).any()
    assert f"mean repeat factor {factors.mean():.3f}" in caplog.text
    assert "epochs of about" in caplog.text
    ends = np.cumsum([pipeline.order.epoch_length(e) for e in range(6)])
    for step in range(12):
        expected = int(np.searchsorted(ends, step * 4, side="right"))
        assert pipeline.epoch_of_step(step) == expected
    ids = np.concatenate([next(pipeline)["image_id"] for _ in range(3)])
    stream = np.concatenate([pipeline.order.order(0), pipeline.order.order(1)])
    assert ids.tolist() == stream[:12].tolist()  # synthetic image ids are their indices


def test_coco_categories_leave_crowd_regions_out(tmp_path):
    from instseg_jax.input.coco import CocoSource

    images = [{"id": i, "file_name": f"{i}.png", "height": 8, "width": 8} for i in (1, 2)]
    box = [1, 1, 3, 3]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": box, "segmentation": [], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": box, "segmentation": [], "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 9, "bbox": box, "segmentation": [], "iscrowd": 0},
    ]
    categories = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    coco = CocoSource(path, tmp_path, check_files=False)
    assert [c.tolist() for c in coco.image_categories()] == [[0], [1]]
