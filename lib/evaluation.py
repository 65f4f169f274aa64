"""Evaluate base and tuned model on the same test articles: corpus scores, then generations.

Base scores come from the very same PeftModel with its adapter disabled, so both numbers are
computed on identical weights, tokens and windows; the only difference is the adapter.

One core (`evaluate_model`) serves the fine-tuning flow (`evaluate_adapter`, on the prepared
dataset's test split) and re-evaluations of registered versions (`lib.reevaluation`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lib import faults
from lib.base_model import free_memory
from lib.benchmark import CORPUS_METRICS, Benchmark
from lib.config import EvalConfig, PipelineConfig
from lib.generation import generate_continuations, model_context_length
from lib.metrics import chrf_per_sample, content_words, domain_word_share, score_corpus, score_generations, word_shift
from lib.threads import configure_threads

log = logging.getLogger("lenta_lora.evaluate")

TEXT_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2", "repeated_4gram_share")
# Direction of "better", for readers of the summary table (the registry only uses the champion metric).
LOWER_IS_BETTER = frozenset(
    {"test_perplexity", "test_bits_per_byte", "test_bits_per_char", "test_word_perplexity", "repeated_4gram_share"}
)
SAMPLE_COLUMNS = ("prompt", "reference", "base_output", "tuned_output")


@dataclass
class EvaluationSummary:
    """What the evaluation stage hands on, once its numbers and files are logged to the run."""

    metrics: dict[str, float]  # `base_<m>`, `<m>`, `delta_<m>`; `benchmark_<m>` when scored on a benchmark
    samples: list[dict]  # the first rows of the samples table (SAMPLE_COLUMNS plus per-sample chrF)
    samples_md: str  # the files of all samples, and the base-vs-tuned bar chart
    samples_json: str
    plot: str
    bleu_signature: str | None  # sacrebleu's, so a BLEU is reproducible
    dataset_fingerprint: str | None = None  # a re-evaluation: the data it read ...
    same_data_as_training: bool | None = None  # ... and whether the version was trained on that data


def reference_continuation(tokenizer, text: str, max_new_tokens: int) -> str:
    """What a perfect model would write: the article's first `max_new_tokens` tokens.

    A byte-level BPE can split one Cyrillic letter into two byte tokens; cutting between them
    would decode to U+FFFD and cost chrF a character no model could match. The decoded cut is
    therefore trimmed to its longest common prefix with the decoded whole text.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    cut = tokenizer.decode(ids[:max_new_tokens], skip_special_tokens=True)
    if len(ids) > max_new_tokens:
        cut = os.path.commonprefix([cut, tokenizer.decode(ids, skip_special_tokens=True)])
    return cut.strip()


def score_both(model, tokenizer, texts: list[str], config: PipelineConfig) -> tuple[dict, dict]:
    kwargs = {"max_length": config.train.max_length, "stride": config.eval.stride, "batch_size": config.eval.batch_size}
    with model.disable_adapter():
        base = score_corpus(model, tokenizer, texts, **kwargs)
    return base, score_corpus(model, tokenizer, texts, **kwargs)


def generate_both(model, tokenizer, prompts: list[str], settings: EvalConfig) -> tuple[list[str], list[str]]:
    kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
    }
    with model.disable_adapter():
        base = generate_continuations(model, tokenizer, prompts, **kwargs)
    return base, generate_continuations(model, tokenizer, prompts, **kwargs)


def name_metrics(base: dict, tuned: dict, keys: tuple[str, ...], prefix: str = "") -> dict[str, float]:
    """`base_<m>`, `<m>` and `delta_<m>` (tuned - base) for each metric key."""
    out: dict[str, float] = {}
    for key in keys:
        name = f"{prefix}{key}"
        out[f"base_{name}"], out[name] = float(base[key]), float(tuned[key])
        out[f"delta_{name}"] = out[name] - out[f"base_{name}"]
    return out


def markdown_cell(text) -> str:
    """One GitHub-table cell: any line break (\\n, \\r, U+2028...) becomes a space, pipes are escaped."""
    return re.sub(r"\s*[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+\s*", " ", str(text)).replace("|", "\\|").strip()


