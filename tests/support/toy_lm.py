"""A byte-level BPE tokenizer trained on four sentences and a 2-layer random GPT-Neo on it: the
model the metric and progress tests score by hand (offline, CPU, milliseconds per forward pass).
The fixtures are registered for every test by tests/conftest.py (so torch and transformers are
imported when one is used, not when the session starts); a module's own `model` or `tokenizer`
fixture takes precedence there."""

from __future__ import annotations

import pytest

CORPUS = [
    "Президент подписал закон о бюджете на следующий год.",
    "В Москве прошел снег, движение на дорогах затруднено.",
    "The quick brown fox jumps over the lazy dog.",
    "Курс рубля к доллару вырос на торгах Московской биржи.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    # GPT-2 style: one <|endoftext|> serves as BOS, EOS, and no pad token.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_gpt_neo(tokenizer=None, **settings):
    """A 2-layer, 32-wide random GPT-Neo (one global and one local attention layer) in eval mode,
    its weights drawn after `torch.manual_seed(0)`. Vocabulary and BOS/EOS come from
    `tokenizer`; `settings` override any `GPTNeoConfig` field (window_size, initializer_range...)."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    shape = {
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "attention_types": [[["global", "local"], 1]],
        "max_position_embeddings": 128,
        "window_size": 64,
    }
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        shape.update(vocab_size=len(tokenizer), **ids)
    torch.manual_seed(0)
    return GPTNeoForCausalLM(GPTNeoConfig(**{**shape, **settings})).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt_neo(tokenizer)
