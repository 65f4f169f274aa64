"""What a run stored in MLflow, as tests look at it."""

from __future__ import annotations

from mlflow import MlflowClient


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of the run (below `path`), as paths relative to its artifact root."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found
