"""Shared test settings and fixtures."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests run tiny programs a few times each, so XLA's CPU compile dominates their time: LLVM's
# optimisation passes take about 40% of a smoke step's compile and buy nothing at this size
# (tests/methods/test_fcos.py's smoke step: 62 s at the default level, 38 s at 0). Results stay
# IEEE float32; the bitwise tests compare runs made under the same flags. Set before JAX starts
# its backend; subprocesses inherit it (tests that set XLA_FLAGS for them append to it).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402 (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
if _cache:
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Two CPU devices in each test process, for the smoke steps' two-image "data" mesh
# (tests/methods/smoke.py checks what crosses devices on the program it runs). Everything else
# in these processes trains, evaluates and predicts on one device as before: the product's mesh
# is cut to the first device below. Subprocesses start their own JAX with the device count
# their XLA_FLAGS give (one unless they say otherwise).
jax.config.update("jax_num_cpu_devices", 2)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def one_device_product_mesh():
    from jax.sharding import Mesh

    from instseg_jax import sharding

    original = sharding.make_mesh
    sharding.make_mesh = lambda: Mesh(np.asarray(jax.devices()[:1]), ("data",))
    yield
    sharding.make_mesh = original


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
