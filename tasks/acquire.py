"""Stage 1: get the corpus CSV onto local disk (bundled sample, a local file, or Kaggle)."""

from __future__ import annotations

import json

from prefect import get_run_logger, task

from lib.config import DataConfig
from lib.dataset import corpus_path


def _kaggle_credentials(block: str | None) -> dict[str, str] | None:
    """Credentials from a Prefect Secret block holding kaggle.json, when the profile names one."""
    if not block:
        return None
    from prefect.blocks.system import Secret

    value = Secret.load(block).get()
    return json.loads(value) if isinstance(value, str) else dict(value)


@task(retries=2, retry_delay_seconds=[5, 30])
def acquire_corpus(data: DataConfig) -> str:
    """Return the path of the corpus CSV; downloads only for `data.source: kaggle`."""
    logger = get_run_logger()
    if data.source != "kaggle":
        path = corpus_path(data)
        logger.info("corpus: %s (%s)", path, data.source)
        return str(path)
    from lib.kaggle_source import download_kaggle_file

    path = download_kaggle_file(data.kaggle_dataset, data.kaggle_file, f"{data.cache_dir}/kaggle",
                                credentials=_kaggle_credentials(data.kaggle_secret_block))
    logger.info("corpus: %s (kaggle %s)", path, data.kaggle_dataset)
    return str(path)
