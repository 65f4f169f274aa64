"""The warm interpreter of tests/support/warm.py, run as `python -m tests.support.warm_interpreter
SOCKET` from the repository: it sets the CLI's environment defaults, imports what every CLI run
imports, then forks one child per request that arrives on the Unix socket SOCKET.

A request is the child's argv, working directory, environment and session flag, with its stdin,
stdout and stderr passed as file descriptors. For each, a waiter process forks the child, the child
sets itself up and sends its pid (so a caller can signal its session at once, as after Popen), and
the waiter sends the child's exit status (negative: the signal that killed it) when it ends.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import struct
import sys


def import_as_the_cli_does() -> dict:
    """The CLI's environment defaults, then the imports; what they set, printed or logged."""
    from flows import cli

    before = dict(os.environ)
    cli._quiet_environment()  # as `lenta-lora` does first, before anything heavy is imported
    defaults = {k: v for k, v in os.environ.items() if k not in before}
    said = []  # records logged at the CLI's INFO level while importing: a fresh CLI run prints them

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(self.format(record))

    keep = Keep(logging.INFO)
    logging.root.addHandler(keep)
    logging.root.setLevel(logging.INFO)
    import mlflow  # noqa: F401
    import peft  # noqa: F401
    import prefect  # noqa: F401
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    import flows.evaluate  # noqa: F401
    import flows.finetune  # noqa: F401

    logging.root.removeHandler(keep)
    logging.root.setLevel(logging.WARNING)  # the default again: the child's CLI configures its own
    return {"defaults": defaults, "said": said}


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    size = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))[0]
    data, fds, _, _ = socket.recv_fds(conn, size, 3, socket.MSG_WAITALL)
    return pickle.loads(data), fds


def run_module(argv: list[str]) -> None:
    """`python -m MODULE ARGS` in this process, then exit as the interpreter would."""
    import atexit
    import runpy
    import threading
    import types

    try:
        sys.argv = argv[2:]
        sys.modules.pop(argv[2], None)  # run as __main__ alone, as `python -m` does (no second copy)
        sys.modules["__main__"] = types.ModuleType("__main__")  # not this module's globals
        runpy._run_module_as_main(argv[2], alter_argv=True)  # what `python -m` calls
        code = 0
    except SystemExit as stop:
        code = stop.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        kind, error, trace = sys.exc_info()
        sys.excepthook(kind, error.with_traceback(trace.tb_next), trace.tb_next)  # without this frame
        code = 1
    try:
        threading._shutdown()  # what the interpreter does at exit: join non-daemon threads,
        atexit._run_exitfuncs()  # then run the atexit handlers
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code & 0xFF)


def start_child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: its session, stdio, directory and environment; tell the pid; run."""
    if request["new_session"]:
        os.setsid()
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import numpy

    numpy.random.seed()  # a fresh interpreter's numpy has its own seed (`random` reseeds itself)
    conn.sendall(f"pid {os.getpid()}\n".encode())
    conn.close()
    run_module(request["argv"])


def serve(path: str) -> None:
    report = import_as_the_cli_does()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the waiters
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(5)
    parent = os.getppid()
    print("ready", json.dumps(report), flush=True)
    while os.getppid() == parent:  # the pytest worker that started it is gone: stop
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        request, fds = receive(conn)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:  # the waiter
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            child = os.fork()
            if child == 0:
                start_child(conn, request, fds)
            for fd in fds:
                os.close(fd)
            _, status = os.waitpid(child, 0)
            try:
                conn.sendall(f"status {os.waitstatus_to_exitcode(status)}\n".encode())
            finally:  # the test that asked may be gone
                os._exit(0)
        for fd in fds:
            os.close(fd)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
