# vlfast: `make train` / `make test` on a fresh checkout.
#
#   make install        create .venv (if missing), install torch + vlfast[test] into it
#   make train          install, then python -m vlfast.train $(TRAIN_ARGS)
#   make test           install, then pytest $(PYTEST_ARGS) against the installed package
#   make bench-quick    install, then every benchmarks/bench_*.py --quick
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

PY  := $(VENV)/bin/python
# PYTHONSAFEPATH: `python -m` must not put the source tree (cwd) first on sys.path,
# or `import vlfast` finds ./vlfast without its compiled _C instead of the installed one.
RUN := PYTHONSAFEPATH=1 $(PY)
PIP := $(PY) -m pip

.PHONY: venv install train test bench-quick clean distclean

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

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
