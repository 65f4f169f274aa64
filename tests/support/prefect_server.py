"""A real Prefect server and worker as child processes, for tests of deployments.

`prefect_test_harness()` (tests/conftest.py) runs an in-process server that cannot host workers
from other processes the way a deployment needs; this module starts what a user starts:
`prefect server start` on 127.0.0.1 with a free port, its own PREFECT_HOME and sqlite database,
and `prefect worker start` processes. Each child runs in its own process group (its own session)
with its output in a log file, and is stopped as a group: the server and worker spawn children
(uvicorn services, flow-run subprocesses) that must not outlive the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil  # installed with accelerate and mlflow

from tests.support.env import child_env
from tests.support.net import free_port

PREFECT_CLI = str(Path(sys.executable).with_name("prefect"))  # the CLI of the interpreter running the tests


def start_process(args: list[str], env: dict[str, str], log_path: Path, cwd: str | Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # the child keeps its copy of the descriptor; ours closes now
    try:
        return subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log.close()


def stop_process(process: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM to the child's process group and to every descendant (Prefect's process worker
    starts flow runs in sessions of their own, out of the group's reach), SIGKILL to what is left
    after `grace_s`."""
    try:
        family = [psutil.Process(process.pid)]
        family += family[0].children(recursive=True)
    except psutil.NoSuchProcess:
        family = []

    def send(members: list, sig: int) -> None:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):  # the group is gone already
            pass
        for member in members:
            try:
                member.send_signal(sig)  # psutil checks the pid still names the same process
            except psutil.NoSuchProcess:
                pass

    send(family, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    send(alive, signal.SIGKILL)
    process.wait(timeout=10)


def log_tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return text[-chars:]


@dataclass
class PrefectServer:
    url: str  # API URL, http://127.0.0.1:PORT/api
    home: Path  # PREFECT_HOME of the server and of every child
    env: dict[str, str]
    log: Path

    def cli(self, *args: str, cwd: str | Path, timeout_s: float = 180) -> subprocess.CompletedProcess:
        """Run `prefect ARGS` against this server; a failure raises with the command's output."""
        result = subprocess.run(
            [PREFECT_CLI, *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"`prefect {' '.join(args)}` exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    @contextmanager
    def worker(self, pool: str, cwd: str | Path, queues: tuple[str, ...] = ()) -> Iterator[subprocess.Popen]:
        """`prefect worker start --pool POOL`; its log is `worker-POOL.log` in the server's home."""
        log = self.home / f"worker-{pool}.log"
        args = [PREFECT_CLI, "worker", "start", "--pool", pool, "--no-create-pool-if-not-found"]
        for queue in queues:
            args += ["--work-queue", queue]
        process = start_process(args, self.env, log, cwd)
        try:
            yield process
        finally:
            stop_process(process, grace_s=5)  # one SIGTERM starts a slow graceful stop (>20 s seen here)


RETRYABLE_STATUS = (429, 502, 503)  # what Prefect's own client retries: 503 is the server's "try again"


def api(url: str, path: str, method: str = "GET", body=None, attempts: int = 6):
    """One call of the Prefect REST API; the decoded JSON answer (None for an empty one).

    The server answers 503 for errors it calls retryable (a sqlite "database is locked" while its
    scheduler writes, seen in CI on a loaded machine); Prefect's client retries those with backoff,
    and so does this helper. Any other error, or the last retryable one, is raised.
    """
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(attempts):
        request = urllib.request.Request(
            f"{url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            if error.code not in RETRYABLE_STATUS or attempt == attempts - 1:
                raise
            time.sleep(min(2**attempt, 10))


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited {process.returncode} before it was healthy:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout_s:.0f}s:\n{log_tail(log)}")


@contextmanager
def prefect_server(
    home: Path, startup_timeout_s: float = 120, extra_env: dict[str, str] | None = None
) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1:<free port> with PREFECT_HOME=`home` (a fresh folder);
    `extra_env` (say, a faster scheduler loop) goes to the server, the CLI calls and the workers."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = child_env(prefect_home=home, prefect_api=url, **(extra_env or {}))
    log = home / "server.log"
    process = start_process(
        [PREFECT_CLI, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"],
        env,
        log,
        home,
    )
    try:
        wait_healthy(url, process, log, startup_timeout_s)
        yield PrefectServer(url=url, home=home, env=env, log=log)
    finally:
        stop_process(process)
