"""The model registry (lib/registry.py) against real MLflow sqlite stores: a registered adapter
reproduces the trained model's logits in a fresh process, every failure is a clear one-line error,
tampered files are refused, re-registration is idempotent, and `champion` survives a stale write.

Tests marked slow share one adapter trained here with lib (a minute on 2 busy cores); the others
build what they need with MlflowClient and take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse
from uuid import uuid4

import pytest
from mlflow import MlflowClient

from lib import faults, loading, provenance, registry, tracking
from lib.adapter_pyfunc import ArtifactIntegrityError, sha256_file
from tests.support.adapter_fixtures import CHAMPION_POLICY, NAME, git_commit
from tests.support.env import run_script

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: nothing of the training process (modules, tensors, caches) is shared.
RELOAD = r"""
import json, sys, tempfile
from pathlib import Path
from urllib.parse import urlparse
import mlflow, torch
from mlflow import MlflowClient
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from lib.loading import load_registered

args = json.loads(sys.argv[1])
uri, name, ref = args["uri"], args["name"], load_file(args["reference"])
ids, expected = ref["input_ids"], ref["logits"]

def compare(model):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"dtype": str(logits.dtype), "max_abs_diff": float((logits - expected).abs().max())}

report = {}
for label, target in (("version", f"models:/{name}/1"), ("champion", f"models:/{name}@champion"),
                      ("latest", f"models:/{name}/latest")):
    model, tokenizer, base = load_registered(uri, target)
    report[label] = compare(model)
