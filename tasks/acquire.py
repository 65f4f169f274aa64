"""Stage 1: get the corpus CSV onto local disk (bundled sample, a local file, or Kaggle).

Also home of the cache helpers that stages 1 and 2 share. Both tasks are cached by Prefect on
what determines their output, so a re-run that changes only a training setting goes straight to
training. The flow puts their cache records in `data.cache_dir`/prefect-results (see
`result_storage_for`), next to the files the records point at: deleting the cache folder
deletes both. `PREFECT_TASKS_REFRESH_CACHE=true` ignores (and overwrites) existing records.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from lib import dataset
from lib.config import DataConfig
from lib.dataset import corpus_path

RESULTS_SUBDIR = "prefect-results"


def result_storage_for(data: DataConfig) -> Path:
    """Absolute folder for the cached tasks' results; pass it as `task.with_options(result_storage=...)`.

    A `Path`, not a `str`: Prefect reads a string as the slug of a storage block. Resolved now,
    because the cache dir is relative to the working directory of the run (the project root for
    deployments, see prefect.yaml).
    """
    return Path(data.cache_dir).expanduser().resolve() / RESULTS_SUBDIR


def code_version(fn: Callable, modules: tuple[ModuleType, ...]) -> list[str]:
    """Hashes of the task function's source and of the lib modules doing its work: editing either
    invalidates the cache (Prefect's TASK_SOURCE covers the task body only, not lib/)."""
    parts = [hash_objects(inspect.getsource(fn), raise_on_failure=True)]
    parts += [hash_objects(Path(m.__file__).read_bytes(), raise_on_failure=True) for m in modules]
    return parts


def file_state(path: str | Path) -> dict[str, Any] | None:
    """Size and mtime (ns) of a file, None when it is absent: an edited or replaced file is a new
    key, without reading gigabytes to hash them."""
    try:
        stat = Path(path).expanduser().stat()
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _acquire_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    data: DataConfig = parameters["data"]
    if data.source == "kaggle":
        # No Prefect cache: the lib's own cache check (size + sha256 of the download) runs on every
        # call, and a Prefect hit would skip it. It costs seconds; a download costs minutes.
        return None
    path = corpus_path(data).expanduser().resolve()
    return hash_objects(
        "acquire_corpus",
        code_version(context.task.fn, (dataset,)),
        data.source,
        str(path),
        file_state(path),
        raise_on_failure=True,
    )


def _kaggle_credentials(block: str | None) -> dict[str, str] | None:
    """Credentials from a Prefect Secret block holding kaggle.json, when the profile names one."""
    if not block:
        return None
    from prefect.blocks.system import Secret

    value = Secret.load(block).get()
    return json.loads(value) if isinstance(value, str) else dict(value)


def worth_retrying(task, task_run, state) -> bool:
    """A KaggleError is final (no or rejected credentials, no such file; the download retried its
    own network errors already): fail at once instead of waiting 35 s for the same answer."""
    from lib.kaggle_source import KaggleError

    return not isinstance(state.result(raise_on_failure=False), KaggleError)


@task(
    retries=2,
    retry_delay_seconds=[5, 30],
    cache_key_fn=_acquire_cache_key,
    persist_result=True,
    result_serializer="json",
    retry_condition_fn=worth_retrying,
)
def acquire_corpus(data: DataConfig) -> str:
    """Return the path of the corpus CSV; downloads only for `data.source: kaggle`.

    For Kaggle, asks the dataset's current version first and downloads again when the cached file
    is of another one (the version is kept in the cache marker: see `corpus_version`). Kaggle
    unreachable but a verified file cached: that file is used, with a warning.
    """
    logger = get_run_logger()
    if data.source != "kaggle":
        path = corpus_path(data)
        logger.info("corpus: %s (%s)", path, data.source)
        return str(path)
    from lib.kaggle_source import KaggleError, current_version, download_kaggle_file

    credentials = _kaggle_credentials(data.kaggle_secret_block)
    cache = f"{data.cache_dir}/kaggle"
    try:
        version = current_version(data.kaggle_dataset, credentials=credentials)
    except KaggleError as error:
        if corpus_version(data) is None:  # nothing usable cached: the download reports the problem
            raise
        version = None
        logger.warning("could not ask Kaggle for the current version (%s); using the cached file", error)
    path = download_kaggle_file(data.kaggle_dataset, data.kaggle_file, cache, credentials=credentials, version=version)
    logger.info("corpus: %s (kaggle %s, version %s)", path, data.kaggle_dataset, corpus_version(data))
    return str(path)


def corpus_version(data: DataConfig) -> int | None:
    """The Kaggle dataset version of the cached download (None for other sources or no cache)."""
    if data.source != "kaggle":
        return None
    from lib.kaggle_cache import cached_path, cached_version

    return cached_version(cached_path(data.kaggle_dataset, data.kaggle_file, f"{data.cache_dir}/kaggle"))
