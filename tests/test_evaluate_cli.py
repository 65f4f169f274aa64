"""`lenta-lora evaluate`: a registered tiny adapter re-evaluated through the real Prefect flow into a
temporary MLflow sqlite store; what a user finds in MLflow and the registry afterwards."""

from __future__ import annotations

import contextlib
import csv
import io

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE, main
from lib.config import SAMPLE_CSV, load_config
from tests.conftest import tiny_overrides
from tests.support.artifacts import artifact_paths

pytestmark = pytest.mark.slow

COMPARED = (
    "base_test_perplexity",
    "test_perplexity",
    "test_bits_per_byte",
    "base_test_bits_per_byte",
    "test_word_perplexity",
    "chrf",
    "base_chrf",
    "bleu",
    "rougeL",
)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """main() with stdout/stderr captured in buffers that stay open: capsys closes its buffer after
    the test, and a log handler created during the call (Prefect's console handler) would keep
    writing into the closed file until the session ends."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def evaluation_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(
        experiments, "tags.evaluated_model = 'test-adapter'", order_by=["attributes.start_time ASC"]
    )


def test_evaluate_reproduces_the_registered_numbers_and_links_both_ways(
    prefect_server, shared_cache, tracking_uri, tmp_path
):
    from prefect.artifacts import Artifact

    from flows.finetune import finetune

    trained = finetune(config=load_config(DEFAULT_PROFILE, tiny_overrides(shared_cache)))
    client = MlflowClient(tracking_uri)
    source = client.get_run(trained["run_id"])

    code, printed, _ = run_cli("evaluate", "--model", "test-adapter", "--version", "1")
    assert code == 0
    [run] = evaluation_runs(client)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "evaluate-test-adapter-v1"
    assert run_id != trained["run_id"] and f"MLflow run:        {run_id}" in printed
    tags = run.data.tags
    assert (tags["evaluated_model"], tags["evaluated_version"], tags["evaluated_run_id"]) == (
        "test-adapter",
        "1",
        source.info.run_id,
    )
    # Default config = the training run's, default data = the bundled sample: the very same test articles...
    assert (
        tags["same_data_as_training"] == "True"
        and tags["dataset_fingerprint"] == source.data.tags["dataset_fingerprint"]
    )
    assert run.data.params["train.max_length"] == "64" and run.data.params["data.source"] == "sample"
    # ...so the registered adapter, reloaded from the registry, reproduces the numbers it was registered with.
    for name in COMPARED:
        assert run.data.metrics[name] == pytest.approx(source.data.metrics[name], rel=1e-4, abs=1e-6), name
    assert run.data.metrics["data_test_articles"] >= 1
    assert {"samples/samples.md", "samples/samples_table.json", "plots/base_vs_tuned.png"} <= artifact_paths(
        client, run_id
    )
    version = client.get_model_version("test-adapter", "1")
    assert version.tags["last_evaluation_run_id"] == run_id
    assert float(version.tags["last_evaluation_test_bits_per_byte"]) == pytest.approx(
        run.data.metrics["test_bits_per_byte"], rel=1e-5
    )

    summary = Artifact.get("evaluation-summary").data
    assert f"mlflow ui --backend-store-uri {tracking_uri}" in summary and f"/runs/{run_id}" in summary
    assert "| test_bits_per_byte |" in summary and "| prompt | reference | base | tuned |" in summary

    # Another CSV (a copy of the sample with one article dropped), by alias, with an override.
    other = tmp_path / "other.csv"
    with open(SAMPLE_CSV, newline="", encoding="utf-8") as src, open(other, "w", newline="", encoding="utf-8") as dst:
        rows = list(csv.reader(src))
        csv.writer(dst).writerows(rows[:1] + rows[2:])
    assert (
        run_cli(
            "evaluate",
            "--model",
            "test-adapter",
            "--alias",
            "champion",
            "--csv",
            str(other),
            "--set",
            "eval.num_samples=1",
        )[0]
        == 0
    )
    first, second = evaluation_runs(client)
    assert first.info.run_id == run_id
    assert second.data.tags["same_data_as_training"] == "False" and second.data.params["data.path"] == str(other)
    assert second.data.params["eval.num_samples"] == "1" and second.data.tags["evaluated_version"] == "1"
    assert client.get_model_version("test-adapter", "1").tags["last_evaluation_run_id"] == second.info.run_id

    # A window longer than the context the config knows of: reported before any work, no run.
    code, _, err = run_cli("evaluate", "--model", "test-adapter", "--version", "1", "--set", "train.max_length=256")
    assert code == 2 and "train.max_length=256 exceeds the tiny model's context" in err
    assert len(evaluation_runs(client)) == 2
    # A window of 256 fits the demo profile's tiny model (512) but not this one (128): one line, run FAILED.
    code, _, err = run_cli(
        "evaluate",
        "--model",
        "test-adapter",
        "--version",
        "1",
        "--config",
        str(DEFAULT_PROFILE),
        "--set",
        "train.max_length=256",
    )
    assert code == 2
    [err] = [line for line in err.splitlines() if line.startswith("lenta-lora")]
    assert err == (
        "lenta-lora: error: models:/test-adapter/1: train.max_length=256 (the scoring window) exceeds the "
        "model's context of 128 tokens; pass --set train.max_length=128"
    )
    assert evaluation_runs(client)[-1].info.status == "FAILED"
    assert client.get_model_version("test-adapter", "1").tags["last_evaluation_run_id"] == second.info.run_id


def test_evaluate_unknown_version_is_one_clear_line(tracking_uri):
    code, _, err = run_cli("evaluate", "--model", "no-such-model", "--version", "3")
    # (MLflow's own INFO lines about creating the fresh sqlite store may precede it.)
    [line] = [line for line in err.splitlines() if line.startswith("lenta-lora")]
    assert code == 2 and line.startswith("lenta-lora: error: no registered model 'no-such-model'")
    code, _, err = run_cli("evaluate", "--model", "m", "--version", "1", "--csv", "/nonexistent.csv")
    assert code == 2 and "--csv /nonexistent.csv: no such file" in err


def test_run_link_on_a_tracking_server_names_the_experiment(tmp_path):
    from lib.reports import render_summary, run_link
    from lib.tracking import start_run
    from tests.support.mlflow_server import running_mlflow_server

    with running_mlflow_server(tmp_path / "server") as server:
        run_id = start_run(server.uri, "link-test", "r", {}, {}, "a: 1\n")
        experiment = MlflowClient(server.uri).get_run(run_id).info.experiment_id
        link = run_link(server.uri + "/", run_id)
        assert link["url"] == f"{server.uri}/#/experiments/{experiment}/runs/{run_id}" and link["command"] is None
        text = render_summary(
            {
                "run_id": run_id,
                "tracking_uri": server.uri,
                "model": {"uri": "models:/m/1", "champion": False},
                "metrics": {},
            }
        )
        assert f"[{link['url']}]({link['url']})" in text and "(champion: no)" in text
