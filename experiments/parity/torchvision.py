"""Parity of converted torchvision Mask R-CNN weights with torchvision itself (`make peer` env).

    .venv-peer/bin/python experiments/parity/torchvision.py              # seeded random weights
    .venv-peer/bin/python experiments/parity/torchvision.py --weights maskrcnn.pth
    .venv-peer/bin/python experiments/parity/torchvision.py --make-fixture \
        tests/fixtures/torchvision_tiny.npz                                # the CI test's data

Builds torchvision's maskrcnn_resnet50_fpn with seeded random weights (torchvision's own
initialisation under torch.manual_seed, frozen-BN statistics and affine terms drawn at random
so that their conversion is exercised, class scores spread by a wider cls_score), converts its
state_dict with instseg_jax.weights.torchvision, runs both on nuclei val images and synthetic
scenes, and compares backbone+FPN features, the top-100 RPN proposals, the final detections
(same set, boxes, scores) and the pasted masks (IoU). Random weights give near-uniform class
scores, so both sides use a lower score threshold (--score-threshold); a comparison without
detections counts as a failure. With --record the figures are appended to RESULTS.md.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

# This file's name would shadow the torchvision package: drop its folder from the import path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.models.detection import MaskRCNN  # noqa: E402
from torchvision.models.detection.backbone_utils import BackboneWithFPN  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor  # noqa: E402
from torchvision.models.resnet import Bottleneck  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments" / "benchmarks"))

from instseg_jax.weights import parity  # noqa: E402
from instseg_jax.weights import torchvision as tv  # noqa: E402
from instseg_jax.weights.state_dict import load_state_dict  # noqa: E402

LEVEL_KEYS = ("0", "1", "2", "3", "pool")


def randomize_frozen_bn(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial frozen BN buffers (torchvision initialises them to the identity)."""
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            n = module.weight.shape[0]
            module.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=generator))
            module.bias.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))


@torch.no_grad()
def seeded_model(
    seed: int, score_threshold: float, tiny: bool = False, cls_std: float = 0.05
) -> MaskRCNN:
    torch.manual_seed(seed)
    if tiny:
        model = tiny_model(score_threshold)
    else:
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, box_score_thresh=score_threshold
        )
    generator = torch.Generator().manual_seed(seed + 1)
    randomize_frozen_bn(model, generator)
    cls = model.roi_heads.box_predictor.cls_score
    cls.weight.copy_(cls_std * torch.randn(cls.weight.shape, generator=generator))
    return model.eval()


class TinyBody(torch.nn.Module):
    """torchvision's ResNet layout (conv1, bn1, layer1..4 of Bottlenecks) at width 8, one block
    per stage: a state_dict with maskrcnn_resnet50_fpn's key pattern in ~200 KB."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for stage in range(4):
            planes = width * 2**stage
            stride = 1 if stage == 0 else 2
            downsample = torch.nn.Sequential(
                torch.nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                FrozenBatchNorm2d(planes * 4),
            )
            block = Bottleneck(inplanes, planes, stride, downsample, norm_layer=FrozenBatchNorm2d)
            setattr(self, f"layer{stage + 1}", torch.nn.Sequential(block))
            inplanes = planes * 4


def tiny_two_stage(score_threshold: float, classes: int, width: int = 4, channels: int = 16):
    """The arguments of a tiny torchvision two-stage model (Mask or Keypoint R-CNN) up to its
    box predictor: the tiny ResNet body under a `channels`-wide FPN, a 32-wide box head, a
    128-160 px resize. Built in this order, so seeded weights come out the same."""
    backbone = BackboneWithFPN(
        TinyBody(width),
        {f"layer{i}": str(i - 1) for i in range(1, 5)},
        [width * 4 * 2**s for s in range(4)],
        channels,
    )
    return {
        "backbone": backbone,
        "num_classes": None,
        "min_size": 128,
        "max_size": 160,
        "box_score_thresh": score_threshold,
        "box_head": TwoMLPHead(channels * 49, 32),
        "box_predictor": FastRCNNPredictor(32, classes),
    }


def tiny_model(score_threshold: float) -> MaskRCNN:
    channels, classes = 16, 5
    return MaskRCNN(
        **tiny_two_stage(score_threshold, classes, channels=channels),
        mask_head=MaskRCNNHeads(channels, [channels, channels], 1),
        mask_predictor=MaskRCNNPredictor(channels, channels, classes),
    )


@torch.no_grad()
def torchvision_outputs(model: MaskRCNN, image: np.ndarray, dtype=torch.float32) -> dict:
    """Everything `parity.compare` needs, in its terms (NHWC features, NumPy)."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).to(dtype) / 255.0
    images, _ = model.transform([tensor])
    features = model.backbone(images.tensors)
    feature_list = list(features.values())
    rpn = model.rpn
    objectness, deltas = rpn.head(feature_list)
    anchors = rpn.anchor_generator(images, feature_list)
    per_level = [o[0].numel() for o in objectness]
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(1, -1, 4)
    boxes, scores = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
    detections, _ = model.roi_heads(features, boxes, images.image_sizes)
    detections = model.transform.postprocess(detections, images.image_sizes, [image.shape[:2]])
    d = detections[0]
    return {
        "features": {
            ours: features[k][0].permute(1, 2, 0).numpy()
            for ours, k in zip(parity.LEVELS, LEVEL_KEYS, strict=True)
        },
        "proposals": boxes[0].numpy(),
        "proposal_scores": scores[0].numpy(),
        "boxes": d["boxes"].numpy(),
        "scores": d["scores"].numpy(),
        "labels": d["labels"].numpy(),
        "masks": d["masks"][:, 0].numpy(),
        "input": images.tensors[0].permute(1, 2, 0).numpy(),
        "anchors": anchors[0].numpy(),
    }


