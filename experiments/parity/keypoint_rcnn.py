"""Parity of converted torchvision Keypoint R-CNN weights with torchvision (`make peer` env).

    .venv-peer/bin/python experiments/parity/keypoint_rcnn.py             # seeded random weights
    .venv-peer/bin/python experiments/parity/keypoint_rcnn.py --weights keypointrcnn.pth
    .venv-peer/bin/python experiments/parity/keypoint_rcnn.py --make-fixture \
        tests/fixtures/torchvision_keypoint_tiny.npz                      # the CI test's data

Builds torchvision's keypointrcnn_resnet50_fpn with seeded random weights (as
experiments/parity/torchvision.py does for Mask R-CNN: torchvision's initialisation under
torch.manual_seed, random frozen-BN terms, a redrawn cls_score: std 0.005 keeps the person
scores of this two-way softmax near 0.74-0.82, where std 0.05 saturated them at 1 - 1e-5 and
float32 rounding then decided their order at the 100-detection cut), converts its state_dict with
instseg_jax.weights.torchvision_keypoint, runs both on nuclei val images and synthetic scenes
and compares features, the top-100 proposals, the detections (every one matched, boxes,
scores) and their keypoints: decoded positions agree to 0.01 px where both sides' heatmap
maxima fall in the same cell (near-equal maxima can swap cells; their share is reported), with
the heatmap value at the maximum as the keypoint score.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.models.detection import KeypointRCNN  # noqa: E402
from torchvision.models.detection.keypoint_rcnn import (  # noqa: E402
    KeypointRCNNHeads,
    KeypointRCNNPredictor,
)

ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments" / "benchmarks"))

from instseg_jax.weights import parity  # noqa: E402
from instseg_jax.weights import torchvision_keypoint as tvk  # noqa: E402

# The Mask R-CNN parity script's helpers (its file name shadows the torchvision package, so it
# is loaded from its path).
_spec = importlib.util.spec_from_file_location("mask_rcnn_parity", HERE / "torchvision.py")
mask_rcnn_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mask_rcnn_parity)


@torch.no_grad()
def seeded_model(seed: int, score_threshold: float, tiny: bool = False, cls_std: float = 0.005):
    torch.manual_seed(seed)
    if tiny:
        model = tiny_model(score_threshold)
    else:
        model = torchvision.models.detection.keypointrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, box_score_thresh=score_threshold
        )
    generator = torch.Generator().manual_seed(seed + 1)
    mask_rcnn_parity.randomize_frozen_bn(model, generator)
    cls = model.roi_heads.box_predictor.cls_score
    cls.weight.copy_(cls_std * torch.randn(cls.weight.shape, generator=generator))
    return model.eval()


def tiny_model(score_threshold: float) -> KeypointRCNN:
    """Keypoint R-CNN's key pattern in a small file: the tiny ResNet body, 16-channel FPN,
    2 keypoint convs of 16, COCO's 17 keypoints."""
    channels = 16
    return KeypointRCNN(
        **mask_rcnn_parity.tiny_two_stage(score_threshold, 2, channels=channels),
        keypoint_head=KeypointRCNNHeads(channels, (16, 16)),
        keypoint_predictor=KeypointRCNNPredictor(16, 17),
    )


@torch.no_grad()
def torchvision_outputs(model: KeypointRCNN, image: np.ndarray) -> dict:
    """Features, proposals, detections and keypoints in `parity.compare`'s terms."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    images, _ = model.transform([tensor])
    features = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, features)
    detections, _ = model.roi_heads(features, proposals, images.image_sizes)
    detections = model.transform.postprocess(detections, images.image_sizes, [image.shape[:2]])
    d = detections[0]
    return {
        "features": {
            ours: features[k][0].permute(1, 2, 0).numpy()
            for ours, k in zip(parity.LEVELS, mask_rcnn_parity.LEVEL_KEYS, strict=True)
        },
        "proposals": proposals[0].numpy(),
        "boxes": d["boxes"].numpy(),
        "scores": d["scores"].numpy(),
        "labels": d["labels"].numpy(),
        "keypoints": d["keypoints"].numpy(),
        "keypoint_scores": d["keypoints_scores"].numpy(),
    }


def make_fixture(path: Path, seed: int) -> None:
    """A tiny converted-and-compared case for the CI test: state_dict + torchvision outputs."""
    model = seeded_model(seed, 0.0, tiny=True, cls_std=0.5)
    rng = np.random.default_rng(seed)
    from instseg_jax.input.synthetic import SyntheticSource

    image = SyntheticSource(1, (100, 120), seed=seed).load(0)["image"]
    image = np.clip(image.astype(np.int16) + rng.integers(-20, 21, image.shape), 0, 255)
    image = image.astype(np.uint8)
    scores = np.sort(torchvision_outputs(model, image)["scores"])[::-1]
    threshold = float((scores[19] + scores[20]) / 2)  # exactly the top 20 detections
    model.roi_heads.score_thresh = threshold
    out = torchvision_outputs(model, image)
    arrays = {f"sd/{k}": v.numpy() for k, v in model.state_dict().items()}
    arrays["image"] = image
    arrays["score_threshold"] = np.float32(threshold)
    for key, value in out.items():
        if key == "features":
            arrays.update({f"out/features/{k}": v for k, v in value.items()})
        else:
            arrays[f"out/{key}"] = value
    np.savez_compressed(path, **arrays)
    variables, arch = tvk.convert({k: v.numpy() for k, v in model.state_dict().items()}, "tiny")
    ours = parity.run_converted_keypoint(variables, arch, image, threshold, 128, 160)
    figures = parity.compare(ours, out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB): {len(out['boxes'])} detections")
    print(json.dumps(figures, indent=1, default=str))


def main(argv=None) -> int:
    parser = parity.script_arguments(
        __doc__.split("\n\n")[0], "keypointrcnn_resnet50_fpn", score_threshold=0.02, nuclei=2
    )
    args = parser.parse_args(argv)
    if args.make_fixture:
        make_fixture(args.make_fixture, args.seed)
        return 0
    if args.weights:
        model = torchvision.models.detection.keypointrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, box_score_thresh=args.score_threshold
        )
        model, kind = mask_rcnn_parity.load_weights(
            model, args.weights, "keypointrcnn_resnet50_fpn"
        )
    else:
        model = seeded_model(args.seed, args.score_threshold)
        kind = f"seeded random weights (seed {args.seed})"
    variables, arch = tvk.convert({k: v.numpy() for k, v in model.state_dict().items()}, kind)
    rows, failed = parity.compare_on_images(
        mask_rcnn_parity.test_images(args.nuclei, args.synthetic),
        lambda image: torchvision_outputs(model, image),
        lambda image: parity.run_converted_keypoint(variables, arch, image, args.score_threshold),
    )
    return parity.verdict(rows, failed, kind, args.json)


if __name__ == "__main__":
    sys.exit(main())
