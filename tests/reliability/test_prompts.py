"""Prompts from the command line that must never crash `lenta-lora generate`: bytes that are not
UTF-8 (replaced), an empty prompt (generation starts from BOS), and one far longer than the model's
context (truncated from the left, with a warning). The library-level behaviour is pinned exactly in
tests/test_generation.py; this is the user's path, against a registered version."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.adapter_fixtures import NAME, ROOT

pytestmark = pytest.mark.slow


def generate(registered, prompt: bytes) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["tracking_uri"], "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable.encode(),
            b"-m",
            b"flows.cli",
            b"generate",
            b"--model",
            NAME.encode(),
            b"--version",
            b"1",
            b"--max-new-tokens",
            b"4",
            prompt,
        ],
        cwd=ROOT,
        capture_output=True,
        env=env,
        timeout=300,
    )


def test_prompt_bytes_that_are_not_utf8_are_replaced(registered):
    done = generate(registered, b"\xff\xfe bad \xc3")  # straight from the OS: no decoding on the way
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.strip()


def test_empty_and_overlong_prompts_generate(registered, monkeypatch, capsys):
    """In this process (Python hands main() the same str either way), to spare two interpreter starts."""
    from flows.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["tracking_uri"])
    command = ["generate", "--model", NAME, "--version", "1", "--max-new-tokens", "4"]
    assert main([*command, ""]) == 0  # generation starts from BOS
    assert capsys.readouterr().out.strip()
    with pytest.warns(UserWarning, match="truncated from the left"):
        assert main([*command, "Новость " * 400]) == 0
    assert capsys.readouterr().out.strip()
