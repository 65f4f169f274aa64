"""How many CPU threads torch uses, chosen for the machine a run finds (no Prefect, no MLflow).

torch's default is one intra-op thread per logical CPU, and the pip wheels' OpenMP runtime lets a
thread that reaches a barrier spin before it sleeps. Both are right on a dedicated machine and
wrong on a shared one: every parallel op waits for its slowest thread, and with a busy neighbour on
each core one of the threads is nearly always descheduled. Measured on 2 cores beside one CPU hog
per core (bench/threads_contention.py): demo training 4.9x slower at the defaults, where a fair
share would be 2x.

The policy (`train.threads: auto`):
* usable CPUs = the affinity mask, capped by a cgroup CPU quota (a container's `--cpus`);
* on 4 or fewer usable CPUs: 1 intra-op thread. A small model's ops are too short to gain from
  a second thread on such a machine, and one thread cannot wait for a descheduled sibling;
* on larger machines: one thread per usable CPU, less one left for the rest of the process
  (Prefect, MLflow, tokenizers); the wait policy (below) keeps idle threads off the cores;
* `OMP_WAIT_POLICY=PASSIVE` for the processes this project starts (the CLI and its flow runs):
  a waiting OpenMP thread sleeps at once instead of spinning on a core a neighbour wants. It must
  be in the environment before torch is imported (the runtime reads it once), so the CLI sets it
  and deployments carry it in their job variables.

Explicit settings always win: `train.threads: N` in the config, else `OMP_NUM_THREADS` (or
`LENTA_LORA_THREADS`) in the environment; an `OMP_WAIT_POLICY` already set is never changed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("lenta_lora.threads")

SMALL_MACHINE_CPUS = 4  # at or below this many usable CPUs, one intra-op thread (see the module doc)
WAIT_POLICY = "PASSIVE"


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2/v1 CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(count, quota) if quota else count)


def _cgroup_quota() -> int | None:
    """Whole CPUs allowed by the cgroup quota (rounded up), or None when there is none."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()  # v2: "<quota> <period>" or "max <period>"
        quota, period = (None if text[0] == "max" else int(text[0])), int(text[1])
    except (OSError, ValueError, IndexError):
        try:  # v1
            quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            quota = quota if quota > 0 else None
        except (OSError, ValueError):
            return None
    if not quota or period <= 0:
        return None
    return max(1, -(-quota // period))


def auto_threads(cpus: int | None = None) -> int:
    """Intra-op threads for `cpus` usable CPUs (default: this machine's)."""
    cpus = usable_cpus() if cpus is None else cpus
    return 1 if cpus <= SMALL_MACHINE_CPUS else cpus - 1


def explicit_threads(setting: str | int | None = "auto", environ: dict | None = None) -> tuple[int | None, str]:
    """(threads, source) a user asked for: the config key, else OMP_NUM_THREADS / LENTA_LORA_THREADS."""
    environ = os.environ if environ is None else environ
    if setting not in (None, "auto"):
        return int(setting), "config train.threads"
    for name in ("LENTA_LORA_THREADS", "OMP_NUM_THREADS"):
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), name
    return None, "auto"


def configure_threads(setting: str | int | None = "auto") -> dict:
    """Set torch's intra-op threads for this process; returns what was chosen and why.

    Call where CPU work starts (training, evaluation). Idempotent and cheap.
    """
    import torch

    threads, source = explicit_threads(setting)
    if threads is None:
        threads, source = auto_threads(), f"auto ({usable_cpus()} usable CPUs)"
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info(
            "torch intra-op threads: %d (%s); OMP_WAIT_POLICY=%s",
            threads,
            source,
            os.environ.get("OMP_WAIT_POLICY", "unset"),
        )
    return {"threads": threads, "source": source, "wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def set_wait_policy(environ: dict | None = None) -> dict:
    """Put `OMP_WAIT_POLICY=PASSIVE` into `environ` (default os.environ) unless one is set; returns it.

    Only effective for a process whose OpenMP runtime has not started yet (before `import torch`),
    and for every process it starts afterwards.
    """
    environ = os.environ if environ is None else environ
    environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    return environ
