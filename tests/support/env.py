"""The environment of a child process a test starts (the CLI, a loader, a Prefect server or worker),
and `run_script`, which runs a test's own script in a fresh interpreter and returns its answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository
FAULT_VARIABLE = "LENTA_LORA_FAULT"  # lib/faults.py


def child_env(
    fault: str | None = None,
    *,
    tracking_uri: str | None = None,
    pythonpath: bool = False,
    prefect_home: Path | None = None,
    prefect_api: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """This process's environment for a child, with:

    - Prefect: by default the session's test server (`PREFECT_API_URL`, see the `prefect_server`
      fixture) instead of one the child would start itself. With `prefect_home`, the child belongs
      to a standalone server (tests/support/prefect_server.py) at `prefect_api`: this process's
      PREFECT_* and MLFLOW_TRACKING_URI (the session harness's server, a profile in ~/.prefect)
      must not leak in, so they are dropped and PREFECT_* is rebuilt for that home.
    - one torch thread (OMP_NUM_THREADS=1, see tests/conftest.py);
    - `tracking_uri`: MLFLOW_TRACKING_URI; `pythonpath`: PYTHONPATH=the repository (for a child
      whose working directory is elsewhere);
    - `extra`: any other variables, last (they win over the above);
    - LENTA_LORA_FAULT (lib/faults.py) only when `fault` names a fault point, never inherited.
    """
    if prefect_home is not None:
        if prefect_api is None:
            raise ValueError("a standalone Prefect server's children need its API URL (prefect_api)")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MLFLOW_TRACKING_URI"}
        env.update(
            {
                "PREFECT_HOME": str(prefect_home),
                "PREFECT_API_URL": prefect_api,
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # telemetry logs a traceback offline
                "DO_NOT_TRACK": "1",
                "PREFECT_CLI_PROMPT": "false",
                "PREFECT_SERVER_UI_ENABLED": "false",  # nobody looks at it; saves startup time
                "PREFECT_WORKER_QUERY_SECONDS": "2",  # default 10 s between polls: runs start sooner
                "PREFECT_LOGGING_EXTRA_LOGGERS": "lenta_lora",
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_TELEMETRY": "1",
            }
        )
    else:
        if prefect_api is None:
            from prefect.settings import PREFECT_API_URL

            prefect_api = PREFECT_API_URL.value()
        env = {**os.environ, "PREFECT_API_URL": prefect_api}
    env["OMP_NUM_THREADS"] = "1"
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if pythonpath:
        env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    env.pop(FAULT_VARIABLE, None)
    if fault:
        env[FAULT_VARIABLE] = fault
    return env


def run_script(code: str, *args: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> Any:
    """Run `python -c code args...` in a fresh interpreter, as a user's own program would run: no
    state from this process. Fails the test with the script's stderr unless it exits 0; returns
    the JSON it printed after `RESULT `."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1])
