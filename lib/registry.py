"""The MLflow model registry: one version per trained adapter, `champion` decided with it, versions back.

Safe under task retries and concurrent flow runs without any lock (MLflow's registry has none):
- Registering is idempotent per MLflow run: a retried task finds the version its earlier attempt
  created instead of adding a twin; a twin made by MLflow's own HTTP retry of a POST whose answer
  was lost is deleted, keeping the lowest version of that run. Likewise per training key: of two
  unforced runs that trained the same thing at once, the lower version stays.
- Registering and deciding `champion` are one unit (lib/champion.py decides): if the decision
  fails, the new version is deleted again; a process killed in between leaves a RUNNING run whose
  version the next run's sweep deletes (`retract_versions`). No version is left without a decision.

A version records, as tags and in its `base_model.json`, sha256 checksums of its files;
`load_registered` refuses files that changed since registration.
"""

from __future__ import annotations

import errno
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from lib import faults, packaging
from lib.benchmark_store import model_benchmark
from lib.champion import (
    BENCHMARK_TAG,
    CHAMPION,
    METRIC_TAG,
    VALUE_TAG,
    restore_champion,
    update_champion,
)
from lib.loading import registered_model
from lib.store import alias_version, all_pages, all_versions, ensure_registered_model, not_found, require_reachable
from lib.store import client as _client
from lib.tracking import (
    create_logged_model,
    fail_logged_model,
    fail_logged_models,
    link_model_metrics,
    logged_model_failed_on_error,
)

log = logging.getLogger("lenta_lora.registry")

MODEL_PATH = "adapter_model"  # the logged model's name


def register_adapter(
    uri: str,
    run_id: str,
    adapter_dir: str | Path,
    base: dict,
    generation: dict,
    model_name: str,
    tags: dict[str, Any],
    metrics: dict[str, float],
    *,
    champion_metric: str,
    benchmark_fingerprint: str,
    min_improvement: float,
    training_key: str | None = None,
    example: dict | None = None,
) -> dict:
    """Log the adapter as a pyfunc model in the run, register it as a version, decide `champion`.

    Only the adapter is stored for hub bases (plus the hub id and revision); the offline tiny base
    has no hub to come from, so its few-MB weights travel with it. `metrics` must hold the
    `benchmark_*` scores measured on `benchmark_fingerprint`. With `training_key`, an unforced run
    whose key another version already holds (a twin that finished first) registers nothing.
    `example` ({"prompt", "output"}, from the evaluation) is the version's input/output example:
    nothing is loaded or generated here (lib/packaging.py).
    Returns `name`, `version`, `uri` (models:/NAME/VERSION), `champion` (whether this version
    holds the alias), `decision`, `sha256`, and `up_to_date` (True when a twin's version was kept).
    """
    require_reachable(uri)
    client = _client(uri)
    ensure_registered_model(client, model_name)
    earlier = _versions_of_run(client, model_name, run_id)
    if earlier:
        version = earlier[0]
        log.info(
            "%s version %s already holds run %s (a retried registration): reusing it",
            model_name,
            version.version,
            run_id,
        )
    else:
        version = _create_version(
            client,
            run_id,
            adapter_dir,
            base,
            generation,
            model_name,
            {**tags, BENCHMARK_TAG: benchmark_fingerprint, **({"training_key": training_key} if training_key else {})},
            metrics,
            champion_metric,
            example,
        )
    if training_key and (holder := _keep_lowest_of_key(client, model_name, training_key, version)) is not None:
        return {
            "name": model_name,
            "version": int(holder.version),
            "uri": f"models:/{model_name}/{holder.version}",
            "champion": alias_version(client, model_name, CHAMPION) == str(holder.version),
            "decision": None,
            "sha256": {},
            "up_to_date": True,
        }
    try:
        faults.reach("register.after-version")
        decision = update_champion(
            client, model_name, version.version, champion_metric, benchmark_fingerprint, min_improvement, run_id
        )
    except BaseException:
        # One unit: a version without a decision must not stay (the holder may be worse than it).
        log.error("deciding champion for %s version %s failed: deleting the version", model_name, version.version)
        try:
            _delete_version(client, model_name, version.version)
        except Exception as error:  # noqa: BLE001 - the next run's sweep retracts it (its run ends FAILED)
            log.error("could not delete %s version %s: %s", model_name, version.version, error)
        fail_logged_model(client, version.tags.get("logged_model_id"), run_id)
        raise
    faults.reach("register.after-champion")
    return {
        "name": model_name,
        "version": int(version.version),
        "uri": f"models:/{model_name}/{version.version}",
        "champion": decision["promoted"],
        "decision": decision,
        "up_to_date": False,
        "sha256": {k: v for k, v in version.tags.items() if k.endswith("sha256")},
    }


