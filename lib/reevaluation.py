"""Score a registered version again: on its model's benchmark (a version registered before the
benchmark existed), or base vs tuned on the test split of any Kaggle-format CSV, selected and
split exactly as `lib.dataset.prepare_dataset` does (the `evaluate` command and flow).

Both load the version from the MLflow registry (`lib.loading`); the scoring itself is
`lib.evaluation.evaluate_model` and `lib.benchmark.score_benchmark`, as in the fine-tuning flow.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lib.base_model import free_memory
from lib.benchmark import Benchmark, read_benchmark, score_benchmark
from lib.config import ConfigError, DataConfig, PipelineConfig, build_config, load_config
from lib.corpus import CorpusError, iter_articles, join_title_and_text
from lib.dataset import fingerprint_settings
from lib.evaluation import evaluate_model
from lib.generation import model_context_length
from lib.loading import load_registered
from lib.splits import fingerprint_articles, select_articles, split_articles
from lib.threads import configure_threads


def score_registered_on_benchmark(
    tracking_uri: str, registered_uri: str, benchmark: Benchmark, batch_size: int
) -> dict[str, float]:
    """`benchmark_<m>` of a registered version (one registered before benchmarks, say)."""
    model, tokenizer, _ = load_registered(tracking_uri, registered_uri)
    _, documents = read_benchmark(benchmark.path)
    scores = score_benchmark(model, tokenizer, benchmark, documents, batch_size, model_context_length(model, tokenizer))
    del model
    free_memory()
    return scores


def evaluation_config(
    source_config_yaml: str | None,
    config_path: str | None = None,
    overrides: list[str] = (),
    csv: str | None = None,
    tracking_uri: str | None = None,
) -> PipelineConfig:
    """Config of a re-evaluation: `config_path` if given, else the config the version was trained with.

    The training config is the default because it fixes what makes numbers comparable with the
    ones the version was registered with: the scoring window (`train.max_length`), the split
    ratios and seed, and the generation settings. The data is the bundled sample unless `csv` is
    given; `overrides` (`key=value`) come last.
    """
    if config_path:
        raw = load_config(config_path).model_dump(mode="json")
    elif source_config_yaml:
        raw = yaml.safe_load(source_config_yaml) or {}
    else:
        raise FileNotFoundError("the registered version's run has no config.yaml; pass --config PATH")
    raw.setdefault("data", {}).update(
        {"source": "csv", "path": str(Path(csv).expanduser().resolve())} if csv else {"source": "sample", "path": None}
    )
    if tracking_uri:
        raw.setdefault("tracking", {})["uri"] = tracking_uri
    return build_config(raw, list(overrides), source=config_path or "the registered version's config.yaml")


def test_split(csv_path: str | Path, data: DataConfig) -> dict:
    """The test articles of a CSV, chosen exactly as `lib.dataset.prepare_dataset` chooses them.

    Also returns the dataset fingerprint (same settings, same digest as prepare_dataset), so an
    evaluation can say whether it saw the very data the version was trained and tested on.
    """
    selected = select_articles(
        iter_articles(csv_path),
        topics=data.topics,
        date_from=data.date_from,
        date_to=data.date_to,
        min_text_chars=data.min_text_chars,
        max_articles=data.max_articles,
        seed=data.seed,
        source=csv_path,
    )
    splits = split_articles(selected, data.splits.model_dump())
    # The same settings as prepare_dataset, so equal data gives an equal fingerprint.
    settings = fingerprint_settings(data)
    test = splits["test"]
    if not test:
        raise CorpusError(
            f"{csv_path}: the test split is empty ({len(selected)} articles selected); "
            "raise data.splits.test or pass a larger --csv"
        )
    return {
        "document": [join_title_and_text(a) for a in test],
        "title": [a.title for a in test],
        "text": [a.text for a in test],
        "fingerprint": fingerprint_articles(splits, settings),
    }


def evaluate_registered(
    tracking_uri: str, registered_uri: str, csv_path: str | Path, config: PipelineConfig, output_dir: str | Path
) -> dict:
    """Re-evaluate `models:/NAME/VERSION` on the test split of `csv_path`; same result keys as
    `evaluate_model`, plus `dataset_fingerprint` and `test_articles`."""
    configure_threads(config.train.threads)
    model, tokenizer, _ = load_registered(tracking_uri, registered_uri)
    context = model_context_length(model, tokenizer)
    if context is not None and config.train.max_length > context:
        raise ConfigError(
            f"{registered_uri}: train.max_length={config.train.max_length} (the scoring window) exceeds "
            f"the model's context of {context} tokens; pass --set train.max_length={context}"
        )
    test = test_split(csv_path, config.data)
    result = evaluate_model(model, tokenizer, test, config, output_dir)
    del model
    free_memory()
    return {**result, "dataset_fingerprint": test["fingerprint"], "test_articles": len(test["document"])}
