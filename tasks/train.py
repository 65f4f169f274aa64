"""Stage 3: LoRA training; loss and throughput stream into the MLflow run as they happen.

With a checkpoint folder the task resumes a killed run of the same config: the new MLflow run is
tagged `resumed_from_run` / `resumed_from_step` and logs its steps under the same step numbers,
and the killed run (left RUNNING by the kill) is marked KILLED.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from lib import checkpoint, plots, tracking, training
from lib.config import PipelineConfig


def _close_interrupted_run(uri: str, found: checkpoint.Checkpoint, run_id: str, logger) -> None:
    """Mark the run that wrote `found` KILLED if it is still RUNNING and its training was cut short.

    Safe only because the caller holds the checkpoint lock: no live process is training with these
    checkpoints, so a RUNNING writer with unfinished training died (a Python error would have
    marked it FAILED). A writer that finished training may still be evaluating: it is left alone.
    A writer this run's start already swept (FAILED with `stale_reason`) is relabelled KILLED too.
    """
    old = found.run_id
    if not old or old == run_id or found.step >= found.total_steps:
        return
    try:
        summary = tracking.get_run_summary(uri, old)
    except Exception as error:  # noqa: BLE001 - e.g. the checkpoint was written under another tracking store
        logger.warning("MLflow run %s that wrote %s not found in %s (%s); left as it is", old, found.path, uri, error)
        return
    if summary["status"] == "RUNNING" or (summary["status"] == "FAILED" and "stale_reason" in summary["tags"]):
        tracking.set_tags(
            uri,
            old,
            {
                "resumed_in_run": run_id,
                "killed_reason": f"training process died after checkpoint step {found.step} of "
                f"{found.total_steps}; training resumed in run {run_id}",
            },
        )
        tracking.finish_run(uri, old, "KILLED")
        logger.info("marked MLflow run %s KILLED (its process died; resumed here)", old)


@task
def train_adapter(
    dataset_path: str, config: PipelineConfig, output_dir: str, uri: str, run_id: str, checkpoint_dir: str | None = None
) -> training.TrainResult:
    """The trained adapter's folder and how training went (`lib.training.TrainResult`)."""
    logger = get_run_logger()
    train = config.train
    tracking.log_params(
        uri, run_id, {"train.effective_batch": train.batch_size * train.grad_accum * train.num_processes}
    )

    bar = create_progress_artifact(0.0, key="training-progress", description="optimizer steps done, %")
    updated = [0.0]  # monotonic seconds of the last update: at most one API call every 2 s

    def on_log(step: int, record: dict[str, float], progress: training.Progress | None) -> None:
        tracking.log_metrics(uri, run_id, record, step=step)
        if progress is not None and (time.monotonic() - updated[0] >= 2 or step == progress.total):
            update_progress_artifact(bar, 100.0 * step / progress.total)
            updated[0] = time.monotonic()
        if progress is not None:
            logger.info(
                "step %d/%d loss %.4f lr %.2e %.0f tok/s ETA %s",
                step,
                progress.total,
                record["train_loss"],
                record["learning_rate"],
                record["tokens_per_second"],
                timedelta(seconds=round(progress.eta_seconds)),
            )

    def on_resume(found: checkpoint.Checkpoint) -> None:
        tracking.set_tags(uri, run_id, {"resumed_from_run": found.run_id or "unknown", "resumed_from_step": found.step})
        logger.info(
            "resuming from %s: step %d of %d (MLflow run %s)", found.path, found.step, found.total_steps, found.run_id
        )
        _close_interrupted_run(uri, found, run_id, logger)

    with tracking.system_metrics(uri, run_id):  # sampled here, while this process or its torchrun ranks train
        result = training.train_adapter(
            dataset_path,
            config,
            output_dir,
            on_log=on_log,
            checkpoint_dir=checkpoint_dir,
            run_id=run_id,
            on_resume=on_resume,
        )
    # The modules `lora.target_modules` (say "auto") resolved to on this base, as trained.
    tracking.set_tags(uri, run_id, {"lora_target_modules": ",".join(result.lora_targets)})
    plot = plots.plot_loss(result.history, Path(output_dir) / "loss_curve.png")
    tracking.log_artifact(uri, run_id, plot, "plots")
    tracking.log_metrics(
        uri,
        run_id,
        {
            "train_steps": result.steps,
            "train_tokens": result.tokens,
            "train_seconds": result.seconds,
            "train_tokens_per_second": result.tokens / max(result.seconds, 1e-9),
        },
    )
    logger.info(
        "trained %d steps on %d tokens in %.1fs -> %s", result.steps, result.tokens, result.seconds, result.adapter_dir
    )
    return result


@task
def discard_checkpoints(checkpoint_dir: str | None) -> bool:
    """After a successful run: its adapter is in MLflow, so its checkpoints only take disk space."""
    removed = checkpoint.discard(checkpoint_dir)
    if removed:
        get_run_logger().info("deleted checkpoints %s", checkpoint_dir)
    return removed
