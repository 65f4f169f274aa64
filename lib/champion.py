"""`champion`: which version of a registered model users get, decided on one benchmark with a gate.

- Every registered model has one benchmark (lib/benchmark.py), stored once in MLflow (a run
  holding `benchmark/benchmark.json`, logged as a dataset input) and named by tags on the
  registered model (`benchmark.fingerprint`, `benchmark.run_id`, ...). A version's score counts
  only if it was measured on that fingerprint: no number from another text set enters a decision.
- The gate: a challenger takes `champion` only if its value is below the holder's by the
  relative margin `min_improvement` (lower is better). Ties and near-ties keep the holder.
- Race-safe without a lock (MLflow's registry has none): never read-compare-set. Each
  registration converges the alias: read every scored version and the holder; if the best one
  passes the gate against the holder, write the alias and read both again, until nothing moves
  (6 threads racing on a real `mlflow server`: the old read-compare-set left the wrong champion in
  14 of 20 trials, converging in 0 of 20). Since the candidate is always the best scored version,
  racers agree on where the alias ends, whatever order their writes land in.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

from lib.benchmark import FILE_NAME, Benchmark, read_benchmark, write_benchmark
from lib.store import alias_version, all_versions, ensure_registered_model, not_found
from lib.store import client as _client
from lib.tracking import experiment_id, log_dataset_input

log = logging.getLogger("lenta_lora.champion")

CHAMPION = "champion"
# Version tags: the benchmark a version's `benchmark_*` tags were measured on; a person may set
# `champion_eligible=false` to keep a version out of the race.
BENCHMARK_TAG, ELIGIBLE_TAG = "benchmark_fingerprint", "champion_eligible"
METRIC_TAG, VALUE_TAG = "champion_metric", "champion_metric_value"
MODEL_TAGS = ("fingerprint", "run_id", "source", "texts", "max_length", "stride")  # as `benchmark.<key>`
ARTIFACT = f"benchmark/{FILE_NAME}"


# --- the benchmark of a registered model ----------------------------------------------------


def model_benchmark(uri: str, name: str) -> dict | None:
    """The registered model's benchmark tags (`fingerprint`, `run_id`, ...), None if it has none yet."""
    from mlflow.exceptions import MlflowException

    try:
        tags = _client(uri).get_registered_model(name).tags
    except MlflowException as error:
        if not_found(error):
            return None
        raise
    found = {key: tags[f"benchmark.{key}"] for key in MODEL_TAGS if f"benchmark.{key}" in tags}
    return found if found.get("fingerprint") and found.get("run_id") else None


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
            _, documents = read_benchmark(downloaded)
            payload = json.loads(Path(downloaded).read_text(encoding="utf-8"))
            write_benchmark(documents, payload["max_length"], payload["stride"], payload["source"], folder)
    benchmark, _ = read_benchmark(local)  # refuses a file whose texts do not match its fingerprint
    if benchmark.fingerprint != meta["fingerprint"]:
        raise ValueError(
            f"model {name!r}: the benchmark file in run {meta['run_id']} has fingerprint "
            f"{benchmark.fingerprint[:12]}, the model records {meta['fingerprint'][:12]}"
        )
    return benchmark


def store_benchmark(uri: str, name: str, benchmark: Benchmark, experiment: str) -> Benchmark:
    """Make `benchmark` the model's benchmark unless it has one; return the one it has afterwards.

    The texts go into a run of their own (`benchmark-<name>` in experiment `<experiment>-benchmarks`,
    tag `lenta_lora.kind=benchmark`), logged as an MLflow dataset input with the fingerprint as digest,
    so the benchmark outlives any training run and is browsable in the UI.
    """
    client = _client(uri)
    ensure_registered_model(client, name)
    existing = model_benchmark(uri, name)
    if existing:
        return _as_stored(existing, benchmark)
    # An experiment of their own: the training experiment lists training runs only.
    run = client.create_run(
        experiment_id(client, uri, f"{experiment}-benchmarks"),
        run_name=f"benchmark-{name}",
        tags={
            "lenta_lora.kind": "benchmark",
            "benchmark.for_model": name,
            "mlflow.note.content": f"The benchmark of registered model `{name}`: "
            f"{benchmark.texts} texts, {benchmark.source}",
        },
    )
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory(prefix="lenta-lora-benchmark-") as tmp:  # stored under a stable name
        shutil.copyfile(benchmark.path, Path(tmp) / FILE_NAME)
        client.log_artifact(run_id, str(Path(tmp) / FILE_NAME), "benchmark")
    log_documents(uri, run_id, benchmark, name, context="benchmark")
    from mlflow.entities import Param

    client.log_batch(
        run_id,
        params=[
            Param(k, str(v))
            for k, v in {
                "benchmark.fingerprint": benchmark.fingerprint,
                "benchmark.source": benchmark.source[:500],
                "benchmark.max_length": benchmark.max_length,
                "benchmark.stride": benchmark.stride,
                "benchmark.texts": benchmark.texts,
            }.items()
        ],
    )
    client.set_terminated(run_id, "FINISHED")
    values = {
        "fingerprint": benchmark.fingerprint,
        "run_id": run_id,
        "source": benchmark.source[:500],
        "texts": benchmark.texts,
        "max_length": benchmark.max_length,
        "stride": benchmark.stride,
    }
    for key, value in values.items():
        client.set_registered_model_tag(name, f"benchmark.{key}", str(value))
    stored = model_benchmark(uri, name)  # a concurrent first registration may have written last
    log.info(
        "model %s: benchmark %s (%d texts, %s)", name, stored["fingerprint"][:12], benchmark.texts, benchmark.source
    )
    return _as_stored(stored, benchmark)


