"""Prepare the corpus for training: select, split, tokenize, pack, and save as a `datasets` folder.

The saved DatasetDict holds the raw splits (`train`, `validation`, `test`: one article a row, with
`document` = title + text, the string every metric is computed on) and the training views
(`train_blocks`, `validation_blocks`: `input_ids` + `attention_mask` of length `max_length`).

Packing (default) concatenates tokenized documents, each followed by EOS (and preceded by BOS for a
tokenizer that adds one itself, see `document_prefix`), and cuts fixed blocks, so
no compute goes to padding and long articles are used in full; only the final partial block is
dropped, and counted. `packing: false` is the seed recipe: each document truncated to `max_length`
and right-padded, padding masked out of the loss by the attention mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from datetime import date
from pathlib import Path

import numpy as np

from lib import faults
from lib.base_model import load_tokenizer, resolve_base
from lib.config import SAMPLE_CSV, TINY_MODEL, DataConfig, ModelConfig, TinyModelConfig
from lib.corpus import article_key, iter_articles, join_title_and_text, text_digest
from lib.splits import describe_splits, fingerprint_articles, select_articles, split_articles

log = logging.getLogger("lenta_lora.dataset")

SPLITS = ("train", "validation", "test")
INFO_FILE = "lenta_lora_dataset.json"  # a prepared folder's facts, written last: a folder without it is not one


@dataclass(frozen=True)
class PreparedDataset:
    """What the prepare stage hands on: a prepared folder and its facts (`INFO_FILE` holds them).

    The folder holds `data/` (the DatasetDict described above), `tokenizer/` and `INFO_FILE`. Later
    stages get this (or read it back with `read_prepared`), never the file's keys by name."""

    path: str  # the folder, absolute
    fingerprint: str  # sha256 of the selected, split articles (lib/splits.py): the data's identity
    base: str  # the base model: a hub id or a local folder; its tokenizer made the blocks
    csv: str  # the CSV the articles came from
    max_length: int  # tokens per block
    packing: bool
    stats: dict  # split counts, block statistics, tokens per character

    @property
    def tokenizer_dir(self) -> str:
        return str(Path(self.path) / "tokenizer")


def read_prepared(dataset_path: str | Path) -> PreparedDataset:
    """The one loader of a prepared folder's facts; a folder that is not one gets a clear error."""
    info_path = Path(dataset_path) / INFO_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{dataset_path} is not a prepared dataset (no {INFO_FILE}); run the prepare stage first"
        ) from None
    return PreparedDataset(**{f.name: info[f.name] for f in fields(PreparedDataset)})


def document_prefix(tokenizer) -> list[int]:
    """What starts every training document: `[BOS]` for a tokenizer that adds BOS to its encodings by
    itself (Llama's `<s>`: the model was pretrained, and lib/metrics.py scores, with it in front),
    else nothing (GPT-2/Neo: the EOS that ends the previous document is the separator, as in
    pretraining; Qwen2 has no BOS). Documents are tokenized with `add_special_tokens=False`, so
    this is the only BOS, and no chat template is ever applied to training text."""
    bos = tokenizer.bos_token_id
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and bos != tokenizer.eos_token_id and bos in added else []


def pack_documents(
    token_lists: list[list[int]], eos_id: int, block: int, prefix: list[int] = ()
) -> tuple[np.ndarray, int]:
    """Concatenate documents (each `prefix` + tokens + EOS: one EOS between two documents) and cut
    `block`-token rows; return rows and dropped tokens.

    Only the final partial block is dropped (fewer than `block` tokens in all), and counted.
    """
    lengths = [len(prefix) + len(ids) + 1 for ids in token_lists]
    stream = np.empty(sum(lengths), dtype=np.int64)
    position = 0
    for ids, length in zip(token_lists, lengths):
        stream[position : position + length] = [*prefix, *ids, eos_id]
        position += length
    usable = len(stream) - len(stream) % block
    return stream[:usable].reshape(-1, block), len(stream) - usable


def pad_documents(
    token_lists: list[list[int]], pad_id: int, block: int, prefix: list[int] = ()
) -> tuple[np.ndarray, np.ndarray, int]:
    """The seed recipe exactly: `tokenizer(text, truncation=True, max_length=block, padding="max_length")`
    (whose special tokens are the `prefix`: a Llama's BOS, nothing for GPT-Neo).

    No EOS is appended (the seed did not), tokens past `block` are dropped and counted; padding is
    masked by the attention mask. Returns ids, masks, dropped tokens.
    """
    ids_out = np.full((len(token_lists), block), pad_id, dtype=np.int64)
    masks = np.zeros((len(token_lists), block), dtype=np.int64)
    dropped = 0
    for row, ids in enumerate(token_lists):
        ids = [*prefix, *ids]
        kept = ids[:block]
        dropped += len(ids) - len(kept)
        ids_out[row, : len(kept)] = kept
        masks[row, : len(kept)] = 1
    return ids_out, masks, dropped


