"""Long work is visible: training logs a step at least every `train.progress_interval_s` seconds
(and heartbeats inside a slow step), checkpoint writes are logged with step and size, and the
evaluation loops log progress lines when no terminal shows their tqdm bars."""

from __future__ import annotations

import logging
import re

import pytest

from lib import progress, training
from lib.generation import generate_continuations
from lib.metrics import score_corpus
from tests.support.toy_lm import CORPUS
from tests.support.training import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ticker_is_due_once_the_interval_passed_since_the_last_mark():
    clock = FakeClock()
    ticker = progress.Ticker(30.0, clock)
    assert not ticker.due()
    clock.now += 29.9
    assert not ticker.due()
    clock.now += 0.1
    assert ticker.due()
    ticker.mark()
    assert not ticker.due()
    clock.now += 30
    assert ticker.due()
    disabled = progress.Ticker(30.0, clock, enabled=False)  # a tqdm bar is showing the progress
    clock.now += 1e6
    assert not disabled.due()
    with pytest.raises(ValueError, match="interval_s"):
        progress.Ticker(0)


def test_ticker_report_logs_count_rate_and_eta_then_waits_a_whole_interval(caplog):
    clock = FakeClock()
    ticker = progress.Ticker(30.0, clock)
    logger = logging.getLogger("lenta_lora.test")
    with caplog.at_level(logging.INFO, logger="lenta_lora"):
        clock.now += 10
        assert not ticker.report(logger, "score_corpus", 1, 40)  # 10 s in: not due
        clock.now += 30
        assert ticker.report(logger, "score_corpus", 4, 40)  # 40 s for 4 batches: 10 s each, 36 left
        clock.now += 20
        assert not ticker.report(logger, "score_corpus", 6, 40)  # 20 s since the last line
    assert caplog.messages == ["score_corpus: batch 4/40, 10 s/batch, ETA 0:06:00"]


def train_and_record(prepared_path, config, caplog):
    logged = []
    with caplog.at_level(logging.INFO, logger="lenta_lora"):
        training.train_model(prepared_path, config, on_log=lambda step, record, p: logged.append((step, p is not None)))
    return [step for step, is_step in logged if is_step]


@pytest.mark.parametrize("interval, expected", [(1e-6, [1, 2, 3, 4]), (30.0, [4])])
def test_a_step_is_logged_when_the_interval_passed_whatever_log_every_says(
    prepared, shared_cache, caplog, interval, expected
):
    """log_every 1000 over 4 steps: only the last step is due by count; a microsecond interval makes
    every step due by time (each takes milliseconds). 4 tiny steps never take 30 s."""
    config = tiny(
        shared_cache,
        **{"train.max_steps": 4, "train.log_every": 1000, "train.grad_accum": 3, "train.progress_interval_s": interval},
    )
    assert train_and_record(prepared, config, caplog) == expected
    heartbeats = [m for m in caplog.messages if "micro-batch" in m]
    if interval < 1:  # every micro-batch but each step's last one; the step's own line follows that one
        assert len(heartbeats) == 4 * 2 and re.fullmatch(
            r"step 3/4: micro-batch 2/3, \d+ s into this step", heartbeats[5]
        )
    else:
        assert heartbeats == []


def test_progress_interval_is_bookkeeping_not_part_of_the_checkpoint_key(shared_cache):
    from lib import checkpoint

    config = tiny(shared_cache, **{"train.checkpoint_every": 5})
    other = tiny(shared_cache, **{"train.checkpoint_every": 5, "train.progress_interval_s": 1.5})
    assert checkpoint.checkpoint_dir(config, "f" * 64, "/d/x") == checkpoint.checkpoint_dir(other, "f" * 64, "/d/x")
    assert config.train.progress_interval_s == 30.0
    with pytest.raises(ValueError, match="progress_interval_s"):
        tiny(shared_cache, **{"train.progress_interval_s": 0})


def test_checkpoint_writes_are_logged_with_step_and_size(prepared, shared_cache, tmp_path, caplog):
    config = tiny(shared_cache, **{"train.max_steps": 4, "train.checkpoint_every": 2})
    with caplog.at_level(logging.INFO, logger="lenta_lora.checkpoint"):
        training.train_model(prepared, config, checkpoint_dir=tmp_path / "ck", run_id="r")
    lines = [m for m in caplog.messages if m.startswith("checkpoint step")]
    assert [m.split(" written")[0] for m in lines] == ["checkpoint step 2/4", "checkpoint step 4/4"]
    found = re.fullmatch(r"checkpoint step 4/4 written: ([\d.]+) (kB|MB) in [\d.]+ s -> (.+)", lines[1])
    assert found and found[3] == str(tmp_path / "ck" / "step-00000004")
    size = sum(p.stat().st_size for p in (tmp_path / "ck" / "step-00000004").rglob("*") if p.is_file())
    logged = float(found[1]) * (1e3 if found[2] == "kB" else 1e6)
    assert size > 1000 and abs(logged - size) <= 0.05 * (1e3 if found[2] == "kB" else 1e6), (size, lines[1])


@pytest.mark.parametrize("bar_shown", [False, True])
def test_evaluation_loops_log_progress_only_without_a_bar(model, tokenizer, caplog, monkeypatch, bar_shown):
    """Under pytest stderr is no terminal, so the bar is hidden anyway; the patch makes both cases explicit."""
    monkeypatch.setattr(progress, "bar_hidden", lambda bar: not bar_shown)
    with caplog.at_level(logging.INFO, logger="lenta_lora"):
        score_corpus(model, tokenizer, CORPUS, max_length=16, batch_size=2, progress_interval_s=1e-6)
        generate_continuations(model, tokenizer, CORPUS[:3], max_new_tokens=2, batch_size=1, progress_interval_s=1e-6)
    lines = [m for m in caplog.messages if m.startswith(("score_corpus:", "generate:"))]
    if bar_shown:
        assert lines == []
    else:
        assert [m.split(",")[0] for m in lines if m.startswith("generate")] == [
            f"generate: batch {i}/3" for i in (1, 2, 3)
        ]
        scored = [m for m in lines if m.startswith("score_corpus")]
        assert scored and re.fullmatch(r"score_corpus: batch (\d+)/\1, [\d.e+-]+ s/batch, ETA 0:00:00", scored[-1])