def _as_stored(meta: dict, ours: Benchmark) -> Benchmark:
    if meta["fingerprint"] == ours.fingerprint:
        return Benchmark(**{**ours.describe(), "stored": True})
    stride = meta.get("stride")
    return Benchmark(
        meta["fingerprint"],
        "",
        meta.get("source", "?"),
        int(meta.get("texts", 0)),
        int(meta.get("max_length", 0)),
        None if stride in (None, "None") else int(stride),
        True,
    )


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


def record_scores(
    uri: str, name: str, version: str | int, benchmark: Benchmark, scores: dict[str, float], reason: str
) -> None:
    """Tag a version with its `benchmark_*` scores and the fingerprint they were measured on."""
    client = _client(uri)
    tags = {
        BENCHMARK_TAG: benchmark.fingerprint,
        **{k: repr(float(v)) for k, v in scores.items()},
        "benchmark_scored": reason,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def unscored_holder(uri: str, name: str, fingerprint: str, metric: str) -> str | None:
    """The version holding `champion` if it has no `metric` on this benchmark (registered before
    benchmarks existed, or on an older one): it must be scored before anything is compared with it."""
    client = _client(uri)
    holder = alias_version(client, name, CHAMPION)
    if holder is None:
        return None
    version = client.get_model_version(name, holder)
    return None if score_of(version, metric, fingerprint) is not None else holder


# --- the decision ---------------------------------------------------------------------------


def score_of(version, metric: str, fingerprint: str) -> float | None:
    """The version's `metric` if it was measured on benchmark `fingerprint`, else None."""
    if version.tags.get(BENCHMARK_TAG) != fingerprint:
        return None
    try:
        value = float(version.tags.get(metric, "nan"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _scored_versions(client, name: str, metric: str, fingerprint: str) -> dict[str, float]:
    """Version -> its `metric` on benchmark `fingerprint`, for every eligible version that has one."""
    return {
        str(v.version): value
        for v in all_versions(client, name)
        if v.tags.get(ELIGIBLE_TAG, "").lower() != "false" and (value := score_of(v, metric, fingerprint)) is not None
    }


def _best(scored: dict[str, float]) -> str:
    return min(scored, key=lambda v: (scored[v], int(v)))  # ties: the older version


def gate(challenger: float, holder: float | None, min_improvement: float) -> dict:
    """Whether `challenger` beats `holder` by the relative margin (lower is better)."""
    if holder is None:
        return {"passes": True, "threshold": None, "relative_improvement": None}
    threshold = holder * (1 - min_improvement)
    improvement = (holder - challenger) / abs(holder) if holder else 0.0
    return {"passes": challenger < threshold, "threshold": threshold, "relative_improvement": improvement}


def update_champion(
    client,
    name: str,
    version: str | int,
    metric: str,
    fingerprint: str,
    min_improvement: float,
    run_id: str | None = None,
) -> dict:
    """Converge `champion` (see the module docstring); record and return the decision for `version`.

    The decision (version tag `champion_decision` and the run's `champion_decision.json`) holds the
    challenger's and the holder's values on the benchmark, the fingerprint, the margin and whether
    the alias moved.
    """
    from mlflow.exceptions import MlflowException

    version = str(version)
    previous = alias_version(client, name, CHAMPION)
    holder, writes, failed, scored = previous, 0, None, {}
    for attempt in range(10):  # each round follows another registrant's write; 10 is far more than a few racers
        scored = _scored_versions(client, name, metric, fingerprint)
        holder = alias_version(client, name, CHAMPION)
        if not scored:
            break
        best = _best(scored)
        if best == holder or not gate(scored[best], scored.get(holder), min_improvement)["passes"]:
            break
        try:
            client.set_registered_model_alias(name, CHAMPION, best)
            writes, failed = writes + 1, None
        except MlflowException as error:
            # MLflow sets an alias by select-then-insert: two first-ever writes race into a UNIQUE
            # constraint error (HTTP 400, not retried). The other write landed; re-read and re-check.
            failed = error
            log.info("champion write for %s lost a race (%s); re-checking", name, str(error).splitlines()[0][:120])
            time.sleep(0.2 * (attempt + 1))
    else:
        if failed is not None:
            raise failed
        log.warning("champion of %s still moving after 10 rounds; the last registrant will settle it", name)
    mine, before = scored.get(version), scored.get(previous) if previous != version else None
    verdict = gate(mine, before, min_improvement) if mine is not None else {}
    decision = {
        "version": version,
        "metric": metric,
        "benchmark_fingerprint": fingerprint,
        "value": mine,
        "previous_champion": previous,
        "previous_value": before,
        "min_improvement": min_improvement,
        "threshold": verdict.get("threshold"),
        "relative_improvement": verdict.get("relative_improvement"),
        "champion_version": holder,
        "champion_value": scored.get(holder),
        "promoted": holder == version,
        "alias_writes": writes,
        "reason": _reason(version, mine, previous, before, holder, min_improvement),
    }
    client.set_model_version_tag(name, version, "champion_decision", json.dumps(decision))
    if run_id:
        client.log_dict(run_id, decision, "champion_decision.json")
    log.info("champion decision: %s", decision["reason"])
    return decision


def _reason(version, mine, previous, before, holder, margin) -> str:
    if mine is None:
        return f"version {version} has no score on this benchmark: left out of the race; champion is {holder}"
    if holder == version:
        if previous in (None, version):
            return f"version {version} is champion: no scored holder to beat ({mine:.6g})"
        if before is None:
            return f"version {version} took champion from {previous}, which has no score on this benchmark"
        return f"version {version} took champion: {mine:.6g} < {before:.6g} x (1 - {margin:g})"
    if before is not None and holder == previous:
        return f"champion stays {previous}: {mine:.6g} is not below {before:.6g} x (1 - {margin:g})"
    return f"champion is {holder} (version {version}: {mine:.6g})"


def restore_champion(client, name: str, metric: str) -> str | None:
    """After the holder was deleted (a retracted run): the best version scored on the model's
    benchmark takes `champion` (no holder, so no gate). Returns it, or None if none is scored."""
    fingerprint = client.get_registered_model(name).tags.get("benchmark.fingerprint")
    scored = _scored_versions(client, name, metric, fingerprint) if fingerprint else {}
    if not scored:
        return None
    best = _best(scored)
    client.set_registered_model_alias(name, CHAMPION, best)
    return best


def promote(uri: str, name: str, version: int, metric: str, min_improvement: float, force: bool) -> dict:
    """`lenta-lora promote`: move `champion` to `version` if it passes the gate against the holder
    on the model's benchmark (or whatever it scores, with `force`); returns the gate report."""
    client = _client(uri)
    meta = model_benchmark(uri, name)
    if meta is None:
        raise LookupError(f"model {name!r} has no benchmark yet (it is fixed when a run registers its first version)")
    target = client.get_model_version(name, str(version))
    holder = alias_version(client, name, CHAMPION)
    value = score_of(target, metric, meta["fingerprint"])
    held = score_of(client.get_model_version(name, holder), metric, meta["fingerprint"]) if holder else None
    if value is None and not force:
        raise LookupError(
            f"{name} version {version} has no {metric} on the model's benchmark "
            f"{meta['fingerprint'][:12]} and could not be scored; use --force to promote it anyway"
        )
    verdict = gate(value, held, min_improvement) if value is not None else {"passes": False}
    moved = str(version) != holder and (verdict["passes"] or force)
    if moved:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    report = {
        "version": str(version),
        "value": value,
        "holder": holder,
        "holder_value": held,
        "metric": metric,
        "benchmark_fingerprint": meta["fingerprint"],
        "min_improvement": min_improvement,
        **verdict,
        "forced": bool(force and moved and not verdict.get("passes")),
        "promoted": moved,
        "champion_version": str(version) if moved else holder,
    }
    client.set_model_version_tag(name, str(version), "champion_decision", json.dumps({**report, "by": "promote"}))
    return report


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
