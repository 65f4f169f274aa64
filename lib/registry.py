"""The MLflow model registry: one version per trained adapter, `champion` on the best, versions back.

Safe under task retries and concurrent flow runs without any lock (MLflow's registry has none):
- Registering is idempotent per MLflow run: a retried task finds the version its earlier attempt
  created instead of adding a twin; a twin made by MLflow's own HTTP retry of a POST whose answer
  was lost is deleted, keeping the lowest version of that run.
- `champion` is never moved by read-compare-set, which loses under concurrency: two registrations
  both read the old holder, both decide to promote, and the later *write* wins whatever its
  metric (6 threads racing on a real `mlflow server`: wrong champion in 14 of 20 trials). Each
  registration instead converges the alias to the best version it can see and re-reads after
  every write, until alias and best agree (see `update_champion`; 20 of 20 right).

A version records, as tags and in its `base_model.json`, sha256 checksums of its files;
`load_registered` refuses files that changed since registration.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from lib import faults
from lib.tracking import _client, require_reachable

log = logging.getLogger("lenta_lora.registry")

PYFUNC_CODE = Path(__file__).with_name("adapter_pyfunc.py")
CHAMPION = "champion"
MODEL_PATH = "adapter_model"  # where the pyfunc model lives in the run's artifacts
# Tags written on every version; `champion_eligible=false` (set by a person) keeps one out of the race.
METRIC_TAG, VALUE_TAG, ELIGIBLE_TAG = "champion_metric", "champion_metric_value", "champion_eligible"


def register_adapter(uri: str, run_id: str, adapter_dir: str | Path, base: dict, generation: dict,
                     model_name: str, tags: dict[str, Any], metrics: dict[str, float],
                     champion_metric: str) -> dict:
    """Log the adapter as a pyfunc model in the run, register it as a version, update `champion`.

    Only the adapter is stored for hub bases (plus the hub id and revision); the offline tiny base
    has no hub to come from, so its few-MB weights travel with it. Returns `name`, `version`, `uri`
    (models:/NAME/VERSION), `champion` (whether this version holds the alias) and `sha256`.
    """
    require_reachable(uri)
    client = _client(uri)
    _ensure_registered_model(client, model_name)
    earlier = _versions_of_run(client, model_name, run_id)
    if earlier:
        version = earlier[0]
        log.info("%s version %s already holds run %s (a retried registration): reusing it",
                 model_name, version.version, run_id)
    else:
        version = _create_version(client, run_id, adapter_dir, base, generation, model_name, tags, metrics,
                                  champion_metric)
    faults.reach("register.after-version")
    champion = update_champion(client, model_name, version.version, champion_metric, run_id)
    faults.reach("register.after-champion")
    return {"name": model_name, "version": int(version.version), "uri": f"models:/{model_name}/{version.version}",
            "champion": champion, "sha256": {k: v for k, v in version.tags.items() if k.endswith("sha256")}}


def _create_version(client, run_id, adapter_dir, base, generation, model_name, tags, metrics, champion_metric):
    import mlflow.pyfunc

    from lib.adapter_pyfunc import ADAPTER_WEIGHTS, GENERATION_DEFAULTS, checksum_manifest, sha256_file

    artifacts = {"adapter": str(adapter_dir)}
    params = {key: type(default)(generation.get(key, default)) for key, default in GENERATION_DEFAULTS.items()}
    if base.get("kind") == "tiny":
        artifacts["base_weights"] = base["path"]
    manifest = checksum_manifest(artifacts)  # refuses pickles and a missing adapter_model.safetensors
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "base_model.json"
        meta.write_text(json.dumps({**base, "generation": generation, "sha256": manifest}, indent=2, ensure_ascii=False))
        local = Path(tmp) / "model"
        # (prompts, params): the params give the signature the params schema that lets
        # `predict(..., params=...)` through (MLflow drops undeclared params), with the profile's
        # generation settings as defaults.
        mlflow.pyfunc.save_model(
            str(local), python_model=str(PYFUNC_CODE), artifacts={**artifacts, "base_model": str(meta)},
            input_example=(["Учёные обнаружили новый вид бабочек"], params), pip_requirements=_requirements(),
        )
        destination = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_PATH}"
        try:
            client.log_artifacts(run_id, str(local), MODEL_PATH)
        except OSError as error:  # a local artifact store's disk; the error names the source file, not it
            if error.errno != errno.ENOSPC:
                raise
            raise OSError(errno.ENOSPC, "No space left in the MLflow artifact store", destination) from error
        faults.reach("register.after-artifacts")
        # The registry (a database) keeps these apart from the artifact store they describe, so a
        # file changed in the store cannot also change the checksum it is verified against.
        integrity = {"base_model_json_sha256": sha256_file(meta), "adapter_sha256": manifest["adapter"][ADAPTER_WEIGHTS]}
    if "model.safetensors" in manifest.get("base_weights", {}):
        integrity["base_weights_sha256"] = manifest["base_weights"]["model.safetensors"]
    value = metrics.get(champion_metric)
    ranked = {METRIC_TAG: champion_metric, VALUE_TAG: repr(float(value))} if _finite(value) else {}
    created = client.create_model_version(
        model_name, f"{client.get_run(run_id).info.artifact_uri}/{MODEL_PATH}", run_id=run_id,
        tags={**{k: str(v) for k, v in tags.items()}, **integrity, **ranked},
        description=describe_version(base, tags, metrics, champion_metric, run_id))
    # MLflow's HTTP client retries any method, POST included: a create whose answer was lost can
    # leave a twin. Every registrant of a run keeps the run's lowest version and drops its own other.
    twins = _versions_of_run(client, model_name, run_id)
    if twins and twins[0].version != created.version:
        log.warning("run %s already has %s version %s; deleting duplicate version %s",
                    run_id, model_name, twins[0].version, created.version)
        client.delete_model_version(model_name, created.version)
        return twins[0]
    return created


def retract_versions(uri: str, run_ids: list[str], reason: str) -> list[str]:
    """Delete the registry versions of runs that did not finish (FAILED, or killed and swept), so that
    no version points at a run that failed; `champion` moves back to the best version left.

    A version is created before its run is closed, so a crash or a failure in between leaves one
    (see lib/faults.py: register.after-version). Returns "NAME/VERSION" for each one deleted.
    """
    if not run_ids:
        return []
    client, retracted, names = _client(uri), [], {}
    for run_id in run_ids:
        for version in _all_pages(client.search_model_versions, f"run_id = '{run_id}'"):
            client.delete_model_version(version.name, version.version)
            retracted.append(f"{version.name}/{version.version}")
            names[version.name] = version.tags.get(METRIC_TAG)
    for name, metric in names.items():
        if metric and _alias_version(client, name) is None:  # the deleted version held it
            best = _best_version(client, name, metric)
            if best:
                client.set_registered_model_alias(name, CHAMPION, best[1])
    if retracted:
        log.warning("deleted registry version(s) %s: %s", ", ".join(retracted), reason)
    return retracted


def describe_version(base: dict, tags: dict, metrics: dict, champion_metric: str, run_id: str) -> str:
    """The version's description: what it is and where it came from, readable in the MLflow UI."""
    origin = base.get("name") + (f"@{base['revision']}" if base.get("revision") else "")
    shown = [m for m in (champion_metric, "test_perplexity", "chrf") if _finite(metrics.get(m))]
    facts = [f"{label} {tags[key]}" for key, label in (("dataset_fingerprint", "dataset"), ("git_commit", "git commit"),
                                                       ("prefect.flow_run_id", "Prefect flow run")) if tags.get(key)]
    return "\n".join([f"LoRA adapter on {origin} ({base.get('precision', '?')}), MLflow run {run_id}.",
                      "Metrics: " + (", ".join(f"{m} {metrics[m]:.4g}" for m in shown) or "none") + ".",
                      "; ".join(facts) + "." if facts else ""]).strip()


