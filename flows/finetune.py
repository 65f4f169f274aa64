"""The `finetune` flow: acquire -> prepare -> train -> evaluate -> register, in one MLflow run."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from lib.config import PipelineConfig
from lib.tracking import resolve_tracking_uri
from tasks.acquire import acquire_corpus
from tasks.evaluate import evaluate_adapter
from tasks.prepare import prepare_dataset
from tasks.register import register_adapter
from tasks.tracking import finish_run, provenance_tags, start_run
from tasks.train import train_adapter


@flow(name="finetune")
def finetune(config: PipelineConfig = PipelineConfig()) -> dict:
    """Fine-tune a LoRA adapter on Lenta.ru news, evaluate it, and register it in MLflow."""
    uri = resolve_tracking_uri(config.tracking.uri)
    tags = provenance_tags()
    run_id = start_run(config, uri, tags)
    try:
        csv_path = acquire_corpus(config.data)
        prepared = prepare_dataset(csv_path, config.data, config.model, config.train.max_length, uri, run_id)
        output_dir = f"{config.data.cache_dir}/runs/{run_id}"
        trained = train_adapter(prepared["path"], config, output_dir, uri, run_id)
        evaluated = evaluate_adapter(prepared["path"], trained["adapter_dir"], config, output_dir, uri, run_id)
        registered = register_adapter(trained["adapter_dir"], prepared["base"], config, evaluated["metrics"],
                                      prepared["fingerprint"], uri, run_id, tags)
    except BaseException:
        finish_run(uri, run_id, "FAILED")
        raise
    finish_run(uri, run_id, "FINISHED")
    summary = {"run_id": run_id, "tracking_uri": uri, "model": registered, "metrics": evaluated["metrics"],
               "train": trained, "dataset_fingerprint": prepared["fingerprint"]}
    create_markdown_artifact(key="finetune-summary", markdown=render_summary(summary), description="lenta-lora run")
    return summary


def render_summary(summary: dict) -> str:
    m = summary["metrics"]
    rows = "\n".join(f"| {k} | {m[f'base_{k}']:.4g} | {m[k]:.4g} |" for k in sorted(m)
                     if f"base_{k}" in m and not k.startswith(("base_", "delta_")))
    return (f"## lenta-lora: {summary['model']['uri']}\n\nMLflow run `{summary['run_id']}` "
            f"in `{summary['tracking_uri']}`; champion: {summary['model']['champion']}\n\n"
            f"| metric | base | tuned |\n|---|---|---|\n{rows}\n")


if __name__ == "__main__":
    from flows.cli import main

    main()
