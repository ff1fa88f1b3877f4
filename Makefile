# desmoe: every target creates .venv on first use (scripts/setup_env.sh) and installs into it.
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-unit test-integration bench gpu-check clean

setup:
	DESMOE_VENV=$(VENV) scripts/setup_env.sh

demo: setup
	$(PY) scripts/demo.py --out runs/demo

test: setup
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

bench: setup
	$(PY) benchmarks/step_time.py --steps 80 --repeats 4
	$(PY) benchmarks/method_speed.py --steps 100 --repeats 2
	$(PY) benchmarks/data_throughput.py

# on a machine with CUDA GPUs; installs its own venv (.venv-gpu), so no setup dependency
gpu-check:
	scripts/gpu_check.sh

clean:
	rm -rf runs .pytest_cache
