"""MLflow runs: start one, log metrics, params, tags, artifacts and datasets into it, close it.

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

from lib import faults, store

log = logging.getLogger("lenta_lora.tracking")

# MLflow 3's UI opens an experiment in its GenAI view unless this tag names another kind; the
# model-training view ("Machine learning") is `custom_model_development`.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
TOKEN = "lenta_lora.create_token"  # one per create call: finds twins made by a retried request


def experiment_id(client, uri: str, name: str) -> str:
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


def create_run(client, experiment: str, run_name: str, tags: dict[str, Any]):
    """`client.create_run` that leaves exactly one run, even when an answer was lost.

    MLflow's client retries a POST whose answer it did not get (a 502 from a gateway, a dropped
    connection): the server created the run the first time, so the retry makes a twin that nobody
    logs into or closes. Its owner (this process) is alive, so the stale-run sweep would leave it
    RUNNING until some later run. Each creation carries a fresh token; any other run with the
    token is such a twin and is deleted here. When the create raises (an error that is not retried,
    or retries used up) after a try landed, the runs with the token are deleted before re-raising:
    the task's retry starts from nothing.
    """
    token = _token()
    query = f"tags.`{TOKEN}` = '{token}'"
    try:
        run = client.create_run(
            experiment, run_name=run_name, tags={**{k: str(v) for k, v in tags.items()}, TOKEN: token}
        )
    except Exception:
        try:
            for landed in client.search_runs([experiment], filter_string=query, max_results=50):
                log.warning("deleting run %s: made by a create that then failed", landed.info.run_id)
                client.delete_run(landed.info.run_id)
        except Exception as error:  # noqa: BLE001 - the create's error is the one to report
            log.warning("could not look for runs left by a failed create (%s)", type(error).__name__)
        raise
    twins = client.search_runs([experiment], filter_string=query, max_results=50)
    for twin in [t.info.run_id for t in twins if t.info.run_id != run.info.run_id]:
        log.warning("deleting run %s: a twin of run %s made by a retried request", twin, run.info.run_id)
        client.delete_run(twin)
    return run


def create_logged_model(client, experiment: str, run_id: str, name: str, model_type: str, tags: dict[str, str]):
    """`client.create_logged_model` made by run `run_id`, leaving exactly one (see `create_run`): a
    retried create would leave a twin PENDING in the experiment's logged models, and a create that
    raised after it landed would leave that one."""
    token = _token()
    query = f"tags.`{TOKEN}` = '{token}'"
    try:
        logged = client.create_logged_model(
            experiment, name=name, source_run_id=run_id, model_type=model_type, tags={**tags, TOKEN: token}
        )
    except Exception:  # a try may have landed: delete what it made (see `create_run`)
        try:
            for landed in client.search_logged_models([experiment], filter_string=query, max_results=50):
                log.warning("deleting logged model %s: made by a create that then failed", landed.model_id)
                client.delete_logged_model(landed.model_id)
        except Exception as error:  # noqa: BLE001 - the create's error is the one to report
            log.warning("could not look for logged models left by a failed create (%s)", type(error).__name__)
        raise
    twins = client.search_logged_models([experiment], filter_string=query, max_results=50)
    for twin in [t.model_id for t in twins if t.model_id != logged.model_id]:
        log.warning("deleting logged model %s: a twin of %s made by a retried request", twin, logged.model_id)
        client.delete_logged_model(twin)
    return logged


@contextlib.contextmanager
def logged_model_failed_on_error(client, model_id: str, run_id: str) -> Iterator[None]:
    """When the block raises, mark logged model `model_id` FAILED (see `fail_logged_model`), then re-raise.
    A retried task logs a new model: without this the first one would stay in the experiment's
    Logged models tab, PENDING or READY, with no version."""
    try:
        yield
    except BaseException:
        fail_logged_model(client, model_id, run_id)
        raise


def fail_logged_model(client, model_id: str | None, run_id: str) -> None:
    """Mark logged model `model_id` FAILED unless a registry version of run `run_id` names it (a version
    create whose answer was lost can have landed). Never raises: the caller is handling an error."""
    try:
        versions = store.all_pages(client.search_model_versions, f"run_id = '{run_id}'")
        if model_id and all(v.tags.get("logged_model_id") != model_id for v in versions):
            client.finalize_logged_model(model_id, "FAILED")
    except Exception as error:  # noqa: BLE001 - the error being raised is the one to report
        log.warning("could not mark logged model %s FAILED (%s)", model_id, type(error).__name__)


def fail_logged_models(client, run_id: str) -> None:
    """`fail_logged_model` for every logged model run `run_id` made that is not FAILED yet: for a run
    that failed, or died (a kill after its model was logged leaves it READY with no version)."""
    experiment = client.get_run(run_id).info.experiment_id
    for made in store.all_pages(client.search_logged_models, [experiment], f"source_run_id = '{run_id}'"):
        if str(made.status) != "FAILED":
            fail_logged_model(client, made.model_id, run_id)


def link_model_metrics(
    client, run_id: str, model_id: str, metrics: dict[str, float], dataset_fingerprint: str, benchmark: str
) -> None:
    """Logged model `model_id`'s scores, each tied to the texts it was measured on (MLflow's model_id /
    dataset fields: `test_*` to the dataset's test split, `benchmark_*` to the model's benchmark), and
    the model recorded as an output of the run."""
    import math
    import time

    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.exceptions import MlflowException

    now = int(time.time() * 1000)
    test, bench = ("lenta-test", f"{dataset_fingerprint[:24]}-test"), ("benchmark", benchmark[:36])
    linked = [
        Metric(key, float(value), now, 0, model_id=model_id, dataset_name=where[0], dataset_digest=where[1])
        for key, value in metrics.items()
        if isinstance(value, (int, float))
        and math.isfinite(value)
        and (where := bench if key.startswith("benchmark_") else test if key.startswith("test_") else None)
    ]
    if linked:
        client.log_batch(run_id, metrics=linked)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)])
    except MlflowException:
        # A retried request whose first try landed (its answer lost) meets the first one's row: a
        # UNIQUE constraint error. The output is recorded, which is all that was asked.
        outputs = client.get_run(run_id).outputs
        if model_id not in [o.model_id for o in (outputs.model_outputs if outputs else [])]:
            raise
        log.info("run %s already records model %s as an output (a retried request)", run_id, model_id)


def _token() -> str:
    import uuid

    return uuid.uuid4().hex


def start_run(
    uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str], config_yaml: str
) -> str:
    """Create the flow's one MLflow run, log the resolved config, and return its id."""
    from mlflow.entities import Param

    store.require_reachable(uri)  # the flow's first MLflow call: a dead server fails the run in seconds
    store.initialize_store(uri)
    client = store.client(uri)
    run_id = create_run(client, experiment_id(client, uri, experiment), run_name, tags).info.run_id
    params_list = [Param(k, "" if v is None else str(v)[:6000]) for k, v in sorted(params.items())]
    with failed_on_error(client, run_id, "logging the run's config"):
        for start in range(0, len(params_list), 100):  # MLflow caps a batch at 100 params
            client.log_batch(run_id, params=params_list[start : start + 100])
        client.log_text(run_id, config_yaml, "config.yaml")
        client.set_tag(run_id, "mlflow.note.content", f"lenta-lora fine-tuning run `{run_name}`")
    return run_id


