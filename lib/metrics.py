"""Evaluation metrics: corpus-level LM scores and reference-based generation scores.

Two families:

* ``score_corpus`` -- how well a causal LM predicts raw held-out text. Every token of every
  document is scored exactly once; the result is a corpus total (sum of NLL in nats and unit
  counts), so it does not depend on batch size or on how documents are split into windows of
  equal context. Definitions follow lm-evaluation-harness rolling log-likelihood tasks
  (wikitext): token perplexity, word perplexity, byte perplexity and bits per byte.
* ``score_generations`` -- compares generated continuations with reference continuations:
  sacreBLEU BLEU (``intl`` tokenizer), chrF++, ROUGE-1/2/L with a Unicode word tokenizer
  (rouge_score's default tokenizer drops every Cyrillic word) and repetition diagnostics.

Scale conventions: BLEU and chrF++ are on sacreBLEU's 0-100 scale; ROUGE, distinct-n and
the repeated 4-gram share are fractions in 0..1.

No prefect / mlflow imports here: this module is plain library code.
"""

from __future__ import annotations

import logging
import math
import re

import sacrebleu
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lib import progress

log = logging.getLogger("lenta_lora.metrics")

_WORD_RE = re.compile(r"\w+", re.UNICODE)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# --------------------------------------------------------------------------------------------
# Corpus scores of a causal LM
# --------------------------------------------------------------------------------------------


def prefix_token_id(tokenizer) -> int:
    """Token put in front of every document so that its first real token is scored.

    Same rule as lm-evaluation-harness ``HFLM.prefix_token_id``: BOS if the tokenizer has one,
    else EOS. For GPT-2 / GPT-Neo both are ``<|endoftext|>`` (id 50256).
    """
    for tok_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise ValueError("tokenizer has neither a BOS nor an EOS token to prefix documents with")


def text_units(text: str) -> tuple[int, int, int]:
    """(utf-8 bytes, characters, words) of one document, as lm-evaluation-harness counts them.

    Words are ``len(re.split(r"\\s+", text))``: leading/trailing whitespace adds an empty
    "word", exactly as in the harness, so numbers stay comparable with published ones.
    """
    return len(text.encode("utf-8")), len(text), len(re.split(r"\s+", text))


def summarize_nll(nll_sum: float, tokens: int, n_bytes: int, n_chars: int, n_words: int) -> dict[str, float]:
    """Turn a corpus NLL total (nats) and unit counts into the reported scores.

    perplexity = exp(nll/tokens); word_perplexity = exp(nll/words);
    byte_perplexity = exp(nll/bytes); bits_per_byte = nll/bytes/ln 2; bits_per_char likewise
    per character. A zero denominator gives NaN rather than an exception.
    """

    def ratio(den: int) -> float:
        return nll_sum / den if den > 0 else float("nan")

    def exp(x: float) -> float:  # a diverged model's perplexity is infinite, not an OverflowError
        return float("inf") if x > 709.0 else math.exp(x)  # exp(709.8) is the largest double; NaN stays NaN

    return {
        "nll_sum": float(nll_sum),
        "tokens": float(tokens),
        "perplexity": exp(ratio(tokens)),
        "bits_per_byte": ratio(n_bytes) / math.log(2),
        "byte_perplexity": exp(ratio(n_bytes)),
        "bits_per_char": ratio(n_chars) / math.log(2),
        "word_perplexity": exp(ratio(n_words)),
        "bytes": float(n_bytes),
        "chars": float(n_chars),
        "words": float(n_words),
    }


