"""What a run stored in MLflow (and the Prefect artifacts a flow run made), as tests look at it."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of the run (below `path`), as paths relative to its artifact root."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def stored_texts(client: MlflowClient, run_ids: list[str], into: Path) -> list[tuple[str, str]]:
    """(where, text) for everything the runs left readable in MLflow, where a secret must never be: each
    run's params and tags and every artifact file (downloaded under `into`), and the tags, description and
    model files of each version a run registered."""
    import mlflow

    found = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        found.append((run_id, json.dumps([run.data.params, run.data.tags], ensure_ascii=False)))
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, dst_path=str(into / run_id), tracking_uri=client.tracking_uri
        )
        found += [(str(p), p.read_bytes().decode("utf-8", "replace")) for p in Path(local).rglob("*") if p.is_file()]
        for version in client.search_model_versions(f"run_id = '{run_id}'"):
            found.append((f"{version.name}/{version.version}", json.dumps([version.tags, version.description])))
            folder = Path(client.get_model_version_download_uri(version.name, version.version).removeprefix("file://"))
            found += [(str(p), p.read_bytes().decode("utf-8", "replace")) for p in folder.rglob("*") if p.is_file()]
    return found


def artifact_data(key: str) -> str:
    """The newest Prefect artifact under `key`, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    return str(found[0].data)
