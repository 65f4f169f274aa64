"""Stage 4: base vs tuned on the same test articles; metrics, samples table and plots to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from lib import evaluation, plots, tracking
from lib.config import PipelineConfig

PLOTTED = ["test_perplexity", "test_bits_per_byte", "chrf", "rougeL"]


@task
def evaluate_adapter(dataset_path: str, adapter_dir: str, config: PipelineConfig, output_dir: str, uri: str, run_id: str) -> dict:
    """Returns the metrics dict (`base_<m>`, `<m>`, `delta_<m>`)."""
    result = evaluation.evaluate_adapter(dataset_path, adapter_dir, config, Path(output_dir) / "evaluation")
    metrics = result["metrics"]
    tracking.log_metrics(uri, run_id, metrics)
    if result["bleu_signature"]:
        tracking.set_tags(uri, run_id, {"bleu_signature": result["bleu_signature"]})
    rows = json.loads(Path(result["samples_json"]).read_text(encoding="utf-8"))
    if rows:
        tracking.log_table(uri, run_id, {k: [r[k] for r in rows] for k in rows[0]}, "samples/samples_table.json")
    tracking.log_artifact(uri, run_id, result["samples_md"], "samples")
    bars = plots.plot_comparison(metrics, PLOTTED, Path(output_dir) / "base_vs_tuned.png")
    tracking.log_artifact(uri, run_id, bars, "plots")
    get_run_logger().info("test perplexity %.2f -> %.2f, bits/byte %.3f -> %.3f", metrics["base_test_perplexity"],
                          metrics["test_perplexity"], metrics["base_test_bits_per_byte"], metrics["test_bits_per_byte"])
    return {"metrics": metrics, "samples_md": result["samples_md"]}
