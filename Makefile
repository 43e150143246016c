# vlfast: `make train` / `make test` on a fresh checkout.
#
#   make install        create .venv (if missing), install torch + vlfast[test] into it
#   make train          install, then python -m vlfast.train $(TRAIN_ARGS)
#   make test           install, then pytest $(PYTEST_ARGS) against the installed package
#   make bench-quick    install, then every benchmarks/bench_*.py --quick
#   make gpu-compile    no GPU needed: compile a covering subset of the Triton kernels' launch
#                       specialisations for sm_80 + sm_90 with Triton 3.9 (the venv's) and 3.6
#                       ($(TRITON36_DIR), installed if missing); fails on any compile error
#   make gpu-compile-full  every specialisation + csrc/**/*.cu (nvcc), both Tritons; writes
#                       benchmarks/results/kernel_resources.csv (registers, spills, smem, ...)
#   make gpu-check      CUDA machine, no venv: pip install . into its own python3 + torch, then
#                       CUDA kernel tests, sanitizers, full benches, ncu (DRY_RUN=1: print the plan)
#   make clean          remove build outputs (make distclean also removes .venv)
#
# TORCH_SPEC picks the torch build (default torch==2.13.0, the CPU wheel).
# The package is reinstalled on every run (`pip install .`); the CMake tree under
# build/ is reused, so only changed C++/CUDA sources recompile.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PYTEST_ARGS ?=
TRAIN_ARGS  ?=
BENCH_ARGS  ?=
PIP_FLAGS   ?= -q
# gpu-compile: the second Triton (torch 2.11's), installed with `pip install --target` (not into the venv)
TRITON36_SPEC ?= triton==3.6.0
TRITON36_DIR  ?= $(VENV)/triton36
GPU_COMPILE_ARGS ?=
# what gpu-compile needs first (`make gpu-compile GPU_COMPILE_DEPS=` on an existing editable install)
GPU_COMPILE_DEPS ?= install

PY  := $(VENV)/bin/python
# PYTHONSAFEPATH: `python -m` must not put the source tree (cwd) first on sys.path,
# or `import vlfast` finds ./vlfast without its compiled _C instead of the installed one.
RUN := PYTHONSAFEPATH=1 $(PY)
PIP := $(PY) -m pip

.PHONY: venv install train test bench-quick gpu-compile gpu-compile-full triton36 gpu-check clean distclean

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)
	$(PIP) install $(PIP_FLAGS) "$(TORCH_SPEC)" "setuptools>=64" wheel "pybind11>=2.12"

install: venv
	$(PIP) install $(PIP_FLAGS) --no-build-isolation ".[test]"

train: install
	$(RUN) -m vlfast.train $(TRAIN_ARGS)

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench-quick: install
	@set -e; for f in benchmarks/bench_*.py; do \
		echo "== $$f --quick"; $(PY) $$f --quick $(BENCH_ARGS); \
	done

# No install/venv prerequisite: it installs into the machine's own python3 and torch.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

$(TRITON36_DIR)/triton/__init__.py:
	$(PIP) install $(PIP_FLAGS) --no-deps --target $(TRITON36_DIR) "$(TRITON36_SPEC)"

triton36: $(TRITON36_DIR)/triton/__init__.py

gpu-compile: $(GPU_COMPILE_DEPS) triton36
	$(PY) benchmarks/gpu_compile.py --subset --triton-path $(TRITON36_DIR) $(GPU_COMPILE_ARGS)

gpu-compile-full: $(GPU_COMPILE_DEPS) triton36
	$(PY) benchmarks/gpu_compile.py --full --triton-path $(TRITON36_DIR) \
		--csv benchmarks/results/kernel_resources.csv $(GPU_COMPILE_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
