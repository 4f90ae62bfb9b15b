"""Shared test settings: float32 everywhere, a persistent compilation cache for repeated runs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
if _cache:
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
