"""Loss parity of our Mask2Former's training side (methods/mask2former.py: set_targets,
layer_losses, loss_fn) with transformers' Mask2FormerLoss and Mask2FormerHungarianMatcher
(`make parity`: the peer environment with torch and transformers).

    .venv-peer/bin/python experiments/parity/mask2former_loss.py
    .venv-peer/bin/python experiments/parity/mask2former_loss.py --make-fixture \
        tests/fixtures/hf_mask2former_loss_tiny.npz                    # the CI test's data

The model is experiments/parity/mask2former.py's tiny one (the same seeded weights as the
output parity, train_num_points 64), on three 64 x 64 scenes: four objects of three classes,
a crowded one (ten small discs for eight queries: two ground truths stay unmatched) and an
empty one, in one batch; then a batch of three real images (NUCLEI: 128 px crops of DSB 2018
fluorescence images halved to 64 x 64, their nuclei as one class: ten touching nuclei for 8
queries, three, none; read from ../shared/data, skipped when missing; the fixture keeps the
crops and digests of the scenes and of their stride-4 masks, transformers' answers and the
draws, not the pixels or masks). Both batches have SLOTS ground-truth slots per image.

The same random points on both sides: every uniform draw comes from one NumPy generator and is
fed to both. Ours takes them through set_targets(..., draws=...) (the matching points per layer
and image, the candidate and fill points of the importance sampling per layer and ground-truth
slot); transformers gets them through torch.rand, patched for the duration of its loss call
only (ServedDraws: its matcher's torch.rand(1, N, 2) per image, then its
sample_points_using_uncertainty's torch.rand(pairs, 3N, 2) and torch.rand(pairs, N/4, 2), whose
rows are served in the order of its matched pairs). Each side still selects the uncertain
points itself (top-k of -|logit| at the candidates).

Ground truth: the known deviation of issue 28 item 7 (declared in methods/mask2former.py:
ours samples the stride-4 masks the pipeline makes, at cell centres, thresholded at 0.5, where
the reference samples the full-resolution masks) has no ground truth on which the two agree
except trivial ones (a bilinear sample of a 4x4-block mask at full resolution ramps over one
pixel at a block edge, the stride-4 one over four). So transformers gets the stride-4 masks
(its sampling reads any resolution in [0, 1] coordinates) for the parity proper, and a second
call with the full-resolution masks reports what the deviation changes, term by term.

Checks (tolerances in TOLERANCES): (1) on transformers' own logits: the matching indices of
every layer and image (exact), each weighted loss term per layer (class, mask BCE, dice;
relative error) and the gradient of the total loss with respect to the logits (relative norm
of the difference); (2) end to end, through the converted model: the terms again and the
gradient with respect to the prediction heads' parameters (decoder LayerNorm, class head, mask
embedding MLP). With --make-fixture the logits, ground truth, draws and transformers' answers
of (1) are written for tests/weights/test_huggingface_loss.py (no torch).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Mask2FormerForUniversalSegmentation  # noqa: E402

ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from instseg_jax.methods import mask2former as m2f  # noqa: E402
from instseg_jax.weights import huggingface as hf  # noqa: E402
from instseg_jax.weights import loss_parity  # noqa: E402

_spec = importlib.util.spec_from_file_location("mask2former_output_parity", HERE / "mask2former.py")
output_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(output_parity)

SIZE = 64
STRIDE = m2f.MASK_STRIDE
POINTS = 64
SLOTS = 10  # ground-truth slots per image (the crowded scene's count)
SHARED_NUCLEI = ROOT.parent / "shared" / "data" / "dsb2018_nuclei" / "stage1_train"
# The nuclei batch: ten touching nuclei (21 to 224 px^2, some cut by the crop) for the 8
# queries, three nuclei, and a crop of background, each 128 px of a fluorescence image halved.
NUCLEI = tuple(
    loss_parity.NucleiCrop(image_id, (top, left, 2 * SIZE, 2 * SIZE), (SIZE, SIZE))
    for image_id, top, left in (
        ("37ed50eea5a1e0bade3e6753793b6caeb061cd4c2f365658c257f69cab1f6288", 16, 96),
        ("98c5ead89cd066637efd5c93a6edc55c85908eb66807471f0d246d5457341f9c", 0, 112),
        ("00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552", 32, 0),
    )
)
TERMS = ("ce", "mask", "dice")
REFERENCE_TERMS = {"ce": "loss_cross_entropy", "mask": "loss_mask", "dice": "loss_dice"}
# (1) on the same logits: float32 noise of sums over 64 points and 24 queries;
# (2) end to end: the forward's own parity is 1e-4 relative (experiments/parity/mask2former.py).
TOLERANCES = {"terms": 1e-5, "logit_grad": 1e-5, "end_to_end_terms": 1e-4, "head_grad": 1e-4}


# ----------------------------------------------------------------------------- scenes


def scenes(seed: int = 5):
    """images uint8[3, S, S, 3], full-resolution masks bool[3, SLOTS, S, S], classes
    int[3, SLOTS], valid bool[3, SLOTS] (valid slots first): four objects of three classes
    (discs and rectangles, 6 to 24 px), ten discs of radius 3 to 5 px, nothing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    masks = np.zeros((3, SLOTS, SIZE, SIZE), bool)
    classes = np.zeros((3, SLOTS), np.int64)
    valid = np.zeros((3, SLOTS), bool)
    for slot in range(4):
        cy, cx = rng.uniform(12, 52, 2)
        if slot % 2:
            h, w = rng.uniform(6, 24, 2)
            masks[0, slot] = (abs(y - cy) < h / 2) & (abs(x - cx) < w / 2)
        else:
            masks[0, slot] = (y - cy) ** 2 + (x - cx) ** 2 < rng.uniform(4, 11) ** 2
        classes[0, slot] = slot % 3
    for slot in range(SLOTS):
        cy, cx = rng.uniform(6, 58, 2)
        masks[1, slot] = (y - cy) ** 2 + (x - cx) ** 2 < rng.uniform(3, 5) ** 2
        classes[1, slot] = rng.integers(0, 3)
    valid[0, :4] = valid[1] = True
    images = rng.normal(100, 20, (3, SIZE, SIZE, 3))
    for i in range(3):
        for slot in np.flatnonzero(valid[i]):
            images[i][masks[i, slot]] = rng.uniform(0, 255, 3)
    return np.clip(np.round(images), 0, 255).astype(np.uint8), masks, classes, valid


