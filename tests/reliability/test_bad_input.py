"""Bad input: a config with unknown keys, wrong types or impossible values is refused before any
work with every problem listed at once; a bad corpus through the real CLI and flow gives a one-line
error naming the file, exit code 2, the MLflow run FAILED, nothing registered, no dataset cache."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE, main
from lib.config import ConfigError, build_config
from tests.conftest import tiny_overrides

HEADER = "url,title,text,topic,tags,date\n"


def write(path, content: bytes | str):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


CASES = {
    "missing-columns": (lambda d: write(d / "bad.csv", "url,title\nhttps://x/1,Заголовок\n"), "missing"),
    "empty-file": (lambda d: write(d / "bad.csv", ""), "empty"),
    "header-only": (lambda d: write(d / "bad.csv", HEADER), "bad.csv"),
    "no-usable-text": (
        lambda d: write(d / "bad.csv", HEADER + "https://x/1,Заголовок,   ,Мир,Все,2019/01/01\n"),
        "text",
    ),
    "not-utf8": (
        lambda d: write(d / "bad.csv", HEADER.encode() + "https://x/1,Т,Текст,Мир,Все,2019/01/01\n".encode("cp1251")),
        "UTF-8",
    ),
    "does-not-exist": (lambda d: d / "bad.csv", "does not exist"),
    "directory": (lambda d: (d / "bad.csv").mkdir() or d / "bad.csv", "directory"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_csv_fails_cleanly(case, prefect_server, tracking_uri, tmp_path, capsys):
    make, expected = CASES[case]
    source = tmp_path / "input"
    source.mkdir()
    path = make(source)
    cache = tmp_path / "cache"
    code = main(
        [
            "run",
            "--config",
            str(DEFAULT_PROFILE),
            *sum(
                (
                    ["--set", o]
                    for o in tiny_overrides(
                        str(cache), **{"data.source": "csv", "data.path": str(path), "registry.model_name": "never"}
                    )
                ),
                [],
            ),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lenta-lora: error:") and "bad.csv" in err and expected.lower() in err.lower(), err

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_model_versions("name='never'") == []
    leftovers = list((cache / "datasets").glob("*")) if (cache / "datasets").exists() else []
    assert leftovers == [], leftovers


def test_bad_config_fails_before_any_work(tracking_uri, tmp_path, capsys):
    code = main(
        [
            "run",
            "--config",
            str(DEFAULT_PROFILE),
            "--set",
            "data.splits.train=0.5",
            "--set",
            "lora.r=0",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "data.splits" in err and "sum to 1" in err and "lora.r" in err
    assert not (tmp_path / "cache").exists()
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_bad_flow_overrides_fail_the_flow_run_before_any_work(prefect_server, tracking_uri, tmp_path):
    """A deployment run's `overrides` parameter is checked like `--set`: all problems, no MLflow run."""
    from flows.finetune import finetune

    config = build_config({}, [f"data.cache_dir={tmp_path / 'cache'}", f"tracking.uri={tracking_uri}"])
    with pytest.raises(ConfigError) as info:
        finetune(config=config, overrides=["lora.r=0", "train.max_step=3"])
    assert "overrides parameter" in str(info.value) and "lora.r" in str(info.value) and "max_step" in str(info.value)
    assert not (tmp_path / "cache").exists()
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        build_config(
            {}, ["lora.r=0", "lora.dropout=1.0", "train.max_length=abc", "trian.max_steps=3", "lora.target_modules=[]"]
        )
    message = str(info.value)
    for fragment in ("lora.r", "lora.dropout", "train.max_length", "trian", "lora.target_modules", "5 problem"):
        assert fragment in message, message


def test_impossible_values_are_rejected():
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        build_config({}, ["train.max_length=4096"])  # longer than the tiny model's context
    with pytest.raises(ConfigError, match="sum to 1"):
        build_config({}, ["data.splits.train=0.5"])
    with pytest.raises(ConfigError, match="data.path"):
        build_config({}, ["data.source=csv"])


@pytest.mark.slow
def test_a_user_error_prints_one_line_and_no_traceback_unless_debug(prefect_server, tracking_uri, tmp_path):
    """Through the real CLI in a child process, as a user sees it: Prefect's own failure logs keep their
    one-line messages, without the traceback; `--debug` shows it."""

    from tests.support import warm
    from tests.support.env import ROOT, child_env
    from tests.support.harness import flow_command

    bad = write(tmp_path / "bad.csv", "url,title\nhttps://x/1,Заголовок\n")
    command = flow_command(tmp_path / "cache", **{"data.source": "csv", "data.path": str(bad)})
    for debug in (False, True):
        args = command[:3] + (["--debug"] if debug else []) + command[3:]
        done = warm.run(args, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
        printed = done.stdout + done.stderr
        assert done.returncode == 2, printed[-3000:]
        [line] = [x for x in done.stderr.splitlines() if x.startswith("lenta-lora: error: ")]
        assert "bad.csv: missing required column(s)" in line
        assert ("Traceback" in printed) is debug, printed[-3000:]
        assert "Task run failed with exception: CorpusError" in printed  # Prefect still says what failed
