"""How the package's steps are compiled: backend-specific XLA options and JAX's persistent
compilation cache.

On CPU, jax 0.10's XLA hands every float32 NHWC convolution to YNNPACK (`__ynn_fusion` in the
compiled HLO), whose convolution weight gradient ran at 3.9 GFLOP/s against 36 through XLA's
own Eigen path for a 3x3 256->256 convolution here; ResNet-50+FPN forward+backward at 512 ran
2.3x faster with convolutions kept out of YNNPACK (jax-ml/jax#37465, openxla/xla#46351). The
option below keeps YNNPACK for matmuls only and gives convolutions back to Eigen.

On GPU, matmuls go to cuBLAS rather than to XLA's Triton GEMM fusions: with those on, jax 0.10.2's
GPU compiler failed on the nuclei SOLOv2 training step ("Couldn't find output tile sizes" for
the bilinear resize's matmul fused with its neighbours) and, before layers.subsample, aborted the
process on the nuclei Mask R-CNN's (triton_tiling_propagation.cc:627,
experiments/repro/xla_gpu_triton_tiling_abort.py); both compile without them (H100, through
`instseg-jax compile --target h100:N`, which compiles with these options too).
Every step the package compiles (train, eval, predict, the benchmarks) goes through `jit`.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# YNNPACK keeps single matmuls. Its reduction fusions go too: with them on, XLA fused the FPN's
# output-convolution gradients into YNNPACK reductions (seen in the smoke training step), and
# the convolutions would run there again.
YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
TRITON_GEMM_OPTION = "xla_gpu_enable_triton_gemm"


def platform_options(platform: str) -> dict:
    """The package's XLA options for a platform ("cpu", "gpu" (= "cuda"), "tpu"), unchecked:
    compiler_options() checks them against the running jax; the compile tool passes them for
    a target it has no device of."""
    if platform == "cpu":
        return {YNN_FUSION_OPTION: YNN_WITHOUT_CONVOLUTIONS}
    if platform in ("gpu", "cuda"):
        return {TRITON_GEMM_OPTION: False}
    return {}


@functools.cache
def compiler_options() -> dict:
    """XLA options for the default backend: on CPU, convolutions outside YNNPACK; on GPU,
    matmuls outside Triton; on TPU none. A jax that no longer knows an option compiles
    without it (warned once)."""
    options = platform_options(jax.default_backend())
    if not options:
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros(2)).compile()
    except Exception as error:  # the option's name or values changed in this jax
        log.warning(
            "jax %s does not accept %s (%s); steps compile with XLA's defaults",
            jax.__version__,
            ", ".join(options),
            str(error).splitlines()[0],
        )
        return {}
    return options


def jit(fn, **kwargs):
    """jax.jit with the backend's compiler options (see the module docstring)."""
    return jax.jit(fn, compiler_options=compiler_options() or None, **kwargs)


def default_cache_dir() -> Path:
    """$JAX_COMPILATION_CACHE_DIR, else <user cache>/instseg_jax/jax."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "instseg_jax" / "jax"


def enable_persistent_cache(directory: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache: a second run of the same config loads its
    compiled steps instead of compiling them (programs that took >= 1 s to compile)."""
    path = Path(directory) if directory else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def ynn_convolutions(hlo_text: str) -> list[str]:
    """Names of the YNNPACK fusions of a compiled program's HLO text that hold a convolution
    (none is wanted on CPU: see the module docstring)."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        if line.startswith("%") and line.rstrip().endswith("{"):
            current = line[1:].split(" ", 1)[0]
            bodies[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    found = []
    for line in hlo_text.splitlines():
        if "__ynn_fusion" in line and "calls=%" in line:
            called = line.split("calls=%", 1)[1].split(",", 1)[0].split(" ", 1)[0]
            if any(" convolution(" in body for body in bodies.get(called, [])):
                found.append(called)
    return found
