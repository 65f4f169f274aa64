"""`champion` through the whole flow (real Prefect engine, sqlite MLflow): a version trained on
easier texts does not win by its own test split's luck, and `registry.benchmark` fixes a model's
benchmark on a CSV of one's choosing."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib.config import SAMPLE_CSV, load_config
from tests.conftest import tiny_overrides
from tests.support.adapter_fixtures import flip_last_byte

pytestmark = pytest.mark.slow


def write_easy_corpus(path, articles: int = 60) -> str:
    """Kaggle-format news that repeat one sentence pattern: far easier to predict than the sample."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "title", "text", "topic", "tags", "date"])
        for i in range(articles):
            # One pattern, a different number each: distinct articles (duplicates are removed).
            text = " ".join([f"В Москве {i} числа солнечно, ветер слабый, осадков не ожидается."] * 12)
            # Tagged sport, the demo profile's fine-tuning topic, so that the same selection applies.
            writer.writerow(
                [
                    f"https://example.test/weather/{i}",
                    f"Погода на {i % 28 + 1} число",
                    text,
                    "Спорт",
                    "Москва",
                    "2020/01/01",
                ]
            )
    return str(path)


def test_easier_texts_do_not_win_champion_and_a_chosen_benchmark_is_used(
    prefect_server, shared_cache, tracking_uri, tmp_path
):
    from flows.finetune import finetune

    client = MlflowClient(tracking_uri)
    first = finetune(config=load_config(DEFAULT_PROFILE, tiny_overrides(shared_cache)))
    easy_csv = write_easy_corpus(tmp_path / "easy.csv")
    # Its base is pretrained on its own train split (the corpus has no other topic to pretrain on).
    easy_data = {"data.source": "csv", "data.path": easy_csv, "model.tiny.pretrain_corpus": "train_split"}
    easy = finetune(config=load_config(DEFAULT_PROFILE, tiny_overrides(str(tmp_path / "cache"), **easy_data)))
    one, two = first["metrics"], easy["metrics"]
    print(
        f"\ntest bits/byte: v1 {one['test_bits_per_byte']:.4f}, v2 {two['test_bits_per_byte']:.4f} (own test splits); "
        f"benchmark bits/byte: v1 {one['benchmark_bits_per_byte']:.4f}, v2 {two['benchmark_bits_per_byte']:.4f}"
    )
    assert two["test_bits_per_byte"] < one["test_bits_per_byte"]  # its own texts are easier...
    assert two["benchmark_bits_per_byte"] > one["benchmark_bits_per_byte"]  # ...the model's benchmark is not
    assert easy["benchmark"]["fingerprint"] == first["benchmark"]["fingerprint"]
    assert easy["model"]["version"] == 2 and easy["model"]["champion"] is False
    assert str(client.get_model_version_by_alias("test-adapter", "champion").version) == "1"
    decision = json.loads(client.get_model_version("test-adapter", "2").tags["champion_decision"])
    assert (
        decision["value"] == two["benchmark_bits_per_byte"]
        and decision["previous_value"] == one["benchmark_bits_per_byte"]
    )
    assert decision["benchmark_fingerprint"] == first["benchmark"]["fingerprint"] and not decision["promoted"]

    # A new model trained on the easy corpus but judged on the sample's test split, by choice.
    chosen = finetune(
        config=load_config(
            DEFAULT_PROFILE,
            tiny_overrides(
                str(tmp_path / "cache"),
                **{**easy_data, "registry.model_name": "judged-on-sample", "registry.benchmark": str(SAMPLE_CSV)},
            ),
        )
    )
    assert chosen["benchmark"]["fingerprint"] == first["benchmark"]["fingerprint"]  # same texts, same windows
    assert "lenta-sample.csv" in client.get_registered_model("judged-on-sample").tags["benchmark.source"]
    assert chosen["metrics"]["benchmark_bits_per_byte"] == pytest.approx(two["benchmark_bits_per_byte"], rel=1e-6)


