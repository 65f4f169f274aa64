"""Shared fixtures: one real Prefect test server per session, a fresh MLflow sqlite store per test,
and a very small offline config so that end-to-end runs take seconds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Set before Prefect is imported anywhere: its telemetry logs a traceback offline, and the
# `lenta_lora` loggers should reach Prefect's run logs as they do in the CLI.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lenta_lora")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# One intra-op thread per process (inherited by the CLI, worker and distributed subprocesses):
# on 2 cores shared with a Prefect server and other test processes, torch's 2 OpenMP threads were
# measured 60x slower per forward pass than 1 thread once the other core was busy.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Fixtures defined in tests/support/, available to every test without an import. (Allowed here
# only: this is the top conftest, loaded before the session starts; pyproject's testpaths.)
pytest_plugins = [
    "tests.support.adapter_fixtures",  # trained, registered
    "tests.support.kaggle_server",  # fake_kaggle
    "tests.support.mlflow_server",  # mlflow_server
    "tests.support.toy_lm",  # tokenizer, model
    "tests.support.training",  # prepared, one_thread
]


@pytest.fixture(scope="session")
def prefect_server():
    """A real, temporary Prefect API server for the whole session (started once: it takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def empty_store_file(tmp_path_factory) -> Path:
    """An MLflow sqlite database with MLflow's tables and nothing else, made once per session (per
    xdist worker). Making the tables runs MLflow's alembic migrations, about a second of CPU each
    time; `new_store` copies this file instead, so each test still gets a fresh, real store."""
    from lib.store import initialize_store

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    initialize_store(f"sqlite:///{path}")  # the pipeline's own first open: every table, registry's too
    return path


@pytest.fixture
def new_store(empty_store_file):
    """`new_store(path)` puts a fresh, empty MLflow sqlite database at `path` and returns its URI."""

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(empty_store_file, path)
        return f"sqlite:///{path}"

    return make


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, new_store):
    """A fresh sqlite MLflow store per test; MLFLOW_TRACKING_URI points at it for child processes."""
    uri = new_store(tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """Tokenizer/model/dataset cache shared by tests that use identical tiny settings."""
    return str(tmp_path_factory.mktemp("cache"))


def tiny_overrides(cache_dir: str, **extra) -> list[str]:
    """Overrides on top of configs/demo.yaml that keep a whole flow run to a few seconds."""
    values = {
        "data.cache_dir": cache_dir,
        "model.tiny.vocab_size": 512,
        "model.tiny.hidden_size": 64,
        "model.tiny.num_layers": 2,
        "model.tiny.num_heads": 2,
        "model.tiny.max_position_embeddings": 128,
        "model.tiny.window_size": 32,
        "model.tiny.pretrain_steps": 5,
        "model.tiny.pretrain_batch_size": 4,
        "model.tiny.pretrain_length": 64,
        "train.max_length": 64,
        "train.max_steps": 4,
        "train.eval_every": 2,
        "eval.num_samples": 2,
        "eval.max_new_tokens": 8,
        "registry.model_name": "test-adapter",
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture
def tiny_config(shared_cache, tracking_uri):
    from flows.cli import DEFAULT_PROFILE
    from lib.config import load_config

    return load_config(DEFAULT_PROFILE, tiny_overrides(shared_cache))
