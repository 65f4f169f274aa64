"""`champion` (lib/champion.py) against a real sqlite MLflow registry: decided on the model's one
benchmark, behind a promotion gate, converging under a stale write; `lenta-lora promote`.

Versions here are registry entries without files (the decision reads only tags); the benchmark is
a real file stored the way the flow stores it.
"""

from __future__ import annotations

import json
import threading
from uuid import uuid4

import pytest
from mlflow import MlflowClient

from lib import benchmark_store, champion
from lib.benchmark import benchmark_fingerprint, read_benchmark, write_benchmark

METRIC = "benchmark_bits_per_byte"
TEXTS = ["Первая новость о погоде в Москве.", "Вторая новость: сборная выиграла матч.", "Третья, о ценах на нефть."]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('champion') / 'mlflow.db'}"
    return uri, MlflowClient(uri, uri)


def new_model(store, tmp_path, values: dict[str, tuple[float, str] | None]) -> tuple[str, str]:
    """A registered model with a stored benchmark and one version per key, tagged as the flow tags
    them: {key: (value, "bench" | "other")} ("other": measured on another text set)."""
    uri, client = store
    name = f"m-{uuid4().hex[:8]}"
    benchmark = benchmark_store.store_benchmark(
        uri, name, write_benchmark(TEXTS, 64, None, "test texts", tmp_path / name), "champion-tests"
    )
    for key, scored in values.items():
        add_version(client, name, benchmark.fingerprint, key, scored)
    return name, benchmark.fingerprint


def add_version(client, name: str, fingerprint: str, key: str, scored: tuple[float, str] | None) -> str:
    tags = {"key": key}
    if scored is not None:
        value, where = scored
        tags |= {champion.BENCHMARK_TAG: fingerprint if where == "bench" else "0" * 64, METRIC: repr(value)}
    return str(client.create_model_version(name, f"file:///nonexistent/{key}", tags=tags).version)


def holder(client, name) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def decide(store, name, fingerprint, version, margin=0.002) -> dict:
    return champion.update_champion(store[1], name, version, METRIC, fingerprint, margin)


