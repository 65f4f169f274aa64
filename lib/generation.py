"""Batched, reproducible text continuation with a causal LM.

Decoder-only models continue the LAST position of each row, so prompts are padded on the
LEFT; the attention mask hides the padding and ``generate`` derives position ids from it, so a
batched greedy run gives the same text as one prompt at a time. Padding is done here by hand
(not via ``tokenizer.padding_side`` / ``tokenizer.pad``) so the caller's tokenizer is never
mutated, not even temporarily, and a tokenizer without a pad token needs no patching.

No prefect / mlflow imports here: this module is plain library code.
"""

from __future__ import annotations

import logging
import warnings

import torch
from tqdm.auto import tqdm

from . import progress  # relative: the same file runs as lenta_lora_runtime.generation inside a version

log = logging.getLogger("lenta_lora.generation")


def model_context_length(model, tokenizer=None) -> int | None:
    """Longest input the model accepts, in tokens (GPT-Neo: ``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    # Tokenizers without a limit report a huge sentinel (1e30); ignore it.
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _start_token_id(tokenizer) -> int:
    """Token an empty prompt starts from: BOS, else EOS (the GPT-2 document separator)."""
    for tok_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise ValueError("tokenizer has neither BOS nor EOS; cannot start from an empty prompt")


def _encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids per prompt; empty -> [BOS/EOS]; too long -> keep the LAST tokens, warn once."""
    encoded, truncated = [], 0
    for prompt in prompts:
        # The tokenizer's own special-token convention (e.g. a Llama BOS); GPT-Neo adds none.
        ids = list(tokenizer(prompt, verbose=False)["input_ids"]) if prompt else []
        if not ids:
            ids = [_start_token_id(tokenizer)]
        if len(ids) > max_prompt_tokens:
            # Left truncation keeps the text right before the continuation point, which is
            # what conditions the next tokens most.
            ids = ids[-max_prompt_tokens:]
            truncated += 1
        encoded.append(ids)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(prompts)} prompts were longer than {max_prompt_tokens} tokens "
            "and were truncated from the left",
            stacklevel=3,
        )
    return encoded


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def generate_continuations(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
    progress_interval_s: float = progress.DEFAULT_INTERVAL_S,
) -> list[str]:
    """Continue each prompt; return only the new text (special tokens skipped, stripped).

    * Greedy by default; ``do_sample=True`` samples from the temperature-scaled distribution
      restricted to the top-p nucleus. Top-k is switched off (``top_k=0``) so that exactly
      these two knobs define the distribution, whatever the model's generation_config says.
    * Reproducible: the torch RNG is seeded with ``seed`` inside ``torch.random.fork_rng``, so
      equal arguments give equal outputs and the caller's global RNG state is left untouched.
      Sampled outputs still depend on ``batch_size`` (RNG draws are shared across a batch).
    * Prompts are sorted by length to reduce padding and returned in the input order.
    * ``max_prompt_tokens`` defaults to the model context minus ``max_new_tokens``; longer
      prompts lose their beginning (one ``UserWarning`` per call). An empty prompt starts from
      the BOS token (EOS if none). Generation stops at EOS or after ``max_new_tokens`` tokens.
    * pad_token_id is the tokenizer's pad token, or EOS when it has none (GPT-Neo).
    * Without a terminal (the tqdm bar hidden), logs ``generate: batch i/n, s/batch, ETA`` once
      ``progress_interval_s`` seconds have passed since the last such line.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    if not prompts:
        return []
    context = model_context_length(model, tokenizer)
    if max_prompt_tokens is None:
        if context is None:
            raise ValueError("cannot infer the model context length; pass max_prompt_tokens")
        max_prompt_tokens = context - max_new_tokens
    if max_prompt_tokens < 1:
        raise ValueError(
            f"no room for a prompt: context {context} tokens, max_new_tokens {max_new_tokens}, "
            f"max_prompt_tokens {max_prompt_tokens}"
        )

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token")
    encoded = _encode_prompts(tokenizer, prompts, max_prompt_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)

    gen_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "use_cache": True, "pad_token_id": pad_id}
    if do_sample:  # only pass sampling knobs when sampling: transformers warns otherwise
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    device = next(model.parameters()).device
    fork_devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    outputs: list[str] = [""] * len(prompts)
    try:
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            torch.manual_seed(seed)
            starts = range(0, len(order), batch_size)
            bar = tqdm(starts, desc="generate", disable=None)
            # No terminal, no bar: a line every `progress_interval_s` seconds instead (Prefect's run log).
            ticker = progress.Ticker(progress_interval_s, enabled=progress.bar_hidden(bar))
            for done, start in enumerate(bar, 1):
                rows = order[start : start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in rows], pad_id)
                sequences = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **gen_kwargs
                )
                # Left padding: every row's prompt ends at column input_ids.shape[1].
                new_tokens = sequences[:, input_ids.shape[1] :].tolist()
                for i, ids in zip(rows, new_tokens):
                    outputs[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                ticker.report(log, "generate", done, len(starts))
    finally:
        model.train(was_training)
    return outputs
