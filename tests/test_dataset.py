"""Packing and padding: what reaches the model, token for token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lib.config import build_config
from lib.dataset import PreparedDataset, load_prepared, pack_documents, pad_documents, prepare_dataset, read_prepared
from tests.conftest import tiny_overrides


def test_packing_keeps_every_token_but_the_final_partial_block():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    blocks, dropped = pack_documents(docs, eos_id=0, block=4)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0, 11, 0]  # each document + EOS, 15 tokens
    assert blocks.tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    assert dropped == 3 == len(stream) - blocks.size


def test_padding_reproduces_the_seed_tokenizer_call(shared_cache):
    """`packing: false` == tokenizer(text, truncation=True, max_length=L, padding="max_length")."""
    from transformers import AutoTokenizer

    config = build_config({}, tiny_overrides(shared_cache))
    info = prepare_dataset(*_prepare_args(config, shared_cache, packing=False))
    tokenizer = AutoTokenizer.from_pretrained(info.path + "/tokenizer")
    data = load_prepared(info.path)
    texts = list(data["train"]["document"])
    seed = tokenizer(texts, truncation=True, max_length=64, padding="max_length", add_special_tokens=False)
    assert data["train_blocks"]["input_ids"] == seed["input_ids"]
    assert data["train_blocks"]["attention_mask"] == seed["attention_mask"]
    # The seed's collator (DataCollatorForLanguageModeling, pad = EOS) scores exactly the unmasked tokens.
    stats = info.stats["blocks"]["train"]
    assert stats["real_tokens"] == int(np.sum(seed["attention_mask"]))
    assert stats["dropped_tokens"] == sum(
        max(0, len(t) - 64) for t in tokenizer(texts, add_special_tokens=False)["input_ids"]
    )


def test_pad_documents_truncates_and_masks():
    ids, masks, dropped = pad_documents([[5, 6, 7, 8, 9], [5]], pad_id=1, block=3)
    assert ids.tolist() == [[5, 6, 7], [5, 1, 1]] and masks.tolist() == [[1, 1, 1], [1, 0, 0]] and dropped == 2


def _prepare_args(config, cache, packing):
    data = config.data.model_copy(update={"packing": packing})
    from lib.config import SAMPLE_CSV

    return SAMPLE_CSV, data, config.model, 64, f"{cache}/datasets"


def test_prepared_dataset_is_complete_leak_free_and_reused(shared_cache):
    config = build_config({}, tiny_overrides(shared_cache))
    info = prepare_dataset(*_prepare_args(config, shared_cache, packing=True))
    data = load_prepared(info.path)
    urls = {name: set(data[name]["url"]) for name in ("train", "validation", "test")}
    assert not (urls["train"] & urls["test"]) and not (urls["train"] & urls["validation"])
    assert sum(len(u) for u in urls.values()) == 140  # every bundled article, each in one split
    stats = info.stats["blocks"]["train"]
    assert stats["real_tokens"] + stats["dropped_tokens"] == stats["tokens"] + stats["documents"]  # + one EOS each
    assert stats["dropped_tokens"] < 64 and stats["padding_tokens"] == 0
    again = prepare_dataset(*_prepare_args(config, shared_cache, packing=True))
    assert again == info  # same inputs: the saved dataset is reused, not rebuilt
    saved = json.loads((Path(info.path) / "lenta_lora_dataset.json").read_text())
    assert saved["fingerprint"] == info.fingerprint
    assert read_prepared(info.path) == info  # the one loader later stages use


def test_a_prepared_dataset_survives_prefects_json_results_and_a_wrong_folder_is_named(shared_cache, tmp_path):
    """The prepare task's cached result is Prefect JSON: a cache hit must hand on the same typed
    object (attributes, not keys), and a folder that is not a prepared dataset says so."""
    from prefect.serializers import JSONSerializer

    config = build_config({}, tiny_overrides(shared_cache))
    info = prepare_dataset(*_prepare_args(config, shared_cache, packing=True))
    serializer = JSONSerializer()
    again = serializer.loads(serializer.dumps(info))
    assert isinstance(again, PreparedDataset) and again == info and again.tokenizer_dir == info.tokenizer_dir
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a prepared dataset .*run the prepare stage"):
        read_prepared(tmp_path)


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_base_trains_on_cpu(precision, shared_cache, tmp_path):
    """The seed recipe's 8-bit base (and QLoRA's 4-bit) through real bitsandbytes on the tiny model, with
    the seed's targets inside the model (q_proj, v_proj) and a validation pass between steps: bitsandbytes
    repacked nf4 weights for CPU inference at that pass, and the next step failed (lib/lora.py)."""
    from lib.training import train_model

    overrides = {"model.precision": precision, "lora.target_modules": "[q_proj, v_proj]", "train.max_steps": 4}
    config = build_config({}, tiny_overrides(shared_cache, **overrides, **{"train.eval_every": 2}))
    info = prepare_dataset(*_prepare_args(config, shared_cache, packing=True))
    model, _, result = train_model(info.path, config)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Linear8bitLt" if precision == "int8" else "Linear4bit") in kinds, kinds
    assert result.steps == 4 and np.isfinite(result.final_loss)
    assert np.isfinite(result.history[1]["validation_loss"])  # step 2's pass, with steps 3-4 after it
