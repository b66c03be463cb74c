# Entry points. `make test` needs only Python 3.10+: it builds .venv first.
# GPU targets run with the interpreter that has CUDA torch (PYTHON, default python3);
# on the GPU test machine: `source .gpu-deps/env.sh && make test-gpu`.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# CPU build of torch for the CPU tier (a local file on our CI machines).
CPU_TORCH ?= torch==2.13.0

# GPU benchmarks use $(PYTHON) when it can import SGLang (our GPU machine after
# `source .gpu-deps/env.sh`, a server image); otherwise, when a package index answers, they
# build $(GPU_VENV) with the [sglang,dev] extras first and use it.
GPU_VENV ?= .venv-gpu
# Options for `python -m bench.serving` (see its --help), e.g. SERVING_ARGS="--models gpt-oss-120b:tp8".
SERVING_ARGS ?=

.PHONY: install test test-gpu bench bench-serving plot lint clean

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

# Sets $$py to an interpreter that imports SGLang, building $(GPU_VENV) if need be; exits 1 saying why otherwise.
define gpu_python
if $(PYTHON) -c "import sglang" >/dev/null 2>&1; then py="$(PYTHON)"; \
elif $(GPU_VENV)/bin/python -c "import sglang" >/dev/null 2>&1; then py="$(GPU_VENV)/bin/python"; \
elif ! nvidia-smi -L >/dev/null 2>&1; then \
	echo "$@: no CUDA GPU visible (nvidia-smi -L failed); this benchmark needs one" >&2; exit 1; \
elif $(PYTHON) -m pip index versions sglang --retries 0 --timeout 10 >/dev/null 2>&1; then \
	echo "$@: $(PYTHON) cannot import sglang; building $(GPU_VENV) with the [sglang,dev] extras" >&2; \
	$(PYTHON) -m venv $(GPU_VENV) && $(GPU_VENV)/bin/python -m pip install -q --upgrade pip \
		&& $(GPU_VENV)/bin/python -m pip install -q -e ".[sglang,dev]" || exit 1; \
	py="$(GPU_VENV)/bin/python"; \
else \
	echo "$@: $(PYTHON) cannot import sglang and no package index answers;" \
		"install SGLang (pip install -e '.[sglang]') or set PYTHON to an interpreter that has it" >&2; exit 1; \
fi; echo "$@: using $$py" >&2
endef

bench:
	@$(gpu_python); $$py -m bench

# Installs this checkout (editable, no deps) so SGLang's plugin loader finds the entry point.
bench-serving:
	@$(gpu_python); \
	$$py -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
		|| echo "$@: could not pip install this checkout (the plugin's entry point)" >&2; \
	$$py -m bench.serving $(SERVING_ARGS)

plot:
	$(PYTHON) -m bench.plot bench/results/*/latest.json

lint: install
	$(VENV)/bin/ruff check moe_dispatch graphs bench tests
	$(VENV)/bin/ruff format --check moe_dispatch graphs bench tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