def _keep_lowest_of_key(client, name: str, training_key: str, version):
    """Two unforced runs that trained the same thing at once: the lower version stays, the other
    run's is deleted. Returns the version kept when it is not `version`, else None."""
    twins = sorted(
        (
            v
            for v in all_versions(client, name)
            if v.tags.get("training_key") == training_key and v.tags.get("forced") != "true"
        ),
        key=lambda v: int(v.version),
    )
    if not twins or twins[0].version == version.version:
        return None
    log.warning(
        "%s version %s already holds training key %s (a twin run finished first): deleting version %s",
        name,
        twins[0].version,
        training_key[:12],
        version.version,
    )
    _delete_version(client, name, version.version)
    return twins[0]


def _create_version(client, run_id, adapter_dir, base, generation, model_name, tags, metrics, champion_metric, example):
    from lib.adapter_pyfunc import ADAPTER_WEIGHTS, sha256_file

    with tempfile.TemporaryDirectory() as tmp:
        package = packaging.package_adapter(tmp, adapter_dir, base, generation, example)  # loads no model
        local, meta, manifest = package["model_dir"], package["base_model_json"], package["manifest"]
        # An MLflow 3 logged model ("Logged models" in the UI) made by this run; the version points at it.
        experiment = client.get_run(run_id).info.experiment_id
        logged = create_logged_model(
            client, experiment, run_id, MODEL_PATH, "lora-adapter", {"base_model": str(base.get("name"))}
        )
        with logged_model_failed_on_error(client, logged.model_id, run_id):
            try:
                client.log_model_artifacts(logged.model_id, str(local))
            except OSError as error:  # a local artifact store's disk; the error names the source file, not it
                if error.errno != errno.ENOSPC:
                    raise
                raise OSError(
                    errno.ENOSPC, "No space left in the MLflow artifact store", logged.artifact_location
                ) from error
            client.finalize_logged_model(logged.model_id, "READY")
            link_model_metrics(
                client,
                run_id,
                logged.model_id,
                metrics,
                str(tags.get("dataset_fingerprint", "")),
                str(tags[BENCHMARK_TAG]),
            )
            faults.reach("register.after-artifacts")
            # The registry (a database) keeps these apart from the artifact store they describe, so a
            # file changed in the store cannot also change the checksum it is verified against.
            integrity = {
                "base_model_json_sha256": sha256_file(meta),
                "adapter_sha256": manifest["adapter"][ADAPTER_WEIGHTS],
            }
            if "model.safetensors" in manifest.get("base_weights", {}):
                integrity["base_weights_sha256"] = manifest["base_weights"]["model.safetensors"]
            # Exact values (repr) of the scores on the model's benchmark: what `champion` is decided on.
            ranked = {k: repr(float(v)) for k, v in metrics.items() if k.startswith("benchmark_") and _finite(v)}
            if champion_metric in ranked:
                ranked.update({METRIC_TAG: champion_metric, VALUE_TAG: ranked[champion_metric]})
            # The source is the logged model's own folder, not `models:/<model_id>`: MLflow's database
            # registry resolves that form with a client on the process-wide tracking URI (a TODO in its
            # sqlalchemy store), which may name another store; and it keeps no model_id on a version. So
            # the version names its logged model in the tag `logged_model_id` too.
            created = client.create_model_version(
                model_name,
                logged.artifact_location,
                run_id=run_id,
                model_id=logged.model_id,
                tags={
                    **{k: str(v) for k, v in tags.items()},
                    **integrity,
                    **ranked,
                    "logged_model_id": logged.model_id,
                },
                description=packaging.describe_version(base, tags, metrics, champion_metric, run_id),
            )
    # MLflow's HTTP client retries any method, POST included: a create whose answer was lost can
    # leave a twin. Every registrant of a run keeps the run's lowest version and drops its own other.
    twins = _versions_of_run(client, model_name, run_id)
    if twins and twins[0].version != created.version:
        log.warning(
            "run %s already has %s version %s; deleting duplicate version %s",
            run_id,
            model_name,
            twins[0].version,
            created.version,
        )
        _delete_version(client, model_name, created.version)
        return twins[0]
    return created