def update_champion(client, name: str, version: str | int, metric: str, run_id: str | None = None) -> bool:
    """Point `champion` at the eligible version with the lowest `metric`; True if that is `version`.

    Converging, not comparing: read every version, then the alias; if they disagree, set the alias
    and read both again. The registration whose write lands last re-reads after it and sees every
    version created before that, so the alias ends on the best of all of them whatever the order
    (a stale write by a slower twin is undone by whoever re-checks after it). Ties go to the older
    version. A version without the metric never becomes champion.
    """
    from mlflow.exceptions import MlflowException

    previous = holder = _alias_version(client, name)
    best, writes, failed = None, 0, None
    for attempt in range(10):  # each round follows another registrant's write; 10 is far more than a few racers
        best = _best_version(client, name, metric)
        holder = _alias_version(client, name)
        if best is None or holder == best[1]:
            break
        try:
            client.set_registered_model_alias(name, CHAMPION, best[1])
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
    promoted = holder == str(version)
    decision = {"champion_metric": metric, "version": str(version), "champion_version": holder,
                "champion_value": best[0] if best else None, "previous_version": previous, "promoted": promoted,
                "alias_writes": writes}
    client.set_model_version_tag(name, str(version), "champion_decision", json.dumps(decision))
    if run_id:
        client.log_dict(run_id, decision, "champion_decision.json")
    log.info("champion decision: %s", decision)
    return promoted


