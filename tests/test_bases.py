"""Any causal LM as the base, without training anything: `lora.target_modules: auto` resolves per
architecture from config.json alone, and each family's tokenizer convention (no pad, a BOS the
tokenizer adds, a chat template) gives training blocks with one EOS between documents, one BOS per
document where the family uses one, and no chat markup; scoring and prompts follow the same rule."""

from __future__ import annotations

import pytest

from lib import lora
from lib.config import build_config
from lib.dataset import document_prefix, pack_documents
from lib.generation import _encode_prompts
from lib.metrics import prefix_token_id
from tests.support.family_models import CONTEXT, build_tokenizer, sample_texts

# The default vocabulary of each config (its pad/eos ids must fit): the meta device allocates nothing.
SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def save_config(folder, name: str):
    """Only config.json: resolving targets must not need weights."""
    import transformers

    if name == "GPT2Config":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300)
    elif name == "GPTNeoConfig":
        config = transformers.GPTNeoConfig(
            hidden_size=32, num_layers=2, num_heads=2, vocab_size=300, attention_types=[[["global", "local"], 1]]
        )
    else:
        config = getattr(transformers, name)(**SHAPE)
    config.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "config_class, expected",
    [
        ("GPTNeoConfig", ["q_proj", "v_proj"]),
        ("GPT2Config", ["c_attn"]),
        ("LlamaConfig", ["q_proj", "v_proj"]),
        ("Qwen2Config", ["q_proj", "v_proj"]),
        ("MistralConfig", ["q_proj", "v_proj"]),
        # No PEFT default for phi3: every linear layer but the output head.
        ("Phi3Config", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    ],
)
def test_auto_targets_follow_the_architecture_from_config_json_alone(tmp_path, config_class, expected):
    base = save_config(tmp_path, config_class)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    config = build_config({})
    assert config.lora.target_modules == "auto"
    assert lora.targets_for_base(config.lora, base, config.model) == expected


def test_all_linear_and_explicit_targets(tmp_path):
    base = save_config(tmp_path, "LlamaConfig")
    every = build_config({}, ["lora.target_modules=all-linear"])
    assert lora.targets_for_base(every.lora, base, every.model) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    explicit = build_config({}, ["lora.target_modules=[v_proj, q_proj]"])
    assert lora.targets_for_base(explicit.lora, "no/such-base", explicit.model) == ["q_proj", "v_proj"]  # no lookup


def test_the_version_tag_names_every_variant_setting():
    config = build_config({}, ["lora.use_dora=true", "lora.plus_lr_ratio=16"])
    assert lora.describe(config.lora, ["c_attn"]) == (
        "r=8 alpha=16 dropout=0.1 targets=c_attn dora=true rslora=false init=true plus_lr_ratio=16"
    )
    pissa = build_config({}, ["lora.init_weights=pissa", "lora.use_rslora=true"])
    assert "rslora=true init=pissa (saved as plain LoRA r=16)" in lora.describe(pissa.lora, ["q_proj"])


@pytest.fixture(scope="module")
def tokenizers():
    texts = sample_texts()
    return {family: build_tokenizer(family, texts) for family in ("gpt2", "llama", "qwen2")}


@pytest.mark.parametrize("family, starts_with", [("gpt2", None), ("llama", "<s>"), ("qwen2", None)])
def test_packed_documents_get_one_eos_between_them_and_bos_only_where_the_family_uses_it(
    tokenizers, family, starts_with
):
    tokenizer = tokenizers[family]
    docs = ["Первая новость.", "Вторая новость, подлиннее.", "Третья."]
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    prefix = document_prefix(tokenizer)
    assert prefix == ([tokenizer.convert_tokens_to_ids(starts_with)] if starts_with else [])
    total = sum(len(p) for p in ids) + len(docs) * (1 + len(prefix))
    [row], dropped = pack_documents(ids, tokenizer.eos_token_id, total, prefix)
    assert dropped == 0
    expected = [t for p in ids for t in [*prefix, *p, tokenizer.eos_token_id]]
    assert row.tolist() == expected
    assert row.tolist().count(tokenizer.eos_token_id) == len(docs)
    if starts_with:  # BOS once per document, never doubled by the tokenizer's own
        assert row.tolist().count(prefix[0]) == len(docs) and tokenizer(docs[0])["input_ids"][:2].count(prefix[0]) == 1
    # No chat markup in training text, even where the tokenizer has a chat template (Qwen2).
    markup = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>") if t in tokenizer.get_vocab()}
    assert not markup & set(row.tolist())
    if family == "qwen2":
        assert tokenizer.chat_template and markup
    # Scoring prefixes each document with what training put before it: BOS (Llama) or the EOS separator.
    assert prefix_token_id(tokenizer) == (prefix[0] if prefix else tokenizer.eos_token_id)
    # Prompts use the tokenizer's own convention: the Llama BOS once, nothing for the others.
    [prompt] = _encode_prompts(tokenizer, [docs[0]], CONTEXT)
    assert prompt == [*prefix, *ids[0]]
