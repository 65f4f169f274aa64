"""SIGKILL at every stage, one after another, on the same caches and MLflow store.

Each run of the chain is the CLI in a child process told to die at the next fault point
(lib/faults.py: the process SIGKILLs itself there, no cleanup runs). After each death the test
checks what a crash may leave: no published cache entry half-written, no registry version
without its files. The run after it must clean up (the dead run's MLflow run no longer RUNNING,
its registry version retracted) and get past the point. The last run, with no fault, must give
what an uninterrupted run gives: same dataset fingerprint, same number of steps, same perplexity.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib.config import load_config
from tests.conftest import tiny_overrides
from tests.support.harness import (
    all_runs,
    assert_cache_consistent,
    assert_versions_have_their_files,
    flow_command,
    run_flow,
)

pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 5  # checkpoints after steps 5 and 8
SETTINGS = {"train.max_steps": STEPS, "train.checkpoint_every": EVERY}
CHAIN = [
    "prepare.before-publish",
    "train.step-2",
    "train.step-7",
    "evaluate.after-scoring",
    "register.after-artifacts",
    "register.after-version",
    "register.after-champion",
]


@pytest.fixture
def uninterrupted(prefect_server, tmp_path):
    """The same config run once without faults, in this process, into its own cache and store."""
    from flows.finetune import finetune

    uri = f"sqlite:///{tmp_path / 'reference' / 'mlflow.db'}"
    config = load_config(
        DEFAULT_PROFILE, tiny_overrides(str(tmp_path / "reference-cache"), **SETTINGS, **{"tracking.uri": uri})
    )
    summary = finetune(config=config)
    return {
        "fingerprint": summary["dataset_fingerprint"],
        "steps": summary["train"]["steps"],
        "test_perplexity": summary["metrics"]["test_perplexity"],
    }


def check_after_kill(point: str, cache, client: MlflowClient, killed) -> None:
    """What the death at `point` must (and must not) have left."""
    found = assert_cache_consistent(cache)
    versions = assert_versions_have_their_files(client)
    steps = sorted(int(p.name.removeprefix("step-")) for p in found["checkpoints"])
    mine = [v for v in versions if v.run_id == killed.info.run_id]
    if point == "prepare.before-publish":
        assert found["datasets"] == [] and found["leftovers"], "killed before publishing: only a .tmp- folder"
    else:
        assert len(found["datasets"]) == 1
    if point == "train.step-2":
        assert steps == []  # died before the first checkpoint
    if point == "train.step-7":
        assert steps == [EVERY]
    if point in ("evaluate.after-scoring", "register.after-artifacts"):
        assert steps[-1] == STEPS and mine == []  # trained to the end; nothing registered
    if point == "register.after-artifacts":
        [logged] = client.search_logged_models(
            [killed.info.experiment_id], filter_string=f"source_run_id = '{killed.info.run_id}'"
        )
        assert (Path(logged.artifact_location.removeprefix("file://")) / "MLmodel").is_file()
    if point in ("register.after-version", "register.after-champion"):
        assert len(mine) == 1  # a version of a dead run: the next run must retract it
    if point == "register.after-champion":
        assert client.get_model_version_by_alias("test-adapter", "champion").run_id == killed.info.run_id


def test_a_kill_at_every_stage_then_a_clean_run_gives_the_uninterrupted_result(
    prefect_server, tracking_uri, uninterrupted, tmp_path
):
    cache = tmp_path / "cache"
    command, client = flow_command(cache, **SETTINGS), MlflowClient(tracking_uri, tracking_uri)
    killed_runs = []
    for point in CHAIN:
        code = run_flow(command, tmp_path / f"{point}.log", fault=point)
        log = (tmp_path / f"{point}.log").read_text()
        assert code == -9, f"{point}: expected death by SIGKILL, exit {code}\n{log[-3000:]}"
        runs = all_runs(client)
        killed = runs[-1]
        assert killed.info.status == "RUNNING"  # the kill gave it no chance to close
        # The run before this one died too; this run's start swept it (or its training resumed it).
        assert all(r.info.status != "RUNNING" for r in runs[:-1]), [(r.info.run_name, r.info.status) for r in runs]
        check_after_kill(point, cache, client, killed)
        killed_runs.append(killed.info.run_id)

    assert run_flow(command, tmp_path / "final.log") == 0, (tmp_path / "final.log").read_text()[-3000:]
    runs = {r.info.run_id: r for r in all_runs(client)}
    final = list(runs.values())[-1]
    statuses = [runs[k].info.status for k in killed_runs]
    print("\nkilled runs ended as:", dict(zip(CHAIN, statuses)))
    assert final.info.status == "FINISHED" and set(statuses) <= {"FAILED", "KILLED"}
    assert runs[killed_runs[CHAIN.index("train.step-7")]].info.status == "KILLED"  # its training was resumed
    [version] = assert_versions_have_their_files(client)  # the dead runs' versions were retracted
    assert version.run_id == final.info.run_id and "champion_decision" in version.tags  # none undecided
    assert client.get_model_version_by_alias("test-adapter", "champion").version == version.version
    # The logged models the dead runs made (after-artifacts, after-version, after-champion) are FAILED;
    # the one READY logged model is the final run's, the one its version names.
    made = client.search_logged_models([final.info.experiment_id])
    ready = [m.model_id for m in made if str(m.status) == "READY"]
    dead = sorted(str(m.status) for m in made if m.source_run_id in killed_runs)
    assert ready == [version.tags["logged_model_id"]] and dead == ["FAILED"] * 3, [
        (m.source_run_id, str(m.status)) for m in made
    ]
    found = assert_cache_consistent(cache)
    assert found["leftovers"] == [] and found["checkpoints"] == []  # cleaned up after success

    fingerprint = final.data.params["dataset.fingerprint"]
    steps = int(final.data.metrics["train_steps"])
    perplexity = final.data.metrics["test_perplexity"]
    print(
        f"fingerprint {fingerprint[:12]} vs {uninterrupted['fingerprint'][:12]}; steps {steps} vs "
        f"{uninterrupted['steps']}; test perplexity {perplexity:.6f} vs {uninterrupted['test_perplexity']:.6f}"
    )
    assert fingerprint == uninterrupted["fingerprint"] and steps == uninterrupted["steps"] == STEPS
    assert perplexity == pytest.approx(uninterrupted["test_perplexity"], rel=1e-4)
