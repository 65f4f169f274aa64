"""The nightly on a Kaggle corpus: an unchanged upstream version trains nothing; a new version is
downloaded, trains, and registers a version judged on the model's first benchmark. The official
client asks the loopback fake Kaggle (tests/kaggle_server.py), which serves two versions."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib.config import SAMPLE_CSV, load_config
from tests.conftest import tiny_overrides
from tests.kaggle_server import lenta_csv

pytestmark = pytest.mark.slow


def test_a_new_kaggle_version_trains_an_unchanged_one_does_not(prefect_server, fake_kaggle, tracking_uri, tmp_path):
    from flows.finetune import finetune

    config = load_config(DEFAULT_PROFILE, tiny_overrides(str(tmp_path / "cache"), **{"data.source": "kaggle"}))
    first = finetune(config=config)
    assert first["model"]["version"] == 1 and fake_kaggle.downloaded_versions == [1]
    client = MlflowClient(tracking_uri)
    run = client.get_run(first["run_id"])
    assert run.data.params["data.kaggle_version"] == "1" and run.data.tags["kaggle_version"] == "1"

    unchanged = finetune(config=config)  # Kaggle still says version 1: nothing to do
    assert unchanged["up_to_date"] and fake_kaggle.downloaded_versions == [1] and fake_kaggle.version_calls >= 2

    # Upstream publishes version 2: the sample plus 12 more articles (new urls, new texts).
    extra = lenta_csv(rows=12).decode().split("\n", 1)[1].replace("Текст новости номер", "Другой текст номер")
    fake_kaggle.publish(SAMPLE_CSV.read_bytes() + extra.encode())
    moved = finetune(config=config)
    assert fake_kaggle.downloaded_versions == [1, 2] and not moved["up_to_date"]
    assert moved["model"]["version"] == 2 and moved["training_key"] != first["training_key"]
    assert moved["dataset_fingerprint"] != first["dataset_fingerprint"]
    assert client.get_run(moved["run_id"]).data.params["data.kaggle_version"] == "2"
    # Judged on the benchmark its model got from version 1, not on its own test split.
    assert moved["benchmark"]["fingerprint"] == first["benchmark"]["fingerprint"]
    assert client.get_model_version("test-adapter", "2").tags["benchmark_fingerprint"] == first["benchmark"]["fingerprint"]
