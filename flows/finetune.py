"""The `finetune` flow: acquire -> prepare -> train -> evaluate -> register, in one MLflow run."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from lib.checkpoint import checkpoint_dir
from lib.config import PipelineConfig, build_config
from lib.reports import render_summary, run_summary, up_to_date_summary
from lib.store import resolve_tracking_uri
from tasks.acquire import acquire_corpus, corpus_version, result_storage_for
from tasks.benchmark import resolve_benchmark, score_champion_on_benchmark, store_benchmark
from tasks.evaluate import evaluate_adapter
from tasks.prepare import prepare_dataset, record_dataset
from tasks.provenance import pin_revision, record_up_to_date, training_key, version_with_training_key
from tasks.register import register_adapter
from tasks.tracking import finish_run, provenance_tags, start_run
from tasks.train import discard_checkpoints, train_adapter


@flow(name="finetune")
def finetune(
    config: PipelineConfig = PipelineConfig(), overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Fine-tune a LoRA adapter on Lenta.ru news, evaluate it, register it, decide `champion`.

    `overrides`: `key=value` settings on top of `config`, as `lenta-lora run --set` takes them, so
    that a deployment run can change one setting and keep the deployment's config for the rest.
    Unless `force`, a run whose training key a registered version holds trains nothing ("up to date").
    """
    if overrides:  # checked before any work: a bad override fails the flow run with every problem listed
        config = build_config(config.model_dump(mode="json"), overrides, source="the overrides parameter")
    config = pin_revision(config)  # a hub branch -> its commit now: every stage loads the same weights
    uri = resolve_tracking_uri(config.tracking.uri)
    tags = provenance_tags()
    run_id = start_run(config, uri, tags)
    try:
        results = result_storage_for(config.data)  # acquire/prepare cache records live in data.cache_dir
        csv_path = acquire_corpus.with_options(result_storage=results)(config.data)
        prepared = prepare_dataset.with_options(result_storage=results)(
            csv_path, config.data, config.model, config.train.max_length
        )
        version = corpus_version(config.data)  # Kaggle's dataset version, None for other sources
        record_dataset(prepared, config.data, version, uri, run_id)
        key = training_key(config, prepared, version, uri, run_id)
        holder = None if force else version_with_training_key(uri, config.registry.model_name, key)
        if holder:
            message = record_up_to_date(uri, run_id, holder, key)
            finish_run(uri, run_id, "FINISHED")
            return up_to_date_summary(run_id, uri, key, prepared, holder, message)
        benchmark = resolve_benchmark(config, prepared, uri)
        # Keyed by dataset + config, not run id, so that a re-run after a crash resumes (None: no checkpoints).
        checkpoints = checkpoint_dir(config, prepared.fingerprint, prepared.path)
        output_dir = f"{config.data.cache_dir}/runs/{run_id}"
        trained = train_adapter(prepared.path, config, output_dir, uri, run_id, checkpoints)
        evaluated = evaluate_adapter(prepared.path, trained.adapter_dir, config, output_dir, uri, run_id, benchmark)
        benchmark = store_benchmark(benchmark, config, uri, run_id)
        score_champion_on_benchmark(config, benchmark, uri)
        registered = register_adapter(prepared, trained, evaluated, benchmark, key, config, uri, run_id, tags, force)
    except BaseException:
        # Best effort: if the store is down too, the original error is the one to report, and the
        # next run's start marks this one FAILED (and retracts any version it made).
        finish_run(uri, run_id, "FAILED", return_state=True)
        raise
    finish_run(uri, run_id, "FINISHED")
    discard_checkpoints(checkpoints)  # the adapter is registered; a failed run keeps them to resume from
    summary = run_summary(run_id, uri, key, prepared, trained, evaluated, benchmark, registered)
    create_markdown_artifact(key="finetune-summary", markdown=render_summary(summary), description="lenta-lora run")
    return summary
