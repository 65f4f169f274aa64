"""`train.num_processes` = N > 1 from the flow: torchrun starts N ranks of lib/train_entry.py, this process follows.

The task process (Prefect, MLflow) is not a rank. It writes the config to a YAML file and runs

    python -m torch.distributed.run --standalone --nproc_per_node N -m lib.train_entry --report <folder> ...

in a process group of its own; rank 0 appends each `on_log` call and a resume to <folder>/events.jsonl,
which this process tails and replays into the caller's `on_log` / `on_resume` (so the MLflow metrics
and the Prefect progress artifact come from here, as with one process), and writes outcome.json
(atomically) last: the TrainResult, or the error that stopped it, re-raised here with its type.
Rank 0 writes the checkpoints and the adapter itself. torchrun, not torch.multiprocessing: it
stops the other ranks when one fails, and the same entry point runs multi-node (README).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from lib import checkpoint
from lib.config import PipelineConfig
from lib.steps import OutOfMemory, TrainingDiverged
from lib.train_result import LogFn, Progress, TrainResult

ROOT = Path(__file__).resolve().parent.parent  # the repository: lib/ must import in the children
EVENTS, OUTCOME = "events.jsonl", "outcome.json"
POLL_SECONDS = 0.5
# Looked up here, not between fork and exec (where a dlopen could wait on a lock another thread held).
_PRCTL = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform == "linux" else None
ERROR_LINE = re.compile(r"\b\w*(Error|Exception|Fault|Diverged|Memory): ")
# The errors whose message tells the user what to do: raised again here with the same type.
KNOWN = (TrainingDiverged, OutOfMemory, checkpoint.CheckpointError, checkpoint.StorageError)
KNOWN_ERRORS = {error.__name__: error for error in KNOWN}


class TrainingProcessesFailed(RuntimeError):
    """The training processes stopped without a result (a crash, a kill, an unexpected error)."""


def train_with_launcher(
    dataset_path: str,
    config: PipelineConfig,
    output_dir: str | Path,
    on_log: LogFn | None,
    checkpoint_dir: str | Path | None,
    run_id: str | None,
    on_resume: Callable[[checkpoint.Checkpoint], None] | None,
) -> TrainResult:
    """lib.training.train_adapter for `train.num_processes` > 1: the same arguments, the same TrainResult."""
    with tempfile.TemporaryDirectory(prefix="lenta-lora-launch-") as folder:
        folder = Path(folder)
        (folder / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *(f"--nproc_per_node={config.train.num_processes}", "-m", "lib.train_entry"),
            *("--config", str(folder / "config.yaml"), "--dataset", str(Path(dataset_path).resolve())),
            *("--output", str(Path(output_dir).resolve()), "--report", str(folder)),
        ]
        if checkpoint_dir is not None:
            command += ["--checkpoint-dir", str(Path(checkpoint_dir).resolve())]
        if run_id:  # recorded in the checkpoints; the metrics are logged here, not by the child
            command += ["--run-id", run_id]

        def relay(event: dict) -> None:
            if event["kind"] == "log" and on_log:
                progress = event["progress"]
                on_log(event["step"], event["record"], Progress(**progress) if progress else None)
            elif event["kind"] == "resume" and on_resume:
                on_resume(checkpoint.Checkpoint(Path(event["path"]), *event["at"], event["state"]))

        code = _run(command, folder, relay)
        outcome = json.loads((folder / OUTCOME).read_text()) if (folder / OUTCOME).exists() else {}
        if "error" in outcome:
            kind, message = outcome["error"]["type"], " | ".join(outcome["error"]["message"].splitlines())
            if kind in KNOWN_ERRORS:
                raise KNOWN_ERRORS[kind](message)
            raise TrainingProcessesFailed(f"training rank 0 failed: {kind}: {message}")
        if code != 0 or "result" not in outcome:
            raise TrainingProcessesFailed(
                f"the {config.train.num_processes} training processes failed (torchrun exit code {code}) "
                f"without a result; last output: {output_tail(folder / 'output.log')}"
            )
        return TrainResult(**outcome["result"])


def _run(command: list[str], folder: Path, relay: Callable[[dict], None]) -> int:
    """Run `command` in its own process group, relaying complete lines of events.jsonl as they come;
    its exit code. Whatever happens here (an error in `relay`, Ctrl-C), no process of the group is left."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default; lib/train_entry.py divides the cores itself
    offset, events = 0, folder / EVENTS
    with open(folder / "output.log", "wb") as output:
        child = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own group: _stop ends torchrun and every rank together
            preexec_fn=_die_with_parent,
        )
        try:
            while True:
                done = child.poll() is not None  # before reading: every line written before the exit is read
                if events.exists():
                    with open(events, "rb") as stream:
                        stream.seek(offset)
                        lines = stream.read().split(b"\n")[:-1]  # only complete lines: the last may be half-written
                    for line in lines:
                        offset += len(line) + 1
                        relay(json.loads(line))
                if done:
                    return child.returncode
                time.sleep(POLL_SECONDS)
        finally:
            _stop(child)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when this process dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG), so that no orphaned ranks go on training and holding the checkpoint lock."""
    if _PRCTL is not None:  # elsewhere `_run`'s `finally` still covers errors and Ctrl-C
        _PRCTL(1, signal.SIGTERM)


def _stop(child: subprocess.Popen) -> None:
    """End the child's whole process group (torchrun and its ranks): SIGTERM, then SIGKILL after 30 s."""
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGTERM)  # torchrun passes it on to the ranks
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:  # any rank left behind (torchrun itself killed), or one that ignored SIGTERM
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def output_tail(log: Path, lines: int = 4) -> str:
    """The last lines of the children's output on one line, the last exception line first."""
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    text = [t.strip() for t in text if t.strip()]
    # "[rank1]: ValueError: ...", "lib.faults.InjectedFault: ..."; torchrun's own ChildFailedError says less
    errors = [t for t in text if ERROR_LINE.search(t) and "ChildFailedError" not in t]
    shown = ([errors[-1]] if errors else []) + text[-lines:]
    return " | ".join(shown)[-1500:] or "(no output)"
