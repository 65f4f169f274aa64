"""Answers lost between the client and a real `mlflow server` (tests/support/lossy_proxy.py): the
server carried the request out, the client saw an error. A run's start must still leave one run (no
twin left RUNNING), a run whose set-up failed must be closed FAILED, registration must make exactly one
version per run, and a lost alias write must not make `champion` wrong.
"""

from __future__ import annotations

import logging

import pytest
from mlflow import MlflowClient

from lib import benchmark_store, registry, tracking
from lib.benchmark import write_benchmark
from tests.support.adapter_fixtures import CHAMPION_POLICY
from tests.support.lossy_proxy import lossy_proxy

# A hub id: only the adapter is uploaded, and nothing is loaded (registration never loads a model).
HUB_BASE = {"kind": "hub", "name": "no-such-org/no-such-model", "revision": "main", "precision": "fp32"}
ALIAS = "/registered-models/alias"


def register(uri: str, trained, name: str, bits_per_byte: float) -> tuple[str, dict]:
    run_id = tracking.start_run(uri, name, "lost-answers", {}, {}, "{}\n")
    result = registry.register_adapter(
        uri, run_id, trained["adapter"], HUB_BASE, {}, name, {}, {"benchmark_bits_per_byte": bits_per_byte},
        **CHAMPION_POLICY,
    )  # fmt: skip
    tracking.finish_run(uri, run_id)
    return run_id, result


def live_runs(client: MlflowClient, experiment: str) -> list:
    """Every run of `experiment` that was not deleted (the UI's and search's default view)."""
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.mark.slow
def test_a_run_create_whose_answer_was_lost_leaves_one_run(mlflow_server, tmp_path, caplog):
    """MLflow's client retries a run create that got a 502: the server made the run the first time.
    The twin is no one's: its owner (this process) lives, so no stale sweep would close it. The flow's
    run and a model's benchmark run each stay one run, and nothing is left RUNNING."""
    from mlflow.entities import ViewType

    client = MlflowClient(mlflow_server.uri, mlflow_server.uri)
    with lossy_proxy(mlflow_server.uri) as proxy:
        with caplog.at_level(logging.WARNING, logger="lenta_lora"):
            proxy.lose_answer("POST", "/runs/create", status=502, times=2)  # the first retry loses its answer too
            run_id = tracking.start_run(proxy.uri, "lost-run", "lost-run", {"lora.r": 8}, {}, "lora: {r: 8}\n")
            proxy.lose_answer("POST", "/runs/create", status=502)
            texts = ["Первая новость о погоде.", "Вторая новость о футболе."]
            written = write_benchmark(texts, 64, None, "two texts", tmp_path)
            benchmark_store.store_benchmark(proxy.uri, "lost-run-model", written, "lost-run")
        assert proxy.seen("POST", "/runs/create") == [502, 502, 200, 502, 200]  # each try made a run
    tracking.finish_run(mlflow_server.uri, run_id)
    [flow_run] = live_runs(client, "lost-run")
    assert flow_run.info.run_id == run_id and flow_run.info.status == "FINISHED"
    assert flow_run.data.params == {"lora.r": "8"}
    [benchmark_run] = live_runs(client, "lost-run-benchmarks")
    pointed = benchmark_store.model_benchmark(mlflow_server.uri, "lost-run-model")["run_id"]
    assert benchmark_run.info.status == "FINISHED" and benchmark_run.info.run_id == pointed
    every = client.search_runs(
        [client.get_experiment_by_name(e).experiment_id for e in ("lost-run", "lost-run-benchmarks")],
        run_view_type=ViewType.ALL,
    )
    twins = [r for r in every if r.info.lifecycle_stage == "deleted"]
    assert len(every) == 5 and len(twins) == 3, [(r.info.run_name, r.info.lifecycle_stage) for r in every]
    warned = [r.getMessage() for r in caplog.records if "made by a retried request" in r.getMessage()]
    assert len(warned) == 3 and all(t.info.run_id in " ".join(warned) for t in twins), caplog.text


