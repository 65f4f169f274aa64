"""Which errors are the user's to fix, and keeping their tracebacks off the terminal.

A user error (bad config, bad file, missing credential, a version that does not exist, ...) has a
message that says what to fix: the CLI prints it as one line and exits 2; `--debug` shows the
traceback. Split from flows/cli.py so the list reads on its own.
"""

from __future__ import annotations

import logging


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to fix: one line, exit 2, no traceback (unless --debug)."""
    from lib.adapter_pyfunc import ArtifactIntegrityError
    from lib.checkpoint import CheckpointError, StorageError
    from lib.config import ConfigError
    from lib.corpus import CorpusError
    from lib.export import ExportError
    from lib.kaggle_source import KaggleError
    from lib.steps import OutOfMemory, TrainingDiverged

    return (
        ConfigError,
        CorpusError,
        KaggleError,
        TrainingDiverged,
        OutOfMemory,
        CheckpointError,
        StorageError,
        ArtifactIntegrityError,
        LookupError,
        FileNotFoundError,
        ConnectionError,
        ExportError,
    )


class _NoUserErrorTracebacks(logging.Filter):
    """On the terminal's handlers only: Prefect logs every task and flow failure with its traceback;
    for a user error the one line below says it all. Prefect's API keeps the traceback (its handler
    sees the record first: it sits on the run loggers, the terminal's on their parents)."""

    def __init__(self, user_errors: tuple[type[BaseException], ...]):
        super().__init__()
        self.user_errors = user_errors

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.user_errors):
            record.exc_info, record.exc_text = None, None
        return True


def hide_user_error_tracebacks(user_errors: tuple[type[BaseException], ...]) -> None:
    import prefect  # noqa: F401 - configures Prefect's logging, whose handlers get the filter

    quiet = _NoUserErrorTracebacks(user_errors)
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if (
                isinstance(handler, logging.StreamHandler)
                and "API" not in type(handler).__name__
                and not any(isinstance(f, _NoUserErrorTracebacks) for f in handler.filters)
            ):
                handler.addFilter(quiet)
