"""Our side of the torchvision parity check, and the comparison itself.

experiments/parity/torchvision.py runs torchvision's model (in the `make peer` environment) and
this module's `run_converted` on the same image, then `compare`s them; tests/weights compares
`run_converted` with torchvision outputs stored in tests/fixtures (no torch needed there).

Outputs on both sides are NumPy dicts in torchvision's terms:
  features     {"p2".."p6": float32[H_l, W_l, D]} (torchvision's "0".."3", "pool", as NHWC)
  proposals    float32[P, 4] sorted by objectness, resized-image pixels
  boxes        float32[K, 4] detections in original pixels, sorted by score
  scores       float32[K]
  labels       int[K] torchvision's labels (1..C; our class + 1)
  masks        float32[K, H, W] pasted mask probabilities at the original size
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from instseg_jax import builders, compilation, detections, structures
from instseg_jax.methods.fcos import FCOS
from instseg_jax.methods.keypoint_rcnn import KeypointRCNN
from instseg_jax.methods.mask_rcnn import MaskRCNN
from instseg_jax.weights import torchvision as tv
from instseg_jax.weights import torchvision_fcos, torchvision_keypoint

LEVELS = ("p2", "p3", "p4", "p5", "p6")
FCOS_LEVELS = ("p3", "p4", "p5", "p6", "p7")
# The figures ../issues ask for: feature relative error, proposal and box coordinates (px),
# scores, pasted-mask IoU.
TOLERANCES = {
    "features": 1e-4,
    "proposals": 1e-3,
    "boxes": 1e-2,
    "scores": 1e-4,
    "mask_iou": 0.99,
    "keypoints": 1e-2,  # px, where both sides' heatmap maxima fall in the same cell
    "keypoint_maxima_agree": 0.95,
    # Keypoint scores are heatmap logits (tens with random weights, after 8 convolutions of
    # 512 channels), whose float32 error scales with the heatmap, not with the value read:
    # relative to the detection's largest |score| (at least 1).
    "keypoint_scores": 1e-4,
}


def converted_config(
    arch: dict,
    padded_hw,
    score_threshold: float = 0.05,
    min_size=800,
    max_size=1333,
    overrides: dict | None = None,
):
    """MaskRCNNConfig of converted weights on a canvas equal to torchvision's padded batch
    (``overrides``: model fields to change, e.g. to show what a convention is worth)."""
    config = tv.coco_config(arch, padded_hw)
    config.input.short_side = (min_size,)
    config.input.max_long_side = max_size
    config.input.test_short_side = min_size
    config.input.test_max_long_side = max_size
    config.model.score_threshold = score_threshold
    config.model.update(overrides or {})
    return builders.model_config(config, arch["num_classes"])


def _one_image_batch(pixels: np.ndarray, resized_hw, orig_hw) -> dict:
    """The batch of one image as tv.preprocess gave it: resized to resized_hw (no crop) and
    padded to pixels' canvas."""
    h, w = resized_hw
    return {
        "image": pixels[None],
        "image_hw": np.asarray([[h, w]], np.int32),
        "orig_hw": np.asarray([orig_hw], np.int32),
        "scale": np.asarray([h / orig_hw[0]], np.float32),
        "crop_offset": np.zeros((1, 2), np.int32),
    }


def run_converted(
    variables,
    arch: dict,
    image: np.ndarray,
    score_threshold: float = 0.05,
    min_size: int = 800,
    max_size: int = 1333,
    overrides: dict | None = None,
) -> dict:
    """Our model with converted weights on uint8 image[H, W, 3], fed exactly as torchvision
    feeds its own (float resize, mean-colour padding to a multiple of 32)."""
    pixels, resized_hw = tv.preprocess(image, min_size, max_size)
    cfg = converted_config(arch, pixels.shape[:2], score_threshold, min_size, max_size, overrides)
    model = MaskRCNN(cfg)
    batch = _one_image_batch(pixels, resized_hw, image.shape[:2])
    features = compilation.jit(lambda v, x: model.apply(v, x, method=MaskRCNN.features))(
        variables, batch["image"]
    )
    outputs = compilation.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)
    outputs, features = jax.device_get((outputs, features))
    valid = outputs["proposal_valid"][0]
    det = outputs["detections"]
    keep = np.flatnonzero(det["valid"][0])
    boxes = det["boxes"][0][keep]
    return {
        "features": {k: features[k][0] for k in LEVELS},
        "proposals": outputs["proposal_boxes"][0][valid],
        "proposal_scores": 1.0 / (1.0 + np.exp(-outputs["proposal_scores"][0][valid])),
        "boxes": boxes,
        "scores": det["scores"][0][keep],
        "labels": det["classes"][0][keep] + 1,
        "masks": np.stack(
            [
                _pasted(m, box, image.shape[:2])
                for m, box in zip(det["masks"][0][keep], boxes, strict=True)
            ]
        )
        if len(keep)
        else np.zeros((0, *image.shape[:2]), bool),
    }


