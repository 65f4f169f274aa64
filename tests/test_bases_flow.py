"""The whole `finetune` flow on tiny random GPT-2, Llama and Qwen2 bases built offline
(tests/support/family_models.py), given as `model.name=<folder>`: train, evaluate, register, and load the
version in a fresh process with the trained model's logits. `lora.target_modules: auto` resolves
per architecture and the run and version record the resolved list.

One fresh interpreter loads the three versions in turn and makes on each the check each family's own
child made before (a child costs about 10 s of CPU in imports alone)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib import training
from lib.config import load_config
from tests.conftest import tiny_overrides
from tests.support.adapter_fixtures import PROMPT
from tests.support.env import run_script
from tests.support.family_models import FAMILIES, build_family
from tests.support.training import prepare_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"gpt2": "c_attn", "llama": "q_proj,v_proj", "qwen2": "q_proj,v_proj"}  # PEFT's defaults

RELOAD = r"""
import json, sys
import torch
from safetensors.torch import load_file
from lib.generation import generate_continuations
from lib.loading import load_registered

reports = {}
for family, args in json.loads(sys.argv[1]).items():
    ref = load_file(args["reference"])
    model, tokenizer, base = load_registered(args["uri"], args["target"])
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    text = generate_continuations(model, tokenizer, ["Сборная"], max_new_tokens=4)
    reports[family] = {"dtype": str(logits.dtype), "diff": float((logits - ref["logits"]).abs().max()),
                       "kind": base["kind"], "name": base["name"], "text": text}
print("RESULT " + json.dumps(reports))
"""


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {family: build_family(family, root / family) for family in FAMILIES}


def train_and_register(family: str, bases: dict, shared_cache: str, tracking_uri: str, tmp_path: Path) -> dict:
    """The flow on `family`'s base, checked; the trained model's logits on PROMPT kept for the reload."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from flows.finetune import finetune

    name = f"family-{family}"
    config = load_config(
        DEFAULT_PROFILE,
        tiny_overrides(
            shared_cache,
            **{"model.name": str(bases[family]), "lora.target_modules": "auto", "registry.model_name": name},
        ),
    )
    summary = finetune(config=config)
    client = MlflowClient(tracking_uri)
    version = client.get_model_version(name, "1")
    assert f"targets={TARGETS[family]} " in version.tags["lora"], version.tags["lora"]
    assert client.get_run(summary["run_id"]).data.tags["lora_target_modules"] == TARGETS[family]
    assert version.tags["base_model"] == str(bases[family])
    metrics = summary["metrics"]
    info = prepare_for(config)  # the flow's, reused
    print(
        f"\n{family}: train {summary['train']['seconds']:.2f} s, test bits/byte {metrics['test_bits_per_byte']:.3f} "
        f"(base {metrics['base_test_bits_per_byte']:.3f}), tokens/char {info.stats['tokens_per_char']:.3f}"
    )
    assert 0 < metrics["test_bits_per_byte"] < 100

    # The trained model in memory: training is seeded, so it is the flow's adapter bit for bit.
    model, tokenizer, _ = training.train_model(info.path, config)
    flow_adapter = load_file(str(Path(summary["train"]["adapter_dir"]) / "adapter_model.safetensors"))
    ours = get_peft_model_state_dict(model)
    assert flow_adapter.keys() == ours.keys() and all(torch.equal(flow_adapter[k], ours[k]) for k in ours)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"][:, :32]  # with the family's own BOS, if any
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, str(tmp_path / "reference.safetensors"))

    return {"uri": tracking_uri, "target": f"models:/{name}/1", "reference": str(tmp_path / "reference.safetensors")}


def test_flow_trains_registers_and_reloads_each_family(bases, prefect_server, shared_cache, tracking_uri, tmp_path):
    jobs = {}
    for family in FAMILIES:
        (tmp_path / family).mkdir()
        jobs[family] = train_and_register(family, bases, shared_cache, tracking_uri, tmp_path / family)
    reports = run_script(
        RELOAD, json.dumps(jobs), cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600
    )
    assert reports.keys() == set(FAMILIES), reports
    for family, report in reports.items():
        print(f"\n{family}: max |logits difference| registered vs trained {report['diff']:.2e}", end="")
    for family, report in reports.items():
        assert report["kind"] == "local" and report["name"] == str(bases[family].resolve()), (family, report)
        assert report["dtype"] == "torch.float32" and report["diff"] < 1e-4, (family, report)
        assert isinstance(report["text"], list) and len(report["text"]) == 1, (family, report)