def _best_version(client, name: str, metric: str) -> tuple[float, str] | None:
    ranked = [(value, int(v.version)) for v in _all_versions(client, name)
              if v.tags.get(ELIGIBLE_TAG, "").lower() != "false" and _finite(value := _metric_of(client, v, metric))]
    if not ranked:
        return None
    value, number = min(ranked)
    return value, str(number)


def _metric_of(client, version, metric: str) -> float | None:
    from mlflow.exceptions import MlflowException

    if version.tags.get(METRIC_TAG) == metric and version.tags.get(VALUE_TAG):
        return float(version.tags[VALUE_TAG])  # exact value recorded at registration
    if not version.run_id:
        return None
    try:  # versions registered before that tag existed: their run's metric
        return client.get_run(version.run_id).data.metrics.get(metric)
    except MlflowException:
        return None


def _alias_version(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as error:
        if _not_found(error):
            return None
        raise


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _not_found(error) -> bool:  # INVALID_PARAMETER_VALUE: e.g. version "abc", or an alias never set
    return getattr(error, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _all_pages(search, *args) -> list:
    """Every result of an MLflow search call, page after page (a page holds 100 by default)."""
    found, token = [], None
    while True:
        page = search(*args, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def _all_versions(client, name: str, extra_filter: str = "") -> list:
    """Every version of `name`, optionally narrowed by another filter clause."""
    query = f"name = '{name}'" + (f" and {extra_filter}" if extra_filter else "")
    return _all_pages(client.search_model_versions, query)


def _versions_of_run(client, name: str, run_id: str) -> list:
    return sorted(_all_versions(client, name, f"run_id = '{run_id}'"), key=lambda v: int(v.version))


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "transformers", "peft", "safetensors")]


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="LoRA adapters from lenta-lora")
    except MlflowException as error:
        if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":  # made by a concurrent run: fine
            raise


def model_uri(name: str, version: int | None = None, alias: str | None = None) -> str:
    if (version is None) == (alias is None):
        raise ValueError("give exactly one of version or alias")
    return f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"


