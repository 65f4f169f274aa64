"""Tiny random causal LMs of the GPT-2, Llama and Qwen2 architectures, built offline from a config
and saved as ordinary `save_pretrained` folders (safetensors), each with a byte-level BPE trained on
the bundled sample and configured as that family's tokenizer is:

    gpt2   <|endoftext|> is BOS and EOS, no pad token, nothing added to encodings
    llama  <s> BOS added to every encoding by the tokenizer itself, </s> EOS, no pad token
    qwen2  no BOS, <|endoftext|> EOS and pad, a ChatML chat template (<|im_start|> ... <|im_end|>)

Random weights: these test the plumbing (loading, targets, tokenization, registering, reloading),
not what a real base learns. Sizes: hidden 64, 2 layers, 512-token vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("gpt2", "llama", "qwen2")
VOCAB = 512
HIDDEN, LAYERS, HEADS, CONTEXT = 64, 2, 2, 128
# Qwen2's template, shortened: what a chat model would wrap a message in, never training text.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = {
    "gpt2": ["<|endoftext|>"],
    "llama": ["<unk>", "<s>", "</s>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def sample_texts() -> list[str]:
    from lib.config import SAMPLE_CSV
    from lib.corpus import iter_articles, join_title_and_text

    return [join_title_and_text(a) for a in iter_articles(SAMPLE_CSV)]


def build_tokenizer(family: str, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if family == "gpt2":
        return PreTrainedTokenizerFast(
            tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
        )
    if family == "llama":  # the tokenizer itself puts <s> in front of every encoding, as Llama's does
        bpe.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def build_model(family: str, tokenizer, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT, **ids))
    shape = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 1,
        "max_position_embeddings": CONTEXT,
    }
    if family == "llama":  # grouped-query attention (1 KV head), untied output head, as Llama 2/3
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shape, **ids))
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **shape, **ids))  # small Qwen2s tie the head


def build_family(family: str, folder: str | Path) -> Path:
    """Save a tiny `family` base (model + tokenizer) to `folder`; return it."""
    folder = Path(folder)
    tokenizer = build_tokenizer(family, sample_texts())
    model = build_model(family, tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
