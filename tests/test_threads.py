"""lib/threads.py: the thread count chosen for the machine, and explicit settings that win."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib import threads
from lib.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 1), (4, 1), (8, 7), (64, 63)])
def test_auto_threads_by_machine_size(cpus, expected):
    assert threads.auto_threads(cpus) == expected


def test_usable_cpus_respects_the_affinity_mask():
    assert 1 <= threads.usable_cpus() <= len(os.sched_getaffinity(0))


def test_explicit_settings_win_in_order():
    assert threads.explicit_threads(3, {"OMP_NUM_THREADS": "2"}) == (3, "config train.threads")
    assert threads.explicit_threads("auto", {"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    assert threads.explicit_threads("auto", {"LENTA_LORA_THREADS": "5", "OMP_NUM_THREADS": "2"})[0] == 5
    assert threads.explicit_threads("auto", {"OMP_NUM_THREADS": "bogus"}) == (None, "auto")
    assert threads.explicit_threads("auto", {}) == (None, "auto")


def test_the_config_key_is_auto_or_a_positive_count():
    assert build_config({}).train.threads == "auto"
    assert build_config({}, ["train.threads=3"]).train.threads == 3
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="threads"):
            build_config({}, [f"train.threads={bad}"])


def test_wait_policy_is_set_only_when_unset():
    assert threads.set_wait_policy({})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert threads.set_wait_policy({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"


PROBE = """
import json, os, sys
from lib import threads
import torch
chosen = threads.configure_threads(sys.argv[1] if sys.argv[1] == "auto" else int(sys.argv[1]))
print(json.dumps({**chosen, "torch": torch.get_num_threads()}))
"""


def probe(setting: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LENTA_LORA_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, setting],
        cwd=ROOT,
        env={**environ, **env},
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_configure_threads_in_a_fresh_process():
    """Real torch in a fresh process (the test session itself runs with OMP_NUM_THREADS=1)."""
    auto = probe("auto")
    assert auto["torch"] == auto["threads"] == threads.auto_threads() and auto["source"].startswith("auto")
    assert probe("auto", OMP_NUM_THREADS="3")["torch"] == 3  # the user's environment wins over auto
    assert probe("2", OMP_NUM_THREADS="3")["torch"] == 2  # and the config key over the environment


def test_the_cli_sets_the_wait_policy_before_torch_loads():
    code = (
        "import os, sys; from flows import cli; cli._quiet_environment(); "
        "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, check=True, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["PASSIVE", "False"]
