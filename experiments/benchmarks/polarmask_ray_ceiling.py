"""The segm AP PolarMask's own ray targets reach: every ground-truth instance drawn as the
polygon of its 36 target rays from its mass centre (the location centre sampling favours),
scored 1, through the evaluation's own path (pycocotools). Whatever the training, a PolarMask
under that ray rule scores no higher on that data; the two rules differ most on small objects.

    python experiments/benchmarks/polarmask_ray_ceiling.py [--config experiments/polarmask_nuclei.py] [--rules nearest,reference]

tests/methods/test_polarmask.py uses `ceiling` for its over-fitting bar on the smoke scenes.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from instseg_jax import builders, evaluate
from instseg_jax import config as config_lib
from instseg_jax.detections import detections_to_results
from instseg_jax.input.pipeline import InputPipeline
from instseg_jax.methods import polarmask


def ceiling(spec: str, overrides=()) -> dict:
    """COCO stats {"segm": [AP, AP50, AP75, ...], ...} of the target polygons on the config's
    evaluation split (at the test size, instances up to input.max_instances)."""
    config = config_lib.load(spec, list(overrides))
    source = builders.build_source(config.input, train=False)
    cfg = builders.model_config(config, source.num_classes)
    pipeline = InputPipeline(
        source, builders.transform_config(config, False), 4, seed=0, num_workers=0,
        process_index=0, process_count=1,
    )  # fmt: skip
    category_ids = source.category_id(np.arange(source.num_classes))
    results = []
    try:
        for _ in range(pipeline.num_batches):
            batch = next(pipeline)
            centres = np.asarray(batch["gt_centers"])  # [B, N, 2] canvas
            b, n = centres.shape[:2]
            flat = jnp.asarray(centres.reshape(b * n, 2))
            rays = polarmask.ray_targets(
                flat, jnp.asarray(batch["gt_contours"]).reshape(b * n, -1, 2), cfg
            )
            canvas = np.asarray(polarmask.ray_polygons(rays, flat, cfg))
            scale = np.asarray(batch["scale"])[:, None, None, None]
            polygons = canvas.reshape(b, n, cfg.num_rays, 2) / scale  # no crop, no flip at test
            valid = np.asarray(batch["gt_valid"]) & np.asarray(batch["example_valid"])[:, None]
            found = {
                "boxes": np.concatenate([polygons.min(axis=2), polygons.max(axis=2)], axis=-1),
                "scores": valid.astype(np.float32),
                "classes": np.asarray(batch["gt_classes"]),
                "valid": valid,
                "polygons": polygons,
            }
            results += detections_to_results(found, batch, category_ids)
    finally:
        pipeline.close()
    return evaluate.coco_evaluate(evaluate.ground_truth(source), results, print_tables=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/polarmask_nuclei.py")
    parser.add_argument("--rules", default="nearest,reference")
    args = parser.parse_args()
    print("| ray rule | segm AP | AP50 | AP75 | APs | APm |\n|---|---|---|---|---|---|")
    for rule in args.rules.split(","):
        segm = ceiling(args.config, [f"--config.model.ray_rule={rule}"])["segm"]
        print(f"| {rule} | " + " | ".join(f"{float(v):.3f}" for v in segm[:5]) + " |")


if __name__ == "__main__":
    main()
