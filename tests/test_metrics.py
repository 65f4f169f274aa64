"""Tests of lib.metrics against hand-computed values on tiny inputs (offline, CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from rouge_score import rouge_scorer

from lib.metrics import (
    chrf_per_sample,
    distinct_n,
    repeated_ngram_share,
    score_corpus,
    score_generations,
    summarize_nll,
    text_units,
)
from tests.support.toy_lm import CORPUS  # and the `model` and `tokenizer` fixtures (tests/conftest.py)

LONG_TEXT = " ".join(CORPUS * 3)  # well over 100 tokens: many windows when max_length is small


def _brute_force(model, tokenizer, text: str, context_start) -> tuple[float, int]:
    """Sum NLL by one forward pass per token; context_start(t, n) gives the first input index."""
    seq = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(seq) - 1
    nll = 0.0
    with torch.no_grad():
        for t in range(1, n + 1):
            inp = torch.tensor([seq[context_start(t, n) : t]])
            logprobs = torch.log_softmax(model(inp).logits[0, -1].double(), dim=-1)
            nll -= logprobs[seq[t]].item()
    return nll, n


# ---------------------------------------------------------------- generation scores


def test_rouge_cyrillic_identical_disjoint_and_default_tokenizer_failure():
    same = score_generations(["Привет, мир! Новости дня."], ["привет мир новости дня"])
    assert same["rouge1"] == same["rouge2"] == same["rougeL"] == 1.0  # lowercased, punctuation dropped
    apart = score_generations(["кот сидел дома"], ["пёс бежал улицей"])
    assert apart["rouge1"] == apart["rouge2"] == apart["rougeL"] == 0.0
    # Why the custom tokenizer exists: rouge_score's default keeps only [a-z0-9] tokens.
    default = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    assert default.score("привет мир", "привет мир")["rouge1"].fmeasure == 0.0


def test_rouge_partial_overlap_hand_computed():
    scores = score_generations(["кот сидел на ковре"], ["кот лежал на ковре"])
    assert scores["rouge1"] == pytest.approx(3 / 4)  # P = R = 3/4
    assert scores["rouge2"] == pytest.approx(1 / 3)  # only "на ковре" of 3 bigrams each
    assert scores["rougeL"] == pytest.approx(3 / 4)  # LCS "кот на ковре"
    # Mean over pairs: add an identical pair -> (3/4 + 1) / 2.
    two = score_generations(["кот сидел на ковре", "да"], ["кот лежал на ковре", "да"])
    assert two["rouge1"] == pytest.approx((3 / 4 + 1) / 2)


def test_bleu_chrf_scales_and_signature():
    scores = score_generations(["«Привет», мир!"], ["«Привет», мир!"])
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)
    assert "tok:intl" in scores["bleu_signature"]
    assert "nw:2" in scores["chrf_signature"]  # chrF++ = word n-grams up to 2
    assert chrf_per_sample(["кот", "абв"], ["кот", "где"]) == pytest.approx([100.0, 0.0])
    with pytest.raises(ValueError):
        score_generations(["a"], ["a", "b"])


def test_distinct_n_hand_computed():
    preds = ["кот кот кот", "Кот, пёс!"]  # words: [кот x3], [кот, пёс]
    assert distinct_n(preds, 1) == pytest.approx(2 / 5)  # {кот, пёс} of 5
    assert distinct_n(preds, 2) == pytest.approx(2 / 3)  # (кот кот) x2, (кот пёс): 2 of 3
    scores = score_generations(preds, ["x", "y"])
    assert scores["distinct_1"] == pytest.approx(2 / 5) and scores["distinct_2"] == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0


def test_repeated_4gram_share_hand_computed():
    # "a b c d a b c d": 4-grams abcd bcda cdab dabc abcd -> 1 repeat of 5.
    assert repeated_ngram_share(["a b c d a b c d"]) == pytest.approx(1 / 5)
    # Pooled over all 4-grams: + 1 fresh 4-gram, + a 3-word text with none -> 1 / 6.
    assert repeated_ngram_share(["a b c d a b c d", "x y z w", "p q r"]) == pytest.approx(1 / 6)
    # Repeats count within a prediction only, not across predictions.
    assert repeated_ngram_share(["а б в г", "а б в г"]) == 0.0
    assert score_generations(["a b c d a b c d"], ["a"])["repeated_4gram_share"] == pytest.approx(0.2)


# ---------------------------------------------------------------- corpus scores


def test_unit_definitions_from_known_nll():
    # nll_sum = 12 ln 2 nats over 4 tokens, 6 bytes, 3 chars, 2 words.
    s = summarize_nll(12 * math.log(2), 4, 6, 3, 2)
    assert s["perplexity"] == pytest.approx(8.0)  # exp(3 ln 2)
    assert s["bits_per_byte"] == pytest.approx(2.0)  # 12 bits / 6 bytes
    assert s["byte_perplexity"] == pytest.approx(4.0)  # 2 ** bits_per_byte
    assert s["bits_per_char"] == pytest.approx(4.0)
    assert s["word_perplexity"] == pytest.approx(64.0)  # exp(6 ln 2)
    assert text_units("Привет мир") == (19, 10, 2)  # Cyrillic letters are 2 bytes in UTF-8
    assert text_units(" a  b ")[2] == 4  # harness quirk: re.split keeps edge empties
    assert math.isnan(summarize_nll(1.0, 0, 0, 0, 0)["perplexity"])
    # A model trained at an absurd rate (measured: NLL 6.0e17 nats over 6,933 tokens) has an
    # infinite perplexity and a finite, huge bits/byte, not an OverflowError that fails evaluation.
    huge = summarize_nll(6.0e17, 6933, 22278, 12197, 1731)
    assert huge["perplexity"] == huge["word_perplexity"] == math.inf and math.isfinite(huge["bits_per_byte"])


def test_score_corpus_equals_brute_force_full_context(model, tokenizer):
    text = CORPUS[0]
    expected, n = _brute_force(model, tokenizer, text, lambda t, n: 0)
    got = score_corpus(model, tokenizer, [text], max_length=128)
    assert got["tokens"] == n
    assert got["nll_sum"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected / n), rel=1e-5)
    b, c, w = text_units(text)
    assert got["bits_per_byte"] == pytest.approx(expected / b / math.log(2), rel=1e-5)
    assert got["word_perplexity"] == pytest.approx(math.exp(expected / w), rel=1e-5)
    assert (got["bytes"], got["chars"], got["words"]) == (b, c, w)


@pytest.mark.parametrize("stride", [None, 1, 5])
def test_long_text_scores_every_token_once(model, tokenizer, stride):
    L = 16
    n_total = len(tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"])
    assert n_total > 6 * L
    got = score_corpus(model, tokenizer, [LONG_TEXT], max_length=L, stride=stride, batch_size=4)
    assert got["tokens"] == n_total
    if stride is None:
        # lm-eval-harness disjoint windows: window k starts at input k*L; the last partial
        # window is right-aligned to the document end (input starts at n - L).
        expected, _ = _brute_force(model, tokenizer, LONG_TEXT, lambda t, n: min((t - 1) // L * L, max(0, n - L)))
    elif stride == 1:
        # Every token after the first window sees exactly the L tokens before it.
        expected, _ = _brute_force(model, tokenizer, LONG_TEXT, lambda t, n: max(0, t - L))
    else:
        expected = None
    if expected is not None:
        assert got["nll_sum"] == pytest.approx(expected, rel=1e-5)
    # More context per token should not make a random model's score identical to disjoint.
    assert stride is None or got["nll_sum"] != score_corpus(model, tokenizer, [LONG_TEXT], max_length=L)["nll_sum"]


@pytest.mark.parametrize("stride", [None, 8])
def test_perplexity_independent_of_batch_size(model, tokenizer, stride):
    texts = CORPUS + [LONG_TEXT]
    one = score_corpus(model, tokenizer, texts, max_length=32, stride=stride, batch_size=1)
    eight = score_corpus(model, tokenizer, texts, max_length=32, stride=stride, batch_size=8)
    assert one["tokens"] == eight["tokens"]
    assert eight["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4)


def test_padding_never_scored(model, tokenizer):
    short, long = "Снег.", LONG_TEXT
    alone_short = score_corpus(model, tokenizer, [short], max_length=128)
    alone_long = score_corpus(model, tokenizer, [long], max_length=128)
    # One batch: the short window is right-padded to the long one's 128 positions.
    together = score_corpus(model, tokenizer, [short, long], max_length=128, batch_size=8)
    assert together["tokens"] == alone_short["tokens"] + alone_long["tokens"]
    assert together["nll_sum"] == pytest.approx(alone_short["nll_sum"] + alone_long["nll_sum"], rel=1e-5)


def test_empty_documents_skipped_and_model_mode_restored(model, tokenizer):
    model.train()
    base = score_corpus(model, tokenizer, [CORPUS[1]], max_length=64)
    assert model.training  # restored after scoring in eval mode
    model.eval()
    with_empty = score_corpus(model, tokenizer, ["", CORPUS[1], ""], max_length=64)
    assert with_empty == pytest.approx(base)
    with pytest.raises(ValueError):
        score_corpus(model, tokenizer, [CORPUS[1]], max_length=8, stride=9)