def test_benchmark_is_stored_once_with_its_fingerprint(store, tmp_path):
    uri, client = store
    name, fingerprint = new_model(store, tmp_path, {})
    tags = client.get_registered_model(name).tags
    assert tags["benchmark.fingerprint"] == fingerprint == benchmark_fingerprint(TEXTS, 64, None)
    assert (tags["benchmark.texts"], tags["benchmark.max_length"], tags["benchmark.stride"]) == ("3", "64", "None")
    run = client.get_run(tags["benchmark.run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["lenta_lora.kind"] == "benchmark"
    [found] = run.inputs.dataset_inputs
    assert found.dataset.name == f"{name}-benchmark" and found.dataset.digest == fingerprint[:36]
    fetched = benchmark_store.fetch_benchmark(uri, name, tmp_path / "fetched")
    assert fetched.fingerprint == fingerprint and read_benchmark(fetched.path)[1] == TEXTS
    # A second store (another text set) keeps the first: a model's benchmark never changes.
    other = write_benchmark(TEXTS[:2], 64, None, "other texts", tmp_path / "other")
    assert benchmark_store.store_benchmark(uri, name, other, "champion-tests").fingerprint == fingerprint
    # Windows are part of what makes numbers comparable: same texts, other max length, other fingerprint.
    assert benchmark_fingerprint(TEXTS, 128, None) != fingerprint != benchmark_fingerprint(TEXTS, 64, 32)


def model_tags_match_the_pointed_run(client, name: str) -> dict:
    """The model's `benchmark.<key>` tags (for people) copy the params of the run it points at."""
    tags = client.get_registered_model(name).tags
    params = client.get_run(tags[benchmark_store.POINTER]).data.params
    for key in benchmark_store.DESCRIPTION:
        assert tags[f"benchmark.{key}"] == params[f"benchmark.{key}"], key
    return tags


@pytest.mark.parametrize("where", ["sqlite", "http"])
def test_racing_first_registrations_agree_on_one_benchmark(where, store, tmp_path, request):
    """A sweep started at once on a new model name, each run with other test texts: every racer
    must come back with the benchmark the model keeps. Before benchmark_store converged the
    pointer (4 racers, 20 trials), racers failed on a UNIQUE constraint or got a benchmark the model
    did not keep, and the model's tags could mix two racers' values (6 of 20 models over HTTP
    then failed every later run's benchmark download)."""
    uri = store[0] if where == "sqlite" else request.getfixturevalue("mlflow_server").uri
    client = MlflowClient(uri, uri)
    racers = 4
    for trial in range(5):
        name = f"race-{uuid4().hex[:8]}"
        candidates = [
            write_benchmark([f"{text} ({i})" for text in TEXTS], 64, None, f"racer {i}", tmp_path / name / str(i))
            for i in range(racers)
        ]
        barrier, got, errors = threading.Barrier(racers), [None] * racers, []

        def race(i: int) -> None:
            barrier.wait()
            try:
                got[i] = benchmark_store.store_benchmark(uri, name, candidates[i], "race").fingerprint
            except Exception as error:  # noqa: BLE001 - collected and asserted on below
                errors.append(error)

        threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, (trial, errors)
        kept = benchmark_store.fetch_benchmark(uri, name, tmp_path / name / "fetched")
        assert set(got) == {kept.fingerprint}, (trial, got, kept.fingerprint)
        assert kept.fingerprint in {c.fingerprint for c in candidates}
        kept_run = model_tags_match_the_pointed_run(client, name)[benchmark_store.POINTER]
        [experiment] = client.search_experiments(filter_string="name = 'race-benchmarks'")
        runs = client.search_runs([experiment.experiment_id], f"tags.`benchmark.for_model` = '{name}'")
        # Every racer's own benchmark run that lost says which one won (a racer that found the
        # pointer set already made none).
        assert kept_run in {r.info.run_id for r in runs}
        for run in runs:
            expected = None if run.info.run_id == kept_run else kept_run
            assert run.data.tags.get("benchmark.superseded_by") == expected, (trial, run.info.run_id)


def test_a_later_racer_adopts_the_first_finished_benchmark_and_a_stale_write_is_undone(store, tmp_path):
    uri, client = store
    name, first = new_model(store, tmp_path, {})
    first_run = client.get_registered_model(name).tags[benchmark_store.POINTER]
    # A racer that looked before the pointer was set (simulated: the pointer removed while it looks).
    client.delete_registered_model_tag(name, benchmark_store.POINTER)
    late = write_benchmark(TEXTS[:2], 64, None, "the late racer's texts", tmp_path / "late")
    kept = benchmark_store.store_benchmark(uri, name, late, "champion-tests")
    assert kept.fingerprint == first and kept.stored and kept.path == ""  # not the late racer's file
    tags = model_tags_match_the_pointed_run(client, name)
    assert tags[benchmark_store.POINTER] == first_run
    [late_run] = client.search_runs(
        [client.get_run(first_run).info.experiment_id],
        f"tags.`benchmark.for_model` = '{name}' and params.`benchmark.fingerprint` = '{late.fingerprint}'",
    )
    assert late_run.data.tags["benchmark.superseded_by"] == first_run
    # That racer's pointer write landing after everything else: the next convergence undoes it.
    client.set_registered_model_tag(name, benchmark_store.POINTER, late_run.info.run_id)
    assert benchmark_store.model_benchmark(uri, name)["fingerprint"] == late.fingerprint  # the pointer decides
    assert benchmark_store.converge_benchmark(uri, name)["fingerprint"] == first
    assert model_tags_match_the_pointed_run(client, name)[benchmark_store.POINTER] == first_run


def test_a_model_made_again_under_an_old_name_gets_its_own_benchmark(store, tmp_path):
    """Deleting a registered model and registering the name again starts afresh: the old model's
    benchmark runs (still in the benchmarks experiment) are not candidates."""
    uri, client = store
    name, old = new_model(store, tmp_path, {})
    client.delete_registered_model(name)
    other = write_benchmark(TEXTS[1:], 64, None, "new texts", tmp_path / "new")
    assert benchmark_store.store_benchmark(uri, name, other, "champion-tests").fingerprint == other.fingerprint != old
    assert benchmark_store.model_benchmark(uri, name)["fingerprint"] == other.fingerprint


def test_an_edited_benchmark_file_is_refused(tmp_path):
    written = write_benchmark(TEXTS, 64, None, "t", tmp_path)
    payload = json.loads(open(written.path, encoding="utf-8").read())
    payload["documents"][0] += " (изменено)"
    open(written.path, "w", encoding="utf-8").write(json.dumps(payload, ensure_ascii=False))
    with pytest.raises(ValueError, match="changed after it was stored"):
        read_benchmark(written.path)


def test_gate_keeps_the_holder_within_the_margin_and_records_both_values(store, tmp_path):
    _, client = store
    name, fingerprint = new_model(store, tmp_path, {"a": (1.0, "bench")})
    assert decide(store, name, fingerprint, "1")["promoted"] and holder(client, name) == "1"
    add_version(client, name, fingerprint, "b", (0.999, "bench"))
    within = decide(store, name, fingerprint, "2")  # 0.1% better: inside the 0.2% margin
    assert not within["promoted"] and holder(client, name) == "1"
    assert (within["value"], within["previous_value"], within["previous_champion"]) == (0.999, 1.0, "1")
    assert within["threshold"] == pytest.approx(0.998) and within["relative_improvement"] == pytest.approx(0.001)
    assert within["benchmark_fingerprint"] == fingerprint and within["reason"].startswith("champion stays 1")
    assert json.loads(client.get_model_version(name, "2").tags["champion_decision"]) == within
    add_version(client, name, fingerprint, "c", (0.99, "bench"))
    beyond = decide(store, name, fingerprint, "3")  # 1% better
    assert beyond["promoted"] and holder(client, name) == "3" and beyond["relative_improvement"] == pytest.approx(0.01)


def test_numbers_from_other_texts_never_enter_the_decision(store, tmp_path):
    """Version 2 looks far better on its own (easier) texts; version 3 has no benchmark score at all."""
    _, client = store
    name, fingerprint = new_model(store, tmp_path, {"a": (1.8, "bench"), "b": (0.6, "other"), "c": None})
    decide(store, name, fingerprint, "1")
    for version in ("2", "3"):
        decision = decide(store, name, fingerprint, version)
        assert not decision["promoted"] and decision["value"] is None and "left out" in decision["reason"]
    assert holder(client, name) == "1"


def test_champion_converges_after_a_stale_write(store, tmp_path):
    """Two registrations race: the worse one's alias write lands last. Re-checking undoes it."""
    _, client = store
    name, fingerprint = new_model(
        store, tmp_path, {"a": (2.0, "bench"), "b": (1.5, "bench"), "c": None, "d": (1.5, "bench")}
    )
    client.set_registered_model_alias(name, "champion", "1")  # the slower racer's stale write
    decision = decide(store, name, fingerprint, "1")
    assert decision["promoted"] is False and holder(client, name) == "2"  # of the tied 2 and 4 the older
    assert decision["previous_champion"] == "1" and decision["alias_writes"] == 1
    assert decide(store, name, fingerprint, "2")["promoted"] is True
    # A person can keep a version out of the race.
    client.set_model_version_tag(name, "2", champion.ELIGIBLE_TAG, "false")
    assert decide(store, name, fingerprint, "4")["promoted"] is True and holder(client, name) == "4"


def test_a_deleted_champion_passes_to_the_best_scored_version(store, tmp_path):
    uri, client = store
    name, fingerprint = new_model(store, tmp_path, {"a": (2.0, "bench"), "b": (1.0, "bench"), "c": (0.5, "other")})
    decide(store, name, fingerprint, "2")
    client.delete_model_version(name, "2")
    assert champion.restore_champion(uri, name, METRIC) == "1" and holder(client, name) == "1"


def test_promote_reports_the_gate_and_force_overrides_it(store, tmp_path, capsys):
    from flows.cli import main

    uri, client = store
    name, fingerprint = new_model(store, tmp_path, {"a": (1.0, "bench")})
    decide(store, name, fingerprint, "1")
    add_version(client, name, fingerprint, "b", (0.999, "bench"))
    add_version(client, name, fingerprint, "c", (0.9, "bench"))
    args = ["promote", "--model", name, "--tracking-uri", uri]
    assert main([*args, "--version", "2"]) == 1 and holder(client, name) == "1"
    out = capsys.readouterr().out
    assert f"benchmark:         {fingerprint[:12]}" in out and "needs < 0.998" in out and "+0.1000%" in out
    assert "stays 1 (use --force to promote anyway)" in out
    assert main([*args, "--version", "2", "--force"]) == 0 and holder(client, name) == "2"
    assert "forced past the gate" in capsys.readouterr().out
    record = json.loads(client.get_model_version(name, "2").tags["champion_decision"])
    assert record["forced"] is True and record["by"] == "promote" and record["holder_value"] == 1.0
    assert main([*args, "--version", "3"]) == 0 and holder(client, name) == "3"  # 0.9 < 0.999 x 0.998
    assert main([*args, "--version", "9"]) == 2  # unknown version: one line, exit 2
    assert "has no version '9'" in capsys.readouterr().err

    # `models` shows each version's benchmark score and which text set it was measured on.
    add_version(client, name, fingerprint, "d", (0.5, "other"))
    assert main(["models", "--model", name, "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: line.split() for line in lines[1:5]}
    assert rows["3"][2:5] == ["champion", "0.9", fingerprint[:12]]
    assert rows["4"][3:6] == ["0.5", "00000000", "(other)"]  # another text set: marked, never compared
    assert lines[-1] == f"{name}: benchmark {fingerprint[:12]} = test texts"
    # The listing reads the benchmark through the model's pointer: a stale copy for the UI (one a
    # racer wrote before it adopted another's benchmark) changes nothing.
    client.set_registered_model_tag(name, "benchmark.fingerprint", "f" * 64)
    client.set_registered_model_tag(name, "benchmark.source", "a racer's texts")
    assert main(["models", "--model", name, "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{name}: benchmark {fingerprint[:12]} = test texts"
