"""TPU memory of the bilinear gathers at Mask2Former's COCO shapes, in today's form and the
forms they replaced (RESULTS.md, "Mask2Former on one v5e chip").

    make tpu-env
    .venv-tpu/bin/python experiments/benchmarks/tpu_layouts.py [--target v5e:2x2]

Each case is the gradient of a scalar through one sampling op, compiled for one chip of the
target (no TPU needed: libtpu compiles on this host) and reported as XLA's temporary bytes:

- `point_sample`: one loss layer of Mask2Former (2 images x 100 query masks of 256 x 256,
  12,544 points shared by the queries of an image; float32 logits, as the loss computes).
- `deformable_attention`: one pixel-decoder encoder layer's sampling (2 images, the 128/64/32
  levels of a 1024 canvas, 8 heads of 32 channels, 3 levels x 4 points; bfloat16 values).

TPUs tile an array's two minor axes in 8 x 128 blocks, so an axis of 3, 4 or 8 next to the
minor end is padded to 128. The replaced forms kept such axes there: take_along_axis's
(map, cell) index pairs and the 4 bilinear corners last (point_sample), the 8 heads beside the
queries (deformable attention). The replaced forms live here only, as the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from instseg_jax import aot

GiB = 1 << 30


def point_sample_before(maps, points):
    """point_sample as it was: take_along_axis over [N, H*W] with the corners last."""
    import jax.numpy as jnp

    from instseg_jax.ops.sampling import bilinear_corners

    num, height, width = maps.shape
    index, weight = bilinear_corners(points, height, width)  # [N, P, 4]
    flat = maps.reshape(num, height * width)
    values = jnp.take_along_axis(flat, index.reshape(num, -1), axis=1).reshape(index.shape)
    return (values * weight).sum(-1)


def deformable_attention_before(value, level_shapes, locations, attention):
    """deformable_attention as it was: table rows (cell, head), sampling arrays [B, Q, M, ...]."""
    import jax
    import jax.numpy as jnp

    from instseg_jax.ops.sampling import bilinear_corners, pool_bilinear_samples

    _, cells, heads, depth = value.shape
    _, queries, _, levels, points, _ = locations.shape
    heights = jnp.asarray([h for h, _ in level_shapes], jnp.int32)[:, None]
    widths = jnp.asarray([w for _, w in level_shapes], jnp.int32)[:, None]
    starts = np.cumsum([0] + [h * w for h, w in level_shapes[:-1]])
    index, weight = bilinear_corners(locations, heights, widths)  # [B, Q, M, L, K, 4]
    index = index + jnp.asarray(starts, jnp.int32)[:, None, None]
    weight = weight * attention[..., None]
    head = jnp.arange(heads, dtype=jnp.int32)[None, :, None, None, None]
    shape = (queries * heads, 1, levels * points, 1, 1, 4)

    def one_image(image_value, image_index, image_weight):
        pooled = pool_bilinear_samples(
            image_value.reshape(cells * heads, depth),
            (image_index * heads + head).reshape(shape),
            image_weight.astype(value.dtype).reshape(shape),
        )
        return pooled.reshape(queries, heads, depth)

    return jax.vmap(one_image)(value, index, weight)


def temporary_gib(fn, args) -> tuple[float, float]:
    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    return compiled.memory_analysis().temp_size_in_bytes / GiB, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="v5e:2x2", help="a TPU slice; one chip is used")
    args = parser.parse_args()
    aot.prepare_host(args.target)
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from instseg_jax.ops import sampling

    target = aot.target_devices(args.target)
    if target.platform != "tpu":
        raise SystemExit(f"--target {args.target}: this probe is about TPU layouts")
    on_chip = SingleDeviceSharding(target.devices[0])

    def struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)

    images, queries, side, num_points = 2, 100, 256, 12544

    def point_loss(sample):
        def loss(masks, points):
            def one(image_masks, image_points):
                shared = jnp.broadcast_to(image_points, (queries,) + image_points.shape)
                return sample(image_masks, shared)

            return jnp.sum(jax.nn.softplus(jax.vmap(one)(masks, points)))

        return jax.grad(loss)

    point_args = (
        struct((images, queries, side, side), jnp.float32),
        struct((images, num_points, 2), jnp.float32),
    )
    levels = [(128, 128), (64, 64), (32, 32)]
    cells = sum(h * w for h, w in levels)
    heads, depth, points = 8, 32, 4

    def attention_loss(attend):
        def loss(value, locations, weights):
            out = attend(value, levels, locations, weights)
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))

    attention_args = (
        struct((images, cells, heads, depth), jnp.bfloat16),
        struct((images, cells, heads, len(levels), points, 2), jnp.float32),
        struct((images, cells, heads, len(levels), points), jnp.float32),
    )
    cases = [
        ("point_sample", "before", point_loss(point_sample_before), point_args),
        ("point_sample", "now", point_loss(sampling.point_sample), point_args),
        (
            "deformable_attention",
            "before",
            attention_loss(deformable_attention_before),
            attention_args,
        ),
        (
            "deformable_attention",
            "now",
            attention_loss(sampling.deformable_attention),
            attention_args,
        ),
    ]
    print(f"target {args.target} (one chip), jax {jax.__version__}, pid {os.getpid()}")
    print("| op (gradient, COCO shape) | form | temporaries GiB | compile s |")
    print("|---|---|---|---|")
    for name, form, fn, fn_args in cases:
        gib, seconds = temporary_gib(fn, fn_args)
        print(f"| {name} | {form} | {gib:.3f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
