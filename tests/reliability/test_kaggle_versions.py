"""The nightly on a Kaggle corpus: an unchanged upstream version trains nothing; a new version is
downloaded, trains, and registers a version judged on the model's first benchmark. The official
client asks the loopback fake Kaggle (tests/support/kaggle_server.py), which serves two versions."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib.config import SAMPLE_CSV, load_config
from tests.conftest import tiny_overrides
from tests.support.kaggle_server import lenta_csv

pytestmark = pytest.mark.slow


def _more_sport_articles() -> str:
    """12 more sport articles (new urls, new texts; the demo profile fine-tunes on sport), as CSV rows."""
    return (
        lenta_csv(rows=12)
        .decode()
        .split("\n", 1)[1]
        .replace("Текст новости номер", "Другой текст номер")
        .replace(",Россия,", ",Спорт,")
    )


def test_a_new_kaggle_version_trains_an_unchanged_one_does_not(prefect_server, fake_kaggle, tracking_uri, tmp_path):
    from flows.finetune import finetune

    config = load_config(DEFAULT_PROFILE, tiny_overrides(str(tmp_path / "cache"), **{"data.source": "kaggle"}))
    first = finetune(config=config)
    assert first["model"]["version"] == 1 and fake_kaggle.downloaded_versions == [1]
    client = MlflowClient(tracking_uri)
    run = client.get_run(first["run_id"])
    assert run.data.params["data.kaggle_version"] == "1" and run.data.tags["kaggle_version"] == "1"
    # Each split's dataset input names where its rows came from: the Kaggle dataset, version and file.
    sources = {d.dataset.name: json.loads(d.dataset.source) for d in run.inputs.dataset_inputs}
    assert sources["lenta-train"] == {
        "type": "kaggle",
        "dataset": config.data.kaggle_dataset,
        "version": 1,
        "file": config.data.kaggle_file,
    }, sources

    unchanged = finetune(config=config)  # Kaggle still says version 1: nothing to do
    assert unchanged["up_to_date"] and fake_kaggle.downloaded_versions == [1] and fake_kaggle.version_calls >= 2

    # Upstream publishes version 2: the sample plus 12 more sport articles (new urls, new texts; the
    # demo profile fine-tunes on sport).
    fake_kaggle.publish(SAMPLE_CSV.read_bytes() + _more_sport_articles().encode())
    moved = finetune(config=config)
    assert fake_kaggle.downloaded_versions == [1, 2] and not moved["up_to_date"]
    assert moved["model"]["version"] == 2 and moved["training_key"] != first["training_key"]
    assert moved["dataset_fingerprint"] != first["dataset_fingerprint"]
    assert client.get_run(moved["run_id"]).data.params["data.kaggle_version"] == "2"
    # Judged on the benchmark its model got from version 1, not on its own test split.
    assert moved["benchmark"]["fingerprint"] == first["benchmark"]["fingerprint"]
    assert (
        client.get_model_version("test-adapter", "2").tags["benchmark_fingerprint"] == first["benchmark"]["fingerprint"]
    )


def test_a_model_judged_on_the_kaggle_files_test_split(prefect_server, fake_kaggle, tracking_uri, tmp_path):
    """`registry.benchmark: kaggle`: a model trained on the bundled sample is judged on the test
    split of the Kaggle file (the current version, downloaded by the official client), not its own."""
    from flows.finetune import finetune
    from lib.benchmark import benchmark_fingerprint
    from lib.reevaluation import test_split

    fake_kaggle.publish(SAMPLE_CSV.read_bytes() + _more_sport_articles().encode())  # version 2: more texts
    settings = {"registry.model_name": "judged-on-kaggle", "registry.benchmark": "kaggle"}
    config = load_config(DEFAULT_PROFILE, tiny_overrides(str(tmp_path / "cache"), **settings))
    assert config.data.source == "sample"  # trained on the bundled sample
    summary = finetune(config=config)
    assert fake_kaggle.downloaded_versions == [2]
    [csv] = (tmp_path / "cache" / "kaggle").rglob(config.data.kaggle_file)
    kaggle_test = test_split(csv, config.data)["document"]
    expected = benchmark_fingerprint(kaggle_test, config.train.max_length, config.eval.stride)
    own_test = test_split(SAMPLE_CSV, config.data)["document"]
    assert set(own_test) < set(kaggle_test)  # other texts: the Kaggle split has more
    benchmark = summary["benchmark"]
    assert benchmark["fingerprint"] == expected and benchmark["texts"] == len(kaggle_test)
    assert benchmark["source"] == f"test split of Kaggle {config.data.kaggle_dataset}/{config.data.kaggle_file}"
    model = MlflowClient(tracking_uri).get_registered_model("judged-on-kaggle")
    assert model.tags["benchmark.fingerprint"] == expected
    assert summary["metrics"]["benchmark_bits_per_byte"] != summary["metrics"]["test_bits_per_byte"]


def test_missing_credentials_fail_at_once_without_task_retries(
    prefect_server, fake_kaggle, tracking_uri, tmp_path, monkeypatch
):
    """A retry cannot conjure credentials: the acquire task runs once, not three times over 35 s."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.finetune import finetune
    from lib.kaggle_source import KaggleError

    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name)
    config = load_config(DEFAULT_PROFILE, tiny_overrides(str(tmp_path / "cache"), **{"data.source": "kaggle"}))
    with pytest.raises(KaggleError, match="no Kaggle credentials found"):
        finetune(config=config)
    [run] = MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()]
    )
    assert run.info.status == "FAILED"
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.data.tags["prefect.flow_run_id"]]))
        )
    [acquire] = [t for t in tasks if t.name.startswith("acquire_corpus")]
    assert acquire.state_type.value == "FAILED" and acquire.run_count == 1
