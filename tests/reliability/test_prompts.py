"""Prompts from the command line that must never crash `lenta-lora generate`: bytes that are not
UTF-8 (replaced), an empty prompt (generation starts from BOS), and one far longer than the model's
context (truncated from the left, with a warning). The library-level behaviour is pinned exactly in
tests/test_generation.py; this is the user's path, against a registered version."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.adapter_fixtures import NAME, ROOT, registered, trained  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("prompt", [b"\xff\xfe bad \xc3", b"", "Новость ".encode() * 400],
                         ids=["not-utf8", "empty", "longer-than-context"])
def test_cli_prompt_never_crashes(registered, prompt):
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["tracking_uri"], "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable.encode(), b"-m", b"flows.cli", b"generate", b"--model", NAME.encode(),
                           b"--version", b"1", b"--max-new-tokens", b"4", prompt], cwd=ROOT, capture_output=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.strip()  # something was generated and printed
    if len(prompt) > 1000:
        assert b"truncated from the left" in done.stderr
