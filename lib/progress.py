"""Progress lines for long loops, for the logs people read without a terminal.

tqdm bars (`disable=None`) vanish when stderr is not a TTY: a Prefect worker, CI, `nohup`. There a
long loop would be silent for minutes; the `lenta_lora.*` loggers do reach Prefect's run logs
(PREFECT_LOGGING_EXTRA_LOGGERS), so a loop logs a line once `interval_s` seconds have passed since
its last one: at least that often while it makes progress, never more often.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

DEFAULT_INTERVAL_S = 30.0  # seconds between progress lines: shows a run is alive, rare enough to read


class Ticker:
    """A clock interval: `due()` once `interval_s` seconds have passed since the last `mark()` (or
    since it was made). `enabled=False` (say, a progress bar is already showing) is never due."""

    def __init__(
        self, interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic, enabled: bool = True
    ):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s}")
        self.interval_s, self.clock, self.enabled = interval_s, clock, enabled
        self.started = self.last = clock()

    def due(self) -> bool:
        return self.enabled and self.clock() - self.last >= self.interval_s

    def mark(self) -> None:
        self.last = self.clock()

    def report(self, logger: logging.Logger, what: str, done: int, total: int, unit: str = "batch") -> bool:
        """If due: log `what: unit done/total, seconds per unit, ETA` (rate since the ticker was made)
        and mark; True when a line was logged."""
        if not self.due():
            return False
        elapsed = self.clock() - self.started
        per_unit = elapsed / max(done, 1)
        eta = timedelta(seconds=round(per_unit * max(total - done, 0)))
        logger.info("%s: %s %d/%d, %.3g s/%s, ETA %s", what, unit, done, total, per_unit, unit, eta)
        self.mark()
        return True


def bar_hidden(bar) -> bool:
    """True when a tqdm bar made with `disable=None` shows nothing (stderr is not a terminal)."""
    return bool(getattr(bar, "disable", True))
