# README's two commands: `make demo` and `make test`. Every target creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PEER_VENV := .venv-peer
PEER_PY := $(PEER_VENV)/bin/python
MMDET_VENV := .venv-mmdet
MMDET_PY := $(MMDET_VENV)/bin/python
TPU_VENV := .venv-tpu
TPU_PY := $(TPU_VENV)/bin/python
CUDA_VENV := .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
# JAX's persistent compilation cache: repeated test runs skip most XLA compile time.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax

.PHONY: venv data demo test test-all bench peer peer-env peer-mmdet parity tpu-env test-tpu cuda-env lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The real nuclei set, converted from ../shared/data/dsb2018_nuclei (or --src) to COCO files.
data: $(STAMP)
	$(PY) data/prepare_nuclei.py
	$(PY) data/prepare_nuclei_sizes.py

# Trains on the real nuclei set (about 10 minutes here); SRC=path/to/stage1_train if elsewhere.
demo: $(STAMP)
	$(PY) -m instseg_jax.demo $(if $(SRC),--src $(SRC))

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

test-all: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q -m 'slow or not slow'

bench: $(STAMP)
	$(PY) experiments/benchmarks/ops.py
	$(MAKE) data
	$(PY) experiments/benchmarks/input.py

# torch, torchvision, transformers and torchmetrics in their own environment: large, never a
# dependency of the package.
$(PEER_PY):
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install --quiet --upgrade pip

peer-env: $(PEER_PY)
	$(PEER_PY) -m pip install --quiet torch torchvision transformers torchmetrics
	$(PEER_PY) -m pip install --quiet -e '.[dev]'

# mmdetection 3.x for its heads' losses (issue 29), in its own environment: never a dependency.
# mmcv<2.2 is only an sdist; MMCV_WITH_OPS=0 builds it without compiled ops in seconds, but that
# build names itself mmcv-lite, which pip rejects for a `mmcv` requirement, so it is installed from
# the downloaded sdist's path. Its setup.py imports pkg_resources: setuptools<70 first.
# The parity scripts stub mmcv.ops (experiments/parity/mmdet_shim.py).
$(MMDET_PY):
	$(PYTHON) -m venv $(MMDET_VENV)
	$(MMDET_PY) -m pip install --quiet --upgrade pip

peer-mmdet: $(MMDET_PY)
	$(MMDET_PY) -m pip install --quiet torch torchvision mmengine 'setuptools<70' wheel
	$(MMDET_PY) -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation -d $(MMDET_VENV)/sdist 'mmcv==2.1.0'
	MMCV_WITH_OPS=0 $(MMDET_PY) -m pip install --quiet --no-build-isolation $(MMDET_VENV)/sdist/mmcv-2.1.0.tar.gz
	$(MMDET_PY) -m pip install --quiet 'mmdet>=3.0,<3.4'
	$(MMDET_PY) -m pip install --quiet -e '.[dev]'

# Side-by-side speed against torchvision: ops, then the whole Mask R-CNN (about 30 min on 2 cores).
peer: peer-env
	$(PEER_PY) experiments/benchmarks/ops.py --peer
	$(PEER_PY) experiments/benchmarks/vs_torchvision.py

# Converted torchvision and transformers weights against those libraries themselves, and the
# SOLOv2 loss against mmdetection's.
parity: peer-env peer-mmdet
	$(MAKE) data
	$(PEER_PY) experiments/parity/torchvision.py
	$(PEER_PY) experiments/parity/torchvision_losses.py
	$(PEER_PY) experiments/parity/fcos.py
	$(PEER_PY) experiments/parity/mask2former.py
	$(PEER_PY) experiments/parity/mask2former_loss.py
	$(PEER_PY) experiments/parity/keypoint_rcnn.py
	$(PEER_PY) experiments/parity/panoptic_quality.py
	$(MMDET_PY) experiments/parity/solov2_loss.py
	$(MMDET_PY) experiments/parity/yolact_loss.py
	$(MMDET_PY) experiments/parity/pointrend_loss.py
	$(MMDET_PY) experiments/parity/condinst_loss.py
	$(MMDET_PY) experiments/parity/ms_rcnn_loss.py
	$(MMDET_PY) experiments/parity/solo_loss.py

# libtpu (TPU's compiler) in its own environment, at the jax version of .venv: the compile tool
# (`instseg-jax compile --target v5e:2x2`) compiles for TPU slices on this CPU host. Never a
# dependency of the package.
$(TPU_PY):
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_PY) -m pip install --quiet --upgrade pip

tpu-env: $(STAMP) $(TPU_PY)
	$(TPU_PY) -m pip install --quiet "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	$(TPU_PY) -m pip install --quiet -e '.[dev]'

# jax's CUDA plugin and libraries (several GB) in their own environment, for the compile tool's
# deviceless H100 target (`instseg-jax compile --target h100:8`); no GPU needed.
$(CUDA_PY):
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install --quiet --upgrade pip

cuda-env: $(STAMP) $(CUDA_PY)
	$(CUDA_PY) -m pip install --quiet "jax[cuda12]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	$(CUDA_PY) -m pip install --quiet -e '.[dev]'

# The tests that compile for TPU slices (marked `tpu`, skipped without libtpu), e.g. the nuclei
# Mask R-CNN's smoke steps on a v5e 2x2 slice: no TPU needed, a few minutes on 2 cores.
test-tpu: tpu-env
	$(TPU_PY) -m pytest -q -p no:cacheprovider -m tpu tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) $(PEER_VENV) $(TPU_VENV) $(CUDA_VENV) .cache .pytest_cache
