"""Skip when nothing changed: the run's training key, and the version that may already hold it.

A scheduled run on an unchanged corpus, config, code and base would train the very adapter a
registered version already holds. The flow computes the key after preparing the data (the
dataset fingerprint is part of it), asks the registry, and stops there when a version holds it:
the run finishes Completed, tagged `up_to_date_version`, and registers nothing.

Before all of that the flow pins a hub base's revision to the commit it names (`pin_revision`): the
key then holds the commit the run trains on, and a branch that moves mid-run changes nothing in it.
"""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from lib import base_identity, provenance, registry, reports, tracking
from lib.config import PipelineConfig
from lib.dataset import PreparedDataset


@task
def pin_revision(config: PipelineConfig) -> PipelineConfig:
    """The run's config with a hub base pinned to the commit its revision names now (the rest of the
    run, its MLflow params and its training key, use that commit)."""
    return config.model_copy(update={"model": base_identity.pin_revision(config.model)})


@task(retries=2, retry_delay_seconds=[2, 10])
def training_key(
    config: PipelineConfig, prepared: PreparedDataset, kaggle_version: int | None, uri: str, run_id: str
) -> str:
    """The key of what this run would train; logged as the run's `training_key` tag and `training_key.json`."""
    key, payload = provenance.training_key(config, prepared.fingerprint, prepared.path, prepared.base, kaggle_version)
    tracking.set_tags(
        uri, run_id, {"training_key": key, **({"kaggle_version": kaggle_version} if kaggle_version else {})}
    )
    if kaggle_version is not None:
        tracking.log_params(uri, run_id, {"data.kaggle_version": kaggle_version})
    tracking.log_artifact_text(uri, run_id, json.dumps(payload, indent=2, ensure_ascii=False), "training_key.json")
    get_run_logger().info("training key %s", key[:16])
    return key


@task(retries=2, retry_delay_seconds=[2, 10])
def version_with_training_key(uri: str, model_name: str, key: str) -> dict | None:
    """The registered version that already holds `key`, if any."""
    return registry.version_with_training_key(uri, model_name, key)


@task(retries=2, retry_delay_seconds=[2, 10])
def record_up_to_date(uri: str, run_id: str, holder: dict, key: str) -> str:
    """Say, in the MLflow run, the Prefect UI and the logs, that nothing was trained and why."""
    message = (
        f"up to date: version {holder['version']} holds this ({holder['uri']}, training key {key[:12]}); "
        "nothing trained or registered. Pass force (CLI: --force) to train anyway."
    )
    tracking.set_tags(
        uri,
        run_id,
        {"up_to_date_version": holder["version"], "lenta_lora.outcome": "up_to_date", "mlflow.note.content": message},
    )
    link = reports.run_link(uri, run_id)
    create_markdown_artifact(
        key="finetune-summary",
        description="lenta-lora run: up to date",
        markdown=(
            f"## lenta-lora: up to date\n\n{message}\n\n**MLflow run** `{run_id}`: {link['url']}\n\n"
            f"Same dataset, training config, code and base as the run `{holder['run_id']}` that trained "
            f"`{holder['uri']}` (champion: {'yes' if holder['champion'] else 'no'}).\n"
        ),
    )
    get_run_logger().info(message)
    return message