# The stored adapter is a plain PEFT folder: it loads onto the original base without our code.
source = MlflowClient(uri, uri).get_model_version_download_uri(name, "1")
local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tempfile.mkdtemp(), tracking_uri=uri))
base = AutoModelForCausalLM.from_pretrained(args["base"], dtype=torch.float32, use_safetensors=True)
report["plain_peft"] = compare(PeftModel.from_pretrained(base, local / "artifacts" / "adapter").eval())
mlflow.set_tracking_uri(uri)
pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
report["predict"] = pyfunc.predict(["Заголовок"])
short, hot = {"max_new_tokens": 12}, {"max_new_tokens": 12, "do_sample": True, "temperature": 3.0, "seed": 7}
report["params_schema"] = sorted(spec.name for spec in pyfunc.metadata.signature.params)
report["greedy"] = pyfunc.predict(["Заголовок"], params=short)
report["sampled"] = [pyfunc.predict(["Заголовок"], params=hot) for _ in range(2)]
report["nucleus"] = pyfunc.predict(["Заголовок"], params={**hot, "top_p": 1e-6})
print("RESULT " + json.dumps(report, ensure_ascii=False))
"""


@pytest.mark.slow
def test_registered_adapter_reproduces_trained_logits_in_a_fresh_process(trained, registered, tmp_path):
    assert registered["version"] == 1 and registered["champion"] is True
    args = {
        "uri": registered["tracking_uri"],
        "name": NAME,
        "reference": str(trained["reference"]),
        "base": trained["info"].base,
    }
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    report = run_script(
        RELOAD, json.dumps(args), cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": ""}
    )
    print(
        "\nmax |logits difference| vs the in-memory model:",
        {k: report[k]["max_abs_diff"] for k in ("version", "champion", "latest", "plain_peft")},
        "predict:",
        report["predict"],
    )
    for label in ("version", "champion", "latest", "plain_peft"):
        assert report[label]["dtype"] == "torch.float32", report[label]
        assert report[label]["max_abs_diff"] < 1e-4, (label, report[label])
    predictions = report["predict"]
    assert isinstance(predictions, list) and len(predictions) == 1
    assert all(isinstance(p, str) and p.strip() for p in predictions), predictions
    # `params` reach generate(): hot sampling differs from greedy (and repeats with its seed), and a
    # nucleus of ~one token (top_p 1e-6) is greedy again. MLflow drops any params its signature
    # does not declare, so the signature declares every generation setting.
    assert report["params_schema"] == ["do_sample", "max_new_tokens", "seed", "temperature", "top_p"], report
    generated = {k: report[k] for k in ("greedy", "sampled", "nucleus")}
    assert report["sampled"][0] == report["sampled"][1] != report["greedy"], generated
    assert report["nucleus"] == report["greedy"], generated
    # The loader used only the URI it was given: no default ./mlflow.db appeared in the cwd.
    assert sorted(p.name for p in cwd.iterdir()) == []


@pytest.mark.slow
def test_version_records_provenance_metrics_and_checksums(trained, registered):
    client = MlflowClient(registered["tracking_uri"], registered["tracking_uri"])
    version = client.get_model_version(NAME, "1")
    tags, fingerprint = version.tags, trained["info"].fingerprint
    assert version.run_id == registered["run_id"]
    assert tags["base_model"] == "tiny" and tags["dataset_fingerprint"] == fingerprint
    assert (
        tags["git_commit"] == git_commit() and tags["prefect.flow_run_id"] == registered["tags"]["prefect.flow_run_id"]
    )
    assert tags["champion_metric"] == "benchmark_bits_per_byte" and float(tags["champion_metric_value"]) == 3.25
    assert tags["benchmark_fingerprint"] == "f" * 64 and float(tags["benchmark_bits_per_byte"]) == 3.25
    for fact in (
        fingerprint,
        git_commit(),
        registered["tags"]["prefect.flow_run_id"],
        "benchmark_bits_per_byte 3.25",
        registered["run_id"],
        "tiny",
    ):
        assert fact in version.description, (fact, version.description)
    # Checksums: the tags equal the files that were trained and the files now in the store.
    adapter = registered["model_dir"] / "artifacts" / "adapter" / "adapter_model.safetensors"
    assert (
        tags["adapter_sha256"] == sha256_file(trained["adapter"] / "adapter_model.safetensors") == sha256_file(adapter)
    )
    assert tags["base_weights_sha256"] == sha256_file(Path(trained["info"].base) / "model.safetensors")
    meta = json.loads((registered["model_dir"] / "artifacts" / "base_model.json").read_text())
    assert meta["sha256"]["adapter"]["adapter_model.safetensors"] == tags["adapter_sha256"]
    assert tags["base_model_json_sha256"] == sha256_file(registered["model_dir"] / "artifacts" / "base_model.json")
    assert registered["sha256"]["adapter_sha256"] == tags["adapter_sha256"]


@pytest.mark.slow
def test_registering_the_same_run_again_returns_its_version(registered):
    """What a Prefect retry of the register task does after a partial success."""
    again = registry.register_adapter(*registered["register_args"], **CHAMPION_POLICY)
    client = MlflowClient(registered["tracking_uri"], registered["tracking_uri"])
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert again["version"] == 1 and [str(v.version) for v in versions] == ["1"]
    assert again["champion"] is True


@pytest.mark.slow
def test_a_failed_champion_decision_leaves_no_version(trained, registered, monkeypatch):
    """Register and decide are one unit: a version whose decision failed is deleted again."""
    uri = registered["tracking_uri"]
    client = MlflowClient(uri, uri)
    run_id = tracking.start_run(uri, "registry-test", "atomic", {}, {}, "")
    monkeypatch.setenv("LENTA_LORA_FAULT", "register.after-version:raise")
    with pytest.raises(faults.InjectedFault):  # would have been champion: 1.0 beats 3.25 by far
        registry.register_adapter(
            uri,
            run_id,
            trained["adapter"],
            registered["base"],
            {},
            NAME,
            {},
            {"benchmark_bits_per_byte": 1.0},
            **CHAMPION_POLICY,
        )
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert logged_model_states(client, run_id) == ["FAILED"]  # its version is gone: not left READY
    tracking.finish_run(uri, run_id, "FAILED")


@pytest.mark.slow
def test_a_registration_failed_before_its_version_leaves_its_logged_model_failed(trained, registered, monkeypatch):
    """A task retry logs the model again: the failed attempt's logged model is FAILED, not READY with
    no version; the retry's is READY and its version names it."""
    uri = registered["tracking_uri"]
    client = MlflowClient(uri, uri)
    run_id = tracking.start_run(uri, "registry-test", "failed-before-version", {}, {}, "")
    args = (uri, run_id, trained["adapter"], registered["base"], {}, NAME, {}, {"benchmark_bits_per_byte": 9.0})
    monkeypatch.setenv("LENTA_LORA_FAULT", "register.after-artifacts:raise")
    with pytest.raises(faults.InjectedFault):
        registry.register_adapter(*args, **CHAMPION_POLICY)
    assert logged_model_states(client, run_id) == ["FAILED"]
    assert client.search_model_versions(f"run_id = '{run_id}'") == []
    monkeypatch.delenv("LENTA_LORA_FAULT")
    retried = registry.register_adapter(*args, **CHAMPION_POLICY)
    assert logged_model_states(client, run_id) == ["FAILED", "READY"]
    version = client.get_model_version(NAME, str(retried["version"]))
    [ready] = [m for m in logged_models(client, run_id) if str(m.status) == "READY"]
    assert version.tags["logged_model_id"] == ready.model_id and not retried["champion"]  # 9.0 loses to 3.25
    registry.retract_versions(uri, [run_id], "test cleanup: a version that other tests must not see")
    tracking.finish_run(uri, run_id, "FAILED")


