# The two README commands. Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo docs clean wheels device-suite device-suite-dry

$(STAMP): setup.py kernels/csrc/selective_scan_cpu.cc
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,aot,docs]"
	JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 $(PY) -c "from alignmamba_jax.kernels import cpu_ffi; print(cpu_ffi.build_report())"
	touch $(STAMP)

# Two workers: most tests wait on a compiler or a subprocess, so the 2-core machines run them side by side.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

demo: $(STAMP)
	$(PY) -m alignmamba_jax.main --config configs/synthetic.py --workdir runs/demo

# The docs site (mkdocs.yml, docs/) into site/, warnings as errors: a broken docstring reference fails.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

# `make device-suite` on a GPU machine with no network (benchmarks/device_suite.py): Python 3.12 wheels of the
# runtime dependencies its image lacks. The image has jax 0.11 with the CUDA 13 plugin, flax, optax, orbax, chex,
# absl-py, numpy, matplotlib, tqdm, psutil, etils, PyYAML, protobuf and packaging, which is also everything these
# two wheels need; tensorflow-datasets, grain and array_record are not on the suite's path (data loaders only).
GPU_IMAGE_MISSING := ml_collections==1.1.0 tensorboardX==2.6.5
WHEELS := .whl

wheels:
	rm -rf $(WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 --dest $(WHEELS) $(GPU_IMAGE_MISSING)

# On the GPU machine: the device tool's `run` with carry [".whl"]; results in $OUT (else runs/device_suite).
device-suite:
	PYTHON=$(PYTHON) bash benchmarks/device_suite.sh

device-suite-dry: $(STAMP)
	PYTHON=$(PY) bash benchmarks/device_suite.sh --dry_run

clean:
	rm -rf $(VENV) runs site $(WHEELS)
