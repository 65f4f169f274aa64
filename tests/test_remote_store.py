"""The pipeline against a real `mlflow server` over HTTP (artifacts proxied by the server): the
flow under the real Prefect engine, through a gateway that loses answers, registers a version that
another process loads by HTTP URI,
concurrent flow runs each get their own version, and `champion` ends on the best of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from uuid import uuid4

import pytest
from mlflow import MlflowClient

from lib import champion
from tests.conftest import tiny_overrides
from tests.support import warm
from tests.support.env import child_env, run_script
from tests.support.lossy_proxy import lossy_proxy

pytestmark = pytest.mark.slow

# A fresh interpreter loads the version through the server and checks it against the adapter
# folder the flow trained (the local files, loaded with plain PEFT: no registry involved).
LOAD_OVER_HTTP = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from lib.loading import load_registered

uri, target, adapter_dir = sys.argv[1:4]
model, tokenizer, base = load_registered(uri, target)
ids = tokenizer("Учёные нашли новый вид бабочек", return_tensors="pt", add_special_tokens=False)["input_ids"]
local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base["path"], dtype=torch.float32),
                                  adapter_dir).eval()
with torch.no_grad():
    diff = float((model(input_ids=ids).logits - local(input_ids=ids).logits).abs().max())
print("RESULT " + json.dumps({"max_abs_diff": diff, "kind": base["kind"]}))
"""


