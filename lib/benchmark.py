"""A registered model's benchmark: the one set of evaluation texts every version is judged on.

`champion` compares versions by a number measured on these texts, with these windows, never by
each run's own test split: a short run on easier texts would otherwise win any "lowest test
metric" race. A benchmark is a JSON file (`benchmark.json`) holding the documents and the
scoring settings; its fingerprint hashes all of them, so two numbers are comparable exactly when
they carry the same fingerprint. Bits per byte removes the tokenizer from the comparison (a
version on another base is scored fairly); the texts and windows must still be the same.

Where the texts come from (`registry.benchmark`), decided when the model gets its first version:
    None      that run's test split (the prepared dataset's `test` rows)
    a path    the test split of that Kaggle-format CSV, selected with the run's `data.*` settings
    "kaggle"  the test split of the Kaggle file (downloaded by the acquire stage)
Later runs read the model's stored benchmark from the registry (lib/champion.py) instead.

No MLflow or Prefect here: storing and finding benchmarks is lib/champion.py's job.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

FILE_NAME = "benchmark.json"
# Corpus scores (lib.metrics.score_corpus), each reported as test_<m> and benchmark_<m>.
CORPUS_METRICS = ("perplexity", "bits_per_byte", "bits_per_char", "word_perplexity")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as the stages pass it around: a reference to its file, and its identity."""

    fingerprint: str  # sha256 of the texts and the scoring settings
    path: str  # local benchmark.json
    source: str  # where the texts came from, for people (e.g. "test split of sample lenta-sample.csv")
    texts: int
    max_length: int  # tokens per scoring window
    stride: int | None  # None: disjoint windows
    stored: bool = False  # already the registered model's benchmark (False: this run would fix it)

    def describe(self) -> dict:
        return asdict(self)


def benchmark_fingerprint(documents: list[str], max_length: int, stride: int | None) -> str:
    """sha256 over every document (in order) and the window settings: what makes scores comparable."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"max_length": max_length, "stride": stride, "texts": len(documents)}).encode())
    for document in documents:
        digest.update(b"\x00" + document.encode("utf-8"))
    return digest.hexdigest()


def write_benchmark(
    documents: list[str], max_length: int, stride: int | None, source: str, folder: str | Path
) -> Benchmark:
    """Write `folder/<fingerprint>.json` (written whole, then renamed) and return its reference.

    Named by its fingerprint, a benchmark file is written once per machine and reused by every run
    of every model that is judged on it."""
    if not documents:
        raise ValueError(
            f"benchmark from {source} has no texts; raise data.splits.test or set registry.benchmark "
            "to a CSV with more articles"
        )
    fingerprint = benchmark_fingerprint(documents, max_length, stride)
    path = Path(folder) / f"{fingerprint}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{fingerprint}.{os.getpid()}.tmp")
    payload = {
        "fingerprint": fingerprint,
        "source": source,
        "max_length": max_length,
        "stride": stride,
        "documents": documents,
    }
    try:
        tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return Benchmark(fingerprint, str(path), source, len(documents), max_length, stride)


def read_benchmark(path: str | Path, stored: bool = True) -> tuple[Benchmark, list[str]]:
    """A benchmark file -> (its reference, its documents); a file whose texts do not match its
    recorded fingerprint (edited or truncated) is refused."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    documents = payload["documents"]
    found = benchmark_fingerprint(documents, payload["max_length"], payload["stride"])
    if found != payload["fingerprint"]:
        raise ValueError(
            f"benchmark file {path}: its texts hash to {found[:12]}, not the recorded "
            f"{payload['fingerprint'][:12]}; it was changed after it was stored"
        )
    return Benchmark(
        found, str(path), payload["source"], len(documents), payload["max_length"], payload["stride"], stored
    ), documents


def benchmark_metrics(scores: dict) -> dict[str, float]:
    """`score_corpus` output -> `benchmark_<m>` metrics (the names `registry.champion_metric` takes)."""
    return {f"benchmark_{key}": float(scores[key]) for key in CORPUS_METRICS}


def score_benchmark(
    model, tokenizer, benchmark: Benchmark, documents: list[str], batch_size: int, context: int | None = None
) -> dict[str, float]:
    """The model's `benchmark_<m>` scores on the benchmark's texts, with the benchmark's windows."""
    from lib.metrics import score_corpus

    if context is not None and benchmark.max_length > context:
        raise ValueError(
            f"the benchmark scores windows of {benchmark.max_length} tokens but this model's context is "
            f"{context}: register it under another registry.model_name (a new benchmark)"
        )
    scores = score_corpus(
        model, tokenizer, documents, max_length=benchmark.max_length, stride=benchmark.stride, batch_size=batch_size
    )
    return {**benchmark_metrics(scores), "benchmark_tokens": float(scores["tokens"])}
