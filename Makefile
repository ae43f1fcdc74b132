# bnbcli — make install | test | lint | demo | bench
# A fresh machine needs only Python 3.10+ and make. torch is installed *before* the package, as a
# pinned CPU-capable release, so pip never resolves a bare `torch` into several GB of CUDA wheels;
# a .venv that already has torch (a CUDA build, say) keeps it.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev,hf]"
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check bnbcli tests bench
	$(VENV)/bin/ruff format --check bnbcli tests bench
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/bench_cpu_formats.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
