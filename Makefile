# The project's commands. Each builds its own virtual environment (.venv) with the pinned CPU
# torch and the pinned tools from requirements-dev.txt the first time, then reuses it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Data sets: ../shared/data beside the checkout when present (CI and the dev machines),
# else whatever MINRNN_DATA_DIR says, else ~/.cache/minrnn/data.
export MINRNN_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: train test test-fast lint docs docs-serve wheel-test demo bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

# CI's entry: lint, the docs site (warnings are errors), the whole suite (the wheel test included)
test: venv lint docs
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# the suite without the wheel test (it builds and installs the package: minutes)
test-fast: venv
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not wheel"

lint: venv
	$(BIN)/ruff check .

docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

docs-serve: venv
	$(BIN)/mkdocs serve

wheel-test: venv
	$(BIN)/python -m pytest -q -m wheel tests/test_wheel.py

# the main job: the README's training run on tiny shakespeare (writes runs/shakespeare_char/)
train: venv
	$(BIN)/python -m minrnn train shakespeare_char

demo: venv
	$(BIN)/python examples/demo_shakespeare.py

# the benchmarks (minutes; run on a quiet machine): tables on stdout, runs/bench/*.json and *.png
bench: venv
	$(BIN)/python -m minrnn bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist
