"""The MLflow tracking server down at the start of a run, and going away in the middle of one.

At the start: one probe of /health fails the flow in seconds, naming the URI, before any work.
In the middle (a real `mlflow server`, stopped while the flow trains): MLflow's bounded retries
($MLFLOW_HTTP_REQUEST_MAX_RETRIES), then one error naming the URI; the steps trained so far are
checkpointed; with the server back, the same command resumes from there and finishes.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from mlflow import MlflowClient

from lib import checkpoint, loading, registry, store, tracking
from tests.support import warm
from tests.support.env import ROOT, child_env
from tests.support.harness import all_runs, flow_command, run_flow
from tests.support.mlflow_server import running_mlflow_server, stop
from tests.support.net import free_port

STEPS, EVERY = 40, 10


def test_dead_tracking_server_fails_fast_naming_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for call in (
        lambda: loading.load_registered(uri, "models:/m/1"),
        lambda: registry.list_versions(uri),
        lambda: tracking.start_run(uri, "e", "r", {}, {}, ""),
    ):
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=rf"MLflow tracking server {uri} is not reachable"):
            call()
        elapsed = time.monotonic() - started
        print(f"\ndead server error after {elapsed:.2f}s")
        assert elapsed < 6  # the probe's 5 s timeout bounds it; MLflow's own retries would take minutes


def test_hung_tracking_server_fails_after_the_probe_timeout():
    """A server that accepts connections but never answers (overloaded, stopped in a debugger)."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel completes the handshake; nobody ever reads the request
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=rf"{uri} is not reachable \(ReadTimeout\)"):
            store.require_reachable(uri, timeout=1)
        assert time.monotonic() - started < 3


@pytest.mark.slow
def test_flow_with_a_dead_server_fails_before_any_work(prefect_server, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    code = run_flow(flow_command(tmp_path / "cache", **{"tracking.uri": uri}), tmp_path / "run.log")
    elapsed, log = time.monotonic() - started, (tmp_path / "run.log").read_text()
    print(f"\n`lenta-lora run` against a dead server: exit {code} after {elapsed:.1f}s")
    assert code == 2 and f"lenta-lora: error: MLflow tracking server {uri} is not reachable" in log
    assert not (tmp_path / "cache" / "datasets").exists()  # the run's first step failed: nothing else ran


def wait_for_checkpoint(process: subprocess.Popen, cache, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in cache.glob("checkpoints/*") if checkpoint.latest(p)]
        if found:
            return found[0]
        assert process.poll() is None, f"the flow exited ({process.returncode}) before writing a checkpoint"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint under {cache} after {timeout:.0f}s")


@pytest.mark.slow
def test_server_lost_mid_training_keeps_the_steps_and_a_rerun_finishes(prefect_server, tmp_path):
    root, port, cache = tmp_path / "server", free_port(), tmp_path / "cache"
    uri = f"http://127.0.0.1:{port}"
    command = flow_command(cache, **{"tracking.uri": uri, "train.max_steps": STEPS, "train.checkpoint_every": EVERY})
    env = child_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")  # bounded either way; 1 keeps the test short
    with running_mlflow_server(root, port=port) as server:
        with (tmp_path / "first.log").open("w") as out:
            first = warm.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            folder = wait_for_checkpoint(first, cache, timeout=300)
            stop(server)  # the server goes away while the flow trains
            lost_at = checkpoint.latest(folder).step
            code = first.wait(timeout=300)
    log = (tmp_path / "first.log").read_text()
    assert code == 2, log[-3000:]
    assert f"lenta-lora: error: MLflow tracking server {uri} stopped answering" in log, log[-3000:]
    kept = checkpoint.latest(folder)
    print(f"\nserver stopped after checkpoint {lost_at}; the flow failed with checkpoint {kept.step} of {STEPS} kept")
    assert lost_at <= kept.step < STEPS  # the failed logging call saved the step it was on

    with running_mlflow_server(root, port=port):  # back, with the same store
        code = run_flow(command, tmp_path / "second.log", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
        assert code == 0, (tmp_path / "second.log").read_text()[-3000:]
        client = MlflowClient(uri, uri)
        old, new = all_runs(client)
        assert old.info.status == "KILLED" and old.data.tags["resumed_in_run"] == new.info.run_id
        assert new.info.status == "FINISHED" and new.data.tags["resumed_from_step"] == str(kept.step)
        assert new.data.metrics["train_steps"] == STEPS
        [version] = client.search_model_versions("name='test-adapter'")
        assert version.run_id == new.info.run_id
