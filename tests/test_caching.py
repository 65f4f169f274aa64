"""Task caching of acquire_corpus and prepare_dataset, read back from the real Prefect API as
task-run state names: a changed training setting reuses both ("Cached"), a changed preprocessing
setting prepares again, an edited CSV is read again, and MLflow gets the dataset facts every run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import flow
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from flows.cli import DEFAULT_PROFILE
from lib.config import PipelineConfig, load_config
from lib.dataset import PreparedDataset
from tasks.acquire import RESULTS_SUBDIR, acquire_corpus, result_storage_for
from tasks.prepare import prepare_dataset
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow  # two tiny end-to-end flow runs


def task_states(flow_run_id) -> dict[str, str]:
    """Task name -> state name ("Completed", "Cached", ...) of one flow run, from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = [run.name.rsplit("-", 1)[0] for run in runs]  # task-run names are "<task name>-<suffix>"
    assert len(names) == len(set(names)), names
    return {name: run.state.name for name, run in zip(names, runs)}


def run_flow(cache_dir: Path, **overrides):
    from flows.finetune import finetune

    config = load_config(DEFAULT_PROFILE, tiny_overrides(str(cache_dir), **overrides))
    state = finetune(config=config, return_state=True)
    summary = state.result()  # raises if the flow failed
    return summary, task_states(state.state_details.flow_run_id)


def test_training_change_reuses_data_stages_and_preprocessing_change_reprepares(prefect_server, tracking_uri, tmp_path):
    cache = tmp_path / "cache"
    first, states = run_flow(cache)
    assert states["acquire_corpus"] == "Completed" and states["prepare_dataset"] == "Completed", states
    records = sorted(p.name for p in (cache / RESULTS_SUBDIR).iterdir())
    assert len(records) == 2, records  # acquire + prepare results, in data.cache_dir as configured

    second, states = run_flow(cache, **{"train.learning_rate": 0.001})
    assert states["acquire_corpus"] == "Cached" and states["prepare_dataset"] == "Cached", states
    assert states["record_dataset"] == "Completed" and states["train_adapter"] == "Completed", states
    assert second["dataset_fingerprint"] == first["dataset_fingerprint"]
    client = MlflowClient(tracking_uri)
    for summary in (first, second):  # a cache hit still logs the dataset into the new run
        run = client.get_run(summary["run_id"])
        assert run.data.params["dataset.fingerprint"] == first["dataset_fingerprint"]
        assert run.data.metrics["data_train_blocks"] > 0
        assert "dataset_stats.json" in {a.path for a in client.list_artifacts(summary["run_id"])}
    assert client.get_run(second["run_id"]).data.params["train.learning_rate"] == "0.001"

    # Preprocessing changes, through the same tasks and cache as the flow, without training again.
    def config(**overrides):
        return load_config(DEFAULT_PROFILE, tiny_overrides(str(cache), **overrides))

    assert data_stages(config()) == {"acquire_corpus": "Cached", "prepare_dataset": "Cached"}
    assert data_stages(config(**{"train.max_length": 32})) == {
        "acquire_corpus": "Cached",
        "prepare_dataset": "Completed",
    }
    splits = {"data.splits": "{train: 0.7, validation: 0.15, test: 0.15}"}
    assert data_stages(config(**splits)) == {"acquire_corpus": "Cached", "prepare_dataset": "Completed"}
    assert data_stages(config(**splits)) == {"acquire_corpus": "Cached", "prepare_dataset": "Cached"}


@flow
def data_stages_flow(config: PipelineConfig) -> PreparedDataset:
    """The flow's first two stages exactly as flows/finetune.py calls them."""
    results = result_storage_for(config.data)
    csv_path = acquire_corpus.with_options(result_storage=results)(config.data)
    return prepare_dataset.with_options(result_storage=results)(
        csv_path, config.data, config.model, config.train.max_length
    )


def data_stages(config) -> dict[str, str]:
    state = data_stages_flow(config, return_state=True)
    assert Path(state.result().path).is_dir()  # a cache hit hands on the typed PreparedDataset too
    return task_states(state.state_details.flow_run_id)


@flow
def acquire_only(data):
    return acquire_corpus.with_options(result_storage=result_storage_for(data))(data, return_state=True)


def test_local_csv_is_reread_after_an_edit(prefect_server, tmp_path):
    from lib.config import SAMPLE_CSV

    csv = tmp_path / "news.csv"
    csv.write_bytes(SAMPLE_CSV.read_bytes())
    data = load_config(
        DEFAULT_PROFILE, tiny_overrides(str(tmp_path / "cache"), **{"data.source": "csv", "data.path": str(csv)})
    ).data
    assert acquire_only(data).name == "Completed"
    assert acquire_only(data).name == "Cached"
    with csv.open("a", encoding="utf-8") as handle:  # an edit: a new size, and a new mtime even on
        handle.write("\n")  # file systems with 1-2 s timestamps
    os.utime(csv, ns=(csv.stat().st_atime_ns, csv.stat().st_mtime_ns + 2 * 10**9))
    assert acquire_only(data).name == "Completed"
    assert acquire_only(data).name == "Cached"
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):  # the documented way to force a re-run
        assert acquire_only(data).name == "Completed"
