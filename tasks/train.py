"""Stage 3: LoRA training; loss and throughput stream into the MLflow run as they happen."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task

from lib import plots, tracking, training
from lib.config import PipelineConfig


@task
def train_adapter(dataset_path: str, config: PipelineConfig, output_dir: str, uri: str, run_id: str) -> dict:
    """Returns `adapter_dir`, `steps`, `tokens`, `seconds`, `final_loss`, `validation_loss`."""
    logger = get_run_logger()
    train = config.train
    tracking.log_params(uri, run_id, {"train.effective_batch": train.batch_size * train.grad_accum})

    def on_log(step: int, record: dict[str, float]) -> None:
        tracking.log_metrics(uri, run_id, record, step=step)
        if "train_loss" in record:
            logger.info("step %d loss %.4f lr %.2e %.0f tok/s", step, record["train_loss"],
                        record["learning_rate"], record["tokens_per_second"])

    result = training.train_adapter(dataset_path, config, output_dir, on_log=on_log)
    plot = plots.plot_loss(result.history, Path(output_dir) / "loss_curve.png")
    tracking.log_artifact(uri, run_id, plot, "plots")
    tracking.log_metrics(uri, run_id, {"train_steps": result.steps, "train_tokens": result.tokens,
                                       "train_seconds": result.seconds,
                                       "train_tokens_per_second": result.tokens / max(result.seconds, 1e-9)})
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    logger.info("trained %d steps on %d tokens in %.1fs -> %s", result.steps, result.tokens, result.seconds, result.adapter_dir)
    return summary
