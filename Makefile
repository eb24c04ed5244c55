# The two commands of the README, and the helpers they stand on.
#   make demo   set up .venv (if missing), install fastoptim, run the main job (the optimizer comparison)
#   make test   same set-up, then the whole test suite
# Knobs: PYTHON (interpreter that creates the venv), VENV, TORCH_SPEC (torch to install when the venv has
# none), FASTOPTIM_CUDA (auto|1|0, see setup.py), PYTEST_ARGS, COMPARE_ARGS (e.g. --quick for make demo).

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastoptim-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: demo test install lint clean bench gpu-check gpu-sanitize

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install --upgrade pip "setuptools>=64" wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install --no-build-isolation -e ".[test,compare]"
	@# triton <= 3.6 (torch <= 2.11) runs its CPU interpreter, which the tests use, only with numpy < 2.4
	$(PY) -c "from fastoptim.backends import interpreter_conflict as c; raise SystemExit(c())" \
		|| $(PY) -m pip install "numpy<2.4"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m fastoptim info
	$(PY) -m fastoptim compare $(COMPARE_ARGS)

test: install
	$(PY) -m pytest -q --benchmark-disable $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check python triton_kernels tests bench examples setup.py

clean:
	rm -rf build *.egg-info python/*.egg-info python/fastoptim/_C*.so $(STAMP)

# Benchmarks: every backend beside the plain-PyTorch baseline; small shapes on a CPU-only machine.
BENCH_OUT ?= bench/results/local
bench: install
	mkdir -p $(BENCH_OUT)
	$(PY) -m pytest bench -q --benchmark-enable --benchmark-json=$(BENCH_OUT)/bench.json
	$(PY) bench/render.py $(BENCH_OUT)/bench.json -o bench/RESULTS.md

# The one command for a lent GPU machine (no internet; torch, triton, pybind11, ninja and pytest-benchmark
# installed): build the extension, run all tests (the cuda ones too), run the benchmarks (even when a test failed: the
# failures are in OUT/tests.txt), write everything to OUT. Its three steps also run one by one (gpu-build,
# gpu-tests, gpu-bench), for a machine that limits how long one command may run. The ahead-of-time Triton
# compile test is left to CI there (it needs no GPU).
OUT ?= bench/results/gpu
GPU_PY ?= python3
.PHONY: gpu-build gpu-tests gpu-bench gpu-evidence
gpu-check: gpu-build gpu-tests gpu-bench

# The one call for a lent GPU (at most 8 minutes, at most 8 files under OUT, RESULTS.md rendered): build for
# sm_90a with every core, the cuda/triton tests (a prioritized subset first), the headline benchmarks in one run,
# a short compare; each stage with a hard time limit (bench/gpu_evidence.py). GPU_DRY_RUN=1 rehearses it on a CPU.
EVIDENCE_BUDGET ?= 470
gpu-evidence:
	$(GPU_PY) bench/gpu_evidence.py --out $(OUT) --budget $(EVIDENCE_BUDGET)

gpu-build:
	mkdir -p $(OUT)
	FASTOPTIM_CUDA=1 $(GPU_PY) -m pip install --no-build-isolation --no-deps -e . > $(OUT)/build.log 2>&1
	$(GPU_PY) -m fastoptim info | tee $(OUT)/info.txt

gpu-tests:
	mkdir -p $(OUT)
	-FASTOPTIM_CUDA=1 $(GPU_PY) -m pytest tests -q --ignore=tests/test_triton_compile.py \
		--junitxml=$(OUT)/tests.xml 2>&1 | tee $(OUT)/tests.txt

gpu-bench:
	mkdir -p $(OUT)
	-$(GPU_PY) -m pytest bench -q --benchmark-enable --benchmark-json=$(OUT)/bench.json 2>&1 | tee $(OUT)/bench.txt
	$(GPU_PY) bench/render.py $(OUT)/bench.json -o $(OUT)/RESULTS.md

# compute-sanitizer over the CUDA-op tests (memcheck, then racecheck), on a GPU machine after gpu-check.
# Without torch's caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1) memcheck sees every allocation's
# bounds; inside the allocator's large blocks an overrun would go unseen. Large and >65535-matrix cases
# are left out (slow under the sanitizer; the plain run covers them); racecheck takes every kernel with
# shared memory: the symmetric product's cp.async pipeline and the block reductions.
SANITIZE_SKIP := not 4096 and not grid_y_limit and not 2304 and not 1000 and not reproducible and not deterministic
RACECHECK_ONLY := normuon or sophia or hessian or stack or newton_schulz or symmetric
CUDA_OP_TESTS := tests/test_ops_newton_schulz.py tests/test_ops_muon.py tests/test_ops_normuon.py tests/test_ops_sophia.py \
	tests/test_cuda_symmetric.py
gpu-sanitize:
	mkdir -p $(OUT)
	-PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 $(GPU_PY) -m pytest -q \
		$(CUDA_OP_TESTS) -m "not large" -k "cuda and ($(SANITIZE_SKIP))" 2>&1 | tee $(OUT)/memcheck.txt
	-compute-sanitizer --tool racecheck --error-exitcode 1 $(GPU_PY) -m pytest -q $(CUDA_OP_TESTS) -m "not large" \
		-k "cuda and ($(SANITIZE_SKIP)) and ($(RACECHECK_ONLY)) and not 768 and not speed" \
		2>&1 | tee $(OUT)/racecheck.txt
