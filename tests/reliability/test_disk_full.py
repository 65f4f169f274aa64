"""A full disk while saving a checkpoint, the trained adapter, or the model into the MLflow store.

Each flow runs in its own mount namespace (`unshare`) with a small tmpfs over one folder, so
writes there fail with a real ENOSPC while the rest of the machine is untouched. Expected: a
one-line error naming what could not be written and where, the run FAILED, no registry version,
nothing half-written left in the full folder; work already on other disks is reused by a re-run.
"""

from __future__ import annotations

import shlex
import subprocess

import pytest
from mlflow import MlflowClient

from tests.support.harness import all_runs, flow_command, run_flow

pytestmark = pytest.mark.slow

STEPS, EVERY = 6, 3


@pytest.fixture(scope="module", autouse=True)
def mount_namespaces_work():
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs -o size=8k tmpfs /mnt && echo ok",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "ok", (
        "these tests need `unshare` with user and mount namespaces (util-linux; kernel.unprivileged_userns_clone=1 "
        f"or root): {probe.stderr.strip()}"
    )


def run_on_small_disk(command, folder, size, tmp_path, name):
    """`command` with a `size` tmpfs mounted over `folder`, in its own mount namespace; returns the exit
    code, the output and what the folder held afterwards (the tmpfs vanishes with the namespace)."""
    listing = tmp_path / f"{name}.listing"
    script = (
        f'dir="$1"; shift; mkdir -p "$dir" && mount -t tmpfs -o size={size} tmpfs "$dir" || exit 99; '
        f'"$@"; rc=$?; (cd "$dir" && find . -mindepth 1 | sort) > {shlex.quote(str(listing))}; exit $rc'
    )
    wrapped = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(folder), *command]
    code = run_flow(wrapped, tmp_path / f"{name}.log")
    return code, (tmp_path / f"{name}.log").read_text(), listing.read_text().split()


def assert_failed_cleanly(client: MlflowClient, log: str, what: str) -> None:
    error = [line for line in log.splitlines() if line.startswith("lenta-lora: error:")]
    assert len(error) == 1, log[-3000:]
    print(f"\n{error[0]}")
    assert what in error[0] and ("No space left on device" in error[0] or "no space left" in error[0])
    [run] = all_runs(client)
    assert run.info.status == "FAILED"
    assert client.search_model_versions("") == []


def test_disk_full_while_checkpointing(prefect_server, tracking_uri, tmp_path):
    cache = tmp_path / "cache"
    command = flow_command(cache, **{"train.max_steps": STEPS, "train.checkpoint_every": EVERY})
    code, log, left = run_on_small_disk(command, cache / "checkpoints", "16k", tmp_path, "checkpoint")
    assert code == 2, log[-3000:]
    assert_failed_cleanly(MlflowClient(tracking_uri), log, f"could not write checkpoint step {EVERY}")
    assert "the newest complete checkpoint (none) is intact" in log
    assert not [p for p in left if "/step-" in p or "/.tmp-" in p], left  # nothing half-written stays


def test_disk_full_while_saving_the_adapter_then_a_rerun_registers_it(prefect_server, tracking_uri, tmp_path):
    cache = tmp_path / "cache"
    command = flow_command(cache, **{"train.max_steps": STEPS, "train.checkpoint_every": EVERY})
    code, log, left = run_on_small_disk(command, cache / "runs", "16k", tmp_path, "adapter")
    assert code == 2, log[-3000:]
    client = MlflowClient(tracking_uri)
    assert_failed_cleanly(client, log, "could not write the trained adapter")
    assert not [p for p in left if p.endswith("adapter") or ".adapter.tmp" in p], left

    # The training is not lost: its last checkpoint (step STEPS, on the big disk) is all a re-run needs.
    assert run_flow(command, tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    failed, rerun = all_runs(client)
    assert rerun.info.status == "FINISHED" and rerun.data.tags["resumed_from_step"] == str(STEPS)
    [version] = client.search_model_versions("")
    assert version.run_id == rerun.info.run_id


def test_disk_full_in_the_mlflow_artifact_store_registers_nothing(prefect_server, tracking_uri, tmp_path):
    cache, artifacts = tmp_path / "cache", tmp_path / "mlruns" / "artifacts"  # next to the test's sqlite store
    command = flow_command(cache, **{"train.max_steps": STEPS})
    # Room for the run's plots, samples and config (about 120 kB), not for the model (about 770 kB).
    code, log, left = run_on_small_disk(command, artifacts, "400k", tmp_path, "artifacts")
    assert code == 2, log[-3000:]
    assert_failed_cleanly(MlflowClient(tracking_uri), log, f"no space left on the disk holding file://{artifacts}/")
    assert "Retry 1/2" not in log.split("register_adapter")[-1]  # a full disk is not retried
