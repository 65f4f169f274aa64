"""The `evaluate-registered` flow: re-evaluate a registered adapter version in a new MLflow run."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from lib.config import PipelineConfig
from lib.loading import model_uri
from lib.reevaluation import evaluation_config
from lib.reports import render_evaluation
from lib.store import resolve_tracking_uri
from tasks.acquire import acquire_corpus, result_storage_for
from tasks.evaluate import evaluate_registered_adapter, link_evaluation, resolve_registered
from tasks.tracking import finish_run, provenance_tags, start_run


@flow(name="evaluate-registered")
def evaluate_registered(
    model: str, version: int | None = None, alias: str | None = None, config: PipelineConfig | None = None
) -> dict:
    """Score `models:/model/version` (or `@alias`) base vs tuned on a test split; tag run and version.

    `config` None: the config the version was trained with, on the bundled sample.
    """
    uri = resolve_tracking_uri(config.tracking.uri if config else None)
    target = resolve_registered(uri, model_uri(model, version, alias))
    config = config or evaluation_config(target["config_yaml"], tracking_uri=uri)
    tags = {
        **provenance_tags(),
        "evaluated_model": target["name"],
        "evaluated_version": target["version"],
        "evaluated_run_id": target["run_id"],
        "lenta_lora.kind": "evaluation",
    }
    run_id = start_run(config, uri, tags)
    try:
        # Same cache records as the finetune flow (a Kaggle download is reused, not repeated).
        csv_path = acquire_corpus.with_options(result_storage=result_storage_for(config.data))(config.data)
        output_dir = f"{config.data.cache_dir}/evaluations/{run_id}"
        evaluated = evaluate_registered_adapter(target, csv_path, config, output_dir, uri, run_id)
        link_evaluation(uri, target, run_id, evaluated.metrics)
    except BaseException:
        finish_run(uri, run_id, "FAILED")
        raise
    finish_run(uri, run_id, "FINISHED")
    summary = {
        "run_id": run_id,
        "tracking_uri": uri,
        "evaluated": {k: v for k, v in target.items() if k != "config_yaml"},
        "csv": csv_path,
        **asdict(evaluated),
    }
    create_markdown_artifact(
        key="evaluation-summary", markdown=render_evaluation(summary), description="lenta-lora re-evaluation"
    )
    return summary
