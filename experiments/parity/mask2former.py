"""Parity of converted Hugging Face `transformers` Mask2Former weights with `transformers`
itself (`make parity`: the peer environment with torch and transformers).

    .venv-peer/bin/python experiments/parity/mask2former.py            # seeded random weights
    .venv-peer/bin/python experiments/parity/mask2former.py --make-fixture \
        tests/fixtures/hf_mask2former_tiny.npz                         # the CI test's data

Builds Mask2FormerForUniversalSegmentation with a small config (a bottleneck ResNet backbone,
MSDeformAttn pixel decoder, masked-attention decoder) and seeded random weights (transformers'
own initialisation under torch.manual_seed, then batch-norm statistics, LayerNorm and GroupNorm
affine terms drawn away from the identity so that every conversion is exercised), saves it with
save_pretrained, imports the directory through instseg_jax.weights.huggingface, runs both on the
same images and compares the class logits and mask logits of every prediction layer (before the
first decoder layer and after each): the issue's bar is 1e-4 relative (max |ours - theirs| /
max |theirs|). With --record the figures are appended to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    ResNetConfig,
)

ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments" / "benchmarks"))

from instseg_jax.weights import huggingface as hf  # noqa: E402

BAR = 1e-4
MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


def tiny_config(num_labels: int = 3) -> Mask2FormerConfig:
    backbone = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[32, 64, 128, 256],
        depths=[1, 1, 1, 1],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=2,
        decoder_layers=4,  # transformers counts the query-only prediction: 3 layers, 4 outputs
        num_attention_heads=4,
        num_queries=8,
        num_labels=num_labels,
        use_pretrained_backbone=False,
    )


@torch.no_grad()
def widen(model, generator: torch.Generator) -> None:
    """Norm statistics and affine terms away from the identity (the default init leaves
    them at 0/1, where a swapped scale and bias would go unnoticed)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.LayerNorm | torch.nn.GroupNorm):
            if module.weight is not None:
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(tiny_config()).eval()
    widen(model, torch.Generator().manual_seed(seed + 1))
    return model


@torch.no_grad()
def theirs(model, images: np.ndarray):
    """(class logits [P, B, Q, C+1], mask logits [P, B, Q, h, w]) of transformers, prediction
    layers in order (the auxiliary ones, then the final)."""
    scaled = (images.astype(np.float64) - MEAN) / STD
    pixels = torch.from_numpy(scaled.transpose(0, 3, 1, 2).astype(np.float32))
    out = model(pixel_values=pixels, output_auxiliary_logits=True)
    layers = [
        *out.auxiliary_logits,
        {
            "class_queries_logits": out.class_queries_logits,
            "masks_queries_logits": out.masks_queries_logits,
        },
    ]
    classes = np.stack([layer["class_queries_logits"].numpy() for layer in layers])
    masks = np.stack([layer["masks_queries_logits"].numpy() for layer in layers])
    return classes, masks


def images(seed: int = 2, size: int = 128) -> np.ndarray:
    """Two uint8 RGB images: random discs (so masks have structure) plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(2):
        img = np.zeros((size, size, 3))
        for _ in range(6):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25)
            img += ((y - cy) ** 2 + (x - cx) ** 2 < r**2)[..., None] * rng.uniform(0, 255, 3)
        out.append(np.clip(img + rng.normal(0, 10, img.shape), 0, 255))
    return np.round(np.stack(out)).astype(np.uint8)


def compare(sd: dict, hf_config: dict, batch: np.ndarray, want_classes, want_masks) -> dict:
    params, frozen, fields, num_classes = hf.convert(sd, hf_config)
    classes, masks = hf.predict(params, frozen, fields, num_classes, batch)
    figures = {"layers": int(classes.shape[0])}
    for layer in range(classes.shape[0]):
        figures[f"class_{layer}"] = hf.relative_error(classes[layer], want_classes[layer])
        figures[f"mask_{layer}"] = hf.relative_error(masks[layer], want_masks[layer])
    figures["worst"] = max(v for k, v in figures.items() if k != "layers")
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-fixture", metavar="NPZ", help="write the CI test's data")
    args = parser.parse_args()
    model = build()
    batch = images()
    want_classes, want_masks = theirs(model, batch)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        sd, hf_config = hf.load(tmp)
    figures = compare(sd, hf_config, batch, want_classes, want_masks)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(json.dumps(figures, indent=1))
    ok = figures["worst"] <= BAR
    print(f"worst relative error {figures['worst']:.2e} ({'within' if ok else 'ABOVE'} {BAR})")
    if args.make_fixture:
        arrays = {f"sd/{k}": v.astype(np.float32) for k, v in sd.items() if v.dtype.kind == "f"}
        np.savez_compressed(
            args.make_fixture,
            config=np.array(json.dumps(hf_config)),
            images=batch,
            classes=want_classes,
            masks=want_masks,
            **arrays,
        )
        print(f"wrote {args.make_fixture}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
