"""The seed recipe's profile, `configs/gpt-neo-1.3b.yaml` (the nightly deployment runs it), end to end
as written: only the cache folder and the MLflow store are set.

Kaggle and the Hub are fakes on loopback that the official clients talk to: the Kaggle dataset the
profile names serves the bundled sample (the `fake_kaggle` fixture), and `EleutherAI/gpt-neo-1.3B` is
a small GPT-Neo with random weights and a byte-level BPE without a pad token, as GPT-Neo's own
tokenizer has none. So every stage runs as the profile configures it: download, 512 tokens padded
(no packing), int8 through bitsandbytes, batch 1 x grad-accum 8 for one epoch, 32 samples of 64
tokens, registration. The numbers are those of random weights: this checks that the recipe runs,
not how well.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bench.flow_rss import save_gpt_neo
from lib.config import load_config
from tests.support.family_models import build_tokenizer, sample_texts
from tests.support.harness import run_flow
from tests.support.hf_hub_server import running_hf_hub

pytestmark = pytest.mark.slow

PROFILE = "configs/gpt-neo-1.3b.yaml"
SAMPLES = "samples/samples_table.json"  # MLflow table: {"columns": [...], "data": [[...], ...]}


def gpt_neo_without_pad(folder):
    """A 2-layer GPT-Neo (the 1.3B's class, attention pattern and context) with GPT-2's kind of BPE:
    <|endoftext|> for BOS and EOS, no pad token (tests/support/family_models.py)."""
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer("gpt2", sample_texts())
    save_gpt_neo(folder, tokenizer, hidden=64, layers=2, vocab=len(tokenizer), heads=2, window=256)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    return folder


def test_the_seed_profile_runs_end_to_end_as_written(prefect_server, fake_kaggle, new_store, tmp_path):
    seed = load_config(PROFILE)
    uri = new_store(tmp_path / "mlruns" / "mlflow.db")
    base = gpt_neo_without_pad(tmp_path / "base")
    command = [sys.executable, "-m", "flows.cli", "run", "--config", PROFILE]
    command += [f"--set=data.cache_dir={tmp_path / 'cache'}", f"--set=tracking.uri={uri}"]
    with running_hf_hub(tmp_path / "hub") as hub:  # the child inherits fake_kaggle's variables
        commit = hub.publish(seed.model.name, base)
        shutil.rmtree(base)  # the weights exist only on the Hub now
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        code = run_flow(command, tmp_path / "run.log", tracking_uri=uri, **env)
        assert code == 0, (tmp_path / "run.log").read_text()[-4000:]
        assert fake_kaggle.downloaded_versions == [1]
        assert hub.seen("GET", f"/resolve/{commit}/model.safetensors") == 1

    client = MlflowClient(uri, uri)
    [version] = client.search_model_versions(f"name = '{seed.registry.model_name}'")
    assert version.tags["base_model"] == seed.model.name and version.tags["base_identity"] == commit
    assert client.get_model_version_by_alias(seed.registry.model_name, "champion").version == version.version
    run = client.get_run(version.run_id)
    params, metrics = run.data.params, run.data.metrics
    expected = {"model.precision": "int8", "data.packing": "False", "train.max_length": "512"}
    expected |= {"train.batch_size": "1", "train.grad_accum": "8", "lora.r": "8", "lora.dropout": "0.1"}
    assert {k: params[k] for k in expected} == expected
    splits = {d.dataset.name: json.loads(d.dataset.profile) for d in run.inputs.dataset_inputs}
    train = splits["lenta-train"]
    assert train["blocks"] == train["documents"] > 100 and train["padding_tokens"] > 0  # one padded text each
    assert metrics["train_steps"] == math.ceil(train["blocks"] / 8)  # one epoch of 8-text steps
    assert all(math.isfinite(metrics[k]) for k in ("test_bits_per_byte", "base_test_bits_per_byte"))
    samples = json.loads(Path(client.download_artifacts(run.info.run_id, SAMPLES, str(tmp_path))).read_text())
    assert len(samples["data"]) == min(seed.eval.num_samples, splits["lenta-test"]["articles"]), samples["columns"]
