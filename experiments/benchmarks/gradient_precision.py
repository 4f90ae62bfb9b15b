"""The precision gradients cross chips in: a bfloat16 data-parallel step of the package's
weight layers, compiled for a TPU slice (or H100s) from this host, its all-reduces by element type.

Every weight layer (nn/layers.py Conv 1x1 and 3x3 strided, Dense, Deconv2x2, ConvNorm with
GroupNorm, nn/deform_conv.py's ModulatedDeformConv, Keypoint R-CNN's 4x4 transposed
convolution) computes in bfloat16 on float32 parameters. ops/mixed_precision.py returns their
weight gradients in float32, so the all-reduce of those should be float32; what is left in
bfloat16 is what the package's layers do not route through it (GroupNorm's scale and shift).

    .venv-tpu/bin/python experiments/benchmarks/gradient_precision.py --target v5e:2x2
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 .venv-cuda/bin/python \
        experiments/benchmarks/gradient_precision.py --target h100:8

(XLA:CPU computes bfloat16 convolutions in float32, so a cpu:N target says nothing here.)
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instseg_jax import aot, hlo_collectives
from instseg_jax.methods.keypoint_rcnn import TransposedConv4x4
from instseg_jax.nn.deform_conv import ModulatedDeformConv
from instseg_jax.nn.layers import Conv, ConvNorm, Deconv2x2, Dense

COMPUTE = jnp.bfloat16


class EveryWeightLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Conv(32, (3, 3), (2, 2), ((1, 1), (1, 1)), dtype=COMPUTE, name="conv3x3_s2")(x)
        x = ConvNorm(32, 3, norm="group_norm", dtype=COMPUTE, name="conv_gn")(x)
        x = Conv(32, (1, 1), dtype=COMPUTE, name="conv1x1")(x)
        x = ModulatedDeformConv(32, dtype=COMPUTE, name="deform")(x)
        x = Deconv2x2(32, dtype=COMPUTE, name="deconv2x2")(x)
        x = TransposedConv4x4(16, dtype=COMPUTE, name="keypoint_upsample")(x)
        return Dense(8, dtype=COMPUTE, name="dense")(x.mean(axis=(1, 2)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="v5e:2x2")
    parser.add_argument("--per-chip-batch", type=int, default=2)
    args = parser.parse_args()
    aot.prepare_host(args.target)
    target = aot.target_devices(args.target)
    mesh = Mesh(np.array(target.devices), ("data",))
    batch = args.per_chip_batch * len(target.devices)
    model = EveryWeightLayer()
    images = jax.ShapeDtypeStruct(
        (batch, 32, 32, 16), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("data"))
    )
    params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated), params
    )

    def loss(p, x):
        return jnp.mean(model.apply({"params": p}, x).astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss), out_shardings=replicated)
    compiled = step.lower(params, images).compile()
    found = hlo_collectives.collectives(compiled.as_text(), details=True)
    by_type = hlo_collectives.bytes_by_element_type(found)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    group_norm = sum(
        int(np.prod(p.shape)) * 4 for path, p in leaves if "norm" in jax.tree_util.keystr(path)
    )
    report = {
        "target": args.target,
        "jax": jax.__version__,
        "parameter_bytes_float32": sum(int(np.prod(p.shape)) * 4 for _, p in leaves),
        "group_norm_parameter_bytes_float32": group_norm,
        "collectives_by_kind": {
            k: v for k, v in hlo_collectives.summary(found).items() if v["count"]
        },
        "all_reduce_bytes_by_type": by_type,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