def tokenize_documents(tokenizer, documents: list[str], num_proc: int) -> list[list[int]]:
    """Batched (and, for big corpora, multi-process) tokenization through `datasets.map`."""
    from datasets import Dataset

    if not documents:
        return []
    table = Dataset.from_dict({"document": documents})
    procs = num_proc if len(documents) >= 1000 * num_proc else 1  # process start-up costs ~seconds
    tokenized = table.map(
        lambda batch: {"ids": tokenizer(batch["document"], add_special_tokens=False)["input_ids"]},
        batched=True,
        batch_size=500,
        num_proc=procs if procs > 1 else None,
        remove_columns=["document"],
        desc="tokenize",
        keep_in_memory=True,
    )
    return tokenized["ids"]


def fingerprint_settings(data: DataConfig) -> dict:
    """The data settings that decide which rows are selected (not where files live or how fast)."""
    return {
        k: v
        for k, v in data.model_dump(mode="json").items()
        if k not in ("cache_dir", "kaggle_secret_block", "path", "num_proc")
    }


def corpus_path(data: DataConfig, downloaded: str | None = None) -> Path:
    if data.source == "sample":
        return SAMPLE_CSV
    if data.source == "csv":
        return Path(data.path).expanduser()
    return Path(downloaded)


def _to_date(text: str | None) -> date | None:
    return date.fromisoformat(text) if text else None


def _block_dataset(tokenizer, documents: list[str], block: int, packing: bool, num_proc: int):
    from datasets import Dataset

    token_lists = tokenize_documents(tokenizer, documents, num_proc)
    prefix = document_prefix(tokenizer)
    if packing:
        blocks, dropped = pack_documents(token_lists, tokenizer.eos_token_id, block, prefix)
        masks = np.ones_like(blocks)
    else:
        blocks, masks, dropped = pad_documents(token_lists, tokenizer.pad_token_id, block, prefix)
    stats = {
        "documents": len(documents),
        "tokens": sum(map(len, token_lists)),
        "blocks": len(blocks),
        "real_tokens": int(masks.sum()),
        "padding_tokens": int(masks.size - masks.sum()),
        "dropped_tokens": dropped,
    }
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": masks}), stats


def pretraining_documents(
    csv_path: str | Path, data: DataConfig, tiny: TinyModelConfig, splits: dict, train_documents: list[str]
) -> list[str]:
    """What the offline tiny base and its BPE are trained on (`model.tiny.pretrain_corpus`).

    `train_split`: the fine-tuning train split. `corpus`: every article of the CSV (cleaned,
    de-duplicated and date/length-filtered as the fine-tuning data, but not topic-filtered) except
    the fine-tuning validation and test articles, matched by key and by text, and except the topics
    in `pretrain_exclude_topics`. Either way no evaluation article reaches the base.
    """
    if tiny.pretrain_corpus == "train_split":
        return train_documents
    held_out = [a for name in ("validation", "test") for a in splits[name]]
    keys, digests = {article_key(a) for a in held_out}, {text_digest(a.text) for a in held_out}
    excluded = {topic.strip().casefold() for topic in tiny.pretrain_exclude_topics}
    pool = select_articles(
        iter_articles(csv_path),
        date_from=_to_date(data.date_from),
        date_to=_to_date(data.date_to),
        min_text_chars=data.min_text_chars,
        max_articles=tiny.pretrain_max_articles,
        seed=tiny.seed,
        source=csv_path,
    )
    kept = [
        join_title_and_text(a)
        for a in pool
        if a.topic.strip().casefold() not in excluded
        and article_key(a) not in keys
        and text_digest(a.text) not in digests
    ]
    if not kept:
        raise ValueError(
            f"{csv_path}: no article is left to pretrain the tiny base on "
            f"(model.tiny.pretrain_exclude_topics={tiny.pretrain_exclude_topics})"
        )
    log.info(
        "tiny base corpus: %d articles (%d characters), topics %s held out",
        len(kept),
        sum(map(len, kept)),
        sorted(excluded) or "none",
    )
    return kept


