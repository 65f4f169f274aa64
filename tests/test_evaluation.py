"""Tests of lib.evaluation (and the run summary built from it) on a tiny random GPT-Neo: offline, CPU, seconds."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lib.config import build_config
from lib.evaluation import (
    generate_both,
    markdown_cell,
    metrics_markdown,
    name_metrics,
    reference_continuation,
    samples_markdown,
    score_both,
    write_samples,
)
from lib.generation import generate_continuations
from lib.metrics import score_corpus
from tests.support.toy_lm import tiny_gpt_neo

CORPUS = [
    "Президент подписал закон о бюджете на следующий год.",
    "В Москве прошел снег, движение на дорогах затруднено.",
    "Курс рубля к доллару вырос на торгах Московской биржи.",
    "Учёные нашли новый вид бабочек в заповеднике.",
]
TEXTS = [" ".join(CORPUS[i:] + CORPUS[:i]) for i in range(len(CORPUS))]  # ~200 chars each: several windows
CONFIG = build_config({}, ["train.max_length=32", "eval.stride=16", "eval.batch_size=3", "eval.max_new_tokens=6"])


def bpe_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE trained on CORPUS; a small vocab leaves rare letters as two byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(400)


@pytest.fixture(scope="module")
def base_and_tuned(tokenizer):
    """(plain GPT-Neo, PeftModel around an identical copy whose LoRA B matrices are non-zero)."""
    plain = tiny_gpt_neo(tokenizer, window_size=16, initializer_range=0.5)
    tuned = get_peft_model(
        copy.deepcopy(plain), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "c_fc", "c_proj"])
    )
    with torch.no_grad():  # a fresh LoRA B is zero (adapter = identity); make the adapter matter
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)
    return plain, tuned.eval()


def test_base_numbers_are_the_model_without_any_adapter(base_and_tuned, tokenizer):
    plain, tuned = base_and_tuned
    base, with_adapter = score_both(tuned, tokenizer, TEXTS, CONFIG)
    alone = score_corpus(plain, tokenizer, TEXTS, max_length=32, stride=16, batch_size=5)
    assert base["tokens"] == alone["tokens"] == with_adapter["tokens"] > 4 * 32  # sliding windows, all scored
    assert base["nll_sum"] == pytest.approx(alone["nll_sum"], rel=1e-5)
    assert abs(with_adapter["nll_sum"] - base["nll_sum"]) > 1e-2 * base["nll_sum"]  # the adapter does change scores

    base_out, tuned_out = generate_both(tuned, tokenizer, CORPUS[:3], CONFIG.eval)
    assert base_out == generate_continuations(plain, tokenizer, CORPUS[:3], max_new_tokens=6, batch_size=1)
    assert base_out != tuned_out
    # disable_adapter is a context: afterwards the adapter is active again.
    assert score_corpus(tuned, tokenizer, TEXTS, max_length=32, stride=16)["nll_sum"] == pytest.approx(
        with_adapter["nll_sum"], rel=1e-5
    )


def test_reference_continuation_is_the_first_tokens_of_the_article(tokenizer):
    text = "  " + CORPUS[1]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 5
    ref = reference_continuation(tokenizer, text, 5)
    assert ref == tokenizer.decode(ids[:5]).strip() and text.strip().startswith(ref)
    assert len(tokenizer(ref, add_special_tokens=False)["input_ids"]) <= 5
    assert reference_continuation(tokenizer, text, len(ids) + 10) == text.strip()


def test_reference_never_ends_in_half_a_letter():
    tokenizer = bpe_tokenizer(300)  # few merges: "Ж" (absent from CORPUS) stays two byte tokens
    text = "ЖЖЖЖ ЖЖЖ"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2 * 6  # two byte tokens per letter (the space may merge with one)
    assert tokenizer.decode(ids[:3]).endswith("\ufffd")  # the cut a naive reference would make
    assert reference_continuation(tokenizer, text, 3) == "Ж"
    assert reference_continuation(tokenizer, text, 4) == "ЖЖ"


def test_name_metrics_gives_base_tuned_and_delta():
    out = name_metrics(
        {"perplexity": 10.0, "chrf": 20.0, "other": 1},
        {"perplexity": 7.5, "chrf": 23.5, "other": 2},
        ("perplexity", "chrf"),
        prefix="test_",
    )
    assert out == {
        "base_test_perplexity": 10.0,
        "test_perplexity": 7.5,
        "delta_test_perplexity": -2.5,
        "base_test_chrf": 20.0,
        "test_chrf": 23.5,
        "delta_test_chrf": 3.5,
    }


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_samples_markdown_escapes_pipes_and_line_breaks(tmp_path):
    rows = [
        {
            "prompt": "Курс | рубля",
            "reference": "строка 1\nстрока 2\r\nстрока 3\u2028конец",
            "base_output": "",
            "tuned_output": "a|b||c\n\n|",
            "base_chrf": 12.345,
            "tuned_chrf": 0.0,
        },
        {"prompt": "x", "reference": "y", "base_output": "z", "tuned_output": "w", "base_chrf": 1.0, "tuned_chrf": 2.0},
    ]
    json_path, md_path = write_samples(rows, tmp_path / "out")
    assert json.loads(json_path.read_text(encoding="utf-8")) == rows
    lines = md_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 + len(rows)  # header, rule, one line per row: no line break leaked
    assert {unescaped_pipes(line) for line in lines} == {7}  # 6 columns on every line
    assert r"Курс \| рубля" in lines[2] and "строка 1 строка 2 строка 3 конец" in lines[2]
    assert r"a\|b\|\|c \|" in lines[2] and "| 12.3 | 0.0 |" in lines[2]
    assert markdown_cell("  a \n b  ") == "a b"
    short = samples_markdown(rows[:1]).splitlines()
    assert short[0] == "| prompt | reference | base | tuned |" and unescaped_pipes(short[2]) == 5


def test_metrics_table_orders_metrics_and_says_which_way_is_better():
    metrics = {
        **name_metrics(
            {"chrf": 20.0, "repeated_4gram_share": 0.1},
            {"chrf": 25.0, "repeated_4gram_share": 0.3},
            ("chrf", "repeated_4gram_share"),
        ),
        **name_metrics(
            {"bits_per_byte": 3.0, "perplexity": 50.0},
            {"bits_per_byte": 2.5, "perplexity": 40.0},
            ("bits_per_byte", "perplexity"),
            prefix="test_",
        ),
        "test_tokens": 100.0,
    }
    lines = metrics_markdown(metrics).splitlines()
    assert [line.split(" | ")[0].strip("| ") for line in lines[2:]] == [
        "test_perplexity",
        "test_bits_per_byte",
        "chrf",
        "repeated_4gram_share",
    ]
    assert lines[3] == "| test_bits_per_byte | 3 | 2.5 | -0.5 | lower (tuned better) |"
    assert lines[4] == "| chrf | 20 | 25 | +5 | higher (tuned better) |"
    assert lines[5] == "| repeated_4gram_share | 0.1 | 0.3 | +0.2 | lower |"


def test_run_summary_links_the_run_and_shows_samples(tracking_uri):
    from mlflow import MlflowClient

    from lib.reports import render_summary
    from lib.tracking import start_run

    run_id = start_run(tracking_uri, "summary-test", "r", {}, {}, "a: 1\n")
    experiment = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    rows = [
        {"prompt": f"title {i}", "reference": f"ref | {i}", "base_output": "b\nb", "tuned_output": "t"}
        for i in range(3)
    ]
    summary = {
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "samples": rows,
        "bleu_signature": "nrefs:1|tok:intl",
        "model": {"uri": "models:/m/2", "champion": True},
        "metrics": name_metrics({"bits_per_byte": 3.0}, {"bits_per_byte": 2.0}, ("bits_per_byte",), "test_"),
    }
    text = render_summary(summary)
    assert (
        f"`mlflow ui --backend-store-uri {tracking_uri}`, then open "
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}" in text
    )
    assert "`models:/m/2` (champion: yes)" in text and "| test_bits_per_byte | 3 | 2 | -1 |" in text
    assert "tok:intl" in text and r"| title 2 | ref \| 2 | b b | t |" in text


def test_run_link_for_a_server_that_cannot_be_reached():
    from lib.reports import run_link

    link = run_link("http://127.0.0.1:9/", "abc123")  # port 9 (discard): connection refused
    assert link == {
        "url": "http://127.0.0.1:9/#/runs/abc123",
        "command": None,
        "experiment_id": None,
        "run_id": "abc123",
    }
