"""Evaluate base and tuned model on the same test articles: corpus scores, then generations.

Base scores come from the very same PeftModel with its adapter disabled, so both numbers are
computed on identical weights, tokens and windows; the only difference is the adapter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lib.base_model import load_base_model, load_tokenizer
from lib.config import PipelineConfig
from lib.dataset import load_prepared
from lib.generation import generate_continuations
from lib.metrics import chrf_per_sample, score_corpus, score_generations

log = logging.getLogger("lenta_lora.evaluate")

CORPUS_METRICS = ("perplexity", "bits_per_byte", "bits_per_char", "word_perplexity")
TEXT_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2", "repeated_4gram_share")


def reference_continuation(tokenizer, text: str, max_new_tokens: int) -> str:
    """What a perfect model would write: the article's first `max_new_tokens` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def score_both(model, tokenizer, texts: list[str], config: PipelineConfig) -> tuple[dict, dict]:
    kwargs = {"max_length": config.train.max_length, "stride": config.eval.stride, "batch_size": config.eval.batch_size}
    with model.disable_adapter():
        base = score_corpus(model, tokenizer, texts, **kwargs)
    return base, score_corpus(model, tokenizer, texts, **kwargs)


def generate_both(model, tokenizer, prompts: list[str], config: PipelineConfig) -> tuple[list[str], list[str]]:
    kwargs = {"max_new_tokens": config.eval.max_new_tokens, "do_sample": config.eval.do_sample,
              "temperature": config.eval.temperature, "top_p": config.eval.top_p, "seed": config.eval.seed,
              "batch_size": config.eval.batch_size}
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


def write_samples(rows: list[dict], output_dir: Path) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "samples.json", output_dir / "samples.md"
    json_path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731 - table-safe
    lines = ["| prompt | reference | base | tuned | chrF base | chrF tuned |", "|---|---|---|---|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['reference'])} | {cell(r['base_output'])} | {cell(r['tuned_output'])} "
              f"| {r['base_chrf']:.1f} | {r['tuned_chrf']:.1f} |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return json_path, md_path


def evaluate_adapter(dataset_path: str, adapter_dir: str, config: PipelineConfig, output_dir: str | Path) -> dict:
    """Score base vs tuned on the test split; write samples; return metrics and file paths."""
    from peft import PeftModel

    info = json.loads((Path(dataset_path) / "lenta_lora_dataset.json").read_text())
    test = load_prepared(dataset_path)["test"]
    if not len(test):
        raise ValueError(f"{info['csv']}: the test split is empty; raise data.splits.test or add articles")
    tokenizer = load_tokenizer(str(Path(dataset_path) / "tokenizer"), config.model)
    model = PeftModel.from_pretrained(load_base_model(info["base"], config.model), adapter_dir)
    model.eval()

    base_scores, tuned_scores = score_both(model, tokenizer, list(test["document"]), config)
    metrics = name_metrics(base_scores, tuned_scores, CORPUS_METRICS, prefix="test_")
    metrics["test_tokens"] = float(tuned_scores["tokens"])

    picked = test.select(range(min(config.eval.num_samples, len(test))))
    prompts = list(picked["title"])
    references = [reference_continuation(tokenizer, text, config.eval.max_new_tokens) for text in picked["text"]]
    rows: list[dict] = []
    signature = ""
    if prompts:
        base_out, tuned_out = generate_both(model, tokenizer, prompts, config)
        base_text, tuned_text = score_generations(base_out, references), score_generations(tuned_out, references)
        metrics.update(name_metrics(base_text, tuned_text, TEXT_METRICS))
        signature = str(tuned_text.get("bleu_signature", ""))
        rows = [{"prompt": p, "reference": r, "base_output": b, "tuned_output": t, "base_chrf": bc, "tuned_chrf": tc}
                for p, r, b, t, bc, tc in zip(prompts, references, base_out, tuned_out,
                                              chrf_per_sample(base_out, references), chrf_per_sample(tuned_out, references))]
    json_path, md_path = write_samples(rows, Path(output_dir))
    log.info("test perplexity base %.2f -> tuned %.2f; bits/byte %.3f -> %.3f", metrics["base_test_perplexity"],
             metrics["test_perplexity"], metrics["base_test_bits_per_byte"], metrics["test_bits_per_byte"])
    return {"metrics": metrics, "samples_json": str(json_path), "samples_md": str(md_path), "bleu_signature": signature}
