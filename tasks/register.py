"""Stage 5: log the adapter as an MLflow model and register a new version (aliases moved)."""

from __future__ import annotations

from prefect import get_run_logger, task

from lib import tracking
from lib.base_model import describe_base
from lib.config import PipelineConfig

KEY_METRICS = ("test_perplexity", "test_bits_per_byte", "base_test_bits_per_byte", "chrf", "rougeL")


@task(retries=2, retry_delay_seconds=[5, 20])
def register_adapter(adapter_dir: str, base: str, config: PipelineConfig, metrics: dict[str, float],
                     fingerprint: str, uri: str, run_id: str, extra_tags: dict[str, str]) -> dict:
    """Returns `name`, `version`, `uri` (models:/NAME/VERSION) and whether it became champion."""
    tags = {"base_model": config.model.name, "dataset_fingerprint": fingerprint,
            **{k: f"{metrics[k]:.6g}" for k in KEY_METRICS if k in metrics}, **extra_tags}
    generation = {"max_new_tokens": config.eval.max_new_tokens, "do_sample": config.eval.do_sample,
                  "temperature": config.eval.temperature, "top_p": config.eval.top_p, "seed": config.eval.seed}
    registered = tracking.register_adapter(uri, run_id, adapter_dir, describe_base(base, config.model), generation,
                                           config.registry.model_name, tags, metrics, config.registry.champion_metric)
    get_run_logger().info("registered %s (champion: %s)", registered["uri"], registered["champion"])
    return registered
