"""The whole `finetune` flow on the demo profile (shrunk), under a real Prefect engine, into a
temporary MLflow sqlite store: what a user finds in MLflow afterwards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib.config import load_config
from tests.conftest import tiny_overrides
from tests.support.artifacts import artifact_data, artifact_paths

pytestmark = pytest.mark.slow


def test_demo_flow_logs_everything_and_registers_versions(prefect_server, tiny_config, tracking_uri, monkeypatch):
    from flows.finetune import finetune

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the tiny training lasts seconds
    summary = finetune(config=tiny_config)
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["lora.r"] == "8" and params["train.max_steps"] == "4" and params["model.name"] == "tiny"
    assert params["dataset.fingerprint"] == summary["dataset_fingerprint"]

    metrics = run.data.metrics
    for name in (
        "base_test_perplexity",
        "test_perplexity",
        "test_bits_per_byte",
        "base_test_bits_per_byte",
        "test_bits_per_char",
        "test_word_perplexity",
        "delta_test_perplexity",
        "chrf",
        "base_chrf",
        "bleu",
        "rougeL",
        "distinct_2",
        "validation_loss",
        "train_tokens_per_second",
    ):
        assert name in metrics, name
    assert metrics["test_perplexity"] > 1 and metrics["base_test_perplexity"] > 1
    losses = client.get_metric_history(summary["run_id"], "train_loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]  # one point per optimizer step

    assert any(name.startswith("system/cpu_utilization") for name in metrics), sorted(metrics)
    # The experiment opens in MLflow's model-training view; each split is a dataset input of the run.
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    splits = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs if d.dataset.name.startswith("lenta-")}
    assert sorted(splits) == ["testing", "training", "validation"]
    source = json.loads(splits["training"].source)
    assert source["type"] == "local" and source["path"].endswith("lenta-sample.csv") and len(source["sha256"]) == 64
    profile = json.loads(splits["training"].profile)
    assert (
        profile["articles"] > 0
        and profile["tokens"] > 0
        and profile["blocks"] > 0
        and splits["training"].digest.startswith(summary["dataset_fingerprint"][:24])
    )

    tags = run.data.tags
    assert tags["prefect.flow_run_id"] and tags["git_commit"] and tags["dataset_fingerprint"]
    assert tags["git_dirty"] in ("true", "false")  # whether the commit alone says what code ran

    artifacts = artifact_paths(client, summary["run_id"])
    for path in (
        "config.yaml",
        "dataset_stats.json",
        "plots/loss_curve.png",
        "plots/base_vs_tuned.png",
        "samples/samples.md",
        "samples/samples_table.json",
        "training_key.json",
        "champion_decision.json",
    ):
        assert path in artifacts, (path, sorted(artifacts))

    # The adapter is an MLflow 3 logged model of this run ("Logged models"), its scores linked to the
    # text sets they were measured on; the registered version points at it.
    version = client.get_model_version("test-adapter", "1")
    [logged] = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert version.source == logged.artifact_location and version.tags["logged_model_id"] == logged.model_id
    assert str(logged.status) == "READY"
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    files = {
        str(p.relative_to(Path(logged.artifact_location.removeprefix("file://"))))
        for p in Path(logged.artifact_location.removeprefix("file://")).rglob("*")
        if p.is_file()
    }
    assert {"MLmodel", "artifacts/adapter/adapter_config.json", "artifacts/adapter/adapter_model.safetensors"} <= files
    scores = {m.key: m for m in logged.metrics}
    assert scores["test_bits_per_byte"].value == metrics["test_bits_per_byte"]
    assert scores["test_bits_per_byte"].dataset_name == "lenta-test"
    assert scores["benchmark_bits_per_byte"].dataset_name == "benchmark"

    assert version.run_id == summary["run_id"]
    assert (
        version.tags["base_model"] == "tiny" and version.tags["dataset_fingerprint"] == summary["dataset_fingerprint"]
    )
    assert "test_bits_per_byte" in version.tags and version.tags["prefect.flow_run_id"] == tags["prefect.flow_run_id"]
    assert int(client.get_model_version_by_alias("test-adapter", "champion").version) == 1

    # The model's benchmark is fixed by its first version: this run's test split, stored in a run of
    # its own and logged as a dataset input; the first version's benchmark score is its test score.
    model = client.get_registered_model("test-adapter")
    fingerprint = model.tags["benchmark.fingerprint"]
    assert summary["benchmark"]["fingerprint"] == fingerprint == version.tags["benchmark_fingerprint"]
    assert (
        float(version.tags["benchmark_bits_per_byte"])
        == metrics["benchmark_bits_per_byte"]
        == metrics["test_bits_per_byte"]
    )
    assert "benchmark/benchmark.json" in artifact_paths(client, model.tags["benchmark.run_id"])
    inputs = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert ("test-adapter-benchmark", fingerprint[:36], "benchmark") in inputs
    decision = json.loads(version.tags["champion_decision"])
    assert decision["promoted"] and decision["benchmark_fingerprint"] == fingerprint
    assert len(tags["training_key"]) == 64 and version.tags["training_key"] == tags["training_key"]

    # Prefect artifacts a person reads: a link to the MLflow run, base vs tuned, training progress.
    assert summary["run_id"] in artifact_data("mlflow-run")
    table = {row["metric"]: row for row in json.loads(artifact_data("base-vs-tuned"))}
    assert table["test_bits_per_byte"]["tuned"] == metrics["test_bits_per_byte"]
    assert table["test_bits_per_byte"]["base"] == metrics["base_test_bits_per_byte"]
    assert float(artifact_data("training-progress")) == 100.0

    assert os.environ["MLFLOW_TRACKING_URI"] == tracking_uri  # registering rewrote no process-wide setting

    # Nothing changed: the second run trains and registers nothing, and says so.
    second = finetune(config=tiny_config)
    assert second["up_to_date"] and second["model"]["version"] == 1 and "metrics" not in second, second.get("model")
    assert "up to date: version 1 holds this" in second["message"]
    again = client.get_run(second["run_id"])
    assert again.info.status == "FINISHED" and again.data.tags["up_to_date_version"] == "1"
    assert "train_loss" not in again.data.metrics and again.data.tags["training_key"] == tags["training_key"]
    assert [str(v.version) for v in client.search_model_versions("name='test-adapter'")] == ["1"]
    assert "up to date: version 1 holds this" in artifact_data("finetune-summary")

    # --force trains anyway; identical numbers are within the promotion margin: champion stays 1.
    forced = finetune(config=tiny_config, force=True)
    assert forced["model"]["version"] == 2 and forced["model"]["champion"] is False
    assert forced["metrics"]["benchmark_bits_per_byte"] == metrics["benchmark_bits_per_byte"]
    decision = json.loads(client.get_model_version("test-adapter", "2").tags["champion_decision"])
    assert decision["previous_value"] == decision["value"] and decision["relative_improvement"] == 0
    assert decision["reason"].startswith("champion stays 1") and decision["min_improvement"] == 0.002
    assert int(client.get_model_version_by_alias("test-adapter", "champion").version) == 1


def test_failed_flow_marks_run_failed_and_registers_nothing(prefect_server, shared_cache, tracking_uri, tmp_path):
    from flows.finetune import finetune

    config = load_config(
        DEFAULT_PROFILE,
        tiny_overrides(
            shared_cache,
            **{"data.source": "csv", "data.path": str(tmp_path / "missing.csv"), "registry.model_name": "never"},
        ),
    )
    with pytest.raises(Exception, match="missing.csv"):
        finetune(config=config)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_model_versions("name='never'") == []
