"""Loading a registered version: name it, find it, download it, verify it, load it.

    models:/NAME/VERSION   models:/NAME/latest   models:/NAME@ALIAS

`load_registered` is what the CLI's `generate`, the re-evaluation and users' own code call;
`registered_version` finds a version's facts (its training run, data and config) without loading it;
`download_registered` is the same checks without loading a model (lib/export.py). Each failure is
one error naming the version and what to do; nothing here writes to the store.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from lib.store import all_versions, not_found, require_reachable
from lib.store import client as _client

log = logging.getLogger("lenta_lora.loading")


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
        raise ValueError(
            f"{registered_uri!r} is not a registered-model URI: use models:/NAME/VERSION, "
            "models:/NAME/latest or models:/NAME@ALIAS"
        )
    return name, version, alias


def resolve_version(client, uri: str, registered_uri: str):
    """The ModelVersion a registry URI names, or LookupError naming what exists (before any download)."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(registered_uri)
    model = registered_model(client, uri, name)
    numbers = sorted(int(v.version) for v in all_versions(client, name))
    if version == "latest" and numbers:  # MLflow reserves the alias `latest`; the URI form means newest
        version = str(numbers[-1])
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as error:
        if not not_found(error):
            raise
    what = f"alias {alias!r}" if alias else f"version {version!r}"
    raise LookupError(
        f"model {name!r} has no {what} in {uri}; versions: {numbers}, aliases: "
        f"{dict(sorted(model.aliases.items())) or 'none'}"
    ) from None


def registered_model(client, uri: str, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if not not_found(error):
            raise
    known = sorted(m.name for m in client.search_registered_models())
    raise LookupError(
        f"no registered model {name!r} in {uri}; known: {', '.join(known) or 'none'} "
        "(list them with `lenta-lora models`)"
    )


def registered_version(uri: str, registered_uri: str) -> dict:
    """`models:/NAME/VERSION|latest` or `models:/NAME@ALIAS` -> the version's facts, alias resolved.

    Returns `name`, `version`, `uri` (pinned to the number, so an alias moving mid-evaluation
    changes nothing), `run_id` (the run that trained it), `dataset_fingerprint` (that run's tag)
    and `config_yaml` (that run's resolved config, or None if it logged none).
    """
    from mlflow.exceptions import MlflowException

    require_reachable(uri)
    client = _client(uri)
    found = resolve_version(client, uri, registered_uri)  # LookupError naming what exists
    config_yaml = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config_yaml = Path(client.download_artifacts(found.run_id, "config.yaml", tmp)).read_text(encoding="utf-8")
        except (OSError, MlflowException) as error:  # a run from before config.yaml was logged
            log.warning("run %s of %s has no readable config.yaml: %s", found.run_id, registered_uri, error)
    tags = client.get_run(found.run_id).data.tags
    return {
        "name": found.name,
        "version": int(found.version),
        "uri": f"models:/{found.name}/{found.version}",
        "run_id": found.run_id,
        "dataset_fingerprint": tags.get("dataset_fingerprint"),
        "config_yaml": config_yaml,
    }


def load_registered(uri: str, registered_uri: str):
    """`models:/NAME/VERSION|latest` or `models:/NAME@ALIAS` -> (model, tokenizer, base_info).

    Checks, each a one-line error naming the version: the server answers (ConnectionError), the
    model/version/alias exists (LookupError), its files are still in the artifact store
    (FileNotFoundError), they match the checksums recorded at registration (ArtifactIntegrityError),
    and the base it was trained on is the one it finds (lib/adapter_pyfunc.py: weights hash, commit).
    """
    from lib.adapter_pyfunc import ArtifactIntegrityError, load_adapter_from_artifacts, quiet_loading

    with quiet_loading():  # no download bars or third-party notices (LENTA_LORA_VERBOSE=1 shows them)
        # Loaded weights live in memory, so the download is removed once loaded: no temp dir per call.
        with tempfile.TemporaryDirectory(prefix="lenta-lora-model-", ignore_cleanup_errors=True) as tmp:
            found = download_registered(uri, registered_uri, tmp)
            try:
                return load_adapter_from_artifacts(found["artifacts"])
            except (ArtifactIntegrityError, FileNotFoundError) as error:
                raise type(error)(f"{found['where']}: {error}") from None


def download_registered(uri: str, registered_uri: str, dst: str | Path) -> dict:
    """A version's files downloaded into `dst`, without loading any model (lib/export.py copies or
    merges them). Checked as `load_registered` checks them before it loads: the server answers, the
    version exists (LookupError), its files are in the store (FileNotFoundError) and base_model.json
    is the one registered (ArtifactIntegrityError); the weights' checksums are the caller's to verify
    (lib/adapter_pyfunc.py). Returns `name`, `version`, `run_id`, `tags`, `where` (the version in
    words, for errors) and `artifacts` ({name: local path}: `adapter`, `base_model`, `base_weights`).
    """
    from lib.adapter_pyfunc import ArtifactIntegrityError, sha256_file

    require_reachable(uri)
    client = _client(uri)
    found = resolve_version(client, uri, registered_uri)
    where = f"{registered_uri} (version {found.version} of {found.name!r}, run {found.run_id})"
    artifacts = _download_model(client.get_model_version_download_uri(found.name, found.version), str(dst), uri, where)
    expected = found.tags.get("base_model_json_sha256")
    if expected and sha256_file(artifacts["base_model"]) != expected:
        raise ArtifactIntegrityError(
            f"{where}: base_model.json (which lists the checksums of the weights) differs "
            "from the one registered (tag base_model_json_sha256); refusing to load: "
            "restore the artifacts or register the adapter again"
        )
    return {
        "name": found.name,
        "version": int(found.version),
        "run_id": found.run_id,
        "tags": dict(found.tags),
        "where": where,
        "artifacts": artifacts,
    }


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
        raise FileNotFoundError(
            f"{where}: its files are not in the artifact store at {source} ({reason}); "
            "they were deleted or moved: register the adapter again or load another version"
        ) from None
    missing = sorted({"adapter", "base_model"} - set(artifacts))
    if missing:
        raise FileNotFoundError(f"{where}: not a lenta-lora adapter model (no {missing} in {source})")
    return artifacts
