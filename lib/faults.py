"""Crashes: fault points that cause them for the reliability tests, and telling a crashed process from a live one.

`LENTA_LORA_FAULT=<point>` makes the process SIGKILL itself when it reaches `<point>`, the way
the OOM killer or a power cut would stop it: no `finally`, no `except`, no atexit.
`LENTA_LORA_FAULT=<point>:raise` raises InjectedFault there instead: an ordinary error, after
which the code's own cleanup must leave no half state. A test can hit
a window of milliseconds (between writing a dataset and publishing it, between registering a
version and closing its run) that an outside `kill` would almost never land in. Unset, each point
is one dictionary lookup.

Points (in pipeline order; tests/reliability/test_kill_points.py kills at each one):
    prepare.before-publish        dataset written to its temporary folder, not yet renamed into place
    train.step-<N>                optimizer step N done (after its checkpoint, if one falls on N); rank 0 only
    evaluate.after-scoring        perplexities computed, generations not
    register.after-artifacts      the model is logged in the run's artifacts, no version yet
    register.after-version        a version exists, `champion` not yet decided
    register.after-champion       registration complete; the flow has not closed its run
    export.before-rename          `lenta-lora export` wrote its hidden sibling folder, not yet renamed to --out
                                  (tests/test_export.py raises here; a kill there leaves only that sibling)
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("lenta_lora.faults")

VARIABLE = "LENTA_LORA_FAULT"


class InjectedFault(RuntimeError):
    """Raised at a fault point named with `:raise` (a failure the code must clean up after)."""


def reach(point: str) -> None:
    """SIGKILL this process if $LENTA_LORA_FAULT names `point`; raise InjectedFault if it names `point:raise`."""
    wanted = os.environ.get(VARIABLE)
    if wanted == f"{point}:raise":
        raise InjectedFault(f"fault injected at {point} ({VARIABLE}={wanted})")
    if wanted == point:
        log.warning("fault point %s reached: killing process %d (SIGKILL)", point, os.getpid())
        for handler in logging.getLogger().handlers:  # so the test's log shows where it died
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host: how a later run tells a crashed writer's
    leftovers (a RUNNING run, a temporary dataset folder) from a live one's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
