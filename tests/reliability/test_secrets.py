"""Secrets: the `kaggle` data source through the whole flow (the official client against a loopback
fake Kaggle), and the key never stored anywhere a user (or attacker) can read: MLflow params, tags
and every artifact, the registry version, Prefect's logs and the terminal are all searched."""

from __future__ import annotations

import asyncio

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib.config import load_config
from tests.conftest import tiny_overrides
from tests.support.artifacts import stored_texts
from tests.support.kaggle_server import SECRET

pytestmark = pytest.mark.slow


def flow_logs(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            return [log.message for log in logs]

    return asyncio.run(read())


def test_kaggle_source_downloads_once_and_never_stores_the_key(
    prefect_server, fake_kaggle, tracking_uri, tmp_path, capfd
):
    from flows.finetune import finetune

    config = load_config(DEFAULT_PROFILE, tiny_overrides(str(tmp_path / "cache"), **{"data.source": "kaggle"}))
    first = finetune(config=config)
    second = finetune(
        config=config.model_copy(update={"train": config.train.model_copy(update={"learning_rate": 0.001})})
    )
    assert fake_kaggle.file_requests == 1  # the second run used the verified cache
    assert first["dataset_fingerprint"] == second["dataset_fingerprint"]

    client = MlflowClient(tracking_uri)
    runs = [first["run_id"], second["run_id"]]
    # MLflow: params, tags, artifacts, and the registered versions' tags, descriptions and files.
    texts = stored_texts(client, runs, tmp_path / "artifacts")
    for summary in (first, second):  # each run's registered version was among what was searched
        assert f"{summary['model']['name']}/{summary['model']['version']}" in {where for where, _ in texts}
    haystack = [text for _, text in texts]
    for run_id in runs:
        haystack += flow_logs(client.get_run(run_id).data.tags["prefect.flow_run_id"])
    captured = capfd.readouterr()
    haystack += [captured.out, captured.err]
    assert len(haystack) > 50  # params, tags, artifacts and log lines were really searched
    leaks = [text[:200] for text in haystack if SECRET in text]
    assert leaks == []


def test_credentials_from_a_prefect_secret_block(prefect_server, fake_kaggle, tracking_uri, tmp_path, monkeypatch):
    """No credentials in the environment or on disk: the profile names a Secret block instead."""
    import json

    from prefect.blocks.system import Secret

    from flows.finetune import finetune

    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    Secret(value=json.dumps({"username": "alice", "key": SECRET})).save("kaggle-test-creds", overwrite=True)
    config = load_config(
        DEFAULT_PROFILE,
        tiny_overrides(
            str(tmp_path / "cache"),
            **{"data.source": "kaggle", "data.kaggle_secret_block": "kaggle-test-creds", "train.max_steps": 1},
        ),
    )
    summary = finetune(config=config)
    assert fake_kaggle.file_requests == 1
    run = MlflowClient(tracking_uri).get_run(summary["run_id"])
    assert run.data.params["data.kaggle_secret_block"] == "kaggle-test-creds"  # the name, never the value
    assert not any(SECRET in str(v) for v in {**run.data.params, **run.data.tags}.values())
