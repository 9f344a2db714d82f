# Plain entry points; CI (.ci/run) runs `make venv lint docs test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test test-fast lint demo gpu-check docs clean

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

# ruff (lint + format check) over the code, the tests and the scripts, mypy over the library; the same checks as .pre-commit-config.yaml.
lint: venv
	$(BIN)/python -m ruff check detkit tests tools benchmarks datasets
	$(BIN)/python -m ruff format --check detkit tests tools benchmarks datasets
	$(BIN)/python -m mypy detkit

demo: venv
	$(BIN)/python tools/demo.py

$(VENV)/.docs-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[docs]" -c constraints.txt
	touch $@

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on any broken link or reference.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# On a GPU machine: CUDA tests, GPU benchmark rows, a short shapes training (JSON in output/gpu_check).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) output
