# attnlab — the README's commands. `make train` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Override to pull a CUDA build, e.g. `make install TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url ..."`.
TORCH_SPEC ?= torch==$(TORCH_VERSION)
PIP_EXTRA ?=
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.attnlab-installed

.PHONY: install train test test-slow lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(PIP_EXTRA) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: install
	$(BIN)/attnlab train $(ARGS)

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/attnlab bench $(ARGS)

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
