"""One tiny adapter trained with lib and registered as version 1 of NAME, shared by the registry
tests and the reliability tests that tamper with it or prompt it (session-scoped: training and
registering cost seconds). A test that changes a stored file puts it back before it ends.
The fixtures `trained` and `registered` are registered for every test by tests/conftest.py (so
what they need is imported when one is used, not when the session starts).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlparse
from uuid import uuid4

import pytest

from tests.conftest import tiny_overrides
from tests.support.training import prepare_for

ROOT = Path(__file__).resolve().parents[2]
NAME = "registry-test"
PROMPT = "Учёные нашли новый вид бабочек в горах Алтая"
# How these tests register: the default champion metric, on a benchmark named by a made-up fingerprint.
CHAMPION_POLICY = {
    "champion_metric": "benchmark_bits_per_byte",
    "benchmark_fingerprint": "f" * 64,
    "min_improvement": 0.002,
}


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="session")
def trained(shared_cache, tmp_path_factory):
    """A tiny adapter trained with lib directly, its reference logits, and the inputs it was made from."""
    import torch
    from safetensors.torch import save_file

    from flows.cli import DEFAULT_PROFILE
    from lib import training
    from lib.config import load_config

    config = load_config(DEFAULT_PROFILE, tiny_overrides(shared_cache))
    info = prepare_for(config)
    model, tokenizer, _ = training.train_model(info.path, config)
    assert not model.training  # eval mode: LoRA dropout off, so logits are deterministic
    out = tmp_path_factory.mktemp("trained")
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :32]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, str(out / "reference.safetensors"))
    adapter = training.save_adapter(model, tokenizer, out)
    return {"config": config, "info": info, "adapter": adapter, "reference": out / "reference.safetensors"}


@pytest.fixture(scope="session")
def registered(trained, tmp_path_factory):
    """The trained adapter registered as version 1 of NAME in a session-wide sqlite store."""
    from mlflow import MlflowClient

    from lib import registry, tracking
    from lib.base_identity import describe_base

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    config, info = trained["config"], trained["info"]
    tags = {
        "base_model": config.model.name,
        "dataset_fingerprint": info.fingerprint,
        "git_commit": git_commit(),
        "prefect.flow_run_id": str(uuid4()),
    }
    run_id = tracking.start_run(uri, "registry-test", "registry", {"lora.r": config.lora.r}, tags, "{}\n")
    metrics = {"test_bits_per_byte": 3.25, "test_perplexity": 40.5, "benchmark_bits_per_byte": 3.25}
    base = describe_base(info.base, config.model)
    result = registry.register_adapter(
        uri, run_id, trained["adapter"], base, {"max_new_tokens": 8}, NAME, tags, metrics, **CHAMPION_POLICY
    )
    tracking.finish_run(uri, run_id)
    client = MlflowClient(uri, uri)
    model_dir = Path(urlparse(client.get_model_version_download_uri(NAME, "1")).path)
    return {
        **result,
        "tracking_uri": uri,
        "run_id": run_id,
        "tags": tags,
        "base": base,
        "model_dir": model_dir,
        "register_args": (uri, run_id, trained["adapter"], base, {"max_new_tokens": 8}, NAME, tags, metrics),
    }


def flip_last_byte(path: Path) -> bytes:
    """Change one weight byte (the header stays valid, so only a checksum can tell); return the original."""
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    return original