def test_images(count_nuclei: int, count_synthetic: int) -> list[tuple[str, np.ndarray]]:
    images = []
    val = ROOT / "data" / "nuclei" / "annotations" / "val.json"
    if count_nuclei and val.exists():
        from instseg_jax.input.images import decode_image

        records = json.loads(val.read_text())["images"]
        by_size = {}
        for record in records:  # one image of each size first: several aspect ratios
            by_size.setdefault((record["height"], record["width"]), record)
        chosen = list(by_size.values())[:count_nuclei]
        for record in chosen:
            path = ROOT / "data" / "nuclei" / "images" / record["file_name"]
            images.append((f"nuclei/{record['file_name']}", decode_image(path)))
    elif count_nuclei:
        print(f"no {val} (run `make data`): nuclei images skipped", file=sys.stderr)
    from instseg_jax.input.synthetic import SyntheticSource

    source = SyntheticSource(count_synthetic, (240, 320), seed=3)
    for i in range(count_synthetic):
        images.append((f"synthetic/{i}", source.load(i)["image"]))
    return images


def make_fixture(path: Path, seed: int) -> None:
    """A tiny converted-and-compared case for the CI test: state_dict + torchvision outputs."""
    model = seeded_model(seed, 0.0, tiny=True, cls_std=0.5)
    rng = np.random.default_rng(seed)
    from instseg_jax.input.synthetic import SyntheticSource

    image = SyntheticSource(1, (100, 120), seed=seed).load(0)["image"]
    image = np.clip(image.astype(np.int16) + rng.integers(-20, 21, image.shape), 0, 255)
    image = image.astype(np.uint8)
    # A threshold halfway between the 30th and 31st best scores keeps exactly those 30 (NMS is
    # greedy by score, so the top 30 do not depend on the threshold below them).
    scores = np.sort(torchvision_outputs(model, image)["scores"])[::-1]
    threshold = float((scores[29] + scores[30]) / 2)
    model.roi_heads.score_thresh = threshold
    out = torchvision_outputs(model, image)
    arrays = {f"sd/{k}": v.numpy() for k, v in model.state_dict().items()}
    arrays["image"] = image
    arrays["score_threshold"] = np.float32(threshold)
    for key, value in out.items():
        if key == "features":
            arrays.update({f"out/features/{k}": v for k, v in value.items()})
        elif key == "masks":
            arrays["out/masks_bits"] = np.packbits(value > 0.5, axis=-1)
            arrays["out/masks_shape"] = np.asarray(value.shape)
        elif key not in ("input", "anchors"):
            arrays[f"out/{key}"] = value
    np.savez_compressed(path, **arrays)
    variables, arch = tv.convert({k: v.numpy() for k, v in model.state_dict().items()}, "tiny")
    ours = parity.run_converted(variables, arch, image, threshold, 128, 160)
    figures = parity.compare(ours, out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB): {len(out['boxes'])} detections")
    print(json.dumps(figures, indent=1, default=str))


