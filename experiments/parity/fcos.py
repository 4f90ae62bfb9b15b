"""Parity of converted torchvision FCOS weights with torchvision itself (`make peer` env).

    .venv-peer/bin/python experiments/parity/fcos.py                   # seeded random weights
    .venv-peer/bin/python experiments/parity/fcos.py --weights fcos.pth
    .venv-peer/bin/python experiments/parity/fcos.py --make-fixture \
        tests/fixtures/torchvision_fcos_tiny.npz                     # the CI test's data

Builds torchvision's fcos_resnet50_fpn with seeded random weights (torchvision's own
initialisation under torch.manual_seed; frozen-BN statistics, GroupNorm affine terms, class
logits and box distances drawn wider so that every conversion is exercised and detections are
boxes of several strides with spread-out scores; output 0, COCO's unused id 0 that the import
drops, silenced), converts its state_dict through
`import-weights`' FCOS path (instseg_jax.weights.torchvision_fcos), runs both on nuclei val
images and synthetic scenes, and compares P3..P7 features and the final detections (same set,
boxes, scores, labels) against the tolerances of the Mask R-CNN parity (instseg_jax/weights/
parity.py). torchvision pads its batch to a multiple of 128 here (`transform.size_divisible`),
the canvas ours needs (weights/torchvision_fcos.py says why). With --record the figures are
appended to RESULTS.md.
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
from torchvision.models.detection import FCOS  # noqa: E402
from torchvision.models.detection.backbone_utils import BackboneWithFPN  # noqa: E402
from torchvision.models.detection.fcos import FCOSHead  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402

ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments" / "benchmarks"))

from instseg_jax.weights import parity, torchvision_fcos  # noqa: E402

# The Mask R-CNN parity script's helpers (its file name is not importable as a module name).
_spec = importlib.util.spec_from_file_location("mask_rcnn_parity", HERE / "torchvision.py")
mask_rcnn_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mask_rcnn_parity)

DIVISOR = 128
LEVEL_KEYS = ("0", "1", "2", "p6", "p7")


@torch.no_grad()
def widen(model: FCOS, generator: torch.Generator, cls_std: float) -> None:
    """Frozen-BN buffers and GroupNorm affine terms away from the identity; class logits with
    spread-out scores; box distances of 0.5..3 anchor sizes (torchvision's init gives ~0)."""
    mask_rcnn_parity.randomize_frozen_bn(model, generator)
    for module in model.head.modules():
        if isinstance(module, torch.nn.GroupNorm):
            n = module.weight.shape[0]
            module.weight.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    cls = model.head.classification_head.cls_logits
    cls.weight.copy_(cls_std * torch.randn(cls.weight.shape, generator=generator))
    # Output 0 is COCO's unused category id 0: never a training target, so a trained model
    # never scores it and the import drops it. Random weights would; keep it silent.
    cls.weight[0] = 0.0
    cls.bias[0] = -30.0
    reg = model.head.regression_head.bbox_reg
    reg.bias.copy_(0.5 + 2.5 * torch.rand(reg.bias.shape, generator=generator))


def seeded_model(seed: int, score_threshold: float, cls_std: float) -> FCOS:
    torch.manual_seed(seed)
    model = torchvision.models.detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, score_thresh=score_threshold
    )
    widen(model, torch.Generator().manual_seed(seed + 1), cls_std)
    model.transform.size_divisible = DIVISOR
    return model.eval()


def tiny_model(seed: int, score_threshold: float) -> FCOS:
    """torchvision's FCOS classes around a one-block-per-stage ResNet of width 4 (the Mask R-CNN
    fixture's body), a 32-channel pyramid and two-conv towers: the same key pattern in ~100 KB."""
    torch.manual_seed(seed)
    width, channels, classes = 4, 32, 6
    backbone = BackboneWithFPN(
        mask_rcnn_parity.TinyBody(width),
        {"layer2": "0", "layer3": "1", "layer4": "2"},
        [width * 4 * 2**s for s in (1, 2, 3)],
        channels,
        extra_blocks=LastLevelP6P7(channels, channels),
    )
    model = FCOS(
        backbone,
        classes,
        min_size=128,
        max_size=160,
        score_thresh=score_threshold,
        head=FCOSHead(channels, 1, classes, num_convs=2),
    )
    widen(model, torch.Generator().manual_seed(seed + 1), cls_std=0.3)
    model.transform.size_divisible = DIVISOR
    return model.eval()