def strided(masks: np.ndarray) -> np.ndarray:
    """The pipeline's stride-4 masks (input/transforms.py _strided_masks at scale 1): each cell
    is the full-resolution mask bilinearly sampled at the cell centre, (4i + 2, 4j + 2) in pixel
    units, i.e. the mean of its four central pixels, thresholded at 0.5."""
    centre = masks[..., 1::STRIDE, 1::STRIDE].astype(np.float64)
    centre += masks[..., 2::STRIDE, 1::STRIDE] + masks[..., 1::STRIDE, 2::STRIDE]
    centre += masks[..., 2::STRIDE, 2::STRIDE]
    return centre / 4 >= 0.5


def draws(num_layers: int, batch: int, seed: int = 11, slots: int = SLOTS) -> dict:
    """The uniform draws both sides use, in set_targets' layout (per layer, image and slot)."""
    rng = np.random.default_rng(seed)
    kept = int(0.75 * POINTS)
    return {
        "match": rng.random((num_layers, batch, POINTS, 2), np.float32),
        "candidates": rng.random((num_layers, batch, slots, 3 * POINTS, 2), np.float32),
        "fill": rng.random((num_layers, batch, slots, POINTS - kept, 2), np.float32),
    }


# ----------------------------------------------------------------------------- transformers


