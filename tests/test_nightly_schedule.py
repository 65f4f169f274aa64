"""The nightly as users run it: a real `prefect server start` with its scheduler, the demo
deployment on a short interval schedule, a process worker, at least three cycles.

Cycle 1 registers version 1 as champion. The next cycles (nothing changed) register nothing and
say "up to date". Then the deployment's config changes (as a person edits it in the UI or
redeploys): the next cycle trains and registers version 2, judged on version 1's benchmark.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import tiny_overrides
from tests.support.prefect_server import api, log_tail, prefect_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
POOL = "lenta-process"  # the work pool prefect.yaml deploys to

CYCLE_TIMEOUT_S = 420  # one tiny flow run is ~30 s here; a loaded 2-core machine is much slower
# The scheduler looks for work every 60 s and fills 100 runs ahead by default: every 2 s, 4 ahead.
FAST_SCHEDULER = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "4",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "2",
}


def completed_runs(url: str, deployment_id: str) -> list[dict]:
    runs = api(
        url,
        "/flow_runs/filter",
        "POST",
        {
            "flow_runs": {
                "deployment_id": {"any_": [deployment_id]},
                "state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}},
            },
            "sort": "EXPECTED_START_TIME_ASC",
        },
    )
    bad = [r for r in runs if r["state_type"] != "COMPLETED"]
    assert not bad, [(r["name"], r["state_name"], (r.get("state") or {}).get("message")) for r in bad]
    return runs


def wait_for(url: str, deployment_id: str, done, what: str, worker_log) -> list[dict]:
    deadline = time.monotonic() + CYCLE_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = completed_runs(url, deployment_id)
        if done(runs):
            return runs
        time.sleep(3)
    raise TimeoutError(f"{what}: not after {CYCLE_TIMEOUT_S} s\n{log_tail(worker_log)}")


def mlflow_run(client: MlflowClient, flow_run_id: str):
    [run] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    return run


def test_scheduled_nightly_trains_once_skips_unchanged_and_retrains_on_change(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    name = "nightly-test"
    overrides = tiny_overrides(str(tmp_path / "cache"), **{"registry.model_name": name, "tracking.uri": uri})
    client = MlflowClient(uri, uri)
    with prefect_server(tmp_path / "prefect-home", extra_env=FAST_SCHEDULER) as server:
        server.cli("work-pool", "create", POOL, "--type", "process", cwd=ROOT)
        server.cli("work-pool", "set-concurrency-limit", POOL, "1", cwd=ROOT)  # one cycle at a time, as nightly
        server.cli("deploy", "--all", cwd=ROOT)
        deployment = api(server.url, f"/deployments/name/{urllib.parse.quote('finetune')}/demo")
        did = deployment["id"]
        api(
            server.url,
            f"/deployments/{did}",
            "PATCH",
            {"parameters": {**deployment["parameters"], "overrides": overrides}},
        )
        api(server.url, f"/deployments/{did}/schedules", "POST", [{"schedule": {"interval": 10}, "active": True}])
        worker_log = server.home / f"worker-{POOL}.log"
        with server.worker(POOL, cwd=tmp_path, queues=("default",)):
            # Cycles 1 and 2, on the deployment's config.
            runs = wait_for(server.url, did, lambda r: len(r) >= 2, "two scheduled cycles", worker_log)
            first, second = runs[0], runs[1]
            assert first["auto_scheduled"] and second["auto_scheduled"]
            v1 = client.get_model_version(name, "1")
            assert v1.run_id == mlflow_run(client, first["id"]).info.run_id
            assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
            skipped = mlflow_run(client, second["id"])
            assert skipped.info.status == "FINISHED" and skipped.data.tags["up_to_date_version"] == "1"
            assert "train_loss" not in skipped.data.metrics

            # A person changes the deployment's config: future cycles use the new parameters.
            changed = [*overrides, "train.learning_rate=0.01"]
            api(
                server.url,
                f"/deployments/{did}",
                "PATCH",
                {"parameters": {**deployment["parameters"], "overrides": changed}},
            )
            runs = wait_for(
                server.url,
                did,
                lambda r: any(x["parameters"].get("overrides") == changed for x in r),
                "a cycle with the changed config",
                worker_log,
            )
        print(f"\n{len(runs)} scheduled cycles completed: {[r['name'] for r in runs]}")
        assert len(runs) >= 3
        changed_run = next(r for r in runs if r["parameters"].get("overrides") == changed)
        trained = mlflow_run(client, changed_run["id"])
        versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        assert [int(v.version) for v in versions] == [1, 2]  # every unchanged cycle registered nothing
        v2 = versions[1]
        assert v2.run_id == trained.info.run_id and trained.data.params["train.learning_rate"] == "0.01"
        assert v2.tags["training_key"] != v1.tags["training_key"]
        # Judged on version 1's benchmark: the one the model got with its first version.
        fingerprint = client.get_registered_model(name).tags["benchmark.fingerprint"]
        assert v1.tags["benchmark_fingerprint"] == v2.tags["benchmark_fingerprint"] == fingerprint
        decision = json.loads(v2.tags["champion_decision"])
        assert decision["benchmark_fingerprint"] == fingerprint and decision["previous_champion"] == "1"
        assert decision["previous_value"] == float(v1.tags["benchmark_bits_per_byte"])
        for run in runs:
            if run["id"] not in (first["id"], changed_run["id"]):
                assert mlflow_run(client, run["id"]).data.tags.get("up_to_date_version") in ("1", "2"), run["name"]