def every_run(client: MlflowClient, experiment: str) -> list:
    from mlflow.entities import ViewType

    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], run_view_type=ViewType.ALL)


def test_a_run_whose_set_up_failed_is_closed_failed_and_a_retry_makes_one_new_run(mlflow_server, tmp_path):
    """A run is made, then logging into it fails (here a 400, which the client does not retry). The
    run is closed FAILED with the step named, not left RUNNING beside the run the task's retry makes;
    the same for a model's benchmark run, whose failed run is never taken as the benchmark. A create
    that raised though the server made the run deletes that run again."""
    client = MlflowClient(mlflow_server.uri, mlflow_server.uri)
    refused = {"error_code": "INVALID_PARAMETER_VALUE", "message": "refused by the test proxy"}
    texts = ["Первая новость о погоде.", "Вторая новость о футболе."]
    written = write_benchmark(texts, 64, None, "two texts", tmp_path)
    with lossy_proxy(mlflow_server.uri) as proxy:
        proxy.lose_answer("POST", "/runs/create", status=400, body=refused)  # the run was made: deleted again
        with pytest.raises(Exception, match="refused by the test proxy"):
            tracking.start_run(proxy.uri, "half-run", "half-run", {"lora.r": 8}, {}, "lora: {r: 8}\n")
        proxy.lose_answer("POST", "/runs/log-batch", status=400, body=refused)
        with pytest.raises(Exception, match="refused by the test proxy"):
            tracking.start_run(proxy.uri, "half-run", "half-run", {"lora.r": 8}, {}, "lora: {r: 8}\n")
        run_id = tracking.start_run(proxy.uri, "half-run", "half-run", {"lora.r": 8}, {}, "lora: {r: 8}\n")
        proxy.lose_answer("POST", "/runs/log-inputs", status=400, body=refused)
        with pytest.raises(Exception, match="refused by the test proxy"):
            benchmark_store.store_benchmark(proxy.uri, "half-run-model", written, "half-run")
        benchmark_store.store_benchmark(proxy.uri, "half-run-model", written, "half-run")
    [created] = [r for r in every_run(client, "half-run") if r.info.lifecycle_stage == "deleted"]
    failed, started = sorted(live_runs(client, "half-run"), key=lambda r: r.info.start_time)
    assert (failed.info.status, started.info.status, started.info.run_id) == ("FAILED", "RUNNING", run_id)
    assert failed.data.tags["lenta_lora.failed_while"] == "logging the run's config (RestException)"
    tracking.finish_run(mlflow_server.uri, run_id)
    failed, stored = sorted(live_runs(client, "half-run-benchmarks"), key=lambda r: r.info.start_time)
    assert (failed.info.status, stored.info.status) == ("FAILED", "FINISHED")
    assert failed.data.tags["lenta_lora.failed_while"] == "storing the benchmark (RestException)"
    assert benchmark_store.model_benchmark(mlflow_server.uri, "half-run-model")["run_id"] == stored.info.run_id


def failed_tag(client: MlflowClient, experiment: str) -> str:
    [failed] = [r for r in live_runs(client, experiment) if r.info.status == "FAILED"]
    return failed.data.tags["lenta_lora.failed_while"]