def test_flow_over_http_through_a_lossy_gateway_registers_a_version_another_process_loads(
    prefect_server, mlflow_server, shared_cache, tmp_path
):
    """The flow talks to the server through a gateway that loses the first answer to every kind of
    write (each POST, PUT, PATCH or DELETE path once: the server acted, the client got a 502 and
    retried). Every step copes with its own retried write without failing its task: no Prefect task
    runs twice, and the store holds what one clean run leaves."""
    from flows.cli import DEFAULT_PROFILE
    from flows.finetune import finetune
    from lib.config import load_config

    uri = mlflow_server.uri
    with lossy_proxy(uri) as gateway:
        gateway.lose_every_first_answer()
        overrides = {
            "tracking.uri": gateway.uri,
            "tracking.experiment": "lossy-gateway",
            "registry.model_name": "remote-adapter",
        }
        state = finetune(
            config=load_config(DEFAULT_PROFILE, tiny_overrides(shared_cache, **overrides)), return_state=True
        )
        summary = state.result()
    lost = {(method, path.rsplit("/mlflow/", 1)[-1]) for method, path in gateway.lost_once}
    assert {("POST", "runs/create"), ("POST", "model-versions/create"), ("DELETE", "model-versions/delete")} <= lost
    assert {("POST", "runs/outputs"), ("POST", "logged-models"), ("POST", "registered-models/alias")} <= lost
    assert {("POST", "runs/log-batch"), ("POST", "runs/log-inputs"), ("POST", "registered-models/create")} <= lost
    assert {("POST", "experiments/create"), ("POST", "runs/update"), ("PATCH", "logged-models")} <= {
        (method, path.split("/m-")[0]) for method, path in lost
    }
    assert any(method == "PUT" and "artifacts/adapter/adapter_model.safetensors" in path for method, path in lost)
    assert summary["tracking_uri"] == gateway.uri and summary["model"]["version"] == 1 and summary["model"]["champion"]
    assert task_run_counts(state.state_details.flow_run_id) == {1}  # no task needed Prefect's retry

    client = MlflowClient(uri, uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    # Nothing a retried write left behind: one run per experiment (twins deleted), one version
    # (its twin deleted), one logged model and it READY.
    experiments = [
        client.get_experiment_by_name(n).experiment_id for n in ("lossy-gateway", "lossy-gateway-benchmarks")
    ]
    assert [r.info.status for r in client.search_runs(experiments)] == ["FINISHED", "FINISHED"]
    assert [v.version for v in client.search_model_versions("name = 'remote-adapter'")] == ["1"]
    [logged] = client.search_logged_models([run.info.experiment_id])
    assert str(logged.status) == "READY"
    assert logged.model_id == client.get_model_version("remote-adapter", "1").tags["logged_model_id"]
    version = client.get_model_version("remote-adapter", "1")
    tags = version.tags
    assert tags["prefect.flow_run_id"] == run.data.tags["prefect.flow_run_id"] and tags["git_commit"]
    assert tags["dataset_fingerprint"] == summary["dataset_fingerprint"] and tags["base_model"] == "tiny"
    assert float(tags["test_bits_per_byte"]) == pytest.approx(summary["metrics"]["test_bits_per_byte"], rel=1e-5)
    assert tags["adapter_sha256"] == summary["model"]["sha256"]["adapter_sha256"]
    for fact in (summary["dataset_fingerprint"], tags["git_commit"], tags["prefect.flow_run_id"], summary["run_id"]):
        assert fact in version.description
    # The files went through the server into its artifact folder, not into a client-side path.
    stored = list((mlflow_server.root / "art").rglob("adapter_model.safetensors"))
    assert len(stored) == 1, stored

    result = run_script(
        LOAD_OVER_HTTP,
        uri,
        "models:/remote-adapter@champion",
        summary["train"]["adapter_dir"],
        cwd=tmp_path,
        env=child_env(tracking_uri=uri, pythonpath=True),
    )
    print(f"\nHTTP-loaded vs local adapter, max |logits difference|: {result['max_abs_diff']}")
    assert result["max_abs_diff"] < 1e-4 and result["kind"] == "tiny"


def task_run_counts(flow_run_id) -> set[int]:
    """How many times each task run of a flow run ran (1: no retry), from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.run_count for run in runs}


def test_concurrent_flow_runs_get_own_versions_and_champion_is_the_best(
    prefect_server, mlflow_server, shared_cache, tmp_path
):
    uri, name = mlflow_server.uri, "race-adapter"
    children = []
    for seed in (1, 2):
        overrides = tiny_overrides(
            shared_cache, **{"tracking.uri": uri, "registry.model_name": name, "train.seed": seed}
        )
        command = [sys.executable, "-m", "flows.cli", "run"] + [a for o in overrides for a in ("--set", o)]
        log = open(tmp_path / f"flow-{seed}.log", "w")
        env = child_env(tracking_uri=uri, pythonpath=True)
        children.append((warm.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for child, log in children:
        child.wait(timeout=900)
        log.close()
        assert child.returncode == 0, Path(log.name).read_text()[-3000:]
        # Against a server, the summary's hint is the server's address, not an `mlflow ui` command.
        assert f"browse it:         open {uri} in a browser" in Path(log.name).read_text()

    client = MlflowClient(uri, uri)
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert len({v.run_id for v in versions}) == 2  # one version per flow run, none duplicated
    # Both were scored on the model's one benchmark (the same test split: same data).
    assert len({v.tags["benchmark_fingerprint"] for v in versions}) == 1
    value = {str(v.version): float(v.tags["benchmark_bits_per_byte"]) for v in versions}
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    print(f"\nbenchmark_bits_per_byte by version: {value}; champion: {champion}")
    assert value["1"] != value["2"]  # different seeds, different adapters
    # Whichever registered first holds unless the other beats it by the gate's margin (0.2%).
    assert value[champion] <= min(value.values()) / (1 - 0.002)
    decisions = [json.loads(v.tags["champion_decision"]) for v in versions]
    assert all(d["benchmark_fingerprint"] == versions[0].tags["benchmark_fingerprint"] for d in decisions)


def test_racing_champion_updates_over_http_end_on_the_best(mlflow_server):
    """Registrations in threads, released together: create a version, then update `champion`."""
    uri, name = mlflow_server.uri, f"threads-{uuid4().hex[:6]}"
    client = MlflowClient(uri, uri)
    client.create_registered_model(name)
    values = [3.0, 1.0, 2.0, 0.5, 4.0, 1.5]
    experiment = client.create_experiment(name)
    runs = [client.create_run(experiment) for _ in values]  # the server only accepts a source inside a run
    start, errors = threading.Barrier(len(values)), []

    def register(value: float, run) -> None:
        try:
            start.wait()
            tags = {champion.BENCHMARK_TAG: "f" * 64, "benchmark_bits_per_byte": repr(value)}
            created = client.create_model_version(
                name, f"{run.info.artifact_uri}/adapter_model", run_id=run.info.run_id, tags=tags
            )
            champion.update_champion(client, name, created.version, "benchmark_bits_per_byte", "f" * 64, 0.002)
        except Exception as error:  # reported below with the thread's value
            errors.append((value, error))

    threads = [threading.Thread(target=register, args=(v, r)) for v, r in zip(values, runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    holder = client.get_model_version_by_alias(name, "champion")
    assert float(holder.tags["benchmark_bits_per_byte"]) == min(values)
    writes = [
        json.loads(v.tags["champion_decision"])["alias_writes"]
        for v in client.search_model_versions(f"name = '{name}'")
    ]
    print(f"\nalias writes per registration: {writes}")
