"""SIGKILL in the middle of a Kaggle download, from outside, while the body is still arriving
(the loopback fake Kaggle sends it slowly; the official client downloads it).

Expected: no published CSV and no cache marker, only the temporary download folder; the next run
discards that leftover, downloads again, and gives what an uninterrupted run gives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib.config import load_config
from tests.conftest import tiny_overrides
from tests.support import warm
from tests.support.env import ROOT, child_env
from tests.support.harness import all_runs, flow_command, run_flow

pytestmark = pytest.mark.slow


def test_killed_mid_download_leaves_nothing_published_and_a_rerun_downloads_again(
    prefect_server, fake_kaggle, tracking_uri, tmp_path
):
    from flows.finetune import finetune

    fake_kaggle.default, fake_kaggle.slow_s = "slow", 30.0  # 10 pieces, 3 s apart
    cache = tmp_path / "cache"
    command = flow_command(cache, **{"data.source": "kaggle"})
    with (tmp_path / "first.log").open("w") as out:
        first = warm.Popen(
            command, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            assert fake_kaggle.file_started.wait(timeout=300), "the flow never started downloading"
            deadline = time.monotonic() + 60  # the client opens its part file as the body starts
            while not list(cache.rglob("download.part")) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(2)  # a few pieces into the body
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    [partial] = list(cache.rglob("download.part"))
    print(f"\nkilled with {partial.stat().st_size} of {len(fake_kaggle.payload)} bytes downloaded")
    assert partial.stat().st_size < len(fake_kaggle.payload)  # requests hands over 1 MB chunks: often 0
    published = [p for p in cache.rglob("*") if p.is_file() and not any(part.startswith(".tmp-") for part in p.parts)]
    assert [p for p in published if p.suffix in (".csv", ".json") and "kaggle" in str(p)] == []
    client = MlflowClient(tracking_uri)
    [killed] = all_runs(client)
    assert killed.info.status == "RUNNING"

    fake_kaggle.default = "good"
    assert run_flow(command, tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert not list(cache.rglob("download.part"))  # the leftover was discarded
    assert fake_kaggle.file_requests == 2
    old, new = all_runs(client)
    assert old.info.status == "FAILED" and new.info.status == "FINISHED"

    reference = finetune(
        config=load_config(
            DEFAULT_PROFILE,
            tiny_overrides(
                str(tmp_path / "reference-cache"),
                **{"data.source": "kaggle", "tracking.uri": f"sqlite:///{tmp_path / 'reference.db'}"},
            ),
        )
    )
    assert new.data.params["dataset.fingerprint"] == reference["dataset_fingerprint"]
    assert new.data.metrics["train_steps"] == reference["train"]["steps"]
