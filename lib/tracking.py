"""Everything that talks to MLflow: runs, metrics, artifacts, the model registry.

Every function takes an explicit `run_id` and uses `MlflowClient`, never the fluent API's
process-global "active run": Prefect may run tasks in other threads or processes, and an implicit
active run is exactly the state that gets lost or leaked there.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lib import faults

log = logging.getLogger("lenta_lora.tracking")

DEFAULT_DB = Path("mlruns") / "mlflow.db"
# MLflow 3's UI opens an experiment in its GenAI view unless this tag names another kind; the
# model-training view ("Machine learning") is `custom_model_development`.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Profile value, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB).resolve()}"


class TrackingServerUnavailable(ConnectionError):
    """The MLflow tracking server at the configured URI does not answer."""


def require_reachable(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) store: fail within `timeout` seconds, naming the URI, if the server does not answer.

    MLflow's client retries a refused connection with exponential backoff: 247 s at its defaults
    (7 retries, factor 2; measured on a closed port), and those settings exist only as process-wide
    MLFLOW_HTTP_REQUEST_* environment variables, not per client. One probe of the server's /health,
    without retries, turns "server down" into a clear error at once and leaves the environment alone.
    Any HTTP answer counts as up; only a connection that fails or times out does not.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as error:
        raise TrackingServerUnavailable(
            f"MLflow tracking server {uri} is not reachable ({type(error).__name__}): start it "
            "(`mlflow server ...`) or point tracking.uri / MLFLOW_TRACKING_URI at a running one") from None


@contextlib.contextmanager
def _server_errors(uri: str, doing: str) -> Iterator[None]:
    """Turn a failure against a tracking server that has gone away (after MLflow's own bounded
    retries, $MLFLOW_HTTP_REQUEST_MAX_RETRIES) into one error naming the URI and what survives."""
    try:
        yield
    except Exception as error:
        if not uri.startswith(("http://", "https://")):
            raise
        try:
            require_reachable(uri)
        except TrackingServerUnavailable:
            raise TrackingServerUnavailable(
                f"MLflow tracking server {uri} stopped answering while {doing} ({type(error).__name__}); "
                "training checkpoints under data.cache_dir are kept: start the server again and re-run "
                "the same config to resume") from error
        raise


def _client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client, uri: str, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND not in found.tags:  # made before the kind was set: the UI would guess GenAI
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # An experiment's artifact root is fixed at creation, relative to *that* process's cwd
        # unless absolute: pin it next to the database so every process finds the same files.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING})
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def _initialize_store(uri: str) -> None:
    """Create a new sqlite store's tables under a file lock: two processes that open a brand-new
    database at the same moment would otherwise both run MLflow's schema migrations, and one fails."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".init-lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        _client(uri).search_experiments(max_results=1)


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str], config_yaml: str) -> str:
    """Create the flow's one MLflow run, log the resolved config, and return its id."""
    from mlflow.entities import Param

    require_reachable(uri)  # the flow's first MLflow call: a dead server fails the run in seconds
    _initialize_store(uri)
    client = _client(uri)
    run = client.create_run(_experiment_id(client, uri, experiment), run_name=run_name,
                            tags={k: str(v) for k, v in tags.items()})
    params_list = [Param(k, "" if v is None else str(v)[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(params_list), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run.info.run_id, params=params_list[start : start + 100])
    client.log_text(run.info.run_id, config_yaml, "config.yaml")
    client.set_tag(run.info.run_id, "mlflow.note.content", f"lenta-lora fine-tuning run `{run_name}`")
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    if items:
        with _server_errors(uri, f"logging metrics of run {run_id}"):
            _client(uri).log_batch(run_id, metrics=items)


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    with _server_errors(uri, f"logging parameters of run {run_id}"):
        _client(uri).log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    with _server_errors(uri, f"tagging run {run_id}"):
        _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client = _client(uri)
    with _server_errors(uri, f"uploading {Path(path).name} to run {run_id}"):
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)


def log_artifact_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    _client(uri).log_text(run_id, text, artifact_file)


def log_table(uri: str, run_id: str, columns: dict[str, list], artifact_file: str) -> None:
    """A table browsable in the MLflow UI's artifact view (and Evaluation tab)."""
    # The client's form: mlflow.set_tracking_uri would also rewrite this process's
    # $MLFLOW_TRACKING_URI, which every later run and child process would then inherit.
    _client(uri).log_table(run_id, data=columns, artifact_file=artifact_file)


def log_dataset_input(uri: str, run_id: str, name: str, digest: str, source: dict, profile: dict,
                      context: str) -> None:
    """A dataset input of the run (its Datasets panel): name, digest (our fingerprint), where the
    data came from, and counts. Only this description is stored, never the texts."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest[:36], source_type=str(source.get("type", "local")),
                      source=json.dumps(source, ensure_ascii=False), profile=json.dumps(profile),
                      schema=json.dumps({"mlflow_colspec": [{"type": "string", "name": "document"}]}))
    with _server_errors(uri, f"logging dataset {name} of run {run_id}"):
        _client(uri).log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, interval_s: float = 10.0) -> Iterator[None]:
    """CPU, memory, disk and network (and GPU, where there is one) as the run's `system/*` metrics,
    sampled every `interval_s` seconds (`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` wins) while the block runs."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # The monitor publishes only after a whole interval: a block shorter than that (a small
        # run) would log nothing. One last sample at the end gives every run at least one point.
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as error:  # noqa: BLE001 - system metrics never fail a training run
            log.warning("could not log the final system metrics of run %s: %s", run_id, error)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    with _server_errors(uri, f"closing run {run_id} as {status}"):
        _client(uri).set_terminated(run_id, status)


def get_run_summary(uri: str, run_id: str) -> dict:
    run = _client(uri).get_run(run_id)
    return {"status": run.info.status, "metrics": dict(run.data.metrics), "params": dict(run.data.params),
            "tags": dict(run.data.tags), "artifact_uri": run.info.artifact_uri}


def run_link(uri: str, run_id: str) -> dict:
    """Where a person finds a run: `url` for an MLflow server, else `command` to start the UI.

    `url` is `<uri>/#/experiments/<exp>/runs/<run>` for http(s) stores; for a database or file
    store, `command` is the `mlflow ui` line and `url` the page it will serve. A store that cannot
    be reached still gets a usable link: the UI's `#/runs/<run>` route redirects to the run.
    """
    base = uri.rstrip("/")
    served = base if base.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    try:
        require_reachable(uri)  # a down server: one 5 s probe instead of MLflow's minutes of retries
        experiment = _client(uri).get_run(run_id).info.experiment_id
        url = f"{served}/#/experiments/{experiment}/runs/{run_id}"
    except Exception as error:  # a dead server must not fail a flow whose work is already logged
        log.warning("could not look up run %s in %s: %s", run_id, uri, error)
        experiment, url = None, f"{served}/#/runs/{run_id}"
    command = None if base.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"
    return {"url": url, "command": command, "experiment_id": experiment, "run_id": run_id}


def owner_tags() -> dict[str, str]:
    """Which process owns a run: lets a later run tell a crashed run from a live one."""
    import socket

    return {"lenta_lora.host": socket.gethostname(), "lenta_lora.pid": str(os.getpid())}


def mark_stale_runs(uri: str, run_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this experiment whose owning process on this host is gone.

    A SIGKILL or OOM kill leaves its MLflow run RUNNING forever; the next run sweeps them. Runs
    from other hosts are left alone: from here we cannot tell whether their process still lives.
    """
    import socket

    client = _client(uri)
    experiment = client.get_run(run_id).info.experiment_id
    host, swept = socket.gethostname(), []
    for run in client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'", max_results=500):
        tags = run.data.tags
        pid = int(tags.get("lenta_lora.pid", "0") or 0)
        if run.info.run_id == run_id or tags.get("lenta_lora.host") != host or not pid or faults.process_alive(pid):
            continue
        client.set_tag(run.info.run_id, "stale_reason",
                       f"process {pid} on {host} died without closing this run; marked FAILED by run {run_id}")
        client.set_terminated(run.info.run_id, "FAILED")
        swept.append(run.info.run_id)
    if swept:
        log.warning("marked %d stale run(s) FAILED: %s", len(swept), ", ".join(swept))
    return swept