@pytest.mark.slow
def test_a_version_create_whose_answer_was_lost_leaves_one_version(mlflow_server, trained, caplog):
    """MLflow's client retries a POST that got a 502: the server made the version the first time, so the
    retry makes a twin of the same run. The registrant keeps the run's lowest version, deletes its own.
    A lost logged-model create leaves no twin PENDING in the experiment's logged models either."""
    name = "lost-create"
    with lossy_proxy(mlflow_server.uri) as proxy:
        proxy.lose_answer("POST", "/model-versions/create", status=502)
        proxy.lose_answer("POST", "/logged-models", status=502)  # and the logged model the version points at
        with caplog.at_level(logging.WARNING, logger="lenta_lora"):
            run_id, result = register(proxy.uri, trained, name, 2.5)
        assert proxy.seen("POST", "/model-versions/create") == [502, 200]  # the retry made a second version
        assert proxy.seen("POST", "/logged-models") == [502, 200]
    client = MlflowClient(mlflow_server.uri, mlflow_server.uri)
    versions = client.search_model_versions(f"name = '{name}'")
    assert [(v.version, v.run_id) for v in versions] == [("1", run_id)]  # version 2, the twin, is gone
    assert result["version"] == 1 and result["uri"] == f"models:/{name}/1" and not result["up_to_date"]
    assert result["champion"] is True and str(client.get_model_version_by_alias(name, "champion").version) == "1"
    experiment = client.get_run(run_id).info.experiment_id
    [logged] = client.search_logged_models([experiment])  # the twin logged model is gone too
    assert logged.model_id == versions[0].tags["logged_model_id"] and str(logged.status) == "READY"
    kept = client.get_model_version(name, "1")
    assert kept.tags["benchmark_bits_per_byte"] == repr(2.5) and kept.tags["adapter_sha256"]
    assert '"promoted": true' in kept.tags["champion_decision"]
    assert any("deleting duplicate version 2" in r.getMessage() for r in caplog.records), caplog.text

    # The next run registers normally: version 3 (MLflow does not reuse a deleted number).
    _, after = register(mlflow_server.uri, trained, name, 2.0)
    assert after["version"] == 3 and after["champion"] is True


@pytest.mark.slow
def test_a_logged_model_create_that_raised_after_it_landed_leaves_no_pending_model(mlflow_server, trained):
    """The server made the logged model, the client got a 400 (not retried): registration fails and
    deletes that model; the task's retry makes the one READY model its version names."""
    name = "raised-create"
    refused = {"error_code": "INVALID_PARAMETER_VALUE", "message": "refused by the test proxy"}
    with lossy_proxy(mlflow_server.uri) as proxy:
        proxy.lose_answer("POST", "/logged-models", status=400, body=refused)
        run_id = tracking.start_run(proxy.uri, name, "raised", {}, {}, "{}\n")
        args = (proxy.uri, run_id, trained["adapter"], HUB_BASE, {}, name, {}, {"benchmark_bits_per_byte": 2.5})
        with pytest.raises(Exception, match="refused by the test proxy"):
            registry.register_adapter(*args, **CHAMPION_POLICY)
        assert proxy.seen("POST", "/logged-models") == [400]
        result = registry.register_adapter(*args, **CHAMPION_POLICY)
    tracking.finish_run(mlflow_server.uri, run_id)
    client = MlflowClient(mlflow_server.uri, mlflow_server.uri)
    [logged] = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert str(logged.status) == "READY" and result["version"] == 1
    assert client.get_model_version(name, "1").tags["logged_model_id"] == logged.model_id


@pytest.mark.slow
def test_an_alias_write_whose_answer_was_lost_still_decides_champion(mlflow_server, trained, caplog):
    """Two first-ever alias writes race in MLflow's select-then-insert and one gets a 400 (not retried),
    though a write landed. The registrant re-reads and re-checks: the better version holds `champion`,
    the decision says so, and the registration does not fail."""
    name = "lost-alias"
    _, first = register(mlflow_server.uri, trained, name, 3.0)
    assert first["champion"] is True
    with lossy_proxy(mlflow_server.uri) as proxy:
        race = {"error_code": "INVALID_STATE", "message": "(sqlite3.IntegrityError) UNIQUE constraint failed"}
        proxy.lose_answer("POST", ALIAS, status=400, body=race)
        with caplog.at_level(logging.INFO, logger="lenta_lora"):
            _, second = register(proxy.uri, trained, name, 2.0)  # beats 3.0 by far more than the margin
        assert proxy.seen("POST", ALIAS) == [400]  # not retried by the client: the registrant re-checked
    client = MlflowClient(mlflow_server.uri, mlflow_server.uri)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    decision = second["decision"]
    assert second["champion"] is True and decision["promoted"] and decision["champion_version"] == "2"
    assert decision["previous_champion"] == "1" and decision["previous_value"] == 3.0 and decision["value"] == 2.0
    assert any("lost a race" in r.getMessage() for r in caplog.records), caplog.text
