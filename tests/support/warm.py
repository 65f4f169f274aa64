"""`run` and `Popen` for a test's Python children, as `subprocess.run` / `subprocess.Popen`, but
started by forking a warm interpreter (tests/support/warm_interpreter.py, one per pytest worker)
that has already imported torch, transformers, peft, mlflow, prefect and the flows. Why: each fresh
interpreter spends about 10 s of CPU importing those before it does any work (measured; README,
Tests), and the suite starts dozens.

A forked child is a real, separate process running the real entry point (`python -m flows.cli`,
through runpy as `-m` does) with its own argv, working directory, environment, stdio, session and
exit status. It sees what a fresh interpreter sees because importing this project has no side
effects (tests/test_layout.py), the warm interpreter applied the CLI's own environment defaults
before importing (as `lenta-lora` does), and its imports printed and logged nothing (checked at
start; otherwise every child is fresh). tests/test_warm_children.py compares warm and fresh
children byte for byte. A child is started fresh, as before, when:

- the command is not `sys.executable -m flows.cli ...`, or a stream is a pipe (`stdout=PIPE`);
- its environment differs from the warm interpreter's in any variable outside `CALL_TIME_VARIABLES`
  (read when used, not when imported). Prefect freezes its settings at import, Hugging Face its
  endpoint, offline mode and cache paths, OpenMP its thread settings: a child that changes those
  gets a fresh interpreter. TESTS_FRESH_CHILDREN=1 makes every child fresh.

Exiting runs what a normal interpreter's exit runs: non-daemon threads are joined, then `atexit`
handlers (Prefect's log and event flush, MLflow's async logging).

    done = warm.run([sys.executable, "-m", "flows.cli", "run", ...], env=child_env(), capture_output=True, text=True)
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import pickle
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.env import ROOT

# Variables a child may set differently from the warm interpreter: each is read when used, after
# the imports the warm interpreter made (checked by grepping their readers; see the README, Tests).
CALL_TIME_VARIABLES = frozenset(
    {
        "MLFLOW_TRACKING_URI",  # mlflow reads it on each get_tracking_uri()
        "LENTA_LORA_FAULT",  # lib/faults.py, at each fault point
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",  # mlflow.utils.rest_utils.http_request, per request
        "PYTHONPATH",  # the warm interpreter's sys.path already holds the repository
        "TESTS_FRESH_CHILDREN",  # this module's own switches, read in this process only
        "TESTS_WARM_LOG",
        # Set in this process by pytest and by libraries as they run, so inherited by any child:
        "PYTEST_CURRENT_TEST",  # pytest, per test (set too when the warm one started: mlflow checks it)
        "_MLFLOW_TELEMETRY_SESSION_ID",  # mlflow's telemetry client, when it starts
        "TORCHINDUCTOR_CACHE_DIR",  # torch inductor, when it compiles
        "KMP_DUPLICATE_LIB_OK",  # threadpoolctl/sklearn's setdefault for Intel OpenMP, which this
        "KMP_INIT_AT_FORK",  # torch build does not load (GNU OpenMP ignores KMP_*)
    }
)

# The environment tests start with (tests/conftest.py has set its defaults by now), before any
# test's monkeypatch: the warm interpreter gets this one, plus the session's Prefect server.
_BASE_ENV = dict(os.environ)
_SESSION_VARIABLES = ("PREFECT_API_URL", "OMP_NUM_THREADS")  # child_env() adds them
_warm: dict = {}  # this pytest worker's warm interpreter: process, socket path, environment


def _fixed(env) -> dict[str, str]:
    """What the warm interpreter must share with a child: all but the call-time variables."""
    return {k: v for k, v in env.items() if k not in CALL_TIME_VARIABLES}


def _start_warm(env: dict[str, str]) -> dict:
    """Start this process's warm interpreter with `env` (once; it stops when this process ends)."""
    folder = Path(tempfile.mkdtemp(prefix="warm-"))
    log = open(folder / "warm.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.warm_interpreter", str(folder / "socket")],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
    )
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # runs after the kill below (last in, first out)
    atexit.register(process.kill)
    word, _, report = process.stdout.readline().decode().partition(" ")
    if word != "ready":
        raise RuntimeError(f"the warm interpreter did not start:\n{(folder / 'warm.log').read_text()[-3000:]}")
    report = json.loads(report)
    _warm.update(process=process, socket=str(folder / "socket"), defaults=report["defaults"])
    _warm["env"] = _as_cli_sees(env)
    # A fresh CLI run would print what the imports printed or logged; a forked child would not.
    # Then no child is started warm (the CLI's output is part of what tests check).
    _warm["noise"] = report["said"] + (folder / "warm.log").read_text(errors="replace").splitlines()
    return _warm


def _as_cli_sees(env: dict[str, str]) -> dict[str, str]:
    """`env` as a CLI run sees it after its first step (flows/cli.py `_quiet_environment` sets
    defaults where a variable is unset), without the call-time variables. Tests that call the CLI's
    `main()` in this process leave those defaults in os.environ; children that inherit them are the same."""
    return _fixed({**_warm.get("defaults", {}), **env})


