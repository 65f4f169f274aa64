"""Stage 4: base vs tuned on the same test articles; metrics, samples table and plots to MLflow.

Also the tasks of the standalone re-evaluation of a registered version (`flows/evaluate.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from lib import evaluation, loading, plots, reevaluation, registry, tracking
from lib.benchmark import Benchmark
from lib.config import PipelineConfig

PLOTTED = ["test_perplexity", "test_bits_per_byte", "chrf", "rougeL"]
SUMMARY_SAMPLES = 3  # rows carried in the return value (for the run's Markdown summary); the rest stay in files


def _log_evaluation(result: dict, output_dir: str, uri: str, run_id: str) -> evaluation.EvaluationSummary:
    """Log one evaluation's metrics, samples and plot into `run_id`; return what a summary needs."""
    metrics = result["metrics"]
    tracking.log_metrics(uri, run_id, metrics)
    if result["bleu_signature"]:
        tracking.set_tags(uri, run_id, {"bleu_signature": result["bleu_signature"]})
    rows = json.loads(Path(result["samples_json"]).read_text(encoding="utf-8"))
    if rows:
        tracking.log_table(uri, run_id, {k: [r[k] for r in rows] for k in rows[0]}, "samples/samples_table.json")
    tracking.log_artifact(uri, run_id, result["samples_md"], "samples")
    table = [
        {"metric": name, "base": metrics[f"base_{name}"], "tuned": metrics[name], "delta": metrics[f"delta_{name}"]}
        for name in metrics
        if f"base_{name}" in metrics
    ]
    create_table_artifact(table, key="base-vs-tuned", description="test metrics, base vs tuned, same test articles")
    bars = plots.plot_comparison(metrics, PLOTTED, Path(output_dir) / "base_vs_tuned.png", evaluation.LOWER_IS_BETTER)
    tracking.log_artifact(uri, run_id, bars, "plots")
    get_run_logger().info(
        "test perplexity %.2f -> %.2f, bits/byte %.3f -> %.3f",
        metrics["base_test_perplexity"],
        metrics["test_perplexity"],
        metrics["base_test_bits_per_byte"],
        metrics["test_bits_per_byte"],
    )
    return evaluation.EvaluationSummary(
        metrics=metrics,
        samples=rows[:SUMMARY_SAMPLES],
        samples_md=result["samples_md"],
        samples_json=result["samples_json"],
        plot=str(bars),
        bleu_signature=result["bleu_signature"],
    )


@task
def evaluate_adapter(
    dataset_path: str,
    adapter_dir: str,
    config: PipelineConfig,
    output_dir: str,
    uri: str,
    run_id: str,
    benchmark: Benchmark | None = None,
) -> evaluation.EvaluationSummary:
    """Base vs tuned on the test split (and the tuned model on `benchmark`), logged into the run."""
    result = evaluation.evaluate_adapter(dataset_path, adapter_dir, config, Path(output_dir) / "evaluation", benchmark)
    return _log_evaluation(result, output_dir, uri, run_id)


@task(retries=2, retry_delay_seconds=[2, 10])
def resolve_registered(uri: str, registered_uri: str) -> dict:
    """`models:/NAME/VERSION` or `@ALIAS` -> name, pinned version and uri, source run id, its config."""
    return loading.registered_version(uri, registered_uri)


@task
def evaluate_registered_adapter(
    target: dict, csv_path: str, config: PipelineConfig, output_dir: str, uri: str, run_id: str
) -> evaluation.EvaluationSummary:
    """Re-evaluate a registered version into the evaluation run `run_id`; the summary also holds the
    data's `dataset_fingerprint` and whether it equals the training run's."""
    tracking.set_tags(
        uri,
        run_id,
        {
            "mlflow.runName": f"evaluate-{target['name']}-v{target['version']}",
            "mlflow.note.content": (
                f"Re-evaluation of `{target['uri']}` (trained in run `{target['run_id']}`) on {csv_path}"
            ),
        },
    )
    result = reevaluation.evaluate_registered(uri, target["uri"], csv_path, config, Path(output_dir) / "evaluation")
    same = result["dataset_fingerprint"] == target.get("dataset_fingerprint")
    tracking.set_tags(
        uri, run_id, {"dataset_fingerprint": result["dataset_fingerprint"], "same_data_as_training": same}
    )
    tracking.log_params(uri, run_id, {"dataset.fingerprint": result["dataset_fingerprint"], "data.csv": csv_path})
    tracking.log_metrics(uri, run_id, {"data_test_articles": result["test_articles"]})
    if not same:
        get_run_logger().warning(
            "data differs from the training run's (fingerprint %s vs %s): the test articles may "
            "include ones %s was trained on",
            result["dataset_fingerprint"][:12],
            str(target.get("dataset_fingerprint"))[:12],
            target["uri"],
        )
    summary = _log_evaluation(result, output_dir, uri, run_id)
    summary.dataset_fingerprint, summary.same_data_as_training = result["dataset_fingerprint"], same
    return summary


@task(retries=2, retry_delay_seconds=[2, 10])
def link_evaluation(uri: str, target: dict, run_id: str, metrics: dict[str, float]) -> None:
    """Point the model version at its newest evaluation run (the run already points back by tags).

    Its headline number is tagged as `last_evaluation_test_bits_per_byte`: measured on whatever
    test split the evaluation read, so it never enters the champion decision (that one reads only
    `benchmark_*` scores measured on the model's benchmark)."""
    tags = {"last_evaluation_run_id": run_id}
    if "test_bits_per_byte" in metrics:
        tags["last_evaluation_test_bits_per_byte"] = f"{metrics['test_bits_per_byte']:.6g}"
    registry.set_model_version_tags(uri, target["name"], target["version"], tags)
