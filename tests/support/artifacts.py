"""What a run stored in MLflow (and the Prefect artifacts a flow run made), as tests look at it."""

from __future__ import annotations

from mlflow import MlflowClient


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of the run (below `path`), as paths relative to its artifact root."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
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
