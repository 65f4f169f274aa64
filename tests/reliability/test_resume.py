"""Crash and resume for real: the CLI in a child process, SIGKILLed once its first checkpoint exists,
then the same command again, which must resume from the checkpoint into a new, linked MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lib import checkpoint
from tests.conftest import tiny_overrides
from tests.support import warm

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 40, 5


def wait_for_checkpoint(process: subprocess.Popen, cache: Path, timeout: float) -> Path:
    """Poll (50 ms) until a complete checkpoint exists; return its folder's parent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in cache.glob("checkpoints/*/step-*") if (p / checkpoint.STATE).is_file()]
        if found:
            return found[0].parent
        assert process.poll() is None, f"the flow exited ({process.returncode}) before writing a checkpoint"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint under {cache}/checkpoints after {timeout:.0f}s")


def test_killed_flow_resumes_from_its_last_checkpoint(prefect_server, tracking_uri, tmp_path):
    from prefect.settings import PREFECT_API_URL

    cache = tmp_path / "cache"  # its own cache: the only checkpoints under it are this test's
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--config",
        "configs/demo.yaml",
        *(
            f"--set={o}"
            for o in tiny_overrides(str(cache), **{"train.max_steps": STEPS, "train.checkpoint_every": EVERY})
        ),
    ]
    # The session's Prefect server (not a temporary one per child); one thread: the 0.1M-parameter
    # model is ~10x faster so on a shared 2-core machine, and the kill window stays seconds wide.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    log_first = (tmp_path / "first.log").open("w")
    first = warm.Popen(
        command, cwd=ROOT, env=env, stdout=log_first, stderr=subprocess.STDOUT, start_new_session=True
    )  # its own process group: the kill takes its children too
    try:
        folder = wait_for_checkpoint(first, cache, timeout=300)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL

    found = checkpoint.latest(folder)  # what the kill left: the newest *complete* checkpoint
    assert found.step % EVERY == 0 and found.step < STEPS, f"killed too late to test a resume: {found}"
    client = MlflowClient(tracking_uri)
    assert client.get_run(found.run_id).info.status == "RUNNING"  # the kill gave it no chance to close

    second = warm.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    runs = client.search_runs([client.get_experiment_by_name("lenta-lora").experiment_id])
    assert len(runs) == 2
    new = next(r for r in runs if r.info.run_id != found.run_id)
    assert new.info.status == "FINISHED"
    assert new.data.tags["resumed_from_run"] == found.run_id
    assert new.data.tags["resumed_from_step"] == str(found.step)
    assert new.data.metrics["train_steps"] == STEPS

    # The loss curve continues under the same step numbers: the new run logs exactly the steps after
    # the checkpoint, the killed run logged at least up to it (it may have logged a few more).
    new_steps = [m.step for m in client.get_metric_history(new.info.run_id, "train_loss")]
    old_steps = [m.step for m in client.get_metric_history(found.run_id, "train_loss")]
    assert new_steps == list(range(found.step + 1, STEPS + 1))
    assert old_steps[: found.step] == list(range(1, found.step + 1))

    old = client.get_run(found.run_id)
    assert old.info.status == "KILLED" and old.data.tags["resumed_in_run"] == new.info.run_id
    assert f"after checkpoint step {found.step}" in old.data.tags["killed_reason"]

    [version] = client.search_model_versions("name='test-adapter'")
    assert version.run_id == new.info.run_id
    assert not folder.exists()  # a successful run deletes its checkpoints