def check_import_from_pth(model, variables) -> None:
    """The .pth path end to end: torch.save, `import_torchvision` (torch.load weights_only) and
    `restore_variables` give back exactly the converted arrays."""
    import tempfile

    import jax

    from instseg_jax import workdir as workdir_lib
    from instseg_jax.weights import importer

    with tempfile.TemporaryDirectory() as folder:
        pth = Path(folder) / "model.pth"
        torch.save(model.state_dict(), pth)
        importer.import_torchvision(pth, Path(folder) / "imported")
        _, restored, _ = workdir_lib.restore_variables(Path(folder) / "imported")
    a = jax.tree_util.tree_leaves_with_path(variables)
    b = dict(jax.tree_util.tree_leaves_with_path(restored))
    assert len(a) == len(b), (len(a), len(b))
    for path, value in a:
        np.testing.assert_array_equal(np.asarray(b[path]), value, err_msg=str(path))
    print(f"import-weights from a .pth restores all {len(a)} converted arrays exactly")


def load_weights(model, path: str, kind: str):
    """(the model with a real state_dict file loaded, in eval mode, its description)."""
    state = {k: torch.from_numpy(v) for k, v in load_state_dict(path).items()}
    model.load_state_dict(state)
    return model.eval(), f"{kind} weights {Path(path).name}"


def main(argv=None) -> int:
    parser = parity.script_arguments(
        __doc__.split("\n\n")[0], "maskrcnn_resnet50_fpn", score_threshold=0.02, nuclei=3
    )
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    parser.add_argument(
        "--no-float64",
        action="store_true",
        help="skip the float64 torchvision reference (float32 noise floor of both sides)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.make_fixture:
        make_fixture(args.make_fixture, args.seed)
        return 0
    if args.weights:
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, box_score_thresh=args.score_threshold
        )
        model, kind = load_weights(model, args.weights, "maskrcnn_resnet50_fpn")
    else:
        model = seeded_model(args.seed, args.score_threshold)
        kind = f"seeded random weights (seed {args.seed})"
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    variables, arch = tv.convert(state_dict, kind)
    check_import_from_pth(model, variables)
    # The same model in float64: what float32 arithmetic alone moves, on either side.
    model64 = None if args.no_float64 else copy.deepcopy(model).double()

    def against_float64(figures, image, ours, theirs):
        if model64 is None:
            return
        exact = torchvision_outputs(model64, image, torch.float64)
        for label, candidate in (("ours", ours), ("torchvision", theirs)):
            versus = parity.compare(candidate, exact)
            keys = ("feature_rel_error", "proposal_max_px", "box_max_px", "score_max_diff")
            figures[f"{label}_vs_f64"] = {k: versus[k] for k in keys}

    rows, failed = parity.compare_on_images(
        test_images(args.nuclei, args.synthetic),
        lambda image: torchvision_outputs(model, image),
        lambda image: parity.run_converted(variables, arch, image, args.score_threshold),
        against_float64,
    )
    if args.record:
        record(rows, kind, args)
    return parity.verdict(rows, failed, kind, args.json)


def with_f64(r: dict, key: str) -> str:
    """'ours vs torchvision' [ (ours vs float64 torchvision / float32 vs float64 torchvision) ]"""
    text = f"{r[key]:.1e}"
    if "ours_vs_f64" in r:
        text += f" ({r['ours_vs_f64'][key]:.1e} / {r['torchvision_vs_f64'][key]:.1e})"
    return text


def record(rows: list[dict], kind: str, args) -> None:
    import common

    table = common.markdown_table(
        [
            [
                r["image"],
                with_f64(r, "feature_rel_error"),
                with_f64(r, "proposal_max_px"),
                f"{r['num_detections'][1]}",
                f"{r['matched_detections']}",
                with_f64(r, "box_max_px"),
                with_f64(r, "score_max_diff"),
                f"{r['mask_iou_min']:.4f}",
                "pass" if not r["failures"] else "; ".join(r["failures"]),
            ]
            for r in rows
        ],
        [
            "image",
            "feature rel. err",
            "top-100 proposals max px",
            "detections (tv)",
            "matched",
            "box max px",
            "score max diff",
            "mask IoU min",
            "verdict",
        ],
    )
    common.append_results(
        "torchvision Mask R-CNN parity: `.venv-peer/bin/python experiments/parity/torchvision.py "
        "--record`",
        common.machine_line({"torch": torch.__version__, "torchvision": torchvision.__version__})
        + f"; {kind}; score threshold {args.score_threshold} on both sides",
        table,
        "Tolerances: features <= 1e-4 relative, proposals <= 1e-3 px, boxes <= 0.01 px, "
        "scores <= 1e-4, pasted-mask IoU >= 0.99; every detection of torchvision must be "
        "matched (same label, IoU >= 0.9) and the counts equal. In brackets: ours against "
        "torchvision run in float64, then torchvision's own float32 against its float64 (the "
        "float32 noise floor).",
    )


if __name__ == "__main__":
    sys.exit(main())
