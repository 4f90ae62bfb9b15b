"""YOLACT's anchor targets and losses reproduce mmdetection 3.3's YOLACTHead.loss_by_feat and
YOLACTProtonet.loss_by_feat on the same head outputs and ground truth (issue 29 item 4).

tests/fixtures/mmdet_yolact_loss_tiny.npz was written by `experiments/parity/yolact_loss.py
--make-fixture` in the `make peer-mmdet` environment (mmdetection on mmcv's lite build): three
two-image batches (one mmdetection GPU each) on a 128 x 128 canvas: few + crowded (objects
sharing anchors), nuclei + empty (a crop of a DSB 2018 image: 26 nuclei, two of them slivers
that FilterAnnotations drops there and model.min_gt_box_size here; 31 positives, over the 16
trained masks) and empty + empty; random class logits, box deltas, coefficients, prototypes and
semantic logits; and mmdetection's answers: its anchor labels, the masks its torch.randperm
chose to train (injected into ours), the four terms and the gradient of their sum with respect
to each head output. Here the same inputs go through anchor_targets and loss_fn, with no torch.
The nuclei ground truth is not stored: it is re-read from the shared data and checked against
the fixture's checksum. The COCO recipe's anchors are checked against a sample of mmdetection's
for its yolact config, and (slow tier) mmdetection's head weights, converted, against its
parameter gradients (tests/fixtures/mmdet_yolact_head_tiny.npz).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from instseg_jax.weights import mmdet_yolact_loss as parity
from tests.conftest import SHARED_NUCLEI

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mmdet_yolact_loss_tiny.npz"
NUCLEI = SHARED_NUCLEI
TERM_TOLERANCE = 1e-5  # relative; measured 1.1e-7 (experiments/parity/yolact_loss.py)
GRAD_TOLERANCE = 1e-5  # relative norm of the difference; measured 1.1e-7


def _fixture():
    data = np.load(FIXTURE)
    meta = json.loads(str(data["config"]))
    cfg = parity.yolact_config(
        meta["num_classes"], meta["canvas"], meta["num_protos"], meta["masks_per_image"]
    )
    return data, meta, cfg


def _nuclei_image(meta) -> dict:
    gt = parity.nuclei_ground_truth(NUCLEI, meta["canvas"], meta["stride"])
    assert gt["checksum"] == meta["nuclei_checksum"], "the shared nuclei masks changed"
    return gt


def _ground_truth(images, meta) -> dict:
    side = meta["canvas"] // meta["stride"]
    return parity.padded_ground_truth(images, meta["max_instances"], side)


def _check_batch(data, cfg, k, gt, batch):
    theirs = {n[len(f"b{k}_mmdet_") :]: data[n] for n in data.files if n.startswith(f"b{k}_mmdet_")}
    outputs = tuple(data[f"b{k}_{name}"] for name in parity.INPUTS)
    slots = (theirs["slot_anchor"], theirs["slot_valid"])
    ours, targets = parity.yolact_losses(outputs, gt, cfg, slots)
    np.testing.assert_array_equal(targets["classes"], theirs["classes"], err_msg=batch)
    np.testing.assert_array_equal(targets["ignored"], theirs["ignored"], err_msg=batch)
    for term in parity.TERMS:
        assert parity.relative_difference(ours[term], theirs[term]) < TERM_TOLERANCE, (batch, term)
    for name in parity.INPUTS:
        grad = f"grad_{name}"
        assert parity.relative_difference(ours[grad], theirs[grad]) < GRAD_TOLERANCE, (batch, grad)
    return theirs


def test_yolact_targets_losses_and_gradients_match_mmdetection():
    data, meta, cfg = _fixture()
    checked = 0
    for k, names in enumerate(meta["batches"]):
        if "nuclei" in names:
            continue  # test_yolact_nuclei_scene_matches_mmdetection
        gt = {n: data[f"b{k}_gt_{n}"] for n in parity.GT_FIELDS}
        theirs = _check_batch(data, cfg, k, gt, "+".join(names))
        checked += 1
        if names == ["empty", "empty"]:
            assert theirs["loss_cls"] > 0 and theirs["loss_mask"] == 0.0
    assert checked == 2


def test_yolact_nuclei_scene_matches_mmdetection():
    """Real nuclei: slivers filtered on both sides, more positives than trained masks (the
    reference's random subset injected into ours)."""
    if not NUCLEI.is_dir():
        pytest.skip(f"no nuclei source at {NUCLEI}")
    data, meta, cfg = _fixture()
    (k,) = [i for i, names in enumerate(meta["batches"]) if "nuclei" in names]
    names = meta["batches"][k]
    images = [_nuclei_image(meta) if n == "nuclei" else _empty(meta) for n in names]
    theirs = _check_batch(data, cfg, k, _ground_truth(images, meta), "+".join(names))
    assert theirs["positives"][0] > meta["masks_per_image"], "the nuclei must overflow the budget"


def _empty(meta) -> dict:
    side = meta["canvas"] // meta["stride"]
    return {
        "boxes": np.zeros((0, 4), np.float32),
        "classes": np.zeros((0,), np.int32),
        "masks": np.zeros((0, side, side), bool),
    }


def test_yolact_coco_recipe_anchors_are_mmdetections():
    """The COCO recipe's anchors (640 x 640 canvas, model.anchor_extent_hw (550, 550)) sit where
    mmdetection's yolact_r50_1xb8-55e_coco.py puts them on its 550 x 550 image (strides 550 /
    (69, 35, 18, 9, 5)): three cells per level of theirs, stored in the fixture. Without the
    extent (the canvas grid, strides 8 .. 128) they would be off by up to 81 px."""
    from instseg_jax import config as config_lib
    from instseg_jax.methods import yolact

    data = np.load(FIXTURE)
    config = config_lib.load("experiments/yolact_r50_coco.py")
    cfg = yolact.YOLACTConfig.from_config(config.model, 80, config.input.canvas_hw)
    assert tuple(cfg.anchor_extent_hw) == (550, 550)
    levels = cfg.anchors()
    for level, (y, x), theirs in zip(
        data["coco_anchors_level"],
        data["coco_anchors_cell_yx"],
        data["coco_anchors_anchors"],
        strict=True,
    ):
        width = cfg.canvas_hw[1] // (8 << level)
        ours = np.asarray(levels[level]).reshape(-1, width, 3, 4)[y, x]
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=f"level {level} cell {y, x}")
    assert len(data["coco_anchors_level"]) == 15


