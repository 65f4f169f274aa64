"""A base from the Hugging Face Hub, as the default profile uses (`EleutherAI/gpt-neo-1.3B`), through
the real huggingface_hub client and transformers, from a fake Hub on loopback (tests/support/
hf_hub_server.py) that serves the tiny base as a model repo.

A run pins the branch it was given (`main`) to the commit it names at the start: tokenizer,
training, evaluation and the registered identity all use that commit, even when the branch moves
in the middle of the run. The next scheduled run sees the new commit and trains again; the one
after it is up to date; and the first version still loads the commit it was trained on. With the
Hub gone, a run resolves the branch from the local cache, and a version loads (and merges) from it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.support.artifacts import stored_texts
from tests.support.env import ROOT, child_env
from tests.support.harness import flow_command, run_flow
from tests.support.hf_hub_server import running_hf_hub
from tests.support.training import prepare_for, tiny

pytestmark = pytest.mark.slow

REPO = "lenta-test/tiny-neo"
TOKEN = "hf_lentaLoraTestToken0123456789abcdef"  # HF_TOKEN: sent to the Hub, stored nowhere
NAME = "test-adapter"  # tiny_overrides' registry.model_name


def repo_commits(shared_cache, tmp_path):
    """The tiny base as two commits of a hub repo: as built, and with every weight moved a little."""
    import torch
    from safetensors.torch import load_file, save_file

    first, second = tmp_path / "commit-1", tmp_path / "commit-2"
    shutil.copytree(prepare_for(tiny(shared_cache)).base, first)
    (first / "lenta_lora_recipe.json").unlink()  # what marks the local tiny build: a hub repo has none
    shutil.copytree(first, second)
    weights = load_file(second / "model.safetensors")
    torch.manual_seed(1)
    moved = {k: (v + 0.05 * torch.randn_like(v)).contiguous() for k, v in weights.items()}
    save_file(moved, str(second / "model.safetensors"), metadata={"format": "pt"})
    return first, second


def weights_fetched(hub, since: int = 0) -> set[str]:
    """The commits whose model.safetensors was downloaded (GET) after request number `since`."""
    return {
        path.split("/resolve/")[1].split("/")[0]
        for method, path in hub.requests[since:]
        if method == "GET" and path.endswith("/model.safetensors")
    }


def log_of(tmp_path, run: int) -> str:
    return (tmp_path / f"run-{run}.log").read_text()[-3000:]


def cli(uri: str, env: dict[str, str], *args: str) -> str:
    """`lenta-lora ARGS` in a fresh process with `env` (its HF settings); its output."""
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env=child_env(tracking_uri=uri, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def generate(uri: str, env: dict[str, str], *which: str) -> str:
    """`lenta-lora generate` for a version of NAME; its output."""
    return cli(uri, env, "generate", "--model", NAME, *which, "Заголовок")


def test_a_hub_base_is_pinned_to_one_commit_per_run_and_a_moved_branch_trains_again(
    prefect_server, shared_cache, tmp_path
):
    import torch
    from safetensors.torch import load_file

    first, second = repo_commits(shared_cache, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = flow_command(tmp_path / "cache", **{"model.name": REPO, "model.revision": "main"})
    with running_hf_hub(tmp_path / "hub") as hub:
        hf = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        hf |= {"HF_TOKEN": TOKEN}
        commit_a = hub.publish(REPO, first)
        # The branch moves once training has downloaded the weights: evaluation and registration come after.
        hub.publish_after_download(REPO, "model.safetensors", second)
        assert run_flow(command, tmp_path / "run-1.log", tracking_uri=uri, **hf) == 0, log_of(tmp_path, 1)
        commit_a, commit_b = hub.commits(REPO)  # the move happened during the run
        assert weights_fetched(hub) == {commit_a}  # evaluation used the commit training used, not the new main

        client = MlflowClient(uri, uri)
        one = client.get_model_version(NAME, "1")
        assert one.tags["base_identity"] == commit_a and one.tags["base_revision"] == commit_a
        run = client.get_run(one.run_id)
        assert run.data.params["model.revision"] == commit_a  # the run's params say what it trained on
        payload = json.loads(
            Path(client.download_artifacts(one.run_id, "training_key.json", str(tmp_path))).read_text()
        )
        assert payload["base"] == {"kind": "hub", "name": REPO, "commit": commit_a, "resolved": True}

        # The next scheduled run: main is commit B now, so the key differs and it trains on B.
        before = len(hub.requests)
        assert run_flow(command, tmp_path / "run-2.log", tracking_uri=uri, **hf) == 0, log_of(tmp_path, 2)
        assert weights_fetched(hub, before) == {commit_b}
        two = client.get_model_version(NAME, "2")
        assert two.tags["base_identity"] == commit_b and two.tags["training_key"] != one.tags["training_key"]

        # Nothing moved since: up to date.
        assert run_flow(command, tmp_path / "run-3.log", tracking_uri=uri, **hf) == 0
        assert "up to date: version 2 holds this" in log_of(tmp_path, 3)

        # Version 1 still loads commit A, in a fresh process with an empty Hugging Face cache.
        before = len(hub.requests)
        generate(uri, {**hf, "HF_HOME": str(tmp_path / "hf-user")}, "--version", "1")
        assert weights_fetched(hub, before) == {commit_a}
    # The Hub gone (a GPU box without internet): the same command resolves main from the cache.
    # Not told it is offline (the nightly after a network outage): the Hub refuses connections.
    assert run_flow(command, tmp_path / "run-4.log", tracking_uri=uri, **hf) == 0, log_of(tmp_path, 4)
    assert "up to date: version 2 holds this" in log_of(tmp_path, 4)
    offline = {**hf, "HF_HUB_OFFLINE": "1"}  # ... and told so
    assert run_flow(command, tmp_path / "run-5.log", tracking_uri=uri, **offline) == 0, log_of(tmp_path, 5)
    assert "up to date: version 2 holds this" in log_of(tmp_path, 5)
    # ... and a registered version loads from that cache by its pinned commit.
    assert generate(uri, offline, "--alias", "champion").startswith("Заголовок")
    # ... and `export --merged` of version 1 merges into commit A from that cache, though main is B there.
    cli(uri, offline, "export", "--model", NAME, "--version", "1", "--out", str(tmp_path / "merged"), "--merged")
    merged, untouched = load_file(tmp_path / "merged" / "model.safetensors"), "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(merged[untouched], load_file(first / "model.safetensors")[untouched])  # no LoRA there
    assert not torch.equal(merged[untouched], load_file(second / "model.safetensors")[untouched])
    assert commit_a in (tmp_path / "merged" / "README.md").read_text()
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")) == ["1", "2"]
    assert hub.authorizations == {f"Bearer {TOKEN}"}  # the client sent the token ...
    runs = [r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    texts = [(p.name, p.read_text(errors="replace")) for p in tmp_path.glob("run-*.log")]  # the terminal
    texts += stored_texts(client, runs, tmp_path / "artifacts")
    assert any("MLmodel" in where for where, _ in texts) and any(commit_a in text for _, text in texts)  # searched
    assert not [where for where, text in texts if TOKEN in text]  # ... and nothing kept it