def logged_models(client: MlflowClient, run_id: str) -> list:
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    return sorted(found, key=lambda m: m.creation_timestamp)


def logged_model_states(client: MlflowClient, run_id: str) -> list[str]:
    return [str(m.status) for m in logged_models(client, run_id)]


@pytest.mark.slow
def test_deleted_artifacts_are_a_clear_file_not_found(registered):
    model_dir = registered["model_dir"]
    moved = model_dir.with_name("moved-away")
    model_dir.rename(moved)
    try:
        with pytest.raises(FileNotFoundError, match=rf"models:/{NAME}/1 \(version 1 .*not in the artifact store"):
            loading.load_registered(registered["tracking_uri"], f"models:/{NAME}/1")
    finally:
        moved.rename(model_dir)
    adapter = model_dir / "artifacts" / "adapter" / "adapter_config.json"
    saved = adapter.read_bytes()
    adapter.unlink()  # one file lost
    try:
        with pytest.raises(FileNotFoundError, match=r"\['adapter_config\.json'\] recorded at registration are missing"):
            loading.load_registered(registered["tracking_uri"], f"models:/{NAME}/1")
    finally:
        adapter.write_bytes(saved)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the quick tests (creating one costs seconds); each test uses its own model name."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('quick') / 'mlflow.db'}"
    return uri, MlflowClient(uri, uri)


def model_with_versions(client: MlflowClient, values: dict[str, float | None]) -> str:
    """A new registered model with one (file-less) version per key; returns its name."""
    name = f"m-{uuid4().hex[:8]}"
    client.create_registered_model(name)
    for key in values:
        client.create_model_version(name, f"file:///nonexistent/{key}", tags={"key": key})
    return name


def test_unknown_model_version_and_alias_are_one_line_lookup_errors(store):
    uri, client = store
    name = model_with_versions(client, {"a": 2.0, "b": 1.0})
    cases = {
        "models:/nope/1": rf"no registered model 'nope' in sqlite:.*known: .*{name}",
        f"models:/{name}/7": rf"model '{name}' has no version '7' in sqlite:.*versions: \[1, 2\]",
        f"models:/{name}/abc": rf"model '{name}' has no version 'abc'",
        f"models:/{name}@gold": rf"model '{name}' has no alias 'gold' in sqlite:",
    }
    for target, message in cases.items():
        with pytest.raises(LookupError, match=message) as caught:
            loading.load_registered(uri, target)
        assert "\n" not in str(caught.value)
    for bad in (f"models:/{name}", "runs:/abc/model", f"{name}/1"):
        with pytest.raises(ValueError, match="models:/NAME/VERSION"):
            loading.load_registered(uri, bad)
    # `latest` is the newest version (MLflow reserves the alias name, the URI form works).
    assert str(loading.resolve_version(client, uri, f"models:/{name}/latest").version) == "2"


def test_version_whose_files_are_gone_is_a_file_not_found(store):
    uri, client = store
    name = model_with_versions(client, {"a": 1.0})
    with pytest.raises(
        FileNotFoundError,
        match=rf"models:/{name}/1 \(version 1 of '{name}', run None\): its files "
        r"are not in the artifact store at file:///nonexistent/a",
    ):
        loading.load_registered(uri, f"models:/{name}/1")


def test_pickle_weights_are_never_registered(store, tmp_path):
    uri, client = store
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"{}")
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    run_id = tracking.start_run(uri, "pickles", "r", {}, {}, "")
    with pytest.raises(ArtifactIntegrityError, match=r"pickle weight files \['adapter_model\.bin'\]"):
        registry.register_adapter(
            uri,
            run_id,
            adapter,
            {"kind": "hub", "name": "x"},
            {},
            "pickled",
            {},
            {"benchmark_bits_per_byte": 1.0},
            **CHAMPION_POLICY,
        )
    assert client.search_model_versions("name = 'pickled'") == []


def test_listing_reads_past_the_first_page_of_registered_models(tmp_path, new_store):
    """MLflow's searches return 100 at a time; the 101st model's version must still be listed."""
    uri = new_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, uri)
    for i in range(101):
        client.create_registered_model(f"m{i:03d}")
    client.create_model_version("m100", "file:///nonexistent/m100")
    assert [(row["name"], row["version"]) for row in registry.list_versions(uri)] == [("m100", 1)]


