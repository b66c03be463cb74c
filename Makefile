# Entry points. `make test` needs only Python 3.10+: it builds .venv first.
# GPU targets run with the interpreter that has CUDA torch (PYTHON, default python3);
# on the GPU test machine: `source .gpu-deps/env.sh && make test-gpu`.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# CPU build of torch for the CPU tier (a local file on our CI machines).
CPU_TORCH ?= torch==2.13.0

.PHONY: install test test-gpu bench plot lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(CPU_TORCH)"
	$(VPY) -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(VPY) -m pytest -q -m "not gpu" tests

# Installs this checkout (editable, no deps) so SGLang's plugin loader finds the entry point.
test-gpu:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m pytest -q -m gpu tests

bench:
	$(PYTHON) -m bench

plot:
	$(PYTHON) -m bench.plot bench/results/*/latest.json

lint: install
	$(VENV)/bin/ruff check moe_dispatch graphs bench tests
	$(VENV)/bin/ruff format --check moe_dispatch graphs bench tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
