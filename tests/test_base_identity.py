"""The base a version was trained on is pinned and checked when the version loads.

A version records its base's identity (sha256 of a local folder's weights files, or the hub commit
its revision resolved to) and the precision it actually trained in. Loading refuses a changed
folder and says plainly when the folder is gone or the revision cannot be had: one line from the
CLI, exit 2, where a moved folder used to end in a 44-line transformers traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lib import loading, registry, tracking
from lib.adapter_pyfunc import ArtifactIntegrityError, sha256_file
from lib.base_identity import describe_base, identity_label
from tests.support.adapter_fixtures import CHAMPION_POLICY, flip_last_byte

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # the shared trained adapter (tests/support/adapter_fixtures.py)


def register(uri: str, name: str, adapter: Path, base: dict) -> None:
    run_id = tracking.start_run(uri, name, name, {}, {}, "{}\n")
    registry.register_adapter(
        uri, run_id, adapter, base, {"max_new_tokens": 4}, name, {}, {"benchmark_bits_per_byte": 3.0}, **CHAMPION_POLICY
    )
    tracking.finish_run(uri, run_id)


def generate_cli(uri: str, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "generate",
            "--model",
            name,
            "--version",
            "1",
            "--tracking-uri",
            uri,
            "Заголовок",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("lenta-lora: error: "), done.stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])


@pytest.fixture
def local_base(trained, tmp_path) -> Path:
    """The tiny base as a user's own local folder (no recipe file: a plain `save_pretrained` folder)."""
    folder = tmp_path / "my-base"
    shutil.copytree(trained["info"].base, folder, ignore=shutil.ignore_patterns("lenta_lora_recipe.json"))
    return folder


def test_a_version_records_its_base_weights_and_resolved_precision(trained, local_base):
    config = trained["config"].model_copy(deep=True)
    config.model.precision = "auto"
    described = describe_base(str(local_base), config.model)
    assert described["kind"] == "local"
    # `auto` is resolved on the training machine (CPU here): a GPU must not reload it in bf16.
    assert described["precision"] == "fp32" and described["precision_requested"] == "auto"
    assert described["dtype"] == "float32"
    assert described["identity"] == {
        "kind": "files",
        "sha256": {"model.safetensors": sha256_file(local_base / "model.safetensors")},
    }
    assert identity_label(described["identity"]).startswith("sha256:")
    hub = {"kind": "hub", "name": "org/model", "commit": "0123abcd", "resolved": True}
    assert identity_label(hub) == "0123abcd"
    assert identity_label({**hub, "resolved": False}) == "0123abcd (unresolved)"


def test_a_changed_or_missing_local_base_is_one_clear_line(trained, local_base, tmp_path, new_store):
    uri, name = new_store(tmp_path / "mlflow.db"), "local-base"
    register(uri, name, trained["adapter"], describe_base(str(local_base), trained["config"].model))
    model, _, base = loading.load_registered(uri, f"models:/{name}/1")  # intact: loads
    assert base["identity"]["sha256"]["model.safetensors"] == sha256_file(local_base / "model.safetensors")
    del model

    weights = local_base / "model.safetensors"
    original = flip_last_byte(weights)  # other weights in the same folder
    with pytest.raises(ArtifactIntegrityError, match="differs from the weights this version was trained on"):
        loading.load_registered(uri, f"models:/{name}/1")
    assert_one_line_error(generate_cli(uri, name), str(local_base), "model.safetensors", "refusing to load")
    weights.write_bytes(original)

    local_base.rename(tmp_path / "moved-away")
    with pytest.raises(FileNotFoundError, match="is missing"):
        loading.load_registered(uri, f"models:/{name}/1")
    assert_one_line_error(generate_cli(uri, name), str(local_base), "is missing")


def test_a_hub_revision_that_cannot_be_had_is_one_clear_line(trained, tmp_path, new_store):
    """The version asks for the commit its revision resolved to; offline and uncached, that is a
    clear error naming the base and the commit, not transformers' traceback."""
    uri, name = new_store(tmp_path / "mlflow.db"), "hub-base"
    commit = "0" * 40
    base = {
        "kind": "hub",
        "name": "EleutherAI/gpt-neo-1.3B",
        "revision": "main",
        "precision": "fp32",
        "dtype": "float32",
        "identity": {"kind": "hub", "name": "EleutherAI/gpt-neo-1.3B", "commit": commit, "resolved": True},
    }
    register(uri, name, trained["adapter"], base)
    done = generate_cli(uri, name)
    assert_one_line_error(done, "EleutherAI/gpt-neo-1.3B", commit, "cannot be loaded")
    assert "Traceback" not in done.stderr
    meta = json.loads(json.dumps(base))
    assert meta["identity"]["commit"] == commit
