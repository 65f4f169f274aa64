"""Where the base model and tokenizer come from: the hub, a local folder, or the offline tiny build.

The tiny build is what makes the embedded default run with no network: a byte-level BPE trained with
`tokenizers`, and a seeded GPT-Neo (the same class as EleutherAI/gpt-neo-1.3B, so LoRA target
modules and loading code are exercised for real), pretrained on the same texts: the fine-tuning
train split, or the corpus without the held-out domain (`model.tiny.pretrain_corpus`, chosen in
lib/dataset.py). Both are materialised as ordinary `save_pretrained` folders, cached under a key of
their inputs, so every later step loads them with `from_pretrained` exactly as it would load a hub model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lib.config import TINY_MODEL, ModelConfig, TinyModelConfig
from lib.threads import configure_threads

log = logging.getLogger("lenta_lora.model")

EOS = "<|endoftext|>"
PAD = "<|pad|>"  # distinct from EOS so that masking padding never masks a real end of text


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished folder into place; a concurrent builder that won the race is kept."""
    try:
        os.replace(tmp, final)
    except OSError:  # final exists and is non-empty: someone else finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_tokenizer(texts: list[str], vocab_size: int, cache_dir: Path) -> Path:
    """Train a byte-level BPE on `texts`; cached by a hash of the texts and the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    key = _digest({"texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest(), "vocab": vocab_size})
    final = Path(cache_dir) / "tokenizers" / f"tiny-bpe-{key}"
    if (final / "tokenizer.json").is_file():
        return final
    log.info("training a %d-token byte-level BPE on %d texts", vocab_size, len(texts))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    wrapped.save_pretrained(tmp)
    return _publish(tmp, final)


def pretrain_tiny(model, tokenizer, texts: list[str], tiny: TinyModelConfig) -> float:
    """Full-parameter pretraining of the tiny base on `texts`; returns the last loss (nats/token).

    Random `pretrain_length`-token windows of the concatenated texts (each + EOS), AdamW at
    `pretrain_learning_rate` after a linear warm-up over the first 5% of the steps, then a cosine
    decay to 10% of it, gradients clipped at norm 1: the usual small-LM recipe, which keeps a
    high learning rate from diverging in the first steps.
    """
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += row + [tokenizer.eos_token_id]
    stream = torch.tensor(ids)
    starts = len(stream) - tiny.pretrain_length
    if starts < 1:
        raise ValueError(
            f"the tiny base's corpus has {len(stream)} tokens, fewer than model.tiny.pretrain_length="
            f"{tiny.pretrain_length}; lower it or pretrain on more text"
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=tiny.pretrain_learning_rate, weight_decay=0.01)
    warmup = max(1, tiny.pretrain_steps // 20)
    decay = max(1, tiny.pretrain_steps - warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / decay)),
    )
    generator = torch.Generator().manual_seed(tiny.seed)
    offsets = torch.arange(tiny.pretrain_length)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(tiny.pretrain_steps):
        batch = stream[torch.randint(0, starts, (tiny.pretrain_batch_size, 1), generator=generator) + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, tiny.pretrain_steps // 10) == 0:
            log.info(
                "tiny base pretraining: step %d/%d, loss %.3f", step + 1, tiny.pretrain_steps, float(loss.detach())
            )
    model.eval()
    return float(loss.detach())


def build_tiny_model(tiny: TinyModelConfig, tokenizer_dir: Path, cache_dir: Path, texts: list[str]) -> Path:
    """Materialise a seeded GPT-Neo sized by `tiny` (warmed up on `texts` if asked); cached by inputs."""
    from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # The tokenizer folder name already hashes the texts it was trained on, i.e. the train split.
    # What the BPE learnt from is in the tokenizer's name; leaving the switch out keeps existing keys.
    key = _digest(
        {
            "tiny": tiny.model_dump(exclude={"tokenizer_includes_train_split"}),
            "tokenizer": Path(tokenizer_dir).name,
            "vocab": len(tokenizer),
        }
    )
    final = Path(cache_dir) / "models" / f"tiny-gpt-neo-{key}"
    if (final / "config.json").is_file():
        return final
    # GPT-Neo alternates global and local (windowed) attention layers, like the 1.3B model.
    pattern = (
        [[["global", "local"], tiny.num_layers // 2]] if tiny.num_layers % 2 == 0 else [[["global"], tiny.num_layers]]
    )
    config = GPTNeoConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        num_layers=tiny.num_layers,
        num_heads=tiny.num_heads,
        attention_types=pattern,
        max_position_embeddings=tiny.max_position_embeddings,
        window_size=tiny.window_size,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(tiny.seed)
    model = GPTNeoForCausalLM(config)
    if tiny.pretrain_steps:
        configure_threads()  # built inside the prepare stage: the first CPU-heavy work of a run
        started = time.perf_counter()
        log.info(
            "pretraining the tiny base (%.2fM parameters): %d steps of %d x %d tokens on %d texts",
            model.num_parameters() / 1e6,
            tiny.pretrain_steps,
            tiny.pretrain_batch_size,
            tiny.pretrain_length,
            len(texts),
        )
        loss = pretrain_tiny(model, tokenizer, texts, tiny)
        log.info("tiny base pretrained in %.0f s, last loss %.3f", time.perf_counter() - started, loss)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    (tmp / "lenta_lora_recipe.json").write_text(json.dumps({"kind": "tiny", "tiny": tiny.model_dump()}, indent=2))
    log.info("built tiny GPT-Neo: %.2fM parameters -> %s", model.num_parameters() / 1e6, final)
    return _publish(tmp, final)


def resolve_base(
    model_cfg: ModelConfig, train_texts: list[str], cache_dir: str | Path, tokenizer_texts: list[str] | None = None
) -> str:
    """Return what `from_pretrained` should load: a hub id, a local folder, or the tiny build
    (pretrained on `train_texts`, its BPE trained on `tokenizer_texts`, by default the same)."""
    if model_cfg.name != TINY_MODEL:
        return model_cfg.name
    tokenizer_dir = build_tiny_tokenizer(
        train_texts if tokenizer_texts is None else tokenizer_texts, model_cfg.tiny.vocab_size, Path(cache_dir)
    )
    return str(build_tiny_model(model_cfg.tiny, tokenizer_dir, Path(cache_dir), train_texts))


def load_tokenizer(base: str, model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        base, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:  # GPT-Neo's own tokenizer has none; we mask by attention_mask
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(precision: str) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on CPU."""
    if precision == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def load_base_model(base: str, model_cfg: ModelConfig):
    """Load the base causal LM in the configured precision (int8/nf4 through bitsandbytes)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "use_safetensors": model_cfg.use_safetensors,
    }
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if model_cfg.precision == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif model_cfg.precision == "nf4":
        compute = resolve_dtype("auto")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    else:
        kwargs["dtype"] = resolve_dtype(model_cfg.precision)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(base, **kwargs)


def free_memory() -> None:
    """Collect what a stage let go of, once the caller has dropped its last reference to a model.

    A k-bit (int8/nf4) PEFT model sits in a reference cycle (PEFT's input-grad hook refers back to the
    model), which reference counting never frees; Python's cyclic collector may not run before the
    next stage loads another copy of the base: bench/flow_rss.py measured two mappings of the base
    file during evaluation and after it, flow peak 1.26x training's, until this ran between stages."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
