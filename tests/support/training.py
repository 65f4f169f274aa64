"""The tiny training settings and prepared dataset shared by the training, progress and
distributed-training tests (fixtures registered for every test by tests/conftest.py; the project
and torch are imported when they are used, not when the session starts)."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_overrides


def tiny(cache: str, **extra):
    """The shared tiny settings; dropout 0 so that runs can be compared weight for weight."""
    from flows.cli import DEFAULT_PROFILE
    from lib.config import load_config

    return load_config(
        DEFAULT_PROFILE,
        tiny_overrides(cache, **{"lora.dropout": 0.0, "train.eval_every": "null", "train.warmup_steps": 0, **extra}),
    )


def prepare_for(config):
    """The prepared dataset of `config`'s corpus, in `data.cache_dir/datasets` as the flow keeps it
    (made once, then reused: a `lib.dataset.PreparedDataset`)."""
    from lib import dataset

    return dataset.prepare_dataset(
        dataset.corpus_path(config.data),
        config.data,
        config.model,
        config.train.max_length,
        f"{config.data.cache_dir}/datasets",
    )


@pytest.fixture(scope="module")
def prepared(shared_cache) -> str:
    return prepare_for(tiny(shared_cache)).path


@pytest.fixture(scope="module")
def one_thread():
    """A 0.1M-parameter model: two threads cost more in synchronisation than they save, and on a
    shared 2-core machine they made each step ~10x slower (measured). Restored afterwards.

    A module that wants it for all its tests says `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
