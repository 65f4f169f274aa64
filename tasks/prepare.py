"""Stage 2: clean, split, tokenize and save the dataset (cached); record its fingerprint and
statistics in the run (never cached: every MLflow run gets them, cache hit or not)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from lib import base_model, corpus, dataset, splits, tracking
from lib.config import TINY_MODEL, DataConfig, ModelConfig
from tasks.acquire import code_version, file_state

# lib modules whose code decides the prepared dataset: an edit to any of them re-prepares.
PREPARE_MODULES = (dataset, corpus, splits, base_model)


def _prepare_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """What determines the prepared dataset, and nothing else (so no MLflow run id or URI)."""
    data: DataConfig = parameters["data"]
    model: ModelConfig = parameters["model"]
    csv_path = Path(parameters["csv_path"]).expanduser().resolve()
    # `path` is csv_path (hashed with its size and mtime); the secret block name and the number of
    # tokenizer processes change no byte of the output.
    data_slice = data.model_dump(mode="json", exclude={"path", "kaggle_secret_block", "num_proc"})
    # Only what picks the tokenizer (and, for `tiny`, builds tokenizer and base from the train
    # split). Precision, attention kernel, checkpointing matter to training only.
    model_keys = {"name", "revision", "trust_remote_code"} | ({"tiny"} if model.name == TINY_MODEL else set())
    model_slice = model.model_dump(mode="json", include=model_keys)
    return hash_objects(
        "prepare_dataset",
        code_version(context.task.fn, PREPARE_MODULES),
        str(csv_path),
        file_state(csv_path),
        data_slice,
        model_slice,
        int(parameters["max_length"]),
        raise_on_failure=True,
    )


@task(cache_key_fn=_prepare_cache_key, persist_result=True, result_serializer="json")
def prepare_dataset(csv_path: str, data: DataConfig, model: ModelConfig, max_length: int) -> dataset.PreparedDataset:
    """The prepared dataset: its folder and facts (`lib.dataset.PreparedDataset`)."""
    info = dataset.prepare_dataset(csv_path, data, model, max_length, f"{data.cache_dir}/datasets")
    get_run_logger().info("prepared dataset %s at %s", info.fingerprint[:12], info.path)
    return info


def _source(info: dataset.PreparedDataset, data: DataConfig, kaggle_version: int | None) -> dict:
    """Where the rows came from: the Kaggle dataset and version, or the file and its sha256."""
    if data.source == "kaggle":
        file = Path(info.csv).name
        return {"type": "kaggle", "dataset": data.kaggle_dataset, "version": kaggle_version, "file": file}
    with open(info.csv, "rb") as handle:
        return {"type": "local", "path": info.csv, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}


@task(retries=2, retry_delay_seconds=[2, 10])
def record_dataset(
    info: dataset.PreparedDataset, data: DataConfig, kaggle_version: int | None, uri: str, run_id: str
) -> None:
    """Log the dataset fingerprint, counts and stats into the MLflow run and a Prefect artifact; each
    split as a dataset input of the run, with its source (for Kaggle: the dataset and its version)."""
    # A cache hit returns paths from an earlier run; if someone deleted them since, say so here
    # rather than as a load error deep inside training.
    local = [("prepared dataset", info.path)] + ([("base model", info.base)] if Path(info.base).is_absolute() else [])
    for label, path in local:
        if not Path(path).exists():
            raise FileNotFoundError(
                f"{label} {path} is gone but a cached prepare_dataset result points at it; "
                f"rerun with PREFECT_TASKS_REFRESH_CACHE=true or delete the prefect-results folder in data.cache_dir"
            )
    stats = info.stats
    tracking.set_tags(uri, run_id, {"dataset_fingerprint": info.fingerprint})
    tracking.log_params(uri, run_id, {"dataset.fingerprint": info.fingerprint, "dataset.path": info.path})
    flat = {f"data_{split}_articles": n for split, n in stats.get("articles", {}).items()}
    flat.update({f"data_{split}_{k}": v for split, block in stats["blocks"].items() for k, v in block.items()})
    flat["data_tokens_per_char"] = stats["tokens_per_char"]
    tracking.log_metrics(uri, run_id, flat)
    tracking.log_artifact_text(uri, run_id, json.dumps(stats, ensure_ascii=False, indent=2), "dataset_stats.json")
    source = _source(info, data, kaggle_version)
    for split, context in (("train", "training"), ("validation", "validation"), ("test", "testing")):
        profile = {**stats["splits"].get(split, {}), **stats["blocks"].get(split, {})}  # articles, chars, tokens
        tracking.log_dataset_input(
            uri, run_id, f"lenta-{split}", f"{info.fingerprint[:24]}-{split}", source, profile, context
        )
    create_markdown_artifact(
        key="dataset-stats",
        markdown="## Prepared dataset\n\n"
        + f"fingerprint `{info.fingerprint}`\n\n```json\n"
        + json.dumps(stats, ensure_ascii=False, indent=2)
        + "\n```\n",
        description="lenta-lora dataset statistics",
    )
    get_run_logger().info("dataset %s: %s", info.fingerprint[:12], flat)
