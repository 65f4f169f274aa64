"""Stage 5: log the adapter as an MLflow model, register a new version and decide `champion` on the benchmark.

Retried with backoff because it crosses a network; a retry is safe: lib.registry returns the
version an earlier attempt already registered for this MLflow run instead of adding a twin.
"""

from __future__ import annotations

import errno

from prefect import get_run_logger, task

from lib import lora, registry
from lib.base_identity import describe_base, identity_label
from lib.benchmark import Benchmark
from lib.config import PipelineConfig
from lib.dataset import PreparedDataset
from lib.evaluation import EvaluationSummary
from lib.train_result import TrainResult

KEY_METRICS = ("test_perplexity", "test_bits_per_byte", "base_test_bits_per_byte", "chrf", "rougeL")


def worth_retrying(task, task_run, state) -> bool:
    """A network blip is worth a retry; a full disk is not (Prefect's `retry_condition_fn`)."""
    error = state.data
    return not (isinstance(error, OSError) and error.errno == errno.ENOSPC)


@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=worth_retrying)
def register_adapter(
    prepared: PreparedDataset,
    trained: TrainResult,
    evaluated: EvaluationSummary,
    benchmark: Benchmark,
    training_key: str,
    config: PipelineConfig,
    uri: str,
    run_id: str,
    extra_tags: dict[str, str],
    force: bool = False,
) -> dict:
    """Register the trained adapter as a version and decide `champion` on the model's benchmark, as one unit.

    Returns `name`, `version`, `uri` (models:/NAME/VERSION), whether it is champion, the decision,
    its checksums, and `up_to_date` (a concurrent twin registered the same training key first).
    `extra_tags` carries the provenance (Prefect flow-run id and name, git commit) onto the version.
    The first evaluation sample (`prompt`, `tuned_output`) becomes the version's input/output example.
    """
    base, metrics, example = prepared.base, evaluated.metrics, next(iter(evaluated.samples), None)
    described = describe_base(base, config.model)
    registry_cfg = config.registry
    targets = lora.targets_for_base(
        config.lora, base, config.model
    )  # "auto" resolved as training did, from config.json
    tags = {
        "base_model": config.model.name,
        "precision": described["precision"],
        "dtype": described["dtype"],
        "dataset_fingerprint": prepared.fingerprint,
        "base_identity": identity_label(described["identity"]),
        **({"base_revision": described["revision"]} if described.get("revision") else {}),
        "lora": lora.describe(config.lora, targets),
        **{k: f"{metrics[k]:.6g}" for k in KEY_METRICS if k in metrics},
        **extra_tags,
        **({"forced": "true"} if force else {}),
    }
    generation = {
        "max_new_tokens": config.eval.max_new_tokens,
        "do_sample": config.eval.do_sample,
        "temperature": config.eval.temperature,
        "top_p": config.eval.top_p,
        "seed": config.eval.seed,
    }
    registered = registry.register_adapter(
        uri,
        run_id,
        trained.adapter_dir,
        described,
        generation,
        registry_cfg.model_name,
        tags,
        metrics,
        champion_metric=registry_cfg.champion_metric,
        benchmark_fingerprint=benchmark.fingerprint,
        min_improvement=registry_cfg.min_improvement,
        training_key=None if force else training_key,
        example={"prompt": example["prompt"], "output": example["tuned_output"]} if example else None,
    )
    logger = get_run_logger()
    if registered["up_to_date"]:
        logger.warning(
            "a concurrent run registered the same training key first: %s holds it; nothing registered",
            registered["uri"],
        )
    else:
        logger.info("registered %s: %s", registered["uri"], registered["decision"]["reason"])
    return registered
