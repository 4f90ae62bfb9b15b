"""Mask2Former's matching and losses reproduce transformers' Mask2FormerLoss and
Mask2FormerHungarianMatcher on the same logits, ground truth and random points.

tests/fixtures/hf_mask2former_loss_tiny.npz was written by `experiments/parity/
mask2former_loss.py --make-fixture` in the peer environment (torch + transformers): the class
and mask logits of all 4 prediction layers of the output parity's tiny model on three 64 x 64
scenes (four objects of three classes; ten discs for eight queries; none), their stride-4
ground-truth masks, the uniform draws both sides used (transformers' through a patched
torch.rand: matching points, importance-sampling candidates and fill points) and transformers'
answers: its weighted loss terms per layer, its matcher's indices per layer and image, and the
gradient of its total loss with respect to the logits. Here the same inputs go through
set_targets and loss_fn, with no torch installed. The fixture's "nuclei/" case holds the same
answers on a batch of three crops of real nuclei images (ten touching nuclei for 8 queries,
three, none), whose pixels and masks it does not hold: the crops are re-read here from the
shared data set (skipped where it is missing) and checked against the stored digests. Both
batches have one shape: one compiled program serves both tests.
"""

import functools
import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from instseg_jax.methods import mask2former as m2f
from instseg_jax.weights import loss_parity
from tests.conftest import SHARED_NUCLEI

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf_mask2former_loss_tiny.npz"
TERM_TOLERANCE = 1e-5  # relative; measured 4e-7 (experiments/benchmarks/RESULTS.md)
GRAD_TOLERANCE = 1e-5  # relative norm of the difference; measured 2e-7


def relative_norm(ours, theirs) -> float:
    return float(np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs))


def strided(masks: np.ndarray) -> np.ndarray:
    """The pipeline's stride-4 masks of full-resolution ones (input/transforms.py
    _strided_masks at scale 1: the mean of each cell's four central pixels, thresholded at
    0.5), as experiments/parity/mask2former_loss.py gave them to both sides."""
    cells = [masks[..., a::4, b::4].astype(np.float64) for a in (1, 2) for b in (1, 2)]
    return sum(cells) / 4 >= 0.5


def config(data) -> m2f.Mask2FormerConfig:
    meta = json.loads(str(data["config"]))
    return m2f.Mask2FormerConfig(
        num_classes=meta["num_classes"],
        canvas_hw=(meta["size"], meta["size"]),
        train_points=meta["points"],
        match_points=meta["points"],
    )


@functools.cache
def program(cfg):
    """jit of (class logits, mask logits, batch, draws) -> ((total, (per-layer terms,
    query_to_gt)), logit gradients): batches of one shape share its compile."""

    def total(class_logits, mask_logits, batch, draws):
        targets = m2f.set_targets(class_logits, mask_logits, batch, cfg, jax.random.key(0), draws)
        outputs = {"class_logits": class_logits, "targets": targets}
        layers = m2f.layer_losses(outputs, batch, cfg)
        return m2f.loss_fn(outputs, batch, cfg)[0], (layers, targets["query_to_gt"])

    return jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))


def our_answers(cfg, case, batch: dict):
    """(weighted terms [P, (class, mask BCE, dice)], query_to_gt, class and mask logit
    gradients) of ours on a case's stored logits and draws."""
    draws = {name: case[f"draws_{name}"] for name in ("match", "candidates", "fill")}
    (_, (layers, query_to_gt)), (class_grad, mask_grad) = program(cfg)(
        case["class_logits"], case["mask_logits"], batch, draws
    )
    terms = np.stack(
        [
            cfg.class_weight * np.asarray(layers["ce"]),
            cfg.mask_weight * np.asarray(layers["mask"]),
            cfg.dice_weight * np.asarray(layers["dice"]),
        ],
        -1,
    )
    return terms, np.asarray(query_to_gt), class_grad, mask_grad


def test_matching_losses_and_logit_gradients_match_transformers():
    data = np.load(FIXTURE)
    cfg = config(data)
    batch = {
        "gt_valid": data["gt_valid"],
        "gt_classes": data["gt_classes"],
        "gt_full_masks": data["gt_masks"],
    }
    terms, query_to_gt, class_grad, mask_grad = our_answers(cfg, data, batch)
    # The matching of every layer and image, exactly (-1: the query is unmatched); the crowded
    # scene leaves two of its ten ground truths unmatched, the empty one every query.
    np.testing.assert_array_equal(query_to_gt, data["query_to_gt"])
    assert (data["query_to_gt"][:, 1] >= 0).all() and (data["query_to_gt"][:, 2] < 0).all()
    np.testing.assert_allclose(terms, data["terms"], rtol=TERM_TOLERANCE, atol=0)
    assert relative_norm(class_grad, data["class_grad"]) <= GRAD_TOLERANCE
    assert relative_norm(mask_grad, data["mask_grad"]) <= GRAD_TOLERANCE


def test_matching_and_losses_on_nuclei_crops_match_transformers():
    """Real images: ten touching nuclei (some cut by the crop) for 8 queries, three nuclei, a
    crop of background; one class. The same matching, terms and logit gradients as
    transformers' on its logits and draws."""
    data = np.load(FIXTURE)
    case = {k.removeprefix("nuclei/"): data[k] for k in data.files if k.startswith("nuclei/")}
    assert case, f"{FIXTURE.name} has no nuclei case: regenerate it (mask2former_loss.py)"
    if not SHARED_NUCLEI.is_dir():
        pytest.skip(f"no nuclei source at {SHARED_NUCLEI} (the nuclei loss-parity case)")
    specs = [loss_parity.NucleiCrop.from_json(str(text)) for text in case["specs"]]
    crops = [loss_parity.nuclei_scene(SHARED_NUCLEI, spec) for spec in specs]
    regenerate = "the data set or the crops' code changed: regenerate the fixture"
    assert [loss_parity.scene_digest(c) for c in crops] == case["digests"].tolist(), regenerate
    slots = data["gt_valid"].shape[1]  # the synthetic batch's layout: valid slots first
    full_masks = np.zeros((len(crops), slots, *crops[0].image.shape[:2]), bool)
    valid = np.zeros((len(crops), slots), bool)
    for i, crop in enumerate(crops):
        full_masks[i, : len(crop.masks)] = crop.masks
        valid[i, : len(crop.masks)] = True
    masks = strided(full_masks)
    assert hashlib.sha256(masks.tobytes()).hexdigest() == str(case["strided_digest"]), regenerate
    batch = {
        "gt_valid": valid,
        "gt_classes": np.zeros((len(crops), slots), np.int32),
        "gt_full_masks": masks,
    }
    terms, query_to_gt, class_grad, mask_grad = our_answers(config(data), case, batch)
    np.testing.assert_array_equal(query_to_gt, case["query_to_gt"])
    assert [len(crop.boxes) for crop in crops] == [10, 3, 0]
    matched = (case["query_to_gt"] >= 0).sum(-1)  # [layer, image]
    assert (matched == [8, 3, 0]).all(), matched
    np.testing.assert_allclose(terms, case["terms"], rtol=TERM_TOLERANCE, atol=0)
    assert relative_norm(class_grad, case["class_grad"]) <= GRAD_TOLERANCE
    assert relative_norm(mask_grad, case["mask_grad"]) <= GRAD_TOLERANCE
