"""XLA's GPU compiler aborts on a strided slice of a strided slice feeding a matmul.

    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python experiments/repro/xla_gpu_triton_tiling_abort.py

jax 0.10.2, jaxlib 0.10.2, jax-cuda12-plugin 0.10.2 (`make cuda-env`), compiled for one H100
through the deviceless CUDA target (no GPU or driver needed). The process aborts in the
gemm-fusion pass (GemmFusionVisitor::HandleDot -> FuseDotOperand ->
GetPropagatedDimOrdersForDimAlteringOp):

    F... triton_tiling_propagation.cc:627] Check failed: subdim_size_accumulator == dim_size
    (16 vs. 8)

(1024 vs. 64 in the nuclei Mask R-CNN and SOLOv2 training steps at a 256 canvas). Each line
below is needed: without the second use of `once` (the sum), or with the second slice
written as a reshape to [4, 4, 2, 4, 2, 64] and its [:, :, 0, :, 0], it compiles. `XLA_FLAGS=--xla_gpu_enable_triton_gemm=false` avoids it too.
In the models it was the ResNet stem's max pool (strided views of the padded map), through
res2's first block, into res3's stride-2 1x1 shortcut written as a matmul of x[:, ::2, ::2];
instseg_jax/nn/layers.py now subsamples with a reshape (layers.subsample).
"""

import os

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax
import jax.numpy as jnp
from jax.experimental import topologies

jax.config.update("jax_platforms", "cpu")  # compile for the GPU from a host without one

# An H100 SXM as XLA's GPU compiler needs to know it (XLA's h100_sxm target description).
H100 = """
gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84942979072
  cuda_compute_capability { major: 9 minor: 0 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536 }
platform_name: "CUDA" dnn_version_info { major: 9 minor: 1 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def step(x, w):
    once = x[:, ::2, ::2]  # [4, 8, 8, 64]
    return (once[:, ::2, ::2] @ w).sum() + once.sum()  # [4, 4, 4, 64] @ [64, 128]


if __name__ == "__main__":
    gpu = topologies.get_topology_desc(
        topology_name="", platform="cuda", target_config=H100, topology="1x1x1"
    ).devices[0]
    on_gpu = jax.sharding.SingleDeviceSharding(gpu)
    x = jax.ShapeDtypeStruct((4, 16, 16, 64), jnp.float32, sharding=on_gpu)
    w = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=on_gpu)
    jax.jit(step).lower(x, w).compile()  # aborts here
    print("compiled: not reproduced with jax", jax.__version__)
