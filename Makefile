# The project's two commands. Each builds its own virtual environment (.venv) with the
# pinned CPU torch from requirements-dev.txt the first time, then reuses it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Data sets: ../shared/data beside the checkout when present (CI and the dev machines),
# else whatever MINRNN_DATA_DIR says, else ~/.cache/minrnn/data.
export MINRNN_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: train test demo bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

test: venv
	$(BIN)/python -m pytest -q

# the main job: the README's training run on tiny shakespeare (writes runs/shakespeare_char/)
train: venv
	$(BIN)/python -m minrnn train configs/shakespeare_char.toml

demo: venv
	$(BIN)/python examples/demo_shakespeare.py

# the benchmarks (minutes; run on a quiet machine): tables on stdout, runs/bench/*.json and *.png
bench: venv
	$(BIN)/python -m minrnn bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