def run_converted_fcos(
    variables,
    arch: dict,
    image: np.ndarray,
    score_threshold: float = 0.2,
    min_size: int = 800,
    max_size: int = 1333,
    divisor: int = 128,
    overrides: dict | None = None,
) -> dict:
    """Converted torchvision FCOS weights (weights/torchvision_fcos.py) on uint8 image[H, W, 3],
    fed as torchvision feeds its own with ``transform.size_divisible = divisor``: features
    p3..p7 and the detections, in `compare`'s terms (no proposals, no masks). ``overrides``:
    model fields to change, e.g. to show what a convention is worth."""
    pixels, resized_hw = tv.preprocess(image, min_size, max_size, divisor)
    config = torchvision_fcos.coco_config(arch, pixels.shape[:2])
    config.model.score_threshold = score_threshold
    config.model.update(overrides or {})
    model = FCOS(builders.model_config(config, arch["num_classes"]))
    batch = _one_image_batch(pixels, resized_hw, image.shape[:2])
    outputs = compilation.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)
    det = outputs["detections"]
    keep = np.flatnonzero(np.asarray(det["valid"][0]))
    return {
        "features": {k: np.asarray(outputs["features"][k][0]) for k in FCOS_LEVELS},
        "boxes": np.asarray(det["boxes"][0])[keep],
        "scores": np.asarray(det["scores"][0])[keep],
        "labels": np.asarray(det["classes"][0])[keep] + 1,
    }


def run_converted_keypoint(
    variables,
    arch: dict,
    image: np.ndarray,
    score_threshold: float = 0.05,
    min_size: int = 800,
    max_size: int = 1333,
) -> dict:
    """Converted torchvision Keypoint R-CNN weights (weights/torchvision_keypoint.py) on uint8
    image[H, W, 3], fed as torchvision feeds its own: features, proposals, detections and
    their keypoints[K, Kp, 3] and keypoint_scores[K, Kp] decoded on the host
    (detections.image_instances), in `compare`'s terms."""
    pixels, resized_hw = tv.preprocess(image, min_size, max_size)
    config = torchvision_keypoint.coco_config(arch, pixels.shape[:2])
    config.input.test_short_side = min_size
    config.input.test_max_long_side = max_size
    config.model.score_threshold = score_threshold
    model = KeypointRCNN(builders.model_config(config, arch["num_classes"]))
    batch = {**_one_image_batch(pixels, resized_hw, image.shape[:2]), "flipped": np.zeros(1, bool)}
    features = compilation.jit(lambda v, x: model.apply(v, x, method=KeypointRCNN.features))(
        variables, batch["image"]
    )
    outputs = compilation.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)
    outputs, features = jax.device_get((outputs, features))
    det = outputs["detections"]
    geometry = structures.ImageGeometry.of_batch(batch, 0)
    instances = detections.image_instances(det, 0, geometry)
    valid = outputs["proposal_valid"][0]
    kp = arch["num_keypoints"]
    return {
        "features": {k: features[k][0] for k in LEVELS},
        "proposals": outputs["proposal_boxes"][0][valid],
        "boxes": np.asarray([i["box"] for i in instances], np.float32).reshape(-1, 4),
        "scores": np.asarray([i["score"] for i in instances], np.float32),
        "labels": np.asarray([i["class"] + 1 for i in instances]),
        "keypoints": np.asarray([i["keypoints"] for i in instances], np.float32).reshape(-1, kp, 3),
        "keypoint_scores": np.asarray(
            [i["keypoint_scores"] for i in instances], np.float32
        ).reshape(-1, kp),
    }


def _pasted(mask, box, image_hw) -> np.ndarray:
    """bool[H, W]: one mask pasted by torchvision's rule into a full image."""
    region, top, left = detections.paste_box_mask_torchvision(mask, box, image_hw)
    out = np.zeros(tuple(image_hw), bool)
    out[top : top + region.shape[0], left : left + region.shape[1]] = region
    return out


def _iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def compare(ours: dict, theirs: dict, top_proposals: int = 100) -> dict:
    """Figures of agreement (worst cases); `failures` lists every figure beyond TOLERANCES."""
    figures: dict = {}
    figures["feature_rel_error"] = max(
        float(np.max(np.abs(ours["features"][k] - theirs["features"][k])))
        / max(float(np.max(np.abs(theirs["features"][k]))), 1e-12)
        for k in theirs["features"]
    )
    _compare_proposals(ours, theirs, top_proposals, figures)
    _compare_detections(ours, theirs, figures)
    figures["failures"] = failures(figures)
    return figures


def _compare_proposals(ours: dict, theirs: dict, top_proposals: int, figures: dict) -> None:
    if "proposals" not in theirs:  # a one-stage model
        return
    n = min(top_proposals, len(theirs["proposals"]))
    figures["num_proposals"] = (len(ours["proposals"]), len(theirs["proposals"]))
    # Each of torchvision's top n is matched to the nearest of our top n + 10 (near-equal
    # objectness may swap neighbours), by the largest coordinate difference.
    candidates = ours["proposals"][: n + 10]
    if n and len(candidates):
        distance = np.abs(theirs["proposals"][:n, None, :] - candidates[None]).max(-1)
        figures["proposal_max_px"] = float(distance.min(axis=1).max())
    else:
        figures["proposal_max_px"] = float("inf")


def _compare_detections(ours: dict, theirs: dict, figures: dict) -> None:
    figures["num_detections"] = (len(ours["boxes"]), len(theirs["boxes"]))
    matched, box_px, score_diff, mask_ious, pairs = 0, 0.0, 0.0, [], []
    if len(ours["boxes"]) and len(theirs["boxes"]):
        iou = _iou(theirs["boxes"], ours["boxes"])
        # Boxes clipped to zero width at the image border have no IoU: coordinates decide.
        gap = np.abs(theirs["boxes"][:, None, :] - ours["boxes"][None]).max(-1)
        iou[gap <= 0.1] = 1.0
        iou[theirs["labels"][:, None] != ours["labels"][None, :]] = -1.0
        used = set()
        for t in np.argsort(-theirs["scores"], kind="stable"):
            order = [o for o in np.argsort(-iou[t], kind="stable") if o not in used]
            if not order or iou[t, order[0]] < 0.9:
                continue
            o = order[0]
            used.add(o)
            matched += 1
            box_px = max(box_px, float(np.abs(theirs["boxes"][t] - ours["boxes"][o]).max()))
            score_diff = max(score_diff, abs(float(theirs["scores"][t] - ours["scores"][o])))
            if "keypoints" in theirs:
                pairs.append((t, o))
            if "masks" not in theirs:  # boxes only
                continue
            a, b = theirs["masks"][t] > 0.5, ours["masks"][o] > 0.5
            union = np.logical_or(a, b).sum()
            if union:
                mask_ious.append(np.logical_and(a, b).sum() / union)
    figures["matched_detections"] = matched
    figures["box_max_px"] = box_px
    figures["score_max_diff"] = score_diff
    figures["mask_iou_min"] = float(min(mask_ious)) if mask_ious else float("nan")
    figures["mask_iou_mean"] = float(np.mean(mask_ious)) if mask_ious else float("nan")
    figures["has_masks"] = "masks" in theirs
    if "keypoints" in theirs:
        _compare_keypoints(ours, theirs, pairs, figures)


