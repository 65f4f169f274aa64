# Two commands matter: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-fast lint format bench clean ui deployments

# Re-install when the dependency spec or the lock changes. requirements.lock pins what CI tested
# (torch 2.13.0 CPU build; on a GPU machine install the CUDA torch first, then `make install`).
$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[dev]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/lenta-lora run $(ARGS)

# Two pytest-xdist workers: the tests use one torch thread each (tests/conftest.py), so on 2 cores one
# worker left a core idle; measured 19 min 8 s with one process, 10 min 57 s with -n 2 (10 min 48 s in a
# second run), 10 min 49 s with -n 3, 12 min 29 s with -n 4.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix --select I .
	$(BIN)/ruff format .

test-fast: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow"

deployments: install  # prefect.yaml's config parameters from configs/ (lib/deployments.py)
	$(BIN)/python -m lib.deployments

bench: install
	$(BIN)/python -m bench.train_throughput

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

clean:
	rm -rf .cache mlruns/mlflow.db mlruns/artifacts
