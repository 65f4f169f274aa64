"""A process killed mid-run (SIGKILL, OOM killer) leaves its MLflow run RUNNING; the next run on
the same host marks it FAILED, and never touches a run whose process is alive."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow import MlflowClient

from lib import tracking


def start(uri: str, name: str, owner: dict[str, str]) -> str:
    return tracking.start_run(uri, "stale-test", name, {"x": 1}, owner, "x: 1\n")


def test_runs_of_dead_processes_are_marked_failed(tracking_uri):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = dead.stdout.strip()  # that process has exited: its pid names no live process
    host = tracking.owner_tags()["lenta_lora.host"]
    crashed = start(tracking_uri, "crashed", {"lenta_lora.host": host, "lenta_lora.pid": dead_pid})
    alive = start(tracking_uri, "alive", {"lenta_lora.host": host, "lenta_lora.pid": str(os.getpid())})
    elsewhere = start(tracking_uri, "elsewhere", {"lenta_lora.host": "another-host", "lenta_lora.pid": dead_pid})
    current = start(tracking_uri, "current", tracking.owner_tags())

    assert tracking.mark_stale_runs(tracking_uri, current) == [crashed]
    client = MlflowClient(tracking_uri)
    status = {run_id: client.get_run(run_id).info.status for run_id in (crashed, alive, elsewhere, current)}
    assert status == {crashed: "FAILED", alive: "RUNNING", elsewhere: "RUNNING", current: "RUNNING"}
    assert dead_pid in client.get_run(crashed).data.tags["stale_reason"]
