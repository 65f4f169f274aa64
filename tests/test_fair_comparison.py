"""Two bases with different tokenizers, registered under one model, are judged on the same texts.

Version 1 is the tiny GPT-Neo with its own BPE; version 2 a GPT-2-architecture base with another
BPE (tests/support/family_models.py). The model's benchmark was fixed by version 1: both versions carry
scores on its fingerprint (same texts, same windows), counted in different numbers of tokens, and the
champion decision compares bits per byte, which divides by the texts' UTF-8 bytes, not by tokens.
"""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib.config import load_config
from tests.conftest import tiny_overrides
from tests.support.family_models import build_family

pytestmark = pytest.mark.slow


def test_bases_with_different_tokenizers_are_scored_on_one_benchmark(
    prefect_server, shared_cache, tracking_uri, tmp_path
):
    from flows.finetune import finetune

    name = "fair-comparison"
    first = finetune(config=load_config(DEFAULT_PROFILE, tiny_overrides(shared_cache, **{"registry.model_name": name})))
    gpt2 = build_family("gpt2", tmp_path / "gpt2")
    second = finetune(
        config=load_config(
            DEFAULT_PROFILE,
            tiny_overrides(
                shared_cache, **{"registry.model_name": name, "model.name": str(gpt2), "lora.target_modules": "auto"}
            ),
        )
    )

    client = MlflowClient(tracking_uri)
    v1, v2 = (client.get_model_version(name, str(v)) for v in (1, 2))
    assert (v1.tags["base_model"], v2.tags["base_model"]) == ("tiny", str(gpt2))
    fingerprint = client.get_registered_model(name).tags["benchmark.fingerprint"]
    assert v1.tags["benchmark_fingerprint"] == v2.tags["benchmark_fingerprint"] == fingerprint
    assert first["benchmark"]["fingerprint"] == second["benchmark"]["fingerprint"] == fingerprint
    # The same texts, cut into different numbers of tokens by the two tokenizers...
    tokens = [first["metrics"]["benchmark_tokens"], second["metrics"]["benchmark_tokens"]]
    assert tokens[0] != tokens[1], tokens
    # ... and the decision compares their bits per byte, each measured on those texts.
    values = [float(v.tags["benchmark_bits_per_byte"]) for v in (v1, v2)]
    assert all(math.isfinite(v) and v > 0 for v in values)
    decision = json.loads(v2.tags["champion_decision"])
    assert decision["benchmark_fingerprint"] == fingerprint and decision["metric"] == "benchmark_bits_per_byte"
    assert decision["previous_champion"] == "1" and decision["previous_value"] == values[0]
    assert decision["value"] == values[1]
    print(
        f"\ntiny GPT-Neo: {values[0]:.4f} bits/byte ({tokens[0]:.0f} tokens); "
        f"GPT-2 arch., other BPE: {values[1]:.4f} bits/byte ({tokens[1]:.0f} tokens); {decision['reason']}"
    )
