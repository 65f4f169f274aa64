"""tests/support/warm.py, which forks the CLI children of tests from a warm interpreter: a warm child
prints and exits as a fresh interpreter does, has its own session and dies by signal like one, and
a child whose environment the warm interpreter cannot honour is started fresh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import tiny_overrides
from tests.support import warm
from tests.support.env import ROOT, child_env


@pytest.fixture(autouse=True)
def warm_allowed(monkeypatch):
    monkeypatch.delenv("TESTS_FRESH_CHILDREN", raising=False)  # these tests are about warm children


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def test_a_warm_child_prints_and_exits_as_a_fresh_interpreter(prefect_server, tracking_uri, tmp_path):
    env = child_env()
    (tmp_path / "a-file").write_text("")
    cases = [
        cli("models"),  # exit 0, an answer on stdout
        cli("run", "--config", str(tmp_path / "missing.yaml")),  # exit 2, one error line on stderr
        cli("no-such-command"),  # argparse: exit 2, usage on stderr
        cli("models", "--tracking-uri", f"sqlite:///{tmp_path / 'a-file' / 'x.db'}"),  # an error from deep inside
    ]
    before, codes = warm._warm.get("children", 0), []
    for command in cases:
        fresh = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        forked = warm.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
        codes.append(forked.returncode)
    assert warm._warm["children"] - before == len(cases)  # every one of them was forked
    assert codes[:3] == [0, 2, 2] and codes[3] != 0, codes


def test_a_warm_child_has_its_own_session_and_dies_by_a_signal(prefect_server, tracking_uri, tmp_path):
    command = cli("run", *(f"--set={o}" for o in tiny_overrides(str(tmp_path / "cache"), **{"train.max_steps": 500})))
    with (tmp_path / "run.log").open("w") as log:
        child = warm.Popen(
            command, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        assert isinstance(child, warm.WarmProcess)
        assert os.getsid(child.pid) == child.pid and os.getpgid(child.pid) == child.pid  # set when Popen returns
        assert child.poll() is None
        try:
            child.wait(timeout=1)
            raise AssertionError("a 500-step run ended within a second")
        except subprocess.TimeoutExpired:
            pass
        os.killpg(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL


def test_what_the_warm_interpreter_cannot_honour_is_started_fresh(prefect_server, tracking_uri):
    # Hugging Face reads HF_HUB_OFFLINE when imported (the warm interpreter imported it without);
    # a pipe cannot be handed over; a command other than the CLI was never imported warm.
    fresh = [
        warm.Popen(cli("models"), cwd=ROOT, env={**child_env(), "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL),
        warm.Popen(cli("models"), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE),
        warm.Popen([sys.executable, "-c", "pass"], cwd=ROOT, env=child_env()),
    ]
    for child in fresh:
        assert type(child) is subprocess.Popen
        child.communicate(timeout=300)
        assert child.returncode == 0
    # What a test sets through a call-time variable (or the CLI's own defaults, left in this process
    # by tests that call main() in it) does not stop a warm start.
    same = {**child_env(fault="nowhere"), "MLFLOW_TRACKING_URI": tracking_uri, "OMP_WAIT_POLICY": "PASSIVE"}
    child = warm.Popen(cli("models"), cwd=ROOT, env=same, stdout=subprocess.DEVNULL)
    assert isinstance(child, warm.WarmProcess) and child.wait(timeout=300) == 0
