"""A real `mlflow server` on 127.0.0.1 for tests: sqlite backend store, artifacts served (proxied)
by the server itself, so clients talk only HTTP, as they would to a team's tracking server.

    def test_x(mlflow_server):  # the fixture is registered for every test by tests/conftest.py
        uri = mlflow_server.uri   # http://127.0.0.1:<free port>
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.net import free_port


@dataclass
class MlflowServer:
    uri: str
    root: Path  # holds mlflow.db, art/ (artifacts) and server.log
    process: subprocess.Popen

    def log_tail(self, lines: int = 30) -> str:
        text = (self.root / "server.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running_mlflow_server(root: Path, startup_timeout: float = 180, port: int | None = None):
    """Start the server, wait until /health answers, yield it; stop it (and its workers) on exit.

    The same `root` and `port` again restart a stopped server with its store and artifacts."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "art"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = open(root / "server.log", "ab")
    # Own process group: teardown stops the server and the uvicorn worker it forks, nothing else.
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        start_new_session=True,
        # No huey job consumers (~10 processes for MLflow's scheduled jobs; none used here).
        env={**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    server = MlflowServer(uri, root, process)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(uri):
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy at {uri} after {startup_timeout}s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(process)
        log.close()


def stop(server: MlflowServer) -> None:
    """Stop the server now (its process group): clients see refused connections from here on."""
    _stop(server.process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One real MLflow tracking server per test module."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
