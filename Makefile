# Two set-up commands for a fresh machine (see README):
#   make demo   install, prepare the embedded corpus, run the quickstart study on the CPU, print the leaderboard
#   make test   install, run the test suite
PYTHON ?= python3
# Pin torch before installing the project: on a CPU machine this takes the CPU build, and the project's own
# `torch>=2.6` is then already satisfied, so pip never pulls the multi-GB CUDA wheels.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

data/embedded/meta.json: | $(STAMP)
	$(BIN)/python -m trainer.prepare embedded --out data/embedded

demo: $(STAMP) data/embedded/meta.json
	$(BIN)/orch submit experiments/quickstart.py
	$(BIN)/orch worker --until-empty --parallel 2
	$(BIN)/orch table quickstart

test: $(STAMP)
	$(BIN)/python -m pytest

# Everything, including the slow end-to-end suites (minutes).
test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

# ruff, configured in pyproject.toml; CI runs `make lint`.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs data .pytest_cache