class ServedDraws:
    """torch.rand for the duration of one transformers loss call: serves `shared` draws in the
    order transformers asks for them. Mask2FormerLoss.forward matches and scores the last layer
    first, then the auxiliary ones in order; per layer its matcher draws (1, N, 2) per image,
    then sample_points_using_uncertainty draws (pairs, 3N, 2) candidates and (pairs, N - 3N/4,
    2) fill points, one row per matched pair in the matcher's order (image by image, queries
    ascending). The matcher's answers are recorded (`indices[layer]`) to order those rows."""

    def __init__(self, model, shared: dict):
        self.shared = shared
        num_layers, batch = shared["match"].shape[:2]
        self.order = [num_layers - 1, *range(num_layers - 1)]
        self.batch = batch
        self.indices = {}
        self.matcher = model.criterion.matcher
        self._stream = self._serve()

    def _serve(self):
        for layer in self.order:
            for image in range(self.batch):
                yield self.shared["match"][layer, image][None]
            pairs = [
                (image, int(gt))
                for image, (_, gts) in enumerate(self.indices[layer])
                for gt in gts.tolist()
            ]
            rows = tuple(np.array(a, np.int64) for a in zip(*pairs, strict=True))
            yield self.shared["candidates"][layer][rows]
            yield self.shared["fill"][layer][rows]

    def rand(self, *size, **kwargs):
        if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size):
            size = tuple(size[0])
        served = next(self._stream)
        if tuple(served.shape) != tuple(size):
            raise RuntimeError(
                f"transformers asked torch.rand{tuple(size)} where {served.shape} was next: "
                "its loss's order of draws changed (ServedDraws)"
            )
        return torch.from_numpy(np.ascontiguousarray(served))

    def __enter__(self):
        self._rand, self._forward = torch.rand, self.matcher.forward
        torch.rand = self.rand
        layers = iter(self.order)

        def recording_forward(*args, **kwargs):
            answer = self._forward(*args, **kwargs)
            self.indices[next(layers)] = answer
            return answer

        self.matcher.forward = recording_forward
        return self

    def __exit__(self, *exc):
        torch.rand = self._rand
        del self.matcher.forward  # the instance attribute: the class's forward again
        if exc[0] is None and next(self._stream, None) is not None:
            raise RuntimeError("transformers' loss used fewer draws than ServedDraws holds")


def reference_loss(model, classes, masks, gt_masks, gt_classes, valid, shared):
    """transformers' weighted loss dict and matching for per-layer logits (lists of torch
    tensors, last layer last), with `shared` draws: ({(term, layer): value}, total tensor,
    query_to_gt int[P, B, Q])."""
    labels = [torch.from_numpy(gt_masks[i][valid[i]].astype(np.float32)) for i in range(len(valid))]
    class_labels = [torch.from_numpy(gt_classes[i][valid[i]]) for i in range(len(valid))]
    aux = [
        {"masks_queries_logits": m, "class_queries_logits": c}
        for m, c in zip(masks[:-1], classes[:-1], strict=True)
    ]
    with ServedDraws(model, shared) as served:
        loss_dict = model.get_loss_dict(masks[-1], classes[-1], labels, class_labels, aux)
    num_layers = len(classes)
    terms = {}
    for term, name in REFERENCE_TERMS.items():
        for layer in range(num_layers):
            key = name if layer == num_layers - 1 else f"{name}_{layer}"
            terms[term, layer] = float(loss_dict[key].detach())
    batch, queries = classes[0].shape[:2]
    query_to_gt = np.full((num_layers, batch, queries), -1)
    for layer, per_image in served.indices.items():
        for image, (rows, cols) in enumerate(per_image):
            query_to_gt[layer, image, rows.numpy()] = cols.numpy()
    return terms, model.get_loss(loss_dict), query_to_gt


def build(seed: int = 0):
    """experiments/parity/mask2former.py's model (the same seeded weights) with POINTS points."""
    config = output_parity.tiny_config()
    config.train_num_points = POINTS
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    output_parity.widen(model, torch.Generator().manual_seed(seed + 1))
    return model


def pixels(images: np.ndarray) -> torch.Tensor:
    scaled = (images.astype(np.float64) - output_parity.MEAN) / output_parity.STD
    return torch.from_numpy(scaled.transpose(0, 3, 1, 2).astype(np.float32))


def reference_logits(model, images):
    """Per-layer class and mask logits (lists, last layer last) with their autograd graph."""
    out = model(pixel_values=pixels(images), output_auxiliary_logits=True)
    classes = [a["class_queries_logits"] for a in out.auxiliary_logits]
    masks = [a["masks_queries_logits"] for a in out.auxiliary_logits]
    return classes + [out.class_queries_logits], masks + [out.masks_queries_logits]


HEADS = {  # our heads' parameters -> transformers' module
    "decoder_norm": "model.transformer_module.decoder.layernorm",
    "class_embed": "class_predictor",
    **{
        f"mask_embed{i}": f"model.transformer_module.decoder.mask_predictor.mask_embedder.{i}.0"
        for i in range(3)
    },
}