def _windows(seq: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """Split one prefixed document ``seq = [prefix] + tokens`` into (input_ids, targets) pairs.

    Targets are ``seq[1:]``; each target index t is scored in exactly one window. A window that
    scores targets ``seq[a:b]`` feeds the model ``seq[c:b-1]`` with ``c = max(0, b-1-max_length)``,
    i.e. the longest input that fits, and reads the last ``b-a`` logits. Window ends advance
    by ``max_length`` for the first window and by ``stride`` afterwards.
    """
    windows = []
    n = len(seq)  # = number of targets + 1
    a = 1
    b = min(n, 1 + max_length)
    while a < n:
        c = max(0, b - 1 - max_length)
        windows.append((seq[c : b - 1], seq[a:b]))
        a, b = b, min(n, b + stride)
    return windows


def score_corpus(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    progress_interval_s: float = progress.DEFAULT_INTERVAL_S,
) -> dict[str, float]:
    """Corpus-level log-likelihood scores of a causal LM over raw documents.

    Each document is tokenized without special tokens and prefixed with the BOS token (EOS
    if there is no BOS), as lm-evaluation-harness does, so its first real token is scored
    too. ALL tokens of a document are scored, each exactly once, with model inputs of at most
    ``max_length`` tokens:

    * ``stride=None`` (default): disjoint windows, identical to lm-evaluation-harness
      ``loglikelihood_rolling`` (``context_len=1``). Window k scores tokens
      ``[k*max_length, (k+1)*max_length)``; the token at offset j inside its window sees j + 1
      tokens: the j before it in the window plus one more (the prefix for the first window,
      the previous window's last token after that). The last, partial window is
      right-aligned: it is fed the ``max_length`` tokens before its end so its few targets
      get full context.
    * ``stride=s`` with ``1 <= s <= max_length``: sliding window (HF "perplexity of fixed-length
      models"). The first window scores the first ``max_length`` tokens; each next window moves
      its end by ``s`` tokens and scores only the ``s`` tokens not scored before, seeing the
      preceding ``max_length`` tokens (fewer at the document start). Every scored token
      therefore has at least ``max_length - s + 1`` tokens of context (prefix included) once
      the document is long enough, and at most ``max_length``. Smaller s = more context, more
      compute (about ``max_length / s`` forward passes per ``max_length`` tokens).
      ``s == max_length`` gives exactly the disjoint windows.

    Windows from all documents are run in batches of ``batch_size`` with right padding and an
    attention mask; padded positions are never scored. The sums are accumulated in float64,
    so the result does not depend on ``batch_size`` (up to float32 kernel noise).

    Empty documents (``""``) contain nothing to score and are skipped entirely (the harness's
    word count would otherwise give them one word). Returns the keys of ``summarize_nll``:
    ``nll_sum`` (nats), ``tokens``, ``perplexity`` (token-weighted), ``bits_per_byte``,
    ``byte_perplexity``, ``bits_per_char``, ``word_perplexity``, ``bytes``, ``chars``, ``words``.
    Token perplexities of different tokenizers are not comparable; bits per byte is.
    Without a terminal (the tqdm bar hidden), logs ``score_corpus: batch i/n, s/batch, ETA`` once
    ``progress_interval_s`` seconds have passed since the last such line.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    prefix = prefix_token_id(tokenizer)
    windows: list[tuple[list[int], list[int]]] = []
    n_bytes = n_chars = n_words = 0
    for text in texts:
        if not text:
            continue
        b, c, w = text_units(text)
        n_bytes, n_chars, n_words = n_bytes + b, n_chars + c, n_words + w
        # verbose=False: long documents exceed model_max_length on purpose; we window them.
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        windows.extend(_windows([prefix] + list(ids), max_length, stride))

    # Longest first: similar lengths share a batch (less padding) and an OOM shows up at once.
    windows.sort(key=lambda w: len(w[0]), reverse=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, n_tokens = 0.0, 0
    try:
        with torch.no_grad():
            starts = range(0, len(windows), batch_size)
            bar = tqdm(starts, desc="score_corpus", disable=None)
            # No terminal, no bar: a line every `progress_interval_s` seconds instead (Prefect's run log).
            ticker = progress.Ticker(progress_interval_s, enabled=progress.bar_hidden(bar))
            for done, start in enumerate(bar, 1):
                nll, count = _score_batch(model, windows[start : start + batch_size], prefix, device)
                nll_sum += nll
                n_tokens += count
                ticker.report(log, "score_corpus", done, len(starts))
    finally:
        model.train(was_training)
    return summarize_nll(nll_sum, n_tokens, n_bytes, n_chars, n_words)


def _score_batch(model, batch: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[float, int]:
    """Sum of NLL (nats, float64) and number of scored targets for one batch of windows."""
    width = max(len(inp) for inp, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (inp, _) in enumerate(batch):
        input_ids[row, : len(inp)] = torch.tensor(inp)
        attention_mask[row, : len(inp)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
    nll_sum, count = 0.0, 0
    for row, (inp, targets) in enumerate(batch):
        # Right padding: real positions are 0..len(inp)-1; the last len(targets) logits predict
        # the targets. Upcast per row (not the whole batch) to bound memory: rows x vocab fp32.
        row_logits = logits[row, len(inp) - len(targets) : len(inp)].float()
        tgt = torch.tensor(targets, device=row_logits.device)
        nll_sum += F.cross_entropy(row_logits, tgt, reduction="sum").double().item()
        count += len(targets)
    return nll_sum, count


# --------------------------------------------------------------------------------------------
# Reference-based scores of generated text
# --------------------------------------------------------------------------------------------


class UnicodeWordTokenizer:
    """rouge_score tokenizer: lowercase, then ``\\w+`` with re.UNICODE (keeps Cyrillic words).

    rouge_score's DefaultTokenizer keeps only [a-z0-9] and would erase Russian text entirely.
    No stemming: Porter is English-only. Note that "ё" and "е" stay different letters.
    """

    def tokenize(self, text: str) -> list[str]:
        return word_tokens(text)


def word_tokens(text: str) -> list[str]:
    """Lowercased Unicode word tokens; punctuation is dropped. Used by ROUGE and distinct-n."""
    return _WORD_RE.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(predictions: list[str], n: int) -> float:
    """Unique n-grams / total n-grams, pooled over all predictions (Li et al. 2016).

    0..1; higher = more diverse. 0.0 when there is no n-gram at all (empty outputs).
    """
    grams = [g for p in predictions for g in _ngrams(word_tokens(p), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(predictions: list[str], n: int = 4) -> float:
    """Share of n-gram occurrences that repeat an earlier n-gram of the same prediction.

    Pooled over all n-grams of all predictions (a micro average, so long outputs weigh more).
    0..1; a degenerate loop "a b c d a b c d" has 5 4-grams of which 1 ("a b c d") repeats:
    0.2. 0.0 when there is no n-gram at all.
    """
    repeats = total = 0
    for pred in predictions:
        seen: set[tuple[str, ...]] = set()
        for gram in _ngrams(word_tokens(pred), n):
            repeats += gram in seen
            seen.add(gram)
            total += 1
    return repeats / total if total else 0.0


def _check_pairs(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def score_generations(predictions: list[str], references: list[str]) -> dict[str, float | str]:
    """Corpus scores of generated texts against one reference each.

    * ``bleu``: sacreBLEU corpus BLEU, 0-100, ``tokenize="intl"`` (splits Unicode punctuation
      such as «» off Cyrillic words), case-sensitive; ``bleu_signature`` records the settings.
    * ``chrf``: chrF++ (``sacrebleu.CHRF(word_order=2)``), corpus level, 0-100; character
      n-grams suit Russian morphology. ``chrf_signature`` records the settings.
    * ``rouge1``/``rouge2``/``rougeL``: F-measure in 0..1, mean over pairs (the plain mean that
      ``evaluate``'s rouge approximates with bootstrap), tokens from ``UnicodeWordTokenizer``,
      no stemming.
    * ``distinct_1``/``distinct_2``: unique / total n-grams over all predictions, 0..1.
    * ``repeated_4gram_share``: see ``repeated_ngram_share``, 0..1 (lower = less looping).
    """
    _check_pairs(predictions, references)
    bleu = sacrebleu.BLEU(tokenize="intl")
    chrf = sacrebleu.CHRF(word_order=2)
    out: dict[str, float | str] = {
        "bleu": float(bleu.corpus_score(predictions, [references]).score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": float(chrf.corpus_score(predictions, [references]).score),
        "chrf_signature": str(chrf.get_signature()),
    }
    from rouge_score import rouge_scorer  # here, not at the top: it imports nltk (~1.3 s per process)

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False, tokenizer=UnicodeWordTokenizer())
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # rouge_score's argument order is (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    out.update({key: totals[key] / len(predictions) for key in ROUGE_TYPES})
    out["distinct_1"] = distinct_n(predictions, 1)
    out["distinct_2"] = distinct_n(predictions, 2)
    out["repeated_4gram_share"] = repeated_ngram_share(predictions, 4)
    return out


def chrf_per_sample(predictions: list[str], references: list[str]) -> list[float]:
    """Sentence-level chrF++ (0-100) of each prediction against its reference.

    For per-example tables and bootstrap tests; the mean of these is NOT the corpus chrF++,
    which pools character n-gram statistics before computing the F-score.
    """
    _check_pairs(predictions, references)
    chrf = sacrebleu.CHRF(word_order=2)
    return [float(chrf.sentence_score(p, [r]).score) for p, r in zip(predictions, references)]


# --- Domain words: does a tuned model write the words of the domain it was tuned on? ---

MIN_WORD_LETTERS = 3  # shorter words (в, на, и) are in every domain's vocabulary


def content_words(texts: list[str]) -> list[str]:
    """Lowercased words of at least MIN_WORD_LETTERS letters (no digits), in order."""
    return [w for t in texts for w in word_tokens(t) if len(w) >= MIN_WORD_LETTERS and w.isalpha()]


def domain_word_share(outputs: list[str], vocabulary: set[str]) -> float:
    """Share of generated content words that occur in `vocabulary` (the fine-tuning train split's
    words): how much of what a model writes is real words of the domain it was tuned on."""
    words = content_words(outputs)
    return sum(w in vocabulary for w in words) / len(words) if words else 0.0


def word_shift(base: list[str], tuned: list[str], vocabulary: set[str], top: int = 12) -> dict[str, list]:
    """Domain words the tuned samples use more (`gained`) and less (`lost`) than the base's: [word, base, tuned]."""
    from collections import Counter

    before, after = Counter(content_words(base)), Counter(content_words(tuned))
    moved = [(w, before[w], after[w]) for w in set(before) | set(after) if w in vocabulary and before[w] != after[w]]
    gained = sorted((m for m in moved if m[2] > m[1]), key=lambda m: (m[1] - m[2], m[0]))[:top]
    lost = sorted((m for m in moved if m[1] > m[2]), key=lambda m: (m[2] - m[1], m[0]))[:top]
    return {"gained": [list(m) for m in gained], "lost": [list(m) for m in lost]}
