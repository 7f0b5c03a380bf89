# moe-recipes: `make demo` sets up and runs the whole job on built-in defaults,
# `make test` sets up and runs the test suite. Both (re)use the virtual environment in .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Extra index for the PyTorch wheel, e.g. https://download.pytorch.org/whl/cpu on a CPU machine
# whose package index only has CUDA builds. Empty: the default index (and any local wheels).
TORCH_INDEX ?=
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)

.PHONY: setup system-deps demo test test-install test-slow lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "GPU found: installing the CUDA build of torch $(TORCH_VERSION)"; \
	  $(PIP) install -q torch==$(TORCH_VERSION); \
	else \
	  echo "No GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)); \
	fi
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt --no-build-isolation -e ".[deepspeed]"
	touch $(STAMP)

# A user's install: `pip install .` and the DeepSpeed extra, no dev extras, in its own venv; then every
# documented command and each engine / ZeRO stage once (tests/install_smoke.py). CI runs it.
INSTALL_VENV ?= .venv-install
test-install:
	rm -rf $(INSTALL_VENV) install_smoke
	python3 -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(INSTALL_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(INSTALL_VENV)/bin/python -m pip install -q -c constraints.txt .
	DS_BUILD_OPS=0 $(INSTALL_VENV)/bin/python -m pip install -q -c constraints.txt --no-build-isolation ".[deepspeed]"
	$(INSTALL_VENV)/bin/python tests/install_smoke.py . install_smoke

# Open MPI (for the mpirun launch test); installed from the system's packages when missing.
system-deps:
	@if ! command -v mpirun >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Open MPI (openmpi-bin) for the mpirun tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin >/dev/null; \
	  else \
	    echo "mpirun not found and cannot install it: the mpirun tests will be skipped"; \
	  fi; \
	fi

demo: setup
	$(VENV)/bin/moe-recipes demo --workdir demo_out

test: setup system-deps
	$(PY) -m pytest -q -m "not slow"

test-slow: setup system-deps
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf demo_out runs .pytest_cache install_smoke $(INSTALL_VENV)