def samples_markdown(rows: list[dict], extra: tuple[str, ...] = ()) -> str:
    """A Markdown table of samples: prompt, reference, base and tuned output (+ `extra` columns)."""
    columns = [*SAMPLE_COLUMNS, *extra]
    cells = [[markdown_cell(f"{r[c]:.1f}" if isinstance(r[c], float) else r[c]) or " " for c in columns] for r in rows]
    headers = {"base_output": "base", "tuned_output": "tuned", "base_chrf": "chrF++ base", "tuned_chrf": "chrF++ tuned"}
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def metrics_markdown(metrics: dict[str, float]) -> str:
    """Table of every metric with a base value: base, tuned, delta, which direction is better.

    Corpus scores first (bits per byte is the tokenizer-independent one), then generation scores.
    """
    known = [f"test_{k}" for k in CORPUS_METRICS] + list(TEXT_METRICS)
    names = [k for k in known if k in metrics and f"base_{k}" in metrics]
    names += sorted(
        k for k in metrics if f"base_{k}" in metrics and k not in names and not k.startswith(("base_", "delta_"))
    )
    lines = ["| metric | base | tuned | delta | better |", "|---|---:|---:|---:|---|"]
    for name in names:
        base, tuned = metrics[f"base_{name}"], metrics[name]
        lower = name in LOWER_IS_BETTER
        improved = tuned < base if lower else tuned > base
        verdict = ("lower" if lower else "higher") + (" (tuned better)" if improved else "")
        lines.append(f"| {name} | {base:.4g} | {tuned:.4g} | {tuned - base:+.3g} | {verdict} |")
    return "\n".join(lines) + "\n"


def write_samples(rows: list[dict], output_dir: Path, shift: dict | None = None) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "samples.json", output_dir / "samples.md"
    json_path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    text = samples_markdown(rows, ("base_chrf", "tuned_chrf"))
    if shift:
        fmt = lambda items: ", ".join(f"{w} ({b} -> {t})" for w, b, t in items) or "none"  # noqa: E731
        text += (
            "\n### Words that moved\n\nDomain words (from the fine-tuning train split) that the tuned samples "
            f"use more than the base's: {fmt(shift['gained'])}.\n\nLess: {fmt(shift['lost'])}.\n"
        )
    md_path.write_text(text, encoding="utf-8")
    return json_path, md_path


def evaluate_model(
    model,
    tokenizer,
    test: dict[str, list[str]],
    config: PipelineConfig,
    output_dir: str | Path,
    domain_vocabulary: set[str] | None = None,
) -> dict:
    """Score base vs tuned on `test` (lists `document`, `title`, `text`); write samples.

    Returns `metrics` (`base_<m>`, `<m>`, `delta_<m>`, `test_tokens`), `samples_json`,
    `samples_md` and `bleu_signature`. `model` is a PeftModel (its adapter is switched off for base).
    With `domain_vocabulary` (the fine-tuning train split's words) also `domain_word_share` and,
    in `samples_md` and `word_shift`, the domain words whose use moved.
    """
    base_scores, tuned_scores = score_both(model, tokenizer, list(test["document"]), config)
    metrics = name_metrics(base_scores, tuned_scores, CORPUS_METRICS, prefix="test_")
    metrics["test_tokens"] = float(tuned_scores["tokens"])
    faults.reach("evaluate.after-scoring")

    count = min(config.eval.num_samples, len(test["document"]))
    # Training documents are "title\n\ntext": end the prompt with the same separator, so the first
    # generated token starts the text (which is what the reference holds), not the separator.
    prompts = [f"{title}\n\n" for title in test["title"][:count]]
    references = [reference_continuation(tokenizer, text, config.eval.max_new_tokens) for text in test["text"][:count]]
    rows: list[dict] = []
    signature, shift = "", None
    if prompts:
        base_out, tuned_out = generate_both(model, tokenizer, prompts, config.eval)
        base_text, tuned_text = score_generations(base_out, references), score_generations(tuned_out, references)
        metrics.update(name_metrics(base_text, tuned_text, TEXT_METRICS))
        if domain_vocabulary:
            shares = [{"domain_word_share": domain_word_share(out, domain_vocabulary)} for out in (base_out, tuned_out)]
            metrics.update(name_metrics(*shares, ("domain_word_share",)))
            shift = word_shift(base_out, tuned_out, domain_vocabulary)
        signature = str(tuned_text.get("bleu_signature", ""))
        rows = [
            {"prompt": p, "reference": r, "base_output": b, "tuned_output": t, "base_chrf": bc, "tuned_chrf": tc}
            for p, r, b, t, bc, tc in zip(
                prompts,
                references,
                base_out,
                tuned_out,
                chrf_per_sample(base_out, references),
                chrf_per_sample(tuned_out, references),
            )
        ]
    json_path, md_path = write_samples(rows, Path(output_dir), shift)
    log.info(
        "test perplexity base %.2f -> tuned %.2f; bits/byte %.3f -> %.3f",
        metrics["base_test_perplexity"],
        metrics["test_perplexity"],
        metrics["base_test_bits_per_byte"],
        metrics["test_bits_per_byte"],
    )
    if shift:
        log.info("domain words the tuned samples use more: %s", shift["gained"])
    return {
        "metrics": metrics,
        "samples_json": str(json_path),
        "samples_md": str(md_path),
        "bleu_signature": signature,
        "word_shift": shift,
    }


