"""Serving a registered version with MLflow's own server, as the README shows it:
`mlflow models serve -m models:/NAME@champion --env-manager local` on loopback, real HTTP requests."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.adapter_fixtures import NAME
from tests.support.net import free_port
from tests.support.prefect_server import log_tail, start_process, stop_process

pytestmark = pytest.mark.slow


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_mlflow_models_serve_answers_invocations(registered, tmp_path):
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # `serve` starts uvicorn by name: the venv's bin on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["tracking_uri"], "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    server = start_process(
        [
            str(Path(bin_dir) / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env,
        log,
        tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log_tail(log)
                time.sleep(1)
        request = {"inputs": ["Учёные нашли новый вид бабочек", "Курс рубля"], "params": {"max_new_tokens": 6}}
        status, answer = post(f"{url}/invocations", json.dumps(request).encode())
        assert status == 200, answer
        predictions = answer["predictions"]
        assert len(predictions) == 2 and all(isinstance(p, str) and p for p in predictions)
        assert post(f"{url}/invocations", json.dumps(request).encode())[1] == answer  # greedy: the same again
        # Malformed requests: a clear 4xx naming the problem, never a 500.
        for body, says in (
            (b"not json", "valid JSON"),
            (b'{"prompts": ["x"]}', "inputs"),
            (json.dumps({"inputs": ["x"], "params": {"max_new_tokens": "many"}}).encode(), "max_new_tokens"),
        ):
            status, error = post(f"{url}/invocations", body)
            assert 400 <= status < 500 and says in error["message"], (status, error)
    finally:
        stop_process(server, grace_s=10)