@pytest.mark.slow
def test_loading_a_version_prints_nothing_unless_verbose(registered, tmp_path):
    """No download bars, weight-loading bars or third-party notices around a loaded version."""
    code = (
        "import sys; from lib.loading import load_registered; "
        "load_registered(sys.argv[1], sys.argv[2]); print('loaded')"
    )
    printed = {}
    # As a user's own process: none of the settings the CLI (run in-process by other tests) puts in
    # this process's environment.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}
    for verbose in ("0", "1"):
        done = subprocess.run(
            [sys.executable, "-c", code, registered["tracking_uri"], f"models:/{NAME}/1"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**env, "PYTHONPATH": str(ROOT), "LENTA_LORA_VERBOSE": verbose},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        printed[verbose] = done.stdout + done.stderr
    assert printed["0"] == "loaded\n"
    assert "Downloading artifacts" in printed["1"]  # asked for: shown


@pytest.mark.slow
def test_a_version_requirements_name_public_versions(registered, tmp_path):
    """What `pip install -r requirements.txt` of a version needs: exact pins of released versions
    (no local build tag such as `+cpu`), and bitsandbytes where the base is quantized."""
    from packaging.requirements import Requirement

    lines = (registered["model_dir"] / "requirements.txt").read_text().split()
    pins = {Requirement(line).name: str(Requirement(line).specifier) for line in lines}
    assert {"mlflow", "torch", "transformers", "peft", "safetensors"} <= set(pins), pins
    assert all(spec.startswith("==") and "+" not in spec for spec in pins.values()), pins
    assert "bitsandbytes" not in pins  # an fp32 base
    assert any(line.startswith("bitsandbytes==") for line in provenance.requirements("nf4"))
    # pip itself accepts the file against the configured index (PyPI plus this machine's local wheel
    # folders), for an nf4 version's list too: every pin names a version that exists there.
    nf4 = tmp_path / "nf4-requirements.txt"
    nf4.write_text("\n".join(provenance.requirements("nf4")) + "\n")
    for path in (registered["model_dir"] / "requirements.txt", nf4):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--no-deps",
                "--ignore-installed",
                "-q",
                "-r",
                str(path),
                "--report",
                str(tmp_path / "report.json"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (path.read_text(), done.stderr[-2000:])
        report = json.loads((tmp_path / "report.json").read_text())
        found = {item["metadata"]["name"].lower() for item in report["install"]}
        assert found == {Requirement(line).name.lower() for line in path.read_text().split()}, found


@pytest.mark.slow
def test_registering_loads_no_model_and_keeps_the_evaluation_example(trained, tmp_path, new_store, monkeypatch, caplog):
    """MLflow loads a pyfunc and runs `predict` on its input example unless it is given a signature
    (at 1.3B: the base loaded a second time, 5-85 s and one more copy in memory). Here the base is
    a hub id that cannot load offline: registration must still succeed, without MLflow trying."""
    import logging

    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    uri = new_store(tmp_path / "mlflow.db")
    run_id = tracking.start_run(uri, "no-load", "no-load", {}, {}, "{}\n")
    base = {"kind": "hub", "name": "no-such-org/no-such-model", "revision": "main", "precision": "fp32"}
    example = {"prompt": "Заголовок\n\n", "output": "текст, который написала модель"}
    with caplog.at_level(logging.INFO, logger="mlflow"):
        result = registry.register_adapter(
            uri,
            run_id,
            trained["adapter"],
            base,
            {"max_new_tokens": 8},
            "no-load",
            {},
            {"benchmark_bits_per_byte": 3.0},
            **CHAMPION_POLICY,
            example=example,
        )
    tracking.finish_run(uri, run_id)
    assert result["version"] == 1
    mlflow_lines = [r.getMessage() for r in caplog.records if r.name.startswith("mlflow")]
    assert not [line for line in mlflow_lines if "predict" in line.lower()], mlflow_lines
    model_dir = Path(urlparse(MlflowClient(uri, uri).get_model_version_download_uri("no-load", "1")).path)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert "string" in mlmodel["signature"]["outputs"] and "max_new_tokens" in mlmodel["signature"]["params"]
    saved = json.loads((model_dir / "serving_input_example.json").read_text())
    assert saved["inputs"] == [example["prompt"]] and saved["params"]["max_new_tokens"] == 8
    # The version carries the one generation function it runs (MLflow code_paths).
    stored = model_dir / "code" / "lenta_lora_runtime"
    for name in ("generation.py", "progress.py"):
        assert (stored / name).read_bytes() == (ROOT / "lib" / name).read_bytes()
