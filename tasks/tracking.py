"""Open and close the flow's MLflow run (registry/tracking calls retried: they cross a network)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from prefect import task
from prefect.artifacts import create_link_artifact

from lib import registry, reports, tracking
from lib.config import PipelineConfig, flatten_config


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent.parent
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_state() -> dict[str, str]:
    """The commit, and whether tracked files differed from it (then the commit alone does not say what ran)."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {"git_commit": "unknown"}
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": "unknown" if changed is None else str(bool(changed)).lower()}


def provenance_tags() -> dict[str, str]:
    """Tags that link the MLflow run and registry version back to the Prefect run and the code."""
    from prefect.runtime import flow_run

    return {
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        **_git_state(),
        **tracking.owner_tags(),
    }


@task(retries=2, retry_delay_seconds=[2, 10])
def start_run(config: PipelineConfig, uri: str, tags: dict[str, str]) -> str:
    """Create the run that every later task logs into; returns its id."""
    config_yaml = yaml.safe_dump(config.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
    name = f"{config.registry.model_name}-{tags.get('prefect.flow_run_name', 'local')}"
    run_id = tracking.start_run(uri, config.tracking.experiment, name, flatten_config(config), tags, config_yaml)
    sweep_stale_runs(uri, run_id)
    link = reports.run_link(uri, run_id)
    create_link_artifact(
        key="mlflow-run",
        link=link["url"],
        link_text=f"MLflow run {run_id}",
        description=f"Start the UI first: `{link['command']}`" if link["command"] else "MLflow run",
    )
    return run_id


@task(retries=2, retry_delay_seconds=[2, 10])
def finish_run(uri: str, run_id: str, status: str) -> None:
    """Close this run (a failed one loses any registry version it made), then sweep crashed runs."""
    if status != "FINISHED":  # first: if this fails too, the run stays RUNNING and the next sweep retracts
        registry.retract_versions(uri, [run_id], f"run {run_id} ended {status}")
    tracking.finish_run(uri, run_id, status)
    sweep_stale_runs(uri, run_id)


def sweep_stale_runs(uri: str, run_id: str) -> list[str]:
    """Runs left RUNNING by a process that died on this host -> FAILED, their registry versions deleted.

    At a run's start and at its end: a crash is cleaned up by whichever run comes next.
    """
    swept = tracking.mark_stale_runs(uri, run_id)
    registry.retract_versions(uri, swept, f"run(s) {', '.join(swept)} died before closing")
    return swept