def evaluate_adapter(
    dataset_path: str,
    adapter_dir: str,
    config: PipelineConfig,
    output_dir: str | Path,
    benchmark: Benchmark | None = None,
) -> dict:
    """The fine-tuning flow's evaluation: the prepared dataset's test split, the adapter just trained;
    with `benchmark`, also the tuned model's `benchmark_<m>` scores on the registered model's texts."""
    from peft import PeftModel

    from lib.base_model import load_base_model, load_tokenizer
    from lib.dataset import load_prepared, read_prepared

    configure_threads(config.train.threads)
    info = read_prepared(dataset_path)
    prepared = load_prepared(dataset_path)
    test = prepared["test"]
    if not len(test):
        raise ValueError(f"{info.csv}: the test split is empty; raise data.splits.test or add articles")
    tokenizer = load_tokenizer(info.tokenizer_dir, config.model)
    model = PeftModel.from_pretrained(load_base_model(info.base, config.model), adapter_dir)
    model.eval()
    columns = {"document": list(test["document"]), "title": list(test["title"]), "text": list(test["text"])}
    vocabulary = set(content_words(list(prepared["train"]["document"])))
    result = evaluate_model(model, tokenizer, columns, config, output_dir, vocabulary)
    if benchmark is not None:
        result["metrics"].update(
            benchmark_scores(model, tokenizer, benchmark, columns["document"], result["metrics"], config)
        )
    del model  # nothing after evaluation needs it (registration loads no model)
    free_memory()
    return result


def benchmark_scores(
    model, tokenizer, benchmark: Benchmark, test_documents: list[str], metrics: dict, config: PipelineConfig
) -> dict[str, float]:
    """The tuned model's `benchmark_<m>`. When the benchmark is this very test split with the same
    windows (the first version of a model, or an unchanged corpus), the test scores are those
    numbers already: same texts, same windows, and the scores do not depend on batch size."""
    from lib.benchmark import benchmark_fingerprint, read_benchmark, score_benchmark

    if benchmark_fingerprint(test_documents, config.train.max_length, config.eval.stride) == benchmark.fingerprint:
        log.info("benchmark %s is this run's test split: its scores are the test scores", benchmark.fingerprint[:12])
        return {f"benchmark_{k}": metrics[f"test_{k}"] for k in CORPUS_METRICS} | {
            "benchmark_tokens": metrics["test_tokens"]
        }
    _, documents = read_benchmark(benchmark.path)
    scores = score_benchmark(
        model, tokenizer, benchmark, documents, config.eval.batch_size, model_context_length(model, tokenizer)
    )
    log.info(
        "benchmark %s: bits/byte %.4f on %d texts",
        benchmark.fingerprint[:12],
        scores["benchmark_bits_per_byte"],
        len(documents),
    )
    return scores
