"""Shared test settings and fixtures."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
if _cache:
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = Path(__file__).resolve().parent.parent
SHARED_NUCLEI = REPO.parent / "shared" / "data" / "dsb2018_nuclei" / "stage1_train"


@pytest.fixture(scope="session")
def nuclei_dir(tmp_path_factory) -> Path:
    """The prepared nuclei set: data/nuclei when `make data` ran, else prepared now (~20 s)."""
    prepared = REPO / "data" / "nuclei"
    if (prepared / "annotations" / "val.json").exists():
        return prepared
    if not SHARED_NUCLEI.is_dir():
        pytest.skip(f"no nuclei source at {SHARED_NUCLEI}")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_nuclei", REPO / "data" / "prepare_nuclei.py"
    )
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    out = tmp_path_factory.mktemp("nuclei")
    prepare.convert(SHARED_NUCLEI, out)
    return out
