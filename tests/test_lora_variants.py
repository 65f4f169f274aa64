"""Every LoRA variant the config offers (DoRA, rsLoRA, Gaussian / orthogonal / PiSSA / OLoRA init,
LoRA+) trains on the tiny GPT-Neo, registers, and loads back by version in a fresh process with the
trained model's logits (|difference| < 1e-4, fp32). PiSSA and OLoRA rewrite the base weights at
init: their adapter must be saved converted (a plain LoRA of rank 2r on the untouched base).

One fresh interpreter loads the seven versions in turn, each from its own store, and makes on each
the check each variant's own child made before (a child costs about 10 s of CPU in imports alone).
The comparisons of all seven are printed before any is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flows.cli import DEFAULT_PROFILE
from lib import registry, tracking, training
from lib.base_identity import describe_base
from lib.config import load_config
from tests.conftest import tiny_overrides
from tests.support.adapter_fixtures import CHAMPION_POLICY, PROMPT
from tests.support.env import run_script
from tests.support.training import prepare_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "dora": {"lora.use_dora": True},
    "rslora": {"lora.use_rslora": True},
    "gaussian": {"lora.init_weights": "gaussian"},
    "orthogonal": {"lora.init_weights": "orthogonal"},
    "pissa": {"lora.init_weights": "pissa"},
    "olora": {"lora.init_weights": "olora"},
    "loraplus": {"lora.plus_lr_ratio": 16},
}

# Fresh interpreter: each registered version, and the untouched base alone (which must differ).
RELOAD = r"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from lib.loading import load_registered

reports = {}
for variant, args in json.loads(sys.argv[1]).items():
    ref = load_file(args["reference"])
    model, _, _ = load_registered(args["uri"], args["target"])
    base = AutoModelForCausalLM.from_pretrained(args["base"], dtype=torch.float32, use_safetensors=True).eval()
    with torch.no_grad():
        logits, plain = model(input_ids=ref["input_ids"]).logits, base(input_ids=ref["input_ids"]).logits
    reports[variant] = {"dtype": str(logits.dtype), "diff": float((logits - ref["logits"]).abs().max()),
                        "vs_base": float((plain - ref["logits"]).abs().max())}
print("RESULT " + json.dumps(reports))
"""


def train_and_register(variant: str, shared_cache, tmp_path: Path, new_store) -> dict:
    """Train `variant` in this process, keep its logits on PROMPT, register it in a store of its own;
    what the fresh interpreter needs to load it back and compare."""
    import torch
    from safetensors.torch import save_file

    config = load_config(
        DEFAULT_PROFILE,
        tiny_overrides(
            shared_cache,
            **{
                "lora.target_modules": "[q_proj, v_proj]",
                "registry.model_name": f"variant-{variant}",
                **VARIANTS[variant],
            },
        ),
    )
    info = prepare_for(config)
    model, tokenizer, result = training.train_model(info.path, config)
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :32]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, str(tmp_path / "reference.safetensors"))
    adapter = training.save_adapter(model, tokenizer, tmp_path)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["use_dora"] == config.lora.use_dora and saved["use_rslora"] == config.lora.use_rslora
    if variant in ("pissa", "olora"):  # converted: a plain LoRA of twice the rank, for the untouched base
        assert saved["init_lora_weights"] is True and saved["r"] == 2 * config.lora.r, saved
        assert not list(tmp_path.glob(".initial-adapter-*"))  # the scratch copy of A0, B0 is gone
    else:
        assert saved["init_lora_weights"] == config.lora.init_weights and saved["r"] == config.lora.r
    assert result.lora_targets == ["q_proj", "v_proj"]

    uri = new_store(tmp_path / "mlflow.db")
    run_id = tracking.start_run(uri, "variants", variant, {"lora.r": config.lora.r}, {}, "{}\n")
    metrics = {"test_bits_per_byte": 3.0, "benchmark_bits_per_byte": 3.0}
    registry.register_adapter(
        uri,
        run_id,
        adapter,
        describe_base(info.base, config.model),
        {"max_new_tokens": 8},
        config.registry.model_name,
        {},
        metrics,
        **CHAMPION_POLICY,
    )
    tracking.finish_run(uri, run_id)

    return {
        "uri": uri,
        "target": f"models:/{config.registry.model_name}/1",
        "base": info.base,
        "reference": str(tmp_path / "reference.safetensors"),
    }


def test_every_variant_registers_and_reloads_to_the_trained_logits(shared_cache, tmp_path, new_store):
    jobs = {}
    for variant in VARIANTS:
        folder = tmp_path / variant
        folder.mkdir()
        jobs[variant] = train_and_register(variant, shared_cache, folder, new_store)
    reports = run_script(
        RELOAD, json.dumps(jobs), cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600
    )
    assert reports.keys() == VARIANTS.keys(), reports
    for variant, report in reports.items():
        print(
            f"\n{variant}: max |logits difference| registered vs trained {report['diff']:.2e}, "
            f"base vs trained {report['vs_base']:.2e}",
            end="",
        )
    for variant, report in reports.items():
        assert report["dtype"] == "torch.float32" and report["diff"] < 1e-4, (variant, report)
        assert report["vs_base"] > 1e-3, (variant, report)  # the adapter changes the model: the comparison can fail
