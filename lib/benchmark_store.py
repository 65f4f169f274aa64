"""Where a registered model's benchmark (lib/benchmark.py) lives in MLflow, and how racing first
registrations agree on one.

- A benchmark is stored in a run of its own (experiment `<experiment>-benchmarks`, tags
  `lenta_lora.kind=benchmark` and `benchmark.for_model=<name>`): the file
  `benchmark/benchmark.json`, its description as params, its texts as a dataset input. The run
  outlives every training run and is browsable in the UI.
- The registered model's tag `benchmark.run_id` points at that run, and the run's params are what
  the model's benchmark is. The other `benchmark.<key>` tags on the model copy them for people
  browsing the UI; nothing reads them back.
- First registrations race: a sweep started at once on a new model name, each run with its own
  test split. MLflow's registry has no lock or compare-and-set. Each racer stores its candidate,
  then converges the pointer to one winner, the first benchmark run of the model to finish (ties:
  the run id), and re-checks after a short pause. A racer that finishes later finds the earlier
  run and adopts it, so every racer returns the same benchmark whatever order the writes land in.
  Before this (tags written one by one), 4 threads storing different benchmarks on a new model,
  20 trials: on sqlite 11 of 80 racers failed on a UNIQUE constraint and 6 trials had a racer
  judging its version on a benchmark the model did not keep; over HTTP 6 of 20 models were left
  with tags from two racers, so every later run failed to download their benchmark.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from lib.benchmark import FILE_NAME, Benchmark, read_benchmark, write_benchmark
from lib.store import all_pages, ensure_registered_model, not_found
from lib.store import client as _client
from lib.tracking import create_run, experiment_id, failed_on_error, log_dataset_input

log = logging.getLogger("lenta_lora.champion")

ARTIFACT = f"benchmark/{FILE_NAME}"
POINTER = "benchmark.run_id"  # the registered model's tag naming its benchmark run
# A benchmark run's tag: the creation time of the registered model it was made for, as the store
# recorded it (read back, never a clock here), so an earlier model of the same name is told apart.
MODEL_CREATED = "benchmark.model_created"
DESCRIPTION = ("fingerprint", "source", "texts", "max_length", "stride")  # params `benchmark.<key>`
SETTLE_S = 0.25  # a racer re-checks after this long: a write slower than it could still land late
ROUNDS = 10  # each round follows another racer's write; 10 is far more than a few racers need


def model_benchmark(uri: str, name: str) -> dict | None:
    """The model's benchmark (`fingerprint`, `run_id`, `source`, `texts`, `max_length`, `stride`),
    read from the run its `benchmark.run_id` tag names; None if it has none yet."""
    return _pointed(_client(uri), name)


def fetch_benchmark(uri: str, name: str, folder: str | Path) -> Benchmark | None:
    """The model's stored benchmark as `folder/<fingerprint>.json` (downloaded once, then reused);
    None if the model has none yet."""
    meta = model_benchmark(uri, name)
    if meta is None:
        return None
    local = Path(folder) / f"{meta['fingerprint']}.json"
    if not local.is_file():
        with tempfile.TemporaryDirectory(prefix="lenta-lora-benchmark-") as tmp:
            downloaded = _client(uri).download_artifacts(meta["run_id"], ARTIFACT, tmp)
            benchmark, documents = read_benchmark(downloaded)
            write_benchmark(documents, benchmark.max_length, benchmark.stride, benchmark.source, folder)
    benchmark, _ = read_benchmark(local)  # refuses a file whose texts do not match its fingerprint
    if benchmark.fingerprint != meta["fingerprint"]:
        raise ValueError(
            f"model {name!r}: the benchmark file in run {meta['run_id']} has fingerprint "
            f"{benchmark.fingerprint[:12]}, the run records {meta['fingerprint'][:12]}"
        )
    return benchmark


def store_benchmark(uri: str, name: str, benchmark: Benchmark, experiment: str) -> Benchmark:
    """Make `benchmark` the model's benchmark unless it has one; return the one it has afterwards
    (another racer's, if that one finished first: see the module docstring)."""
    client = _client(uri)
    ensure_registered_model(client, name)
    model, run_id = client.get_registered_model(name), None
    if not model.tags.get(POINTER):
        run_id = _log_benchmark_run(client, uri, model, benchmark, f"{experiment}-benchmarks")
    kept = converge_benchmark(uri, name)
    if run_id is not None and kept["run_id"] != run_id:
        client.set_tag(run_id, "benchmark.superseded_by", kept["run_id"])  # for people browsing runs
    log.info("model %s: benchmark %s (%s texts, %s)", name, kept["fingerprint"][:12], kept["texts"], kept["source"])
    return _as_stored(kept, benchmark)


def converge_benchmark(uri: str, name: str) -> dict:
    """Point the model at its first finished benchmark run and return that benchmark; writes only
    when the pointer (or a copied tag) differs, then reads again, until both agree twice in a row
    `SETTLE_S` apart."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    settled = False
    for attempt in range(ROUNDS):
        model = client.get_registered_model(name)
        winner, tags = _first_finished(client, model), model.tags
        wanted = {POINTER: winner["run_id"], **{f"benchmark.{k}": str(winner[k])[:500] for k in DESCRIPTION}}
        stale = {key: value for key, value in wanted.items() if tags.get(key) != value}
        if not stale:
            if settled:
                return winner
            settled = True
            time.sleep(SETTLE_S)
            continue
        settled = False
        try:
            for key in sorted(stale, key=lambda k: k == POINTER):  # the pointer last
                client.set_registered_model_tag(name, key, stale[key])
        except MlflowException as error:
            # A first-ever tag is set by select-then-insert: two racers meet in a UNIQUE constraint
            # error. The other write landed; read again.
            log.info("benchmark tag of %s: lost a race (%s); re-checking", name, str(error).splitlines()[0][:120])
            time.sleep(0.1 * (attempt + 1))
    raise RuntimeError(f"model {name!r}: its benchmark pointer still moved after {ROUNDS} rounds; run again")


def log_documents(uri: str, run_id: str, benchmark: Benchmark, name: str, context: str) -> None:
    """The benchmark as an MLflow dataset input of the run (the run page's Datasets panel)."""
    log_dataset_input(
        uri,
        run_id,
        f"{name}-benchmark",
        benchmark.fingerprint,
        {"type": "lenta-lora-benchmark", "source": benchmark.source, "fingerprint": benchmark.fingerprint},
        {"texts": benchmark.texts, "max_length": benchmark.max_length, "stride": benchmark.stride},
        context,
    )


def _log_benchmark_run(client, uri: str, model, benchmark: Benchmark, experiment: str) -> str:
    """A FINISHED run holding the benchmark file, its description and its texts; returns its id."""
    from mlflow.entities import Param

    name = model.name
    run = create_run(
        client,
        experiment_id(client, uri, experiment),  # an experiment of its own: the training one lists training runs
        f"benchmark-{name}",
        {
            "lenta_lora.kind": "benchmark",
            "benchmark.for_model": name,
            MODEL_CREATED: str(model.creation_timestamp),
            "mlflow.note.content": f"The benchmark of registered model `{name}`: "
            f"{benchmark.texts} texts, {benchmark.source}",
        },
    )
    run_id = run.info.run_id
    with failed_on_error(client, run_id, "storing the benchmark"):  # FAILED: never a candidate, not left RUNNING
        with tempfile.TemporaryDirectory(prefix="lenta-lora-benchmark-") as tmp:  # stored under a stable name
            shutil.copyfile(benchmark.path, Path(tmp) / FILE_NAME)
            client.log_artifact(run_id, str(Path(tmp) / FILE_NAME), "benchmark")
        log_documents(uri, run_id, benchmark, name, context="benchmark")
        described = {k: getattr(benchmark, k) for k in DESCRIPTION}
        client.log_batch(run_id, params=[Param(f"benchmark.{k}", str(v)[:500]) for k, v in described.items()])
    client.set_terminated(run_id, "FINISHED")  # only now a candidate: its file is complete
    return run_id


def _first_finished(client, model) -> dict:
    """Of the model's candidates, the first to finish: the benchmark runs made for this registered
    model (not for an earlier, deleted model of the same name) that finished (a racer that died half
    way left an unfinished one), and the run the model points at already, if any."""
    name = model.name
    experiments = [
        e.experiment_id
        for e in all_pages(
            lambda page_token: client.search_experiments(
                filter_string="name LIKE '%-benchmarks'", page_token=page_token
            )
        )
    ]
    query = (
        f"tags.`benchmark.for_model` = '{name}' and tags.`{MODEL_CREATED}` = '{model.creation_timestamp}' "
        "and attributes.status = 'FINISHED'"
    )
    runs = all_pages(client.search_runs, experiments, query) if experiments else []
    if model.tags.get(POINTER):
        runs.append(client.get_run(model.tags[POINTER]))
    if not runs:
        raise LookupError(f"model {name!r}: no finished benchmark run to point it at")
    first = min(runs, key=lambda run: (run.info.end_time or 0, run.info.run_id))
    return _describe(first)


def _pointed(client, name: str) -> dict | None:
    from mlflow.exceptions import MlflowException

    try:
        run_id = client.get_registered_model(name).tags.get(POINTER)
    except MlflowException as error:
        if not_found(error):
            return None
        raise
    return _describe(client.get_run(run_id)) if run_id else None


def _describe(run) -> dict:
    params = run.data.params
    stride = params.get("benchmark.stride")
    return {
        "fingerprint": params["benchmark.fingerprint"],
        "run_id": run.info.run_id,
        "source": params.get("benchmark.source", "?"),
        "texts": int(params.get("benchmark.texts", 0)),
        "max_length": int(params.get("benchmark.max_length", 0)),
        "stride": None if stride in (None, "None") else int(stride),
    }


def _as_stored(meta: dict, ours: Benchmark) -> Benchmark:
    if meta["fingerprint"] == ours.fingerprint:
        return Benchmark(**{**ours.describe(), "stored": True})
    return Benchmark(**{k: meta[k] for k in DESCRIPTION}, path="", stored=True)
