# Plain entry points; `make test` is what CI runs (.ci/run calls it and nothing else).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test test-fast demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]" -c constraints.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

demo: venv
	$(BIN)/python tools/demo.py

clean:
	rm -rf $(VENV) output
