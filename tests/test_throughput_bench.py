"""The training benchmark's cheap parts: the no-GPU exit, the 1.3B architecture, the FLOP count."""

from __future__ import annotations

import pytest
import torch

from bench import train_throughput


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_the_13b_scale_without_a_gpu_says_so_and_exits_0(capsys):
    assert train_throughput.main(["--scale", "gpt-neo-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out and "{" not in out  # a message, no numbers


def test_the_13b_architecture_has_gpt_neo_13b_parameter_count():
    from transformers import GPTNeoForCausalLM

    with torch.device("meta"):  # shapes only: no 5 GB of random weights
        model = GPTNeoForCausalLM(train_throughput.gpt_neo_13b_config())
    total = sum(p.numel() for p in model.parameters())
    assert 1.30e9 < total < 1.33e9, total  # EleutherAI/gpt-neo-1.3B: 1,315,575,808
    # ~4 x 1.31e9 + attention: the ~5.3 GFLOP/token of LoRA training (docs/pitfalls), at 512 tokens
    assert 5.2e9 < train_throughput.flops_per_token(model, 512) < 5.5e9
