"""Stage 2: clean, split, tokenize and save the dataset; record its fingerprint and statistics."""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from lib import dataset, tracking
from lib.config import DataConfig, ModelConfig


@task
def prepare_dataset(csv_path: str, data: DataConfig, model: ModelConfig, max_length: int, uri: str, run_id: str) -> dict:
    """Returns the prepared dataset's facts: `path`, `fingerprint`, `base`, `stats`."""
    info = dataset.prepare_dataset(csv_path, data, model, max_length, f"{data.cache_dir}/datasets")
    stats = info["stats"]
    tracking.set_tags(uri, run_id, {"dataset_fingerprint": info["fingerprint"]})
    tracking.log_params(uri, run_id, {"dataset.fingerprint": info["fingerprint"], "dataset.path": info["path"]})
    flat = {f"data_{split}_articles": n for split, n in stats.get("articles", {}).items()}
    flat.update({f"data_{split}_{k}": v for split, block in stats["blocks"].items() for k, v in block.items()})
    flat["data_tokens_per_char"] = stats["tokens_per_char"]
    tracking.log_metrics(uri, run_id, flat)
    tracking.log_artifact_text(uri, run_id, json.dumps(stats, ensure_ascii=False, indent=2), "dataset_stats.json")
    create_markdown_artifact(
        key="dataset-stats",
        markdown="## Prepared dataset\n\n" + f"fingerprint `{info['fingerprint']}`\n\n```json\n"
        + json.dumps(stats, ensure_ascii=False, indent=2) + "\n```\n",
        description="lenta-lora dataset statistics",
    )
    get_run_logger().info("dataset %s: %s", info["fingerprint"][:12], flat)
    return info
