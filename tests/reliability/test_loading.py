"""Loading is safe by default: code that ships with a model never runs unless the profile says
`model.trust_remote_code: true`; base weights load from safetensors only (a pickle is refused
unless `model.use_safetensors: false`); a registered version whose files changed since it was
registered (sha256 recorded in the registry) is refused by both loaders.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from lib import loading
from lib.adapter_pyfunc import ArtifactIntegrityError
from lib.base_model import load_base_model, load_tokenizer
from lib.config import ModelConfig
from tests.support.adapter_fixtures import NAME, flip_last_byte

pytestmark = pytest.mark.slow

# A model folder whose config names its own Python code: importing that code leaves a marker file.
EVIL_CONFIG = """
from pathlib import Path
from transformers import PretrainedConfig
Path(MARKER).write_text("yes")
class EvilConfig(PretrainedConfig):
    model_type = "evil-neo"
"""


def test_code_shipped_with_a_model_runs_only_when_the_profile_allows_it(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "CODE_RAN"  # transformers imports a copy of the code from its modules cache
    (folder / "configuration_evil.py").write_text(EVIL_CONFIG.replace("MARKER", repr(str(marker))))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil-neo",
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "configuration_evil.EvilConfig",
                },
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["configuration_evil.EvilConfig", None]}})
    )
    for load in (load_base_model, load_tokenizer):
        with pytest.raises(ValueError, match="trust_remote_code"):
            load(str(folder), ModelConfig(name=str(folder), precision="fp32"))
    assert not marker.exists()  # refused before importing anything
    try:  # allowed: the code runs (what this fake "model" then builds does not matter)
        load_base_model(str(folder), ModelConfig(name=str(folder), precision="fp32", trust_remote_code=True))
    except Exception:  # noqa: BLE001
        pass
    assert marker.exists()  # the switch is wired: with it, the shipped code did run


def test_pickled_base_weights_are_refused_unless_the_profile_allows_them(tmp_path):
    config = GPTNeoConfig(
        vocab_size=64,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        attention_types=[[["global"], 1]],
        max_position_embeddings=32,
    )
    config.save_pretrained(tmp_path / "pickled")  # transformers 5 writes only safetensors: pickle by hand
    torch.save(GPTNeoForCausalLM(config).state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_base_model(str(tmp_path / "pickled"), ModelConfig(name="x", precision="fp32"))
    model = load_base_model(str(tmp_path / "pickled"), ModelConfig(name="x", precision="fp32", use_safetensors=False))
    assert isinstance(model, GPTNeoForCausalLM) and model.dtype == torch.float32


@pytest.mark.slow
def test_tampered_adapter_weights_are_refused_by_both_loaders(registered):
    import mlflow.pyfunc

    uri = registered["tracking_uri"]
    weights = registered["model_dir"] / "artifacts" / "adapter" / "adapter_model.safetensors"
    original = flip_last_byte(weights)
    try:
        with pytest.raises(ArtifactIntegrityError, match=rf"models:/{NAME}/1 .*adapter_model\.safetensors: sha256"):
            loading.load_registered(uri, f"models:/{NAME}/1")
        mlflow.set_tracking_uri(uri)
        with pytest.raises(Exception, match=r"adapter_model\.safetensors: sha256 .* differs"):
            mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    finally:
        weights.write_bytes(original)
    loading.load_registered(uri, f"models:/{NAME}/1")  # restored: loads again


@pytest.mark.slow
def test_tampered_base_weights_and_extra_pickles_are_refused(registered):
    uri, model_dir = registered["tracking_uri"], registered["model_dir"]
    base_weights = next((model_dir / "artifacts").glob("tiny-gpt-neo-*/model.safetensors"))
    original = flip_last_byte(base_weights)
    try:
        with pytest.raises(ArtifactIntegrityError, match=r"model\.safetensors: sha256 .* differs"):
            loading.load_registered(uri, f"models:/{NAME}@champion")
    finally:
        base_weights.write_bytes(original)
    # A pickle dropped next to the adapter is never loaded (PEFT would fall back to it).
    pickle = model_dir / "artifacts" / "adapter" / "adapter_model.bin"
    pickle.write_bytes(b"not a checkpoint")
    try:
        with pytest.raises(ArtifactIntegrityError, match=r"unexpected files \['adapter_model\.bin'\]"):
            loading.load_registered(uri, f"models:/{NAME}/1")
    finally:
        pickle.unlink()


@pytest.mark.slow
def test_rewritten_checksum_list_is_caught_by_the_registry_tag(registered):
    """Whoever can change the weights can change base_model.json too; the registry tag still differs."""
    meta = registered["model_dir"] / "artifacts" / "base_model.json"
    original = meta.read_text()
    meta.write_text(original.replace('"max_new_tokens": 8', '"max_new_tokens": 9'))
    try:
        with pytest.raises(ArtifactIntegrityError, match=rf"models:/{NAME}/1 .*base_model\.json .*differs"):
            loading.load_registered(registered["tracking_uri"], f"models:/{NAME}/1")
    finally:
        meta.write_text(original)
