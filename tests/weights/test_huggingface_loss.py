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
set_targets and loss_fn, with no torch installed.
"""

import json
from pathlib import Path

import jax
import numpy as np

from instseg_jax.methods import mask2former as m2f

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf_mask2former_loss_tiny.npz"
TERM_TOLERANCE = 1e-5  # relative; measured 4e-7 (experiments/benchmarks/RESULTS.md)
GRAD_TOLERANCE = 1e-5  # relative norm of the difference; measured 2e-7


def relative_norm(ours, theirs) -> float:
    return float(np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs))


def test_matching_losses_and_logit_gradients_match_transformers():
    data = np.load(FIXTURE)
    meta = json.loads(str(data["config"]))
    cfg = m2f.Mask2FormerConfig(
        num_classes=meta["num_classes"],
        canvas_hw=(meta["size"], meta["size"]),
        train_points=meta["points"],
        match_points=meta["points"],
    )
    batch = {
        "gt_valid": data["gt_valid"],
        "gt_classes": data["gt_classes"],
        "gt_full_masks": data["gt_masks"],
    }
    draws = {name: data[f"draws_{name}"] for name in ("match", "candidates", "fill")}

    def total(class_logits, mask_logits):
        targets = m2f.set_targets(class_logits, mask_logits, batch, cfg, jax.random.key(0), draws)
        outputs = {"class_logits": class_logits, "targets": targets}
        layers = m2f.layer_losses(outputs, batch, cfg)
        return m2f.loss_fn(outputs, batch, cfg)[0], (layers, targets["query_to_gt"])

    program = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))
    (_, (layers, query_to_gt)), (class_grad, mask_grad) = program(
        data["class_logits"], data["mask_logits"]
    )
    # The matching of every layer and image, exactly (-1: the query is unmatched); the crowded
    # scene leaves two of its ten ground truths unmatched, the empty one every query.
    np.testing.assert_array_equal(np.asarray(query_to_gt), data["query_to_gt"])
    assert (data["query_to_gt"][:, 1] >= 0).all() and (data["query_to_gt"][:, 2] < 0).all()
    terms = np.stack(
        [
            cfg.class_weight * np.asarray(layers["ce"]),
            cfg.mask_weight * np.asarray(layers["mask"]),
            cfg.dice_weight * np.asarray(layers["dice"]),
        ],
        -1,
    )  # [P, (class, mask BCE, dice)]
    np.testing.assert_allclose(terms, data["terms"], rtol=TERM_TOLERANCE, atol=0)
    assert relative_norm(class_grad, data["class_grad"]) <= GRAD_TOLERANCE
    assert relative_norm(mask_grad, data["mask_grad"]) <= GRAD_TOLERANCE