def reference_head_grads(model) -> dict:
    """{(ours' module, our param name): gradient in our layout} of the last backward."""
    modules = dict(model.named_modules())
    out = {}
    for ours, theirs in HEADS.items():
        module = modules[theirs]
        if isinstance(module, torch.nn.LayerNorm):
            out[ours, "scale"] = module.weight.grad.numpy()
        else:
            out[ours, "kernel"] = module.weight.grad.numpy().T
        out[ours, "bias"] = module.bias.grad.numpy()
    return out


# ----------------------------------------------------------------------------- ours


def our_config(fields: dict, num_classes: int, hf_config: dict) -> m2f.Mask2FormerConfig:
    cfg = m2f.Mask2FormerConfig(
        num_classes=num_classes,
        canvas_hw=(SIZE, SIZE),
        train_points=POINTS,
        match_points=POINTS,
        **fields,
    )
    # The loss settings are transformers' defaults and our COCO recipe's alike: check, not set.
    for ours, theirs in (
        ("class_weight", "class_weight"),
        ("mask_weight", "mask_weight"),
        ("dice_weight", "dice_weight"),
        ("no_object_weight", "no_object_weight"),
        ("oversample_ratio", "oversample_ratio"),
        ("importance_sample_ratio", "importance_sample_ratio"),
        ("deep_supervision", "use_auxiliary_loss"),
    ):
        if getattr(cfg, ours) != hf_config[theirs]:
            raise SystemExit(f"model.{ours} {getattr(cfg, ours)} != transformers' {theirs}")
    return cfg


def our_batch(images, masks, classes, valid) -> dict:
    return {
        "image": images.astype(np.float32),
        "gt_valid": valid,
        "gt_classes": classes.astype(np.int32),
        "gt_full_masks": strided(masks),
    }


def our_loss(class_logits, mask_logits, batch, cfg, shared):
    """(total, per-layer weighted terms {term: [P]}, query_to_gt [P, B, Q]) of ours."""
    key = jax.random.key(0)  # unused for draws: every draw is given
    targets = m2f.set_targets(class_logits, mask_logits, batch, cfg, key, shared)
    outputs = {"class_logits": class_logits, "targets": targets}
    total, _ = m2f.loss_fn(outputs, batch, cfg)
    layers = m2f.layer_losses(outputs, batch, cfg)
    weights = {"ce": cfg.class_weight, "mask": cfg.mask_weight, "dice": cfg.dice_weight}
    terms = {term: weights[term] * layers[term] for term in TERMS}
    return total, (terms, targets["query_to_gt"])


def logit_program(cfg):
    """jit of (total, (terms, matching)) and its gradient w.r.t. both logits."""

    def run(class_logits, mask_logits, batch, shared):
        return jax.value_and_grad(our_loss, argnums=(0, 1), has_aux=True)(
            class_logits, mask_logits, batch, cfg, shared
        )

    return jax.jit(run)


def model_program(cfg):
    """jit of (total, (terms, matching)) and its gradient w.r.t. the params, end to end."""
    model = m2f.Model(cfg)

    def total(params, frozen, batch, shared):
        classes, masks = model.apply(
            {"params": params, "frozen": frozen}, batch["image"], method=m2f.Mask2Former.predict
        )
        return our_loss(classes, masks, batch, cfg, shared)

    return jax.jit(jax.value_and_grad(total, has_aux=True))


# ----------------------------------------------------------------------------- comparison


def relative(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / max(abs(theirs), 1e-12))


def relative_norm(ours, theirs) -> float:
    diff = np.linalg.norm(np.asarray(ours, np.float64) - theirs)
    return float(diff / max(np.linalg.norm(theirs), 1e-12))


def term_errors(ours_terms: dict, theirs_terms: dict, num_layers: int, prefix: str) -> dict:
    return {
        f"{prefix}{term}_{layer}": relative(ours_terms[term][layer], theirs_terms[term, layer])
        for term in TERMS
        for layer in range(num_layers)
    }


