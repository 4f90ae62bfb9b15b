"""How far the 28 x 28 mask targets of ours (ops.mask_targets on the pipeline's box crop,
transforms.box_crop_target) are from the references' rules, at 2 samples per bin and at the
adaptive rule (issue 28 item 9, the follow-up of PointRend's 7 x 7 coarse targets).

    PYTHONPATH=. .venv/bin/python experiments/parity/mask_target_rules.py [--scenes 40]

The references, float64 NumPy encodings in tests/ops/reference.py written from their files:
- "polygon": detectron2/structures/masks.py PolygonMasks.crop_and_resize
  (rasterize_polygons_within_box): the polygons rasterised inside the RoI at 28 x 28 by
  pycocotools. What detectron2's Mask R-CNN and Panoptic FPN COCO recipes train on
  (INPUT.MASK_FORMAT defaults to "polygon", config/defaults.py; only PointRend's configs set
  "bitmask"), and PANet's rule (lib/utils/segms.py polys_to_mask_wrt_box, sides >= 1).
- "bitmask": BitMasks.crop_and_resize: aligned ROIAlign, sampling ratio 0, of the full-
  resolution mask, then >= 0.5 (INPUT.MASK_FORMAT "bitmask", and RLE-annotated sets).

Scenes: COCO-like, 600 x 480 images of 8 star-shaped polygons (12-80 vertices, low-frequency
radial noise, sides log-uniform 8-400 px, aspect 0.4-2.5), resized by 5/3 to detectron2's 800
short side (1000 x 800); RoIs: each instance's box and 5 jittered boxes at IoU >= 0.5 with it (the
positives a trained RPN gives). Nuclei: the DSB 2018 val masks (RLE: the bitmask rule only) at
input.mask_size 56 (the nuclei experiments'), RoIs likewise. Ours: the box crop at input.mask_size
sampled from the original-resolution mask (COCO: annToMask of the polygons), then mask_targets.
Prints the share of target cells differing from each reference, per rule and RoI size.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_util

from instseg_jax import ops
from instseg_jax.input.transforms import box_crop_target
from tests.ops import reference

SIZE = 28
SIDE_BUCKETS = (0, 32, 64, 128, 256, 10_000)  # RoI sqrt(area) on the canvas


def star_polygon(rng, centre, half_sides):
    """Flat [x0, y0, x1, y1, ...] of a star-shaped polygon around centre with the given half
    sides: radius 1 + low-frequency harmonics, then scaled per axis."""
    vertices = int(rng.integers(12, 81))
    theta = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    radius = np.ones(vertices)
    for k in range(1, 6):
        radius += rng.uniform(0, 0.35 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius = np.clip(radius, 0.15, None) / radius.max()
    xs = centre[0] + half_sides[0] * radius * np.cos(theta)
    ys = centre[1] + half_sides[1] * radius * np.sin(theta)
    return np.stack([xs, ys], 1).ravel()


def jittered_rois(rng, box, count, limit_hw):
    """count boxes at IoU >= 0.5 with box (corner noise 12% of the sides), inside the image."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    out = []
    while len(out) < count:
        noise = rng.normal(0, 0.12, 4) * np.array([w, h, w, h])
        c = np.array(box) + noise
        c = np.clip(c, 0, [limit_hw[1], limit_hw[0], limit_hw[1], limit_hw[0]])
        if c[2] - c[0] < 1 or c[3] - c[1] < 1:
            continue
        if reference.iou(c, box) >= 0.5:
            out.append(c)
    return out


def coco_like_cases(num_scenes, seed, scale=5 / 3, orig_hw=(480, 600)):
    """Per RoI: (polygons on the canvas, canvas full mask, original mask, canvas gt box,
    canvas RoI) of COCO-like scenes."""
    rng = np.random.default_rng(seed)
    height, width = orig_hw
    canvas_hw = (round(height * scale), round(width * scale))
    cases = []
    for _ in range(num_scenes):
        for _ in range(8):
            side = np.exp(rng.uniform(np.log(8), np.log(400)))
            aspect = np.exp(rng.uniform(np.log(0.4), np.log(2.5)))
            half = np.array([side * np.sqrt(aspect), side / np.sqrt(aspect)]) / 2
            half = np.minimum(half, [width / 2 - 1, height / 2 - 1])
            centre = rng.uniform(half + 0.5, [width - half[0] - 0.5, height - half[1] - 0.5])
            polygon = star_polygon(rng, centre, half)
            original = reference.polygons_to_bitmask([polygon], height, width)
            if not original.any():
                continue
            # COCO's bbox: the polygon's extent (original pixels); detectron2 and ours scale it.
            box = (
                np.array(
                    [
                        polygon[0::2].min(),
                        polygon[1::2].min(),
                        polygon[0::2].max(),
                        polygon[1::2].max(),
                    ]
                )
                * scale
            )
            canvas_polygon = polygon * scale
            canvas_mask = reference.polygons_to_bitmask([canvas_polygon], *canvas_hw)
            for roi in [box, *jittered_rois(rng, box, 5, canvas_hw)]:
                cases.append(([canvas_polygon], canvas_mask, original, box, np.asarray(roi)))
    return cases, scale