def prepare_dataset(
    csv_path: str | Path, data: DataConfig, model_cfg: ModelConfig, max_length: int, output_root: str | Path
) -> PreparedDataset:
    """Read, clean, split and tokenize the corpus; save it atomically; return its path and facts.

    The output folder is named by the dataset fingerprint plus tokenizer and block settings, so an
    identical request reuses it, and it is written to a temporary folder and renamed when complete:
    a killed run never leaves a half-written dataset behind.
    """
    from datasets import Dataset, DatasetDict

    csv_path = Path(csv_path)
    selected = select_articles(
        iter_articles(csv_path),
        topics=data.topics,
        date_from=_to_date(data.date_from),
        date_to=_to_date(data.date_to),
        min_text_chars=data.min_text_chars,
        max_articles=data.max_articles,
        seed=data.seed,
    )
    splits = split_articles(selected, data.splits.model_dump())
    fingerprint = fingerprint_articles(splits, fingerprint_settings(data))
    documents = {name: [join_title_and_text(a) for a in splits[name]] for name in SPLITS}
    if not documents["train"]:
        raise ValueError(f"{csv_path}: no article fell into the train split; add articles or change data.splits")

    pretrain = (
        pretraining_documents(csv_path, data, model_cfg.tiny, splits, documents["train"])
        if model_cfg.name == TINY_MODEL
        else documents["train"]
    )
    tiny = model_cfg.tiny
    bpe_texts = None
    if model_cfg.name == TINY_MODEL and tiny.tokenizer_includes_train_split:
        seen = set(pretrain)
        bpe_texts = pretrain + [d for d in documents["train"] if d not in seen]
    base = resolve_base(model_cfg, pretrain, data.cache_dir, bpe_texts)
    tokenizer = load_tokenizer(base, model_cfg)
    # Keyed by the rows (fingerprint) and the tokenizer's identity (base + revision) and block settings.
    tokenizer_id = hashlib.sha256(f"{base}@{model_cfg.revision}".encode()).hexdigest()[:8]
    key = f"{fingerprint[:16]}-{Path(base).name}-{tokenizer_id}-L{max_length}-{'packed' if data.packing else 'padded'}"
    final = Path(output_root) / key
    info_path = final / INFO_FILE
    if info_path.is_file():
        log.info("reusing prepared dataset %s", final)
        return read_prepared(final)

    parts = {
        name: Dataset.from_list([{**asdict(a), "document": doc} for a, doc in zip(splits[name], documents[name])])
        for name in SPLITS
    }
    block_stats = {}
    for name in ("train", "validation"):
        parts[f"{name}_blocks"], block_stats[name] = _block_dataset(
            tokenizer, documents[name], max_length, data.packing, data.num_proc
        )
    if not len(parts["train_blocks"]):
        raise ValueError(f"{csv_path}: the train split has fewer than {max_length} tokens; lower train.max_length")

    stats = {
        **describe_splits(splits),
        "blocks": block_stats,
        "tokens_per_char": block_stats["train"]["tokens"] / max(1, sum(map(len, documents["train"]))),
    }
    info = PreparedDataset(
        path=str(final.resolve()),
        fingerprint=fingerprint,
        base=base,
        csv=str(csv_path),
        max_length=max_length,
        packing=data.packing,
        stats=stats,
    )
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{os.getpid()}-"))
    try:
        # datasets cannot load back a split with no rows; load_prepared restores such splits as empty ones.
        DatasetDict({name: part for name, part in parts.items() if len(part)}).save_to_disk(str(tmp / "data"))
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / INFO_FILE).write_text(json.dumps(asdict(info), indent=2, ensure_ascii=False), encoding="utf-8")
        faults.reach("prepare.before-publish")
        os.replace(tmp, final)
    except OSError:
        if not info_path.is_file():  # a real failure, not a concurrent twin that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s: %s", final, {k: len(v) for k, v in parts.items()})
    return info


def remove_dead_leftovers(root: Path) -> list[Path]:
    """Delete `.tmp-<pid>-*` folders whose writer process is gone (killed mid-write); a live
    writer's folder (a concurrent run preparing the same data) is left alone."""
    removed = []
    for leftover in root.glob(".tmp-*"):
        pid = leftover.name.split("-")[1]
        if not pid.isdigit() or faults.process_alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    if removed:
        log.info("removed %d half-written dataset folder(s) of dead processes under %s", len(removed), root)
    return removed


def load_prepared(dataset_path: str | Path):
    """The prepared DatasetDict; a split the ratios left empty (say `data.splits.validation: 0`) is an
    empty Dataset, as if it had been saved."""
    from datasets import Dataset, load_from_disk

    data = load_from_disk(str(Path(dataset_path) / "data"))
    for name in (*SPLITS, "train_blocks", "validation_blocks"):
        if name not in data:
            data[name] = Dataset.from_dict({})
    return data
