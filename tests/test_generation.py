"""Tests of lib.generation on a tiny random GPT-Neo (offline, CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from lib.generation import generate_continuations
from tests.support.toy_lm import CORPUS, tiny_gpt_neo

# `tokenizer` is tests/support/toy_lm.py's (the same CORPUS); `model` below is peaked on purpose.
# Different lengths on purpose, so a batch needs padding.
PROMPTS = ["В Москве", "Курс рубля к доллару вырос на торгах", "Президент", "The quick brown fox jumps over"]
CONTEXT = 128


@pytest.fixture(scope="module")
def model(tokenizer):
    # Peaked logits (initializer_range 0.5): no near-ties that float noise could flip.
    return tiny_gpt_neo(tokenizer, max_position_embeddings=CONTEXT, initializer_range=0.5)


def _reference_greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """Plain single-prompt generate without padding: the ground truth for batched output."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def test_batched_equals_one_at_a_time_greedy(model, tokenizer):
    batched = generate_continuations(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
    single = [generate_continuations(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert any(batched)  # the random model does produce text
    # And both equal an unpadded model.generate call, with the prompt cut off.
    for prompt, out in zip(PROMPTS, batched):
        ids = tokenizer(prompt)["input_ids"]
        assert out == _reference_greedy(model, tokenizer, ids, 12)
    # The caller's tokenizer is left exactly as it was.
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None


def test_prompt_not_in_output(model, tokenizer):
    prompt = CORPUS[0]
    out = generate_continuations(model, tokenizer, [prompt], max_new_tokens=10)[0]
    assert prompt not in out and not out.startswith(prompt[:10])


def test_same_seed_same_sample_and_global_rng_untouched(model, tokenizer):
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, batch_size=2)
    rng_before = torch.get_rng_state()
    first = generate_continuations(model, tokenizer, PROMPTS, seed=123, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)  # fork_rng: caller's RNG unchanged
    again = generate_continuations(model, tokenizer, PROMPTS, seed=123, **kwargs)
    other = generate_continuations(model, tokenizer, PROMPTS, seed=7, **kwargs)
    assert first == again
    assert first != other  # 4 x 16 sampled tokens at temperature 1.5: a collision is ~impossible


def test_empty_prompt_starts_from_bos(model, tokenizer):
    outs = generate_continuations(model, tokenizer, ["", PROMPTS[0]], max_new_tokens=8)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert outs[0] == _reference_greedy(model, tokenizer, [tokenizer.bos_token_id], 8)
    assert outs[1] == generate_continuations(model, tokenizer, [PROMPTS[0]], max_new_tokens=8)[0]


def test_overlong_prompt_truncated_from_left_with_warning(model, tokenizer):
    long_prompt = " ".join(CORPUS * 4)
    ids = tokenizer(long_prompt)["input_ids"]
    assert len(ids) > CONTEXT
    with pytest.warns(UserWarning, match="truncated from the left"):
        out = generate_continuations(model, tokenizer, [long_prompt, PROMPTS[1]], max_new_tokens=8)
    # Default budget: context 128 - 8 new tokens = the last 120 prompt tokens.
    assert out[0] == _reference_greedy(model, tokenizer, ids[-(CONTEXT - 8) :], 8)
    with pytest.warns(UserWarning):
        short = generate_continuations(model, tokenizer, [PROMPTS[1]], max_new_tokens=8, max_prompt_tokens=3)
    assert short[0] == _reference_greedy(model, tokenizer, tokenizer(PROMPTS[1])["input_ids"][-3:], 8)
    assert generate_continuations(model, tokenizer, [], max_new_tokens=8) == []
