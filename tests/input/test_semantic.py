"""Stuff in the synthetic scenes and the semantic target: stuff bands leave the things as they
were, the semantic map has Panoptic FPN's layout, and the transform's stride-s target is the
map through the resize and flip."""

import dataclasses

import numpy as np
import pytest

from instseg_jax.input.synthetic import STUFF_NAMES, SyntheticSource
from instseg_jax.input.transforms import TransformConfig, transform


def test_stuff_bands_keep_the_things_and_label_every_pixel():
    plain = SyntheticSource(6, (96, 80), seed=3)
    stuffed = SyntheticSource(6, (96, 80), seed=3, stuff=True)
    for i in range(6):
        a, b = plain.load(i), stuffed.load(i)
        for key in ("masks", "boxes", "classes", "keypoints"):
            assert np.array_equal(a[key], b[key]), key
        things = a["masks"].any(axis=0) if len(a["masks"]) else np.zeros((96, 80), bool)
        assert np.array_equal(a["image"][things], b["image"][things])
        semantic = b["semantic"]
        assert (semantic[things] == 0).all()
        assert set(np.unique(semantic[~things]).tolist()) <= {1, 2, 255}
        assert (semantic[0][~things[0]] == 1).all() and (semantic[-1][~things[-1]] == 2).all()
    assert "semantic" not in plain.load(0) and len(STUFF_NAMES) == 2


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_semantic_target_is_the_map_at_cell_centres(hflip):
    example = SyntheticSource(1, (64, 64), seed=1, stuff=True).load(0)
    config = TransformConfig(
        canvas_hw=(96, 96), max_instances=8, box_masks=False, semantic_stride=2,
        short_side=(64,), max_long_side=96, hflip=hflip,
    )  # fmt: skip
    out = transform(example, config, np.random.default_rng(0), None)
    target = out["gt_semantic"]
    assert target.shape == (48, 48)
    want = example["semantic"][1::2, 1::2]  # scale 1: cell centres at odd pixels
    if hflip:
        want = want[:, ::-1]
    assert np.array_equal(target[:32, :32], want)
    assert (target[32:] == 255).all() and (target[:, 32:] == 255).all()  # padding is ignored


def test_test_time_examples_without_a_map_get_an_ignored_target_training_ones_fail():
    from instseg_jax.config import ConfigValueError

    example = SyntheticSource(1, (64, 64), seed=1).load(0)  # no stuff: no semantic map
    config = TransformConfig(
        canvas_hw=(64, 64), max_instances=8, box_masks=False, semantic_stride=4,
        short_side=(64,), max_long_side=64, train=False,
    )  # fmt: skip
    out = transform(example, config, np.random.default_rng(0), None)
    assert out["gt_semantic"].shape == (16, 16) and (out["gt_semantic"] == 255).all()
    with pytest.raises(ConfigValueError, match="gives no semantic map"):
        transform(example, dataclasses.replace(config, train=True), np.random.default_rng(0), None)