def _compare_keypoints(ours: dict, theirs: dict, pairs, figures: dict) -> None:
    """Keypoints of matched detections. Decoded positions are cell centres of the resized
    heatmaps, so they agree to float error where both sides' maxima fall in the same cell and
    differ by a cell where near-equal maxima swap: the figures are the share of keypoints whose
    maxima agree (within 0.01 px) and, over those, the largest position difference and score
    difference (relative to the detection's largest |score| by torchvision, at least 1)."""
    agree, total, px, score = 0, 0, 0.0, 0.0
    for t, o in pairs:
        distance = np.abs(theirs["keypoints"][t, :, :2] - ours["keypoints"][o, :, :2]).max(-1)
        same = distance <= TOLERANCES["keypoints"]
        total += len(distance)
        agree += int(same.sum())
        if same.any():
            px = max(px, float(distance[same].max()))
            reference = theirs["keypoint_scores"][t]
            scale = max(float(np.abs(reference).max()), 1.0)
            gap = np.abs(reference - ours["keypoint_scores"][o]) / scale
            score = max(score, float(gap[same].max()))
    figures["keypoints_compared"] = total
    figures["keypoint_maxima_agree"] = agree / total if total else float("nan")
    figures["keypoint_max_px"] = px
    figures["keypoint_score_max_rel"] = score


def failures(figures: dict, min_detections: int = 1) -> list[str]:
    """What breaks the tolerances; an empty comparison is a failure, never a pass."""
    out = []
    if figures["feature_rel_error"] > TOLERANCES["features"]:
        out.append(f"feature relative error {figures['feature_rel_error']:.2e}")
    if figures.get("proposal_max_px", 0.0) > TOLERANCES["proposals"]:
        out.append(f"proposals differ by {figures['proposal_max_px']:.2e} px")
    ours_k, theirs_k = figures["num_detections"]
    if theirs_k < min_detections:
        out.append(f"torchvision made {theirs_k} detections: nothing to compare")
    if ours_k != theirs_k or figures["matched_detections"] != theirs_k:
        out.append(
            f"detections: ours {ours_k}, torchvision {theirs_k}, matched "
            f"{figures['matched_detections']}"
        )
    if figures["box_max_px"] > TOLERANCES["boxes"]:
        out.append(f"boxes differ by {figures['box_max_px']:.2e} px")
    if figures["score_max_diff"] > TOLERANCES["scores"]:
        out.append(f"scores differ by {figures['score_max_diff']:.2e}")
    # NaN (no mask compared) fails too, unless the model has none.
    if figures.get("has_masks", True) and not figures["mask_iou_min"] >= TOLERANCES["mask_iou"]:
        out.append(f"pasted mask IoU down to {figures['mask_iou_min']:.4f}")
    if "keypoints_compared" in figures:
        agree = figures["keypoint_maxima_agree"]
        if not agree >= TOLERANCES["keypoint_maxima_agree"]:  # NaN: nothing compared
            out.append(f"keypoint maxima agree on {agree:.3f} of the keypoints")
        if figures["keypoint_score_max_rel"] > TOLERANCES["keypoint_scores"]:
            out.append(
                f"keypoint scores differ by {figures['keypoint_score_max_rel']:.2e} (relative)"
            )
    return out


# ------------------------------------------------------------------ the parity scripts' frame


def script_arguments(description: str, model_name: str, score_threshold: float, nuclei: int):
    """The arguments every experiments/parity script against a torchvision model takes; a
    script adds its own before parsing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--weights", help=f"a real {model_name} .pth (else random)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-threshold", type=float, default=score_threshold)
    parser.add_argument("--nuclei", type=int, default=nuclei, help="nuclei val images (by size)")
    parser.add_argument("--synthetic", type=int, default=2)
    parser.add_argument("--make-fixture", type=Path, help="write the CI fixture and stop")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    return parser


def compare_on_images(images, run_theirs, run_ours, extra=None) -> tuple[list, list]:
    """(rows of figures, failures) of parity on (name, image) pairs: both sides run on each
    image and `compare`d, each image's figures printed as one JSON line; extra(figures, image,
    ours, theirs), when given, adds figures of its own."""
    rows, failed = [], []
    for name, image in images:
        start = time.perf_counter()
        theirs = run_theirs(image)
        ours = run_ours(image)
        figures = compare(ours, theirs)
        figures["image"] = f"{name} {image.shape[0]}x{image.shape[1]}"
        if extra is not None:
            extra(figures, image, ours, theirs)
        figures["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(figures, default=str), flush=True)
        rows.append(figures)
        failed += [f"{name}: {f}" for f in figures["failures"]]
    return rows, failed


def verdict(rows: list, failed: list, kind: str, json_path: Path | None = None) -> int:
    """Write the rows to json_path (when given), print the verdict; the exit status."""
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    if failed:
        print("PARITY FAILED:\n  " + "\n  ".join(failed))
        return 1
    print(f"parity holds on {len(rows)} images ({kind})")
    return 0
