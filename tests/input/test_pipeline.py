import dataclasses
import json
import logging

import numpy as np
import pytest
from PIL import Image

from instseg_jax.input import report
from instseg_jax.input.images import UnreadableImage
from instseg_jax.input.pipeline import InputPipeline
from instseg_jax.input.synthetic import SyntheticSource
from instseg_jax.input.transforms import TransformConfig
from tests.input.streams import assert_same, take

TRAIN = TransformConfig(
    canvas_hw=(48, 48), short_side=(40, 48), max_long_side=48, max_instances=6, mask_size=8
)
EVAL = TransformConfig(
    canvas_hw=(48, 48),
    train=False,
    short_side=(48,),
    max_long_side=48,
    max_instances=6,
    mask_size=8,
)


def source(n=10):
    return SyntheticSource(n, (40, 56), seed=2, max_shapes=5)


def test_batches_have_the_design_shapes():
    batch = next(
        InputPipeline(source(), TRAIN, global_batch=4, seed=0, process_index=0, process_count=1)
    )
    assert batch["image"].shape == (4, 48, 48, 3) and batch["image"].dtype == np.uint8
    assert batch["gt_boxes"].shape == (4, 6, 4) and batch["gt_boxes"].dtype == np.float32
    assert batch["gt_classes"].dtype == np.int32 and batch["gt_valid"].dtype == bool
    assert batch["gt_masks"].shape == (4, 6, 8, 8) and batch["gt_masks"].dtype == np.uint8
    assert batch["image_hw"].shape == (4, 2) and batch["image_id"].dtype == np.int64
    assert batch["example_valid"].all()


def test_stream_is_independent_of_workers_and_reshuffled_each_epoch():
    single = take(InputPipeline(source(), TRAIN, 4, seed=7, process_index=0, process_count=1), 6)
    workers = InputPipeline(
        source(), TRAIN, 4, seed=7, num_workers=2, process_index=0, process_count=1
    )
    assert_same(single, take(workers, 6))
    workers.close()
    ids = np.concatenate([b["image_id"] for b in single])  # 24 examples = 2.4 epochs of 10
    assert sorted(ids[:10].tolist()) == list(range(10))
    assert sorted(ids[10:20].tolist()) == list(range(10))
    assert ids[:10].tolist() != ids[10:20].tolist(), "a new shuffle every epoch"
    other = take(InputPipeline(source(), TRAIN, 4, seed=8, process_index=0, process_count=1), 1)
    assert other[0]["image_id"].tolist() != single[0]["image_id"].tolist()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_iterator_continues_exactly(num_workers):
    def make():
        return InputPipeline(
            source(), TRAIN, 4, seed=3, num_workers=num_workers, process_index=0, process_count=1
        )

    reference = make()
    expected = take(reference, 7)
    reference.close()
    first = make()
    take(first, 3)
    state = json.loads(json.dumps(first.get_state()))  # survives a JSON round trip
    first.close()
    resumed = make()
    resumed.set_state(state)
    assert_same(take(resumed, 4), expected[3:])
    resumed.close()


@pytest.mark.parametrize("saved_with, resumed_with", [(0, 2), (2, 0), (2, 1)])
def test_a_run_resumes_with_another_number_of_workers(saved_with, resumed_with):
    def make(workers):
        return InputPipeline(
            source(), TRAIN, 4, seed=3, num_workers=workers, process_index=0, process_count=1
        )

    expected = take(make(0), 6)
    first = make(saved_with)
    take(first, 2)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = make(resumed_with)
    resumed.set_state(state)
    assert_same(take(resumed, 4), expected[2:])
    resumed.close()


def test_processes_split_every_global_batch():
    whole = take(InputPipeline(source(), TRAIN, 4, seed=1, process_index=0, process_count=1), 3)
    parts = [
        take(InputPipeline(source(), TRAIN, 4, seed=1, process_index=p, process_count=2), 3)
        for p in range(2)
    ]
    for step in range(3):
        for key in whole[step]:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])
    with pytest.raises(ValueError, match="does not divide"):
        InputPipeline(source(), TRAIN, 5, process_index=0, process_count=2)


def test_eval_is_one_ordered_pass_with_a_padded_last_batch():
    batches = list(InputPipeline(source(10), EVAL, 4, process_index=0, process_count=1))
    assert len(batches) == 3
    ids = np.concatenate([b["image_id"] for b in batches])
    valid = np.concatenate([b["example_valid"] for b in batches])
    assert ids[valid].tolist() == list(range(10))
    assert valid.tolist() == [True] * 10 + [False] * 2
    assert not batches[-1]["gt_valid"][2:].any()


class FlakySource:
    """A synthetic source whose examples in `bad` cannot be read."""

    def __init__(self, bad):
        self.inner = source()
        self.bad = set(bad)

    def __len__(self):
        return len(self.inner)

    def load(self, index, counts=None):
        if index in self.bad:
            raise UnreadableImage(f"broken_{index}.png: cannot decode image")
        return self.inner.load(index)