def parse_model_uri(registered_uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION`, `models:/NAME/latest` or `models:/NAME@ALIAS` -> (name, version, alias)."""
    body = registered_uri.removeprefix("models:/") if registered_uri.startswith("models:/") else ""
    name, version, alias = body, None, None
    if "/" in body:
        name, _, version = body.partition("/")
    elif "@" in body:
        name, _, alias = body.rpartition("@")
    if not name or not (version or alias):
        raise ValueError(f"{registered_uri!r} is not a registered-model URI: use models:/NAME/VERSION, "
                         "models:/NAME/latest or models:/NAME@ALIAS")
    return name, version, alias


def resolve_version(client, uri: str, registered_uri: str):
    """The ModelVersion a registry URI names, or LookupError naming what exists (before any download)."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(registered_uri)
    model = _registered_model(client, uri, name)
    numbers = sorted(int(v.version) for v in _all_versions(client, name))
    if version == "latest" and numbers:  # MLflow reserves the alias `latest`; the URI form means newest
        version = str(numbers[-1])
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as error:
        if not _not_found(error):
            raise
    what = f"alias {alias!r}" if alias else f"version {version!r}"
    raise LookupError(f"model {name!r} has no {what} in {uri}; versions: {numbers}, aliases: "
                      f"{dict(sorted(model.aliases.items())) or 'none'}") from None


def _registered_model(client, uri: str, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if not _not_found(error):
            raise
    known = sorted(m.name for m in client.search_registered_models())
    raise LookupError(f"no registered model {name!r} in {uri}; known: {', '.join(known) or 'none'} "
                      "(list them with `lenta-lora models`)")


def check_model_uri(uri: str, registered_uri: str) -> None:
    """Fail with a clear message for an unknown model, version or alias (before any download)."""
    require_reachable(uri)
    resolve_version(_client(uri), uri, registered_uri)


def load_registered(uri: str, registered_uri: str):
    """`models:/NAME/VERSION|latest` or `models:/NAME@ALIAS` -> (model, tokenizer, base_info).

    Checks, each a one-line error naming the version: the server answers (ConnectionError), the
    model/version/alias exists (LookupError), its files are still in the artifact store
    (FileNotFoundError), and they match the checksums recorded at registration (ArtifactIntegrityError).
    """
    from lib.adapter_pyfunc import ArtifactIntegrityError, load_adapter_from_artifacts, sha256_file

    require_reachable(uri)
    client = _client(uri)
    found = resolve_version(client, uri, registered_uri)
    where = f"{registered_uri} (version {found.version} of {found.name!r}, run {found.run_id})"
    source = client.get_model_version_download_uri(found.name, found.version)
    # Loaded weights live in memory, so the download is removed once loaded: no temp dir per call.
    with tempfile.TemporaryDirectory(prefix="lenta-lora-model-", ignore_cleanup_errors=True) as tmp:
        artifacts = _download_model(source, tmp, uri, where)
        expected = found.tags.get("base_model_json_sha256")
        if expected and sha256_file(artifacts["base_model"]) != expected:
            raise ArtifactIntegrityError(f"{where}: base_model.json (which lists the checksums of the weights) differs "
                                         "from the one registered (tag base_model_json_sha256); refusing to load: "
                                         "restore the artifacts or register the adapter again")
        try:
            return load_adapter_from_artifacts(artifacts)
        except (ArtifactIntegrityError, FileNotFoundError) as error:
            raise type(error)(f"{where}: {error}") from None


def _download_model(source: str, tmp: str, uri: str, where: str) -> dict[str, str]:
    import mlflow.artifacts
    import yaml
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri))
        spec = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
        artifacts = {name: str(local / entry["path"]) for name, entry in spec.items()}
    except (OSError, MlflowException, KeyError, TypeError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise FileNotFoundError(f"{where}: its files are not in the artifact store at {source} ({reason}); "
                                "they were deleted or moved: register the adapter again or load another version") from None
    missing = sorted({"adapter", "base_model"} - set(artifacts))
    if missing:
        raise FileNotFoundError(f"{where}: not a lenta-lora adapter model (no {missing} in {source})")
    return artifacts


def list_versions(uri: str, name: str | None = None) -> list[dict]:
    """Every registered version with its aliases and headline metrics, newest first."""
    require_reachable(uri)
    client = _client(uri)
    names = [name] if name else [m.name for m in _all_pages(client.search_registered_models)]
    rows = []
    for model_name in names:
        aliases: dict[str, list[str]] = {}
        for alias, version in _registered_model(client, uri, model_name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        for v in _all_versions(client, model_name):
            rows.append({"name": model_name, "version": int(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                         "run_id": v.run_id, "created": v.creation_timestamp, "tags": dict(v.tags)})
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))