def compare(model, cfg, params, frozen, images, full_masks, classes, valid, shared):
    """(figures, the declared deviation's figures, transformers' answers for a fixture) of one
    batch of scenes: (1) on transformers' logits, (2) end to end, then transformers on the
    full-resolution masks."""
    batch = our_batch(images, full_masks, classes, valid)
    gt_masks = batch["gt_full_masks"]

    # transformers' logits, run forward once; (1) its loss on them as leaves.
    with torch.no_grad():
        ref_classes, ref_masks = reference_logits(model, images)
    num_layers = len(ref_classes)
    class_leaves = [c.clone().requires_grad_() for c in ref_classes]
    mask_leaves = [m.clone().requires_grad_() for m in ref_masks]
    theirs_terms, theirs_total, theirs_match = reference_loss(
        model, class_leaves, mask_leaves, gt_masks, classes, valid, shared
    )
    theirs_total.backward()
    theirs_class_grad = np.stack([c.grad.numpy() for c in class_leaves])
    theirs_mask_grad = np.stack([m.grad.numpy() for m in mask_leaves])
    logits_c = np.stack([c.detach().numpy() for c in ref_classes])
    logits_m = np.stack([m.detach().numpy() for m in ref_masks])

    (total, (terms, match)), (grad_c, grad_m) = logit_program(cfg)(
        logits_c, logits_m, batch, shared
    )
    figures = {"layers": num_layers}
    match = np.asarray(match)
    figures["matching_mismatches"] = int((match != theirs_match).sum())
    figures.update(term_errors(terms, theirs_terms, num_layers, ""))
    figures["total"] = relative(total, float(theirs_total.detach()))
    figures["logit_grad_class"] = relative_norm(grad_c, theirs_class_grad)
    figures["logit_grad_mask"] = relative_norm(grad_m, theirs_mask_grad)

    # (2) end to end: transformers' forward and backward with its graph, ours through the
    # converted model.
    model.zero_grad()
    e2e_classes, e2e_masks = reference_logits(model, images)
    e2e_terms, e2e_total, e2e_match = reference_loss(
        model, e2e_classes, e2e_masks, gt_masks, classes, valid, shared
    )
    e2e_total.backward()
    theirs_grads = reference_head_grads(model)
    (our_total, (our_terms, our_match)), grads = model_program(cfg)(params, frozen, batch, shared)
    heads = grads["transformer_decoder"]["heads"]
    figures["end_to_end_matching_mismatches"] = int((np.asarray(our_match) != e2e_match).sum())
    figures.update(term_errors(our_terms, e2e_terms, num_layers, "end_to_end_"))
    figures["end_to_end_total"] = relative(our_total, float(e2e_total.detach()))
    ours_flat = np.concatenate([np.ravel(heads[m][n]) for m, n in theirs_grads])
    theirs_flat = np.concatenate([np.ravel(g) for g in theirs_grads.values()])
    figures["head_grad"] = relative_norm(ours_flat, theirs_flat)
    for (module, name), grad in theirs_grads.items():
        figures[f"head_grad_{module}_{name}"] = relative_norm(heads[module][name], grad)

    # The deviation (issue 28 item 7): transformers with the full-resolution masks.
    with torch.no_grad():
        full_terms, full_total, full_match = reference_loss(
            model, ref_classes, ref_masks, full_masks, classes, valid, shared
        )
    deviation = {
        f"{term}_{layer}": relative(theirs_terms[term, layer], full_terms[term, layer])
        for term in TERMS
        for layer in range(num_layers)
    }
    deviation["total"] = relative(float(theirs_total.detach()), float(full_total))
    deviation["matching_changes"] = int((full_match != theirs_match).sum())
    deviation["matching_changes_per_image"] = (full_match != theirs_match).sum((0, 2)).tolist()
    answers = {
        "class_logits": logits_c,
        "mask_logits": logits_m,
        **{f"draws_{name}": value for name, value in shared.items()},
        "terms": np.array([[theirs_terms[t, layer] for t in TERMS] for layer in range(num_layers)]),
        "query_to_gt": theirs_match.astype(np.int32),
        "class_grad": theirs_class_grad,
        "mask_grad": theirs_mask_grad,
    }
    return figures, deviation, answers


