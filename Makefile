# Every target builds its own virtual environment first, so each works on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test train quickstart

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The test suite (CPU, gloo, 1-3 worker processes).
test: install
	$(BIN)/python -m pytest

# The main job: a short EASGD run, 2 CPU workers on synthetic data.
train: quickstart

quickstart: install
	$(BIN)/python examples/quickstart.py