def test_unreadable_images_are_skipped_counted_and_reported(caplog):
    pipeline = InputPipeline(
        FlakySource({2, 5}), TRAIN, 5, seed=0, process_index=0, process_count=1
    )
    with caplog.at_level(logging.INFO, logger="instseg_jax.input.pipeline"):
        batches = take(pipeline, 3)  # 15 examples: all of epoch 0 reported at step 2
    ids = np.concatenate([b["image_id"] for b in batches[:2]])
    assert not {2, 5} & set(ids.tolist())
    assert "input epoch 0: unreadable_image=2" in caplog.text
    assert "broken_2.png" in caplog.text
    strict = InputPipeline(
        FlakySource(range(10)), TRAIN, 5, strict=True, process_index=0, process_count=1
    )
    with pytest.raises(UnreadableImage, match="broken_"):
        next(strict)


def test_truncated_file_in_a_coco_set_is_skipped(tmp_path):
    from instseg_jax.input.coco import CocoSource

    images = []
    for i in range(4):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 20, "width": 20})
    data = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(data[:40])
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [2, 2, 5, 5],
            "segmentation": [[2, 2, 7, 2, 7, 7, 2, 7]],
        }
    ]
    (tmp_path / "a.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]})
    )
    coco = CocoSource(tmp_path / "a.json", tmp_path)
    config = TransformConfig(
        canvas_hw=(24, 24), short_side=(20,), max_long_side=24, max_instances=2, mask_size=4
    )
    pipeline = InputPipeline(coco, config, 4, process_index=0, process_count=1)
    batch = next(pipeline)
    assert 3 not in batch["image_id"].tolist()
    assert pipeline.total_counts[0] == 1


def test_batches_carry_ignore_regions_and_the_epoch_report_counts_them(caplog):
    """Up to 5 shapes per scene, room for 1: every batch (padding included) has the fixed
    ignore fields, the dropped instances fill them, and the epoch report counts them."""
    config = TransformConfig(
        canvas_hw=(48, 48),
        short_side=(40,),
        max_long_side=48,
        max_instances=1,
        max_ignore_regions=2,
        mask_size=4,
    )
    pipeline = InputPipeline(source(), config, 5, seed=0, process_index=0, process_count=1)
    with caplog.at_level(logging.INFO, logger="instseg_jax.input.pipeline"):
        batches = take(pipeline, 3)  # 15 examples: epoch 0 (10) reported at step 2
    for batch in batches:
        assert batch["ignore_boxes"].shape == (5, 2, 4)
        assert batch["ignore_boxes"].dtype == np.float32
        assert batch["ignore_valid"].shape == (5, 2) and batch["ignore_valid"].dtype == bool
    counts = report.as_dict(pipeline.total_counts)
    slotted = sum(int(b["ignore_valid"].sum()) for b in batches)
    assert slotted > 0 and counts["ignore_regions_over_limit"] > 0
    # Every dropped instance has an ignore slot or is counted as having none.
    assert counts["instances_over_limit"] == slotted + counts["ignore_regions_over_limit"]
    assert "input epoch 0: " in caplog.text and "instances_over_limit=" in caplog.text
    evaluation = InputPipeline(
        source(10), dataclasses.replace(config, train=False), 4, process_index=0, process_count=1
    )
    padded = list(evaluation)[-1]  # 2 examples and 2 padding slots
    assert padded["ignore_boxes"].shape == (4, 2, 4) and not padded["ignore_valid"][2:].any()


AUGMENTED = dataclasses.replace(TRAIN, copy_paste=0.8, copy_paste_scale=(0.5, 1.5))


def augmented(workers=0, config=AUGMENTED):
    return InputPipeline(
        source(),
        config,
        4,
        seed=5,
        num_workers=workers,
        process_index=0,
        process_count=1,
        repeat_factor_threshold=0.9,
    )


def test_copy_paste_and_repeat_factors_keep_the_stream_a_function_of_its_position():
    """Both on: the same seed gives the same batches, and a stream resumed from a saved state
    continues exactly, across the (varying) epoch ends."""
    reference = augmented()
    expected = take(reference, 8)  # 32 examples: epochs of more than 10 (factors above 1)
    assert reference.order.factors.max() > 1
    assert reference.epoch_of_step(7) >= 1  # the batches cross an epoch end
    assert_same(take(augmented(), 8), expected)
    plain = take(augmented(config=TRAIN), 8)
    assert not all(
        np.array_equal(a["image"], b["image"]) for a, b in zip(plain, expected, strict=True)
    )
    first = augmented()
    take(first, 3)
    resumed = augmented()
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    assert_same(take(resumed, 5), expected[3:])


@pytest.mark.slow  # grain's worker processes start in 5-20 s
def test_copy_paste_and_repeat_factors_stream_is_independent_of_workers():
    expected = take(augmented(), 6)
    first = augmented()
    take(first, 2)
    resumed = augmented(workers=2)
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    assert_same(take(resumed, 4), expected[2:])
    resumed.close()


def test_an_unusable_copy_paste_partner_means_no_paste_and_is_counted():
    config = dataclasses.replace(TRAIN, copy_paste=1.0)
    pipeline = InputPipeline(
        FlakySource({2, 5}), config, 5, seed=0, process_index=0, process_count=1
    )
    take(pipeline, 2)  # epoch 0: 8 usable examples, each a partner of its batch neighbour
    counts = report.as_dict(pipeline.total_counts)
    assert counts["unreadable_image"] == 2
    # Each of the 10 positions is the partner of the next slot of its batch: the two
    # unreadable ones were asked for once each.
    assert counts["copy_paste_partner_unusable"] == 2
