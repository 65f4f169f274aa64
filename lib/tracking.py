"""Everything that talks to MLflow: runs, metrics, artifacts, the model registry.

Every function takes an explicit `run_id` and uses `MlflowClient`, never the fluent API's
process-global "active run": Prefect may run tasks in other threads or processes, and an implicit
active run is exactly the state that gets lost or leaked there.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("lenta_lora.tracking")

DEFAULT_DB = Path("mlruns") / "mlflow.db"
PYFUNC_CODE = Path(__file__).with_name("adapter_pyfunc.py")


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Profile value, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB).resolve()}"


def _client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client, uri: str, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # An experiment's artifact root is fixed at creation, relative to *that* process's cwd
        # unless absolute: pin it next to the database so every process finds the same files.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str], config_yaml: str) -> str:
    """Create the flow's one MLflow run, log the resolved config, and return its id."""
    from mlflow.entities import Param, RunTag

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
        _client(uri).log_batch(run_id, metrics=items)


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    _client(uri).log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client = _client(uri)
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_artifact_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    _client(uri).log_text(run_id, text, artifact_file)


def log_table(uri: str, run_id: str, columns: dict[str, list], artifact_file: str) -> None:
    """A table browsable in the MLflow UI's artifact view (and Evaluation tab)."""
    import mlflow

    mlflow.set_tracking_uri(uri)  # mlflow.log_table has no client form; it reads the global URI
    mlflow.log_table(data=columns, artifact_file=artifact_file, run_id=run_id)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status)


def get_run_summary(uri: str, run_id: str) -> dict:
    run = _client(uri).get_run(run_id)
    return {"status": run.info.status, "metrics": dict(run.data.metrics), "params": dict(run.data.params),
            "tags": dict(run.data.tags), "artifact_uri": run.info.artifact_uri}


def register_adapter(uri: str, run_id: str, adapter_dir: str | Path, base: dict, generation: dict,
                     model_name: str, tags: dict[str, Any], metrics: dict[str, float],
                     champion_metric: str) -> dict:
    """Log the adapter as a pyfunc model in the run, register a new version, move the aliases.

    Only the adapter is stored for hub bases (plus the hub id and revision); the offline tiny base
    has no hub to come from, so its few-MB weights travel with it.
    """
    import mlflow.pyfunc

    client = _client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "base_model.json"
        meta.write_text(json.dumps({**base, "generation": generation}, indent=2, ensure_ascii=False))
        artifacts = {"adapter": str(adapter_dir), "base_model": str(meta)}
        if base.get("kind") == "tiny":
            artifacts["base_weights"] = base["path"]
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            str(local), python_model=str(PYFUNC_CODE), artifacts=artifacts,
            input_example=["Учёные обнаружили новый вид бабочек"],
            pip_requirements=_requirements(),
        )
        client.log_artifacts(run_id, str(local), "adapter_model")
    source = f"{client.get_run(run_id).info.artifact_uri}/adapter_model"
    _ensure_registered_model(client, model_name)
    version = client.create_model_version(model_name, source, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()},
                                          description=f"LoRA adapter on {base.get('name')} from run {run_id}")
    # No `latest` alias: MLflow reserves that name; `models:/NAME/latest` already means the newest version.
    champion = _update_champion(client, model_name, version.version, metrics, champion_metric, run_id)
    return {"name": model_name, "version": int(version.version), "uri": f"models:/{model_name}/{version.version}",
            "champion": champion}


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "transformers", "peft", "safetensors")]


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="LoRA adapters from lenta-lora")
    except MlflowException:
        pass  # already exists (possibly created by a concurrent run)


def _update_champion(client, name: str, version: str, metrics: dict, metric: str, run_id: str) -> bool:
    """Move `champion` only when the new version's metric (lower is better) beats the holder's."""
    from mlflow.exceptions import MlflowException

    new_value = metrics.get(metric)
    try:
        holder = client.get_model_version_by_alias(name, "champion")
        old_value = client.get_run(holder.run_id).data.metrics.get(metric)
    except MlflowException:
        holder, old_value = None, None
    wins = new_value is not None and (old_value is None or new_value < old_value)
    if wins:
        client.set_registered_model_alias(name, "champion", version)
    decision = {"champion_metric": metric, "new_value": new_value, "previous_value": old_value,
                "previous_version": holder.version if holder else None, "promoted": wins}
    client.set_model_version_tag(name, version, "champion_decision", json.dumps(decision))
    client.log_dict(run_id, decision, "champion_decision.json")
    log.info("champion decision: %s", decision)
    return wins


def model_uri(name: str, version: int | None = None, alias: str | None = None) -> str:
    if (version is None) == (alias is None):
        raise ValueError("give exactly one of version or alias")
    return f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"


def check_model_uri(uri: str, registered_uri: str) -> None:
    """Fail with a clear message for an unknown model, version or alias (before any download)."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    name, _, rest = registered_uri.removeprefix("models:/").partition("/")
    name, _, alias = (name.partition("@") if "@" in name else (name, "", ""))
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise LookupError(f"no registered model {name!r} in {uri}; known: {', '.join(known) or 'none'}") from None
    try:
        client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, rest)
    except MlflowException:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        what = f"alias {alias!r}" if alias else f"version {rest!r}"
        raise LookupError(f"model {name!r} has no {what} in {uri}; versions: {versions}") from None


def load_registered(uri: str, registered_uri: str):
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> (model, tokenizer, base_info), ready to generate."""
    import mlflow.artifacts
    import yaml

    from lib.adapter_pyfunc import load_adapter_from_artifacts

    check_model_uri(uri, registered_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered_uri, tracking_uri=uri))
    try:
        spec = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
        artifacts = {name: str(local / entry["path"]) for name, entry in spec.items()}
    except (OSError, KeyError, TypeError) as error:
        raise FileNotFoundError(f"{registered_uri}: not a lenta-lora adapter model ({error!r} in {local})") from None
    missing = [name for name, path in artifacts.items() if not Path(path).exists()]
    if missing or not {"adapter", "base_model"} <= set(artifacts):
        raise FileNotFoundError(f"{registered_uri}: artifacts missing at {local}: {missing or ['adapter/base_model']}")
    return load_adapter_from_artifacts(artifacts)


def list_versions(uri: str, name: str | None = None) -> list[dict]:
    """Every registered version with its aliases and headline metrics, newest first."""
    client = _client(uri)
    names = [name] if name else [m.name for m in client.search_registered_models()]
    rows = []
    for model_name in names:
        aliases: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(model_name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        for v in client.search_model_versions(f"name='{model_name}'"):
            rows.append({"name": model_name, "version": int(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                         "run_id": v.run_id, "created": v.creation_timestamp, "tags": dict(v.tags)})
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))
