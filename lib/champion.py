"""`champion`: which version of a registered model users get, decided on one benchmark with a gate.

- Every registered model has one benchmark (lib/benchmark.py), stored once in MLflow: a run
  holding `benchmark/benchmark.json` that the model's `benchmark.run_id` tag points at
  (lib/benchmark_store.py). A version's score counts only if it was measured on that fingerprint:
  no number from another text set enters a decision.
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
import time

from lib.benchmark import Benchmark
from lib.benchmark_store import model_benchmark
from lib.store import alias_version, all_versions
from lib.store import client as _client

log = logging.getLogger("lenta_lora.champion")

CHAMPION = "champion"
# Version tags: the benchmark a version's `benchmark_*` tags were measured on; a person may set
# `champion_eligible=false` to keep a version out of the race.
BENCHMARK_TAG, ELIGIBLE_TAG = "benchmark_fingerprint", "champion_eligible"
METRIC_TAG, VALUE_TAG = "champion_metric", "champion_metric_value"


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


def restore_champion(uri: str, name: str, metric: str) -> str | None:
    """After the holder was deleted (a retracted run): the best version scored on the model's
    benchmark takes `champion` (no holder, so no gate). Returns it, or None if none is scored."""
    client, meta = _client(uri), model_benchmark(uri, name)
    scored = _scored_versions(client, name, metric, meta["fingerprint"]) if meta else {}
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