@torch.no_grad()
def torchvision_outputs(model: FCOS, image: np.ndarray) -> dict:
    """Features P3..P7 (NHWC) and detections, in `parity.compare`'s terms."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    images, _ = model.transform([tensor])
    features = model.backbone(images.tensors)
    detections = model([tensor])[0]
    return {
        "features": {
            ours: features[k][0].permute(1, 2, 0).numpy()
            for ours, k in zip(parity.FCOS_LEVELS, LEVEL_KEYS, strict=True)
        },
        "boxes": detections["boxes"].numpy(),
        "scores": detections["scores"].numpy(),
        "labels": detections["labels"].numpy(),
    }


def make_fixture(path: Path, seed: int) -> None:
    """A tiny converted-and-compared case for the CI test: state_dict + torchvision outputs."""
    from instseg_jax.input.synthetic import SyntheticSource

    model = tiny_model(seed, 0.0)
    image = SyntheticSource(1, (100, 120), seed=seed).load(0)["image"]
    rng = np.random.default_rng(seed)
    image = np.clip(image.astype(np.int16) + rng.integers(-20, 21, image.shape), 0, 255)
    image = image.astype(np.uint8)
    # Halfway between the 40th and 41st best scores: the threshold keeps the best 40 candidates
    # and torchvision's NMS runs on them alone (the 100-detection cap never binds).
    scores = np.sort(torchvision_outputs(model, image)["scores"])[::-1]
    threshold = float((scores[39] + scores[40]) / 2)
    model.score_thresh = threshold
    out = torchvision_outputs(model, image)
    arrays = {f"sd/{k}": v.numpy() for k, v in model.state_dict().items()}
    arrays["image"] = image
    arrays["score_threshold"] = np.float32(threshold)
    arrays.update({f"out/features/{k}": v for k, v in out["features"].items()})
    arrays.update({f"out/{k}": out[k] for k in ("boxes", "scores", "labels")})
    np.savez_compressed(path, **arrays)
    variables, arch = torchvision_fcos.convert(
        {k: v.numpy() for k, v in model.state_dict().items()}, "tiny"
    )
    ours = parity.run_converted_fcos(variables, arch, image, threshold, 128, 160)
    figures = parity.compare(ours, out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB): {len(out['boxes'])} detections")
    print(json.dumps(figures, indent=1, default=str))


def main(argv=None) -> int:
    parser = parity.script_arguments(
        __doc__.split("\n\n")[0], "fcos_resnet50_fpn", score_threshold=0.2, nuclei=2
    )
    parser.add_argument("--cls-std", type=float, default=0.02, help="random class-logit weights")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.make_fixture:
        make_fixture(args.make_fixture, args.seed)
        return 0
    if args.weights:
        model = torchvision.models.detection.fcos_resnet50_fpn(
            weights=None, weights_backbone=None, score_thresh=args.score_threshold
        )
        model, kind = mask_rcnn_parity.load_weights(model, args.weights, "fcos_resnet50_fpn")
        model.transform.size_divisible = DIVISOR
    else:
        model = seeded_model(args.seed, args.score_threshold, args.cls_std)
        kind = f"seeded random weights (seed {args.seed})"
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    variables, arch = torchvision_fcos.convert(state_dict, kind)
    rows, failed = parity.compare_on_images(
        mask_rcnn_parity.test_images(args.nuclei, args.synthetic),
        lambda image: torchvision_outputs(model, image),
        lambda image: parity.run_converted_fcos(variables, arch, image, args.score_threshold),
    )
    if args.record:
        record(rows, kind)
    return parity.verdict(rows, failed, kind, args.json)


def record(rows: list[dict], kind: str) -> None:
    import common

    table = common.markdown_table(
        [
            [
                r["image"],
                f"{r['feature_rel_error']:.1e}",
                f"{r['num_detections'][1]}",
                f"{r['matched_detections']}",
                f"{r['box_max_px']:.1e}",
                f"{r['score_max_diff']:.1e}",
                "pass" if not r["failures"] else "; ".join(r["failures"]),
            ]
            for r in rows
        ],
        [
            "image",
            "feature rel. err",
            "detections (tv)",
            "matched",
            "box max px",
            "score max diff",
            "verdict",
        ],
    )
    common.append_results(
        "torchvision FCOS parity (`.venv-peer/bin/python experiments/parity/fcos.py --record`)",
        common.machine_line({"weights": kind, "canvas": f"padded to a multiple of {DIVISOR}"}),
        table,
    )


if __name__ == "__main__":
    sys.exit(main())