def version_with_training_key(uri: str, name: str, key: str) -> dict | None:
    """The oldest version of `name` trained from `key` (lib/provenance.py), or None: a run with this
    key would train the same adapter again."""
    require_reachable(uri)
    client = _client(uri)
    if not _exists(client, name):
        return None
    held = sorted(
        (v for v in all_versions(client, name) if v.tags.get("training_key") == key), key=lambda v: int(v.version)
    )
    if not held:
        return None
    version = held[0]
    return {
        "name": name,
        "version": int(version.version),
        "uri": f"models:/{name}/{version.version}",
        "run_id": version.run_id,
        "champion": alias_version(client, name, CHAMPION) == str(version.version),
    }


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as error:
        if not_found(error):
            return False
        raise


def retract_versions(uri: str, run_ids: list[str], reason: str) -> list[str]:
    """Delete the registry versions of runs that did not finish (FAILED, or killed and swept), so that
    no version points at a run that failed; `champion` moves back to the best version left. The
    logged models those runs made are marked FAILED (none stays READY or PENDING without a version).

    A version is created before its run is closed, so a crash or a failure in between leaves one
    (see lib/faults.py: register.after-version). Returns "NAME/VERSION" for each one deleted.
    """
    if not run_ids:
        return []
    client, retracted, names = _client(uri), [], {}
    for run_id in run_ids:
        for version in all_pages(client.search_model_versions, f"run_id = '{run_id}'"):
            _delete_version(client, version.name, version.version)
            retracted.append(f"{version.name}/{version.version}")
            names[version.name] = version.tags.get(METRIC_TAG)
        fail_logged_models(client, run_id)
    for name, metric in names.items():
        if metric and alias_version(client, name, CHAMPION) is None:  # the deleted version held it
            restore_champion(uri, name, metric)
    if retracted:
        log.warning("deleted registry version(s) %s: %s", ", ".join(retracted), reason)
    return retracted


def _delete_version(client, name: str, version) -> None:
    """Delete a version; one already gone counts as deleted. MLflow's client retries a DELETE whose
    answer was lost (a gateway's 502), and the retry finds nothing to delete: RESOURCE_DOES_NOT_EXIST."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_model_version(name, str(version))
    except MlflowException as error:
        if getattr(error, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.info("%s version %s was already deleted (a retried request)", name, version)


def _versions_of_run(client, name: str, run_id: str) -> list:
    return sorted(all_versions(client, name, f"run_id = '{run_id}'"), key=lambda v: int(v.version))


def list_versions(uri: str, name: str | None = None) -> list[dict]:
    """Every registered version with its aliases and headline metrics, newest first."""
    require_reachable(uri)
    client = _client(uri)
    names = [name] if name else [m.name for m in all_pages(client.search_registered_models)]
    rows = []
    for model_name in names:
        aliases: dict[str, list[str]] = {}
        model = registered_model(client, uri, model_name)
        for alias, version in model.aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        meta = model_benchmark(uri, model_name)  # through the model's pointer, not its tag copies for the UI
        benchmark = {"benchmark": meta and meta["fingerprint"], "benchmark_source": meta and meta["source"]}
        for v in all_versions(client, model_name):
            rows.append(
                {
                    "name": model_name,
                    "version": int(v.version),
                    "aliases": sorted(aliases.get(str(v.version), [])),
                    "run_id": v.run_id,
                    "created": v.creation_timestamp,
                    "tags": dict(v.tags),
                    **benchmark,
                }
            )
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))


def set_model_version_tags(uri: str, name: str, version: int, tags: dict[str, Any]) -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