def _differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _note(text: str) -> None:
    """With TESTS_WARM_LOG=file: why each child was or was not started warm (for tuning, not tests)."""
    if os.environ.get("TESTS_WARM_LOG"):
        with open(os.environ["TESTS_WARM_LOG"], "a") as log:
            log.write(f"{os.getpid()} {os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}: {text}\n")


def _warm_for(args, env, stdin, stdout, stderr) -> dict | None:
    """This worker's warm interpreter if it can start this child (started on first use), else None."""
    if os.environ.get("TESTS_FRESH_CHILDREN") == "1":  # every child a fresh interpreter, as before
        return None
    if not (isinstance(args, list) and args[:3] == [sys.executable, "-m", "flows.cli"]):
        return None
    if not all(isinstance(a, str) for a in args) or stdin not in (None, subprocess.DEVNULL):
        return None
    if any(
        s not in (None, subprocess.DEVNULL, subprocess.STDOUT) and not hasattr(s, "fileno") for s in (stdout, stderr)
    ):
        return None  # a pipe: left to subprocess
    env = dict(os.environ if env is None else env)
    if not (_warm and _warm["process"].poll() is None):
        # The session's environment (as tests started, with the session's Prefect server), so that
        # what one test sets in this process does not decide what every later child must match.
        session = {**_BASE_ENV, **{k: env[k] for k in _SESSION_VARIABLES if k in env}}
        session["PYTEST_CURRENT_TEST"] = env.get("PYTEST_CURRENT_TEST", "")
        _note("starting the warm interpreter")
        _start_warm(session)
    if _warm["noise"]:
        _note(f"fresh: importing printed {_warm['noise'][:3]}")
        return None
    differ = _differences(_as_cli_sees(env), _warm["env"])
    _note(f"fresh, its environment differs in {differ}" if differ else "warm")
    return None if differ else _warm


class WarmProcess:
    """A forked child, with the parts of `subprocess.Popen` the tests use."""

    def __init__(self, warm, args, cwd, env, stdout, stderr, start_new_session):
        self.args, self.returncode = args, None

        # The child's stdin, stdout and stderr, as subprocess would give them: None inherits this
        # process's, DEVNULL is /dev/null, a file is that file, STDOUT (for stderr) is stdout's.
        def stream(given, inherited: int, mode: int) -> int:
            if given is None:
                return os.dup(inherited)
            return os.open(os.devnull, mode) if given == subprocess.DEVNULL else os.dup(given.fileno())

        opened = [stream(None, 0, os.O_RDONLY), stream(stdout, 1, os.O_WRONLY)]
        opened.append(os.dup(opened[1]) if stderr == subprocess.STDOUT else stream(stderr, 2, os.O_WRONLY))
        request = {
            "argv": list(args),
            "cwd": str(cwd or os.getcwd()),
            "env": dict(os.environ if env is None else env),
            "new_session": bool(start_new_session),
        }
        data = pickle.dumps(request)
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._conn.connect(warm["socket"])
            self._conn.sendall(struct.pack("!I", len(data)))
            socket.send_fds(self._conn, [data], opened)
        finally:
            for fd in opened:
                os.close(fd)
        self._buffer = b""
        self.pid = int(self._line(timeout=60).removeprefix("pid "))
        warm["children"] = warm.get("children", 0) + 1

    def _line(self, timeout: float | None) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return None
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError(f"the warm interpreter lost child {self.args[:4]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            line = self._line(timeout=0)
            if line is not None:
                self.returncode = int(line.removeprefix("status "))
                self._conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = int(line.removeprefix("status "))
            self._conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def Popen(args, *, cwd=None, env=None, stdin=None, stdout=None, stderr=None, start_new_session=False, **kwargs):
    """`subprocess.Popen` for the forms above; anything else is a real `subprocess.Popen`."""
    warm = None if kwargs else _warm_for(args, env, stdin, stdout, stderr)
    if warm is None:
        return subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=start_new_session,
            **kwargs,
        )
    return WarmProcess(warm, args, cwd, env, stdout, stderr, start_new_session)


def run(
    args,
    *,
    cwd=None,
    env=None,
    capture_output=False,
    text=False,
    timeout=None,
    stdout=None,
    stderr=None,
    start_new_session=False,
    **kwargs,
) -> subprocess.CompletedProcess:
    """`subprocess.run` for the forms above (output captured to files, then read); else the real one."""
    warm = None if kwargs else _warm_for(args, env, None, stdout, stderr)
    if warm is None:
        return subprocess.run(
            args,
            cwd=cwd,
            env=env,
            capture_output=capture_output,
            text=text,
            timeout=timeout,
            stdout=stdout,
            stderr=stderr,
            start_new_session=start_new_session,
            **kwargs,
        )
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if capture_output:
            stdout, stderr = out, err
        child = WarmProcess(warm, args, cwd, env, stdout, stderr, start_new_session)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise
        captured = []
        for stream in (out, err):
            stream.seek(0)
            data = stream.read()
            # as subprocess decodes in text mode: the locale's encoding, universal newlines
            decoded = data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")
            captured.append(decoded if text else data)
    return subprocess.CompletedProcess(args, child.returncode, *(captured if capture_output else (None, None)))
