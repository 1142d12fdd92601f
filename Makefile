# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Everything runs offline: no model is ever fetched from a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export ANONYMIZED_TELEMETRY := False
# The demo keeps its kit, store and runs inside the checkout, unless IMGRAG_HOME is exported.
DEMO_HOME := $(CURDIR)/.imgrag
IMGRAG_HOME ?= $(DEMO_HOME)

.PHONY: install test test-fast lint demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects no test: that is not a failure of the code.
test: $(STAMP)
	$(BIN)/python -m pytest -q || [ $$? -eq 5 ]

# While developing: everything but the end-to-end subprocess tests (marked slow); CI runs the whole suite.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" || [ $$? -eq 5 ]

# ruff, and the import contracts of .importlinter (the layers, no cycles).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

demo: $(STAMP)
	IMGRAG_HOME=$(IMGRAG_HOME) ./scripts/demo.sh

clean:
	rm -rf $(DEMO_HOME) build dist *.egg-info .pytest_cache