def nuclei_cases(path, num_images, seed):
    """Per RoI: (None, mask, mask, gt box, RoI) of the DSB 2018 val split (scale 1)."""
    rng = np.random.default_rng(seed)
    data = json.load(open(path))
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    cases = []
    for image_id in sorted(by_image)[:num_images]:
        for a in by_image[image_id]:
            mask = mask_util.decode(a["segmentation"]).astype(bool)
            x, y, w, h = a["bbox"]
            box = np.array([x, y, x + w, y + h], np.float64)
            for roi in [box, *jittered_rois(rng, box, 5, mask.shape)]:
                cases.append((None, mask, mask, box, np.asarray(roi)))
    return cases


def ours(cases, scale, crop_size, sampling_ratio, chunk=256):
    """float32[K, 28, 28] our targets: the box crop of the original mask, then mask_targets."""
    run = jax.jit(
        lambda c, g, r: ops.mask_targets(c, g, r, 1, SIZE, sampling_ratio)[0],
    )
    out = []
    for start in range(0, len(cases), chunk):
        part = cases[start : start + chunk]
        n = len(part)
        crops = np.zeros((chunk, 1, crop_size, crop_size), np.uint8)
        gt = np.zeros((chunk, 1, 4), np.float32)
        rois = np.zeros((chunk, 1, 4), np.float32)
        for i, (_, _, original, box, roi) in enumerate(part):
            crops[i, 0] = box_crop_target(original, box / scale, crop_size)
            gt[i, 0] = box
            rois[i, 0] = roi
        batch_rois = {
            "boxes": jnp.asarray(rois),
            "gt_index": jnp.zeros((chunk, 1), jnp.int32),
            "foreground": jnp.ones((chunk, 1), bool),
        }
        out.append(np.asarray(run(jnp.asarray(crops), jnp.asarray(gt), batch_rois))[:n, 0])
    return np.concatenate(out) > 0.5


def report(name, cases, scale, crop_size, rules, references):
    sides = np.array([np.sqrt(reference.area(c[4])) for c in cases])
    bucket = np.digitize(sides, SIDE_BUCKETS) - 1
    print(
        f"\n{name}: {len(cases)} RoIs, input.mask_size {crop_size}; share of the 28 x 28 "
        "target cells differing (all RoIs; by RoI sqrt(area) on the canvas)"
    )
    edges = [f"{SIDE_BUCKETS[i]}-{SIDE_BUCKETS[i + 1]}" for i in range(len(SIDE_BUCKETS) - 1)]
    counts = [int((bucket == i).sum()) for i in range(len(edges))]
    print(f"{'':34s}{'all':>8s}" + "".join(f"{e:>11s}" for e in edges))
    print(f"{'RoIs':34s}{len(cases):8d}" + "".join(f"{c:11d}" for c in counts))
    targets = {f"ours sampling_ratio {sr}": ours(cases, scale, crop_size, sr) for sr in rules}
    for ref_name, ref in references.items():
        for rule_name, got in targets.items():
            cells = (got != ref).reshape(len(cases), -1).mean(1)
            row = [cells.mean()] + [
                cells[bucket == i].mean() if (bucket == i).any() else np.nan
                for i in range(len(edges))
            ]
            print(
                f"{rule_name + ' vs ' + ref_name:34s}"
                + "".join(
                    f"{100 * v:7.2f}% " if i == 0 else f"{100 * v:9.2f}% "
                    for i, v in enumerate(row)
                )
            )
    (first, a), (second, b) = list(targets.items())[-2:]
    cells = (a != b).reshape(len(cases), -1).mean(1)
    print(f"{first + ' vs ' + second[-16:]:34s}{100 * cells.mean():7.2f}%")
    if len(references) == 2:
        a, b = references.values()
        cells = (a != b).reshape(len(cases), -1).mean(1)
        print(f"{'bitmask vs polygon (references)':34s}{100 * cells.mean():7.2f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--nuclei-images", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cases, scale = coco_like_cases(args.scenes, args.seed)
    references = {
        "bitmask": np.stack([reference.bitmask_crop_and_resize(c[1], c[4], SIZE) for c in cases]),
        "polygon": np.stack([reference.polygon_crop_and_resize(c[0], c[4], SIZE) for c in cases]),
    }
    for crop_size in (112, 224):
        report("COCO-like", cases, scale, crop_size, (1, 2, 0), references)

    path = "data/nuclei/annotations/val.json"
    if os.path.exists(path):
        cases = nuclei_cases(path, args.nuclei_images, args.seed)
        references = {
            "bitmask": np.stack(
                [reference.bitmask_crop_and_resize(c[1], c[4], SIZE) for c in cases]
            )
        }
        report("nuclei (DSB 2018 val)", cases, 1.0, 56, (2, 0), references)


if __name__ == "__main__":
    main()
