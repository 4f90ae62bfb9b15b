"""A small showcase of the ops on a seeded scene (`instseg-jax demo --ops`).

It draws a few overlapping ellipses, derives their boxes, makes noisy scored detections around
them, keeps the best with greedy NMS, crops each mask into a 28x28 RoI target, pastes it back
at full resolution, reports the round-trip mask IoU and writes an overlay PNG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from instseg_jax import ops

CANVAS = (240, 320)
COLOURS = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]],
    np.uint8,
)


def ellipse_scene(seed: int, num: int = 6) -> np.ndarray:
    """bool[num, H, W] instance masks of random ellipses (later ones occlude earlier ones)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: CANVAS[0], : CANVAS[1]]
    masks = np.zeros((num, *CANVAS), bool)
    taken = np.zeros(CANVAS, bool)
    for i in reversed(range(num)):
        cy, cx = rng.uniform(40, CANVAS[0] - 40), rng.uniform(40, CANVAS[1] - 40)
        ry, rx = rng.uniform(15, 45, 2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        masks[i] = inside & ~taken
        taken |= inside
    return masks


@jax.jit
def detect(masks, key):
    """Noisy copies of the true boxes, scored by their IoU with the truth, then NMS."""
    truth = ops.masks_to_boxes(masks)  # [N, 4]
    copies = 8
    noise = jax.random.normal(key, (copies,) + truth.shape) * 6.0
    candidates = (truth[None] + noise).reshape(-1, 4)  # [copies*N, 4]
    owner = jnp.tile(jnp.arange(truth.shape[0]), copies)
    scores = ops.paired_box_iou(candidates, truth[owner])
    keep, count = ops.nms(candidates, scores, 0.5, truth.shape[0] * 2)
    return candidates, scores, owner, keep, count


@jax.jit
def round_trip(masks, boxes):
    """Crop each mask to its box at 28x28 and paste it back: what Mask R-CNN's head learns."""
    targets = ops.crop_and_resize_masks(masks, boxes, 28)  # [N, 28, 28]
    pasted = ops.paste_masks(targets, boxes, CANVAS)  # [N, H, W]
    return pasted, jnp.diagonal(ops.mask_iou(pasted, masks))


def overlay(masks: np.ndarray, boxes: np.ndarray) -> Image.Image:
    image = np.full((*CANVAS, 3), 24, np.uint8)
    for i, mask in enumerate(masks):
        colour = COLOURS[i % len(COLOURS)]
        image[mask] = (0.45 * image[mask] + 0.55 * colour).astype(np.uint8)
        x0, y0, x1, y1 = np.clip(
            np.round(boxes[i]).astype(int), 0, [CANVAS[1] - 1, CANVAS[0] - 1] * 2
        )
        image[y0, x0 : x1 + 1] = image[y1, x0 : x1 + 1] = colour
        image[y0 : y1 + 1, x0] = image[y0 : y1 + 1, x1] = colour
    return Image.fromarray(image)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Showcase of instseg_jax.ops on a seeded scene.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_out", help="folder for the overlay PNG")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    masks = ellipse_scene(args.seed)
    print(f"scene: {len(masks)} ellipses on a {CANVAS[0]}x{CANVAS[1]} canvas (seed {args.seed})")
    candidates, scores, owner, keep, count = jax.device_get(
        detect(jnp.asarray(masks), jax.random.key(args.seed))
    )
    kept = keep[: int(count)]
    print(f"nms: {len(candidates)} noisy boxes -> {len(kept)} kept at IoU 0.5")
    for i in kept:
        print(f"  box {np.round(candidates[i], 1)} score {scores[i]:.3f} -> instance {owner[i]}")
    truth = np.asarray(ops.masks_to_boxes(masks))
    pasted, ious = jax.device_get(round_trip(jnp.asarray(masks), jnp.asarray(truth)))
    print(
        "crop to 28x28 and paste back, mask IoU per instance: " + " ".join(f"{v:.3f}" for v in ious)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ops_demo.png"
    overlay(pasted, truth).save(path)
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
