# Two entry points a new user needs: `make demo` (install + run the whole graph on the embedded
# default model) and `make test` (install + run the test suite). Both install into .venv.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel; override (e.g. TORCH_SPEC='torch==2.13.0+cu126') on a GPU host.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
RUN_DIR ?= runs/default

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/questdeploy run --run-dir $(RUN_DIR)

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