@contextlib.contextmanager
def failed_on_error(client, run_id: str, doing: str) -> Iterator[None]:
    """Close run `run_id` as FAILED when the block raises, then re-raise.

    A run made but not finished being set up stays RUNNING otherwise, and a retry of the task makes
    another one beside it. Its owner is alive, so the stale-run sweep skips it (and benchmark runs
    are never swept). The reason tag names the step and the error's type only: an error's message
    can carry a URI with credentials.
    """
    try:
        yield
    except BaseException as error:
        try:
            client.set_tag(run_id, "lenta_lora.failed_while", f"{doing} ({type(error).__name__})")
            client.set_terminated(run_id, "FAILED")
        except Exception as closing:  # noqa: BLE001 - the first error is the one to report
            log.warning("run %s is left RUNNING: closing it as FAILED failed too (%s)", run_id, type(closing).__name__)
        raise


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    if items:
        with store.server_errors(uri, f"logging metrics of run {run_id}"):
            store.client(uri).log_batch(run_id, metrics=items)


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    with store.server_errors(uri, f"logging parameters of run {run_id}"):
        store.client(uri).log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    with store.server_errors(uri, f"tagging run {run_id}"):
        store.client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client = store.client(uri)
    with store.server_errors(uri, f"uploading {Path(path).name} to run {run_id}"):
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)


def log_artifact_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    store.client(uri).log_text(run_id, text, artifact_file)


def log_table(uri: str, run_id: str, columns: dict[str, list], artifact_file: str) -> None:
    """A table browsable in the MLflow UI's artifact view (and Evaluation tab)."""
    # The client's form: mlflow.set_tracking_uri would also rewrite this process's
    # $MLFLOW_TRACKING_URI, which every later run and child process would then inherit.
    store.client(uri).log_table(run_id, data=columns, artifact_file=artifact_file)


def log_dataset_input(uri: str, run_id: str, name: str, digest: str, source: dict, profile: dict, context: str) -> None:
    """A dataset input of the run (its Datasets panel): name, digest (our fingerprint), where the
    data came from, and counts. Only this description is stored, never the texts."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=name,
        digest=digest[:36],
        source_type=str(source.get("type", "local")),
        source=json.dumps(source, ensure_ascii=False),
        profile=json.dumps(profile),
        schema=json.dumps({"mlflow_colspec": [{"type": "string", "name": "document"}]}),
    )
    with store.server_errors(uri, f"logging dataset {name} of run {run_id}"):
        store.client(uri).log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


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
    with store.server_errors(uri, f"closing run {run_id} as {status}"):
        store.client(uri).set_terminated(run_id, status)


def get_run_summary(uri: str, run_id: str) -> dict:
    run = store.client(uri).get_run(run_id)
    return {
        "status": run.info.status,
        "metrics": dict(run.data.metrics),
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
        "artifact_uri": run.info.artifact_uri,
    }


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

    client = store.client(uri)
    experiment = client.get_run(run_id).info.experiment_id
    host, swept = socket.gethostname(), []
    for run in client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'", max_results=500):
        tags = run.data.tags
        pid = int(tags.get("lenta_lora.pid", "0") or 0)
        if run.info.run_id == run_id or tags.get("lenta_lora.host") != host or not pid or faults.process_alive(pid):
            continue
        client.set_tag(
            run.info.run_id,
            "stale_reason",
            f"process {pid} on {host} died without closing this run; marked FAILED by run {run_id}",
        )
        client.set_terminated(run.info.run_id, "FAILED")
        swept.append(run.info.run_id)
    if swept:
        log.warning("marked %d stale run(s) FAILED: %s", len(swept), ", ".join(swept))
    return swept
