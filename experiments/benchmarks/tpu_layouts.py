"""TPU memory of the bilinear gathers at the COCO recipes' shapes (RESULTS.md, "Bilinear gathers
on TPU"): point sampling, deformable attention and multilevel RoIAlign, each as the gradient of a
scalar through the op, compiled for one chip of the target (no TPU needed: libtpu compiles on
this host) and reported as XLA's temporary bytes, FLOPs, and its ConcatBitcast custom calls and
while loops.

    make tpu-env
    .venv-tpu/bin/python experiments/benchmarks/tpu_layouts.py [--target v5e:2x2] [--src TREE]

--src imports the ops from another checkout (e.g. a `git worktree` of an earlier commit, for the
form an op had before): the cases call only the ops' public signatures.

- `point_sample`: one loss layer of Mask2Former (2 images x 100 query masks of 256 x 256,
  12,544 points shared by the queries of an image; float32 logits, as the loss computes).
- `deformable_attention`: one pixel-decoder encoder layer's sampling (2 images, the 128/64/32
  levels of a 1024 canvas, 8 heads of 32 channels, 3 levels x 4 points; bfloat16 values).
- `multilevel_roi_align`: Mask R-CNN's box pooler (2 images x 512 RoIs, 7 x 7) and mask pooler
  (2 x 128 RoIs, 14 x 14) on P2-P5 of a 1024 canvas, 256 bfloat16 channels, with 2 x 2
  samples per bin and with the adaptive rule's slots (6 and 3 per bin axis; sampling_ratio 0).

TPUs tile an array's two minor axes in 8 x 128 blocks, so an axis of 2, 3, 4 or 8 at the minor
end is padded to 128.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GiB = 1 << 30


def compiled_figures(fn, args) -> dict:
    import jax

    from instseg_jax import aot  # from --src, which main() put first on the path

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    # aot's own cost reader is private and missing from older --src trees: read it here.
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "temp_gib": compiled.memory_analysis().temp_size_in_bytes / GiB,
        "gflop": (cost or {}).get("flops", float("nan")) / 1e9,
        "concat_bitcast": text.count('custom_call_target="ConcatBitcast"'),
        "whiles": aot.hlo_op_counts(text)["while"],
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="v5e:2x2", help="a TPU slice; one chip is used")
    parser.add_argument("--src", default=str(REPO), help="the checkout whose ops are compiled")
    parser.add_argument("--only", default="", help="comma-separated case names to run")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.src).resolve()))
    from instseg_jax import aot

    aot.prepare_host(args.target)
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from instseg_jax.ops import sampling
    from instseg_jax.ops.roi_align import multilevel_roi_align

    target = aot.target_devices(args.target)
    if target.platform != "tpu":
        raise SystemExit(f"--target {args.target}: this probe is about TPU layouts")
    on_chip = SingleDeviceSharding(target.devices[0])

    def struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)

    images, queries, side, num_points = 2, 100, 256, 12544

    def point_loss(masks, points):
        def one(image_masks, image_points):
            shared = jnp.broadcast_to(image_points, (queries,) + image_points.shape)
            return sampling.point_sample(image_masks, shared)

        return jnp.sum(jax.nn.softplus(jax.vmap(one)(masks, points)))

    point_args = (
        struct((images, queries, side, side), jnp.float32),
        struct((images, num_points, 2), jnp.float32),
    )
    levels = [(128, 128), (64, 64), (32, 32)]
    cells = sum(h * w for h, w in levels)
    heads, depth, points = 8, 32, 4

    def attention_loss(value, locations, weights):
        out = sampling.deformable_attention(value, levels, locations, weights)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    attention_args = (
        struct((images, cells, heads, depth), jnp.bfloat16),
        struct((images, cells, heads, len(levels), points, 2), jnp.float32),
        struct((images, cells, heads, len(levels), points), jnp.float32),
    )
    pyramid = [struct((images, 1024 >> k, 1024 >> k, 256), jnp.bfloat16) for k in range(2, 6)]

    def pooler_loss(output_size, slots):
        adaptive = {"sampling_ratio": 0, "sampling_ratio_max": slots} if slots else {}

        def loss(features, boxes):
            pooled = multilevel_roi_align(features, boxes, output_size, **adaptive)
            return jnp.sum(pooled.astype(jnp.float32) ** 2)

        return loss

    cases = [
        ("point_sample", jax.grad(point_loss), point_args),
        ("deformable_attention", jax.grad(attention_loss, argnums=(0, 1, 2)), attention_args),
    ]
    for name, rois, size, slots in (("box", 512, 7, 6), ("mask", 128, 14, 3)):
        boxes = struct((images, rois, 4), jnp.float32)
        for sr_slots, label in ((0, "2 x 2"), (slots, f"adaptive, {slots} slots")):
            cases.append(
                (
                    f"multilevel_roi_align {name} {rois}x{size}x{size} ({label})",
                    jax.grad(pooler_loss(size, sr_slots)),
                    (pyramid, boxes),
                )
            )
    wanted = [w for w in args.only.split(",") if w]
    print(f"target {args.target} (one chip), jax {jax.__version__}, ops from {args.src}")
    print(
        "| op (gradient, COCO shape) | temporaries GiB | GFLOP | ConcatBitcast | while | compile s |"
    )
    print("|---|---|---|---|---|---|")
    for name, fn, fn_args in cases:
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        try:
            f = compiled_figures(fn, fn_args)
        except TypeError as error:  # an older tree without the adaptive rule
            print(f"| {name} | - ({error}) | | | | |", flush=True)
            continue
        print(
            f"| {name} | {f['temp_gib']:.3f} | {f['gflop']:.2f} | {f['concat_bitcast']} | "
            f"{f['whiles']} | {f['seconds']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