def test_a_champion_without_a_benchmark_score_is_scored_before_it_is_compared(
    prefect_server, shared_cache, tracking_uri, capsys
):
    """A champion registered before benchmarks existed has no score on the model's benchmark. Both
    places that compare with it, the next flow run and `lenta-lora promote`, first score it there;
    the number they get is the one it was registered with (same adapter, texts and windows). One
    that cannot be scored is left out of the race."""
    from flows.cli import main
    from flows.finetune import finetune
    from lib.champion import BENCHMARK_TAG

    name, metric = "scored-late", "benchmark_bits_per_byte"
    client = MlflowClient(tracking_uri)
    config = load_config(DEFAULT_PROFILE, tiny_overrides(shared_cache, **{"registry.model_name": name}))
    first = finetune(config=config)
    fingerprint = first["benchmark"]["fingerprint"]
    assert config.registry.champion_metric == metric and first["model"]["champion"] is True

    def forget_benchmark_scores(version: str) -> None:  # what a version from before benchmarks looks like
        for key in [k for k in client.get_model_version(name, version).tags if k.startswith("benchmark_")]:
            client.delete_model_version_tag(name, version, key)
        assert BENCHMARK_TAG not in client.get_model_version(name, version).tags

    def scored(version: str) -> tuple[str, float, str]:
        tags = client.get_model_version(name, version).tags
        return tags[BENCHMARK_TAG], float(tags[metric]), tags["benchmark_scored"]

    forget_benchmark_scores("1")
    second = finetune(config=config, force=True)  # the same training again: a twin of version 1
    assert second["model"]["version"] == 2
    on, value, reason = scored("1")
    assert on == fingerprint and reason == "scored when first compared"
    with capsys.disabled():
        print(f"\nversion 1 {metric}: registered {first['metrics'][metric]!r}, scored again by the flow {value!r}")
    assert value == pytest.approx(first["metrics"][metric], rel=1e-6)
    decision = json.loads(client.get_model_version(name, "2").tags["champion_decision"])
    assert decision["previous_champion"] == "1" and decision["previous_value"] == value  # compared with the fresh score

    forget_benchmark_scores("1")
    forget_benchmark_scores("2")
    code = main(["promote", "--model", name, "--version", "2", "--tracking-uri", tracking_uri])
    out = capsys.readouterr().out
    assert f"scoring version 1 on benchmark {fingerprint[:12]}" in out and "scoring version 2" in out, out
    for version, registered in (("1", first), ("2", second)):
        on, value, reason = scored(version)
        assert on == fingerprint and reason == "scored by lenta-lora promote"
        assert value == pytest.approx(registered["metrics"][metric], rel=1e-6)
    holder = str(client.get_model_version_by_alias(name, "champion").version)
    assert code == (0 if holder == "2" else 1) and f"version 2:         {scored('2')[1]:.6g}" in out, out

    # A champion that cannot be scored (its adapter no longer matches its checksum) is left out of
    # the race: the next version is compared only with versions scored on the benchmark.
    forget_benchmark_scores(holder)
    folder = Path(urlparse(client.get_model_version_download_uri(name, holder)).path)
    weights = folder / "artifacts" / "adapter" / "adapter_model.safetensors"
    flip_last_byte(weights)
    third = finetune(config=config, force=True)
    assert third["model"]["version"] == 3
    assert BENCHMARK_TAG not in client.get_model_version(name, holder).tags  # it could not be scored
    decision = json.loads(client.get_model_version(name, "3").tags["champion_decision"])
    assert decision["previous_champion"] == holder and decision["previous_value"] is None, decision
    assert str(client.get_model_version_by_alias(name, "champion").version) != holder


def test_a_benchmark_file_that_does_not_exist_fails_the_run_before_training(
    prefect_server, shared_cache, tracking_uri, tmp_path
):
    from flows.finetune import finetune

    missing = tmp_path / "no-such-benchmark.csv"
    settings = {"registry.model_name": "never-judged", "registry.benchmark": str(missing)}
    config = load_config(DEFAULT_PROFILE, tiny_overrides(shared_cache, **settings))
    with pytest.raises(FileNotFoundError, match=f"registry.benchmark {missing}: no such file; give a Kaggle-format"):
        finetune(config=config)
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and "train_steps" not in run.data.metrics  # nothing trained
    assert client.search_model_versions("name='never-judged'") == []
