"""The MLflow store a run talks to: its URI, a client for it, and what happens when it is away.

Every module that reads or writes MLflow (lib/tracking.py for runs, lib/registry.py and
lib/champion.py for versions and the champion, lib/loading.py for loading a version) gets its client
here, so that the URI rules (the default sqlite file, a new database's tables created once under a
lock) and the server errors (a dead server named in one line within seconds) live in one place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

DEFAULT_DB = Path("mlruns") / "mlflow.db"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Profile value, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB).resolve()}"


class TrackingServerUnavailable(ConnectionError):
    """The MLflow tracking server at the configured URI does not answer."""


def require_reachable(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) store: fail within `timeout` seconds, naming the URI, if the server does not answer.

    MLflow's client retries a refused connection with exponential backoff: 247 s at its defaults
    (7 retries, factor 2; measured on a closed port), and those settings exist only as process-wide
    MLFLOW_HTTP_REQUEST_* environment variables, not per client. One probe of the server's /health,
    without retries, turns "server down" into a clear error at once and leaves the environment alone.
    Any HTTP answer counts as up; only a connection that fails or times out does not.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as error:
        raise TrackingServerUnavailable(
            f"MLflow tracking server {uri} is not reachable ({type(error).__name__}): start it "
            "(`mlflow server ...`) or point tracking.uri / MLFLOW_TRACKING_URI at a running one"
        ) from None


@contextlib.contextmanager
def server_errors(uri: str, doing: str) -> Iterator[None]:
    """Turn a failure against a tracking server that has gone away (after MLflow's own bounded
    retries, $MLFLOW_HTTP_REQUEST_MAX_RETRIES) into one error naming the URI and what survives."""
    try:
        yield
    except Exception as error:
        if not uri.startswith(("http://", "https://")):
            raise
        try:
            require_reachable(uri)
        except TrackingServerUnavailable:
            raise TrackingServerUnavailable(
                f"MLflow tracking server {uri} stopped answering while {doing} ({type(error).__name__}); "
                "training checkpoints under data.cache_dir are kept: start the server again and re-run "
                "the same config to resume"
            ) from error
        raise


def client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def initialize_store(uri: str) -> None:
    """Create a new sqlite store's tables under a file lock: two processes that open a brand-new
    database at the same moment would otherwise both run MLflow's schema migrations, and one fails."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".init-lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        client(uri).search_experiments(max_results=1)


# --- Registry searches and lookups shared by lib/champion.py, lib/registry.py and lib/loading.py ---


def alias_version(client, name: str, alias: str) -> str | None:
    """The version number `alias` points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if not_found(error):
            return None
        raise


def not_found(error) -> bool:  # INVALID_PARAMETER_VALUE: e.g. version "abc", or an alias never set
    return getattr(error, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def all_pages(search, *args) -> list:
    """Every result of an MLflow search call, page after page (a page holds 100 by default)."""
    found, token = [], None
    while True:
        page = search(*args, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def all_versions(client, name: str, extra_filter: str = "") -> list:
    """Every version of `name`, optionally narrowed by another filter clause."""
    query = f"name = '{name}'" + (f" and {extra_filter}" if extra_filter else "")
    return all_pages(client.search_model_versions, query)


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="LoRA adapters from lenta-lora")
    except MlflowException as error:
        if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":  # made by a concurrent run: fine
            raise
