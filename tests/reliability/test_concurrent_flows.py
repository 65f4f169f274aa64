"""Two flows at once with the same config: same caches (empty at the start, so both acquire,
prepare and train at the same time), same sqlite MLflow store, same registered model name.

Expected: both finish; the dataset cache holds one complete entry; the second trainer, finding the
first one holding the checkpoint folder, trains without checkpoints instead of failing (the first
one's checkpoints cover the same work); and since both trained the same thing (one training key),
the registry keeps one version: the run that registers second keeps the first one's and says so.
"""

from __future__ import annotations

import subprocess

import pytest
from mlflow import MlflowClient

from tests.support import warm
from tests.support.env import ROOT, child_env
from tests.support.harness import all_runs, assert_cache_consistent, assert_versions_have_their_files, flow_command

pytestmark = pytest.mark.slow


def test_two_identical_flows_at_once_keep_one_version(prefect_server, tracking_uri, tmp_path):
    cache = tmp_path / "cache"
    command = flow_command(cache, **{"train.max_steps": 30, "train.checkpoint_every": 5})
    children = []
    for name in ("a", "b"):
        log = (tmp_path / f"{name}.log").open("w")
        children.append(
            (
                warm.Popen(
                    command, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                ),
                log,
            )
        )
    for child, log in children:
        child.wait(timeout=600)
        log.close()
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("a", "b")]
    for (child, _), text in zip(children, logs):
        assert child.returncode == 0, text[-3000:]

    client = MlflowClient(tracking_uri)
    runs = all_runs(client)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert len({r.data.params["dataset.fingerprint"] for r in runs}) == 1
    [version] = assert_versions_have_their_files(client)
    assert version.run_id in {r.info.run_id for r in runs}
    assert {r.data.tags["training_key"] for r in runs} == {version.tags["training_key"]}
    assert client.get_model_version_by_alias("test-adapter", "champion").version == version.version
    assert "champion_decision" in version.tags
    # The other run says why it registered nothing: its twin holds the same training key.
    assert sum("holds the same training key" in text or "up to date: version 1" in text for text in logs) == 1
    found = assert_cache_consistent(cache)
    assert len(found["datasets"]) == 1 and found["checkpoints"] == []
    overlapped = sum("trains without checkpoints" in text for text in logs)
    print(
        f"\none version kept (run {version.run_id}); trainers that found the other holding the checkpoints: "
        f"{overlapped}"
    )