HEAD_FIXTURE = FIXTURE.with_name("mmdet_yolact_head_tiny.npz")
PARAM_GRAD_TOLERANCE = 1e-5  # relative, per parameter tensor; measured 5.5e-7


@pytest.mark.slow  # 15 s with a cold compilation cache, 3 s warm: over the fast tier's budget
def test_yolact_heads_from_mmdetection_weights_match_its_losses_and_parameter_gradients():
    """mmdetection's YOLACTHead and YOLACTProtonet (with its protonet and semantic convolution)
    state dict, converted by convert_mmdet_heads, on the fixture's random FPN features: the four
    terms and the gradient of their sum with respect to every head parameter match
    mmdetection's (experiments/parity/yolact_loss.py --make-head-fixture)."""
    _, meta, cfg = _fixture()
    heads = np.load(HEAD_FIXTURE)
    head_meta = json.loads(str(heads["config"]))
    state = {n[len("state_") :]: heads[n] for n in heads.files if n.startswith("state_")}
    params = parity.convert_mmdet_heads(state)
    checked = 0
    for k, names in enumerate(head_meta["batches"]):
        if "nuclei" in names:
            if not NUCLEI.is_dir():
                continue  # the synthetic batch still runs; the nuclei one needs the shared data
            images = [_nuclei_image(meta) if n == "nuclei" else _empty(meta) for n in names]
            gt = _ground_truth(images, meta)
        else:
            gt = {n: heads[f"h{k}_gt_{n}"] for n in parity.GT_FIELDS}
        features = [heads[f"h{k}_p{level}"] for level in range(3, 8)]
        slots = (heads[f"h{k}_mmdet_slot_anchor"], heads[f"h{k}_mmdet_slot_valid"])
        ours, grads = parity.yolact_head_losses(
            params, features, gt, cfg, head_meta["channels"], slots
        )
        for term in parity.TERMS:
            theirs = float(heads[f"h{k}_mmdet_{term}"])
            assert parity.relative_difference(ours[term], theirs) < TERM_TOLERANCE, (names, term)
        prefix = f"h{k}_mmdet_grad_"
        their_grads = parity.convert_mmdet_heads(
            {n[len(prefix) :]: heads[n] for n in heads.files if n.startswith(prefix)}
        )
        theirs = flatten_dict(their_grads, sep="/")
        for name, grad in flatten_dict(grads, sep="/").items():
            difference = parity.relative_difference(grad, theirs[name])
            assert difference < PARAM_GRAD_TOLERANCE, (names, name, difference)
        checked += 1
    assert checked >= 1