def failures(figures: dict) -> list[str]:
    """The figures beyond TOLERANCES."""
    failed = [
        name
        for name, bar in (
            ("matching_mismatches", 0),
            ("end_to_end_matching_mismatches", 0),
            ("logit_grad_class", TOLERANCES["logit_grad"]),
            ("logit_grad_mask", TOLERANCES["logit_grad"]),
            ("head_grad", TOLERANCES["head_grad"]),
        )
        if figures[name] > bar
    ]
    for name, value in figures.items():
        if name.startswith(TERMS) or name == "total":
            failed += [name] if value > TOLERANCES["terms"] else []
        if name.startswith("end_to_end_") and "matching" not in name:
            failed += [name] if value > TOLERANCES["end_to_end_terms"] else []
    return failed


def nuclei_inputs():
    """(the nuclei Scenes, images, full masks, classes, valid) of NUCLEI in scenes()' layout
    (SLOTS slots per image, valid first, one class); None where the shared data set is
    missing."""
    if not SHARED_NUCLEI.is_dir():
        print(f"no {SHARED_NUCLEI}: the nuclei case is skipped")
        return None
    crops = [loss_parity.nuclei_scene(SHARED_NUCLEI, spec) for spec in NUCLEI]
    masks = np.zeros((len(crops), SLOTS, SIZE, SIZE), bool)
    valid = np.zeros((len(crops), SLOTS), bool)
    for i, crop in enumerate(crops):
        masks[i, : len(crop.masks)] = crop.masks
        valid[i, : len(crop.masks)] = True
    images = np.stack([crop.image for crop in crops])
    return crops, images, masks, np.zeros((len(crops), SLOTS), np.int64), valid


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-fixture", metavar="NPZ", help="write the CI test's data")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    model = build()
    images, full_masks, classes, valid = scenes()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        sd, hf_config = hf.load(tmp)
    params, frozen, fields, num_classes = hf.convert(sd, hf_config)
    cfg = our_config(fields, num_classes, hf_config)
    with torch.no_grad():  # the prediction layers, for the draws' layout
        num_layers = len(reference_logits(model, images[:1])[0])
    shared = draws(num_layers, len(images))
    figures, deviation, answers = compare(
        model, cfg, params, frozen, images, full_masks, classes, valid, shared
    )
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, jax {jax.__version__}"
    )
    print(json.dumps(figures, indent=1))
    print("stride-4 against full-resolution ground truth in transformers (the declared deviation):")
    print(json.dumps(deviation, indent=1))
    failed = failures(figures)
    fixture = {
        "gt_valid": valid,
        "gt_classes": classes.astype(np.int32),
        "gt_masks": strided(full_masks),
        **answers,
    }
    nuclei = nuclei_inputs()
    if nuclei is not None:
        crops, *inputs = nuclei
        nuclei_draws = draws(num_layers, len(crops), seed=12)
        figures, deviation, answers = compare(model, cfg, params, frozen, *inputs, nuclei_draws)
        counts = [len(crop.boxes) for crop in crops]
        print(f"nuclei crops {NUCLEI} ({counts} nuclei, {cfg.num_queries} queries):")
        print(json.dumps(figures, indent=1))
        print("nuclei, stride-4 against full-resolution ground truth in transformers:")
        print(json.dumps(deviation, indent=1))
        failed += [f"nuclei {name}" for name in failures(figures)]
        fixture["nuclei/specs"] = np.asarray([spec.as_json() for spec in NUCLEI])
        fixture["nuclei/digests"] = np.asarray([loss_parity.scene_digest(c) for c in crops])
        strided_masks = np.ascontiguousarray(strided(inputs[1]))
        fixture["nuclei/strided_digest"] = np.asarray(
            hashlib.sha256(strided_masks.tobytes()).hexdigest()
        )
        fixture.update({f"nuclei/{k}": v for k, v in answers.items()})
    print(f"tolerances {TOLERANCES}: {'all within' if not failed else 'ABOVE: ' + str(failed)}")
    if args.make_fixture:
        np.savez_compressed(
            args.make_fixture,
            config=np.array(
                json.dumps({"num_classes": num_classes, "points": POINTS, "size": SIZE})
            ),
            **fixture,
        )
        print(f"wrote {args.make_fixture}")
    sys.exit(0 if not failed else 1)


if __name__ == "__main__":
    main()
