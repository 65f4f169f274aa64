"""Helpers for the reliability tests: run the CLI in a child process (optionally told to die at a
fault point, see lib/faults.py), and check that what a crash left behind is consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from tests.conftest import tiny_overrides
from tests.support import warm
from tests.support.env import ROOT, child_env


def flow_command(cache: str | Path, **extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--config",
        "configs/demo.yaml",
        *(f"--set={o}" for o in tiny_overrides(str(cache), **extra)),
    ]


def run_flow(command: list[str], log: Path, fault: str | None = None, timeout: float = 600, **env) -> int:
    """Run the flow to its end (or its death); its output goes to `log`. Returns the exit code."""
    with log.open("w") as out:
        done = warm.run(
            command,
            cwd=ROOT,
            env=child_env(fault, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            start_new_session=True,
        )
    return done.returncode


def all_runs(client: MlflowClient) -> list:
    """Every flow run's MLflow run, oldest first (not the runs that hold registered models' benchmarks)."""
    experiments = [e.experiment_id for e in client.search_experiments() if not e.name.endswith("-benchmarks")]
    return client.search_runs(experiments, order_by=["attributes.start_time ASC"]) if experiments else []


def assert_versions_have_their_files(client: MlflowClient) -> list:
    """Every registry version's model folder exists with its MLmodel and the adapter weights."""
    versions = client.search_model_versions("")
    for version in versions:
        folder = Path(client.get_model_version_download_uri(version.name, version.version).removeprefix("file://"))
        assert (folder / "MLmodel").is_file(), f"version {version.name}/{version.version}: no {folder}/MLmodel"
        weights = list(folder.rglob("adapter_model.safetensors"))
        assert weights, f"version {version.name}/{version.version}: no adapter weights under {folder}"
    return versions


def assert_cache_consistent(cache: Path) -> dict:
    """Every published cache entry is complete; half-written ones exist only as `.tmp-*` folders."""
    from lib import checkpoint
    from lib.dataset import load_prepared

    found = {"datasets": [], "checkpoints": [], "leftovers": []}
    for entry in sorted((cache / "datasets").glob("*")):
        if entry.name.startswith(".tmp-"):
            found["leftovers"].append(entry)
            continue
        assert (entry / "lenta_lora_dataset.json").is_file(), f"published dataset without its info file: {entry}"
        assert len(load_prepared(entry)["train_blocks"]) > 0
        found["datasets"].append(entry)
    for step in sorted((cache / "checkpoints").glob("*/step-*")):
        for part in (checkpoint.STATE, checkpoint.TRAINER, f"{checkpoint.ADAPTER}/adapter_model.safetensors"):
            assert (step / part).is_file(), f"checkpoint {step} lacks {part}"
        found["checkpoints"].append(step)
    for record in (cache / "prefect-results").glob("*"):
        if record.is_file():
            json.loads(record.read_text())  # a torn result record would not parse
    return found
