# The two commands of the README, and the helpers they stand on.
#   make demo   set up .venv (if missing), install fastoptim, run the main job
#   make test   same set-up, then the whole test suite
# Knobs: PYTHON (interpreter that creates the venv), VENV, TORCH_SPEC (torch to install when the venv has
# none), FASTOPTIM_CUDA (auto|1|0, see setup.py), PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastoptim-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: demo test install lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install --upgrade pip "setuptools>=64" wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m fastoptim info
	$(PY) -m fastoptim demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check python triton_kernels tests bench setup.py

clean:
	rm -rf build *.egg-info python/*.egg-info python/fastoptim/_C*.so $(STAMP)
