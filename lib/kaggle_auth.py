"""Kaggle credentials and the official SDK's client, found and opened the way the kaggle CLI 2.x does.

Split from lib/kaggle_source.py (which downloads and caches files) so that the rules for where a
credential comes from, and the one error type acquisition raises, read on their own. Messages
never hold a secret: they name where a credential came from, not its value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

_USER_AGENT = "lenta-lora (kagglesdk)"
_HOW_TO_AUTH = (
    "set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN, or put kaggle.json in "
    "$KAGGLE_CONFIG_DIR or ~/.kaggle, or run `kaggle auth login`; or set "
    "data.source: csv with data.path to use a local CSV instead"
)


class KaggleError(RuntimeError):
    """Acquisition failed. The message says what and what to do; it never holds a secret."""


def resolve_credentials(explicit: dict[str, str] | None, timeout_s: float) -> tuple[dict, str]:
    """Return (KaggleClient auth kwargs, where they came from), in the kaggle CLI 2.x order:
    access token, then legacy username/key (env over kaggle.json), then `kaggle auth login`."""
    from kagglesdk import KaggleCredentials, get_access_token_from_env

    token, token_source = get_access_token_from_env()  # KAGGLE_API_TOKEN, ~/.kaggle/access_token
    token_source = {"access_token": "~/.kaggle/access_token"}.get(token_source, token_source)
    if explicit is not None:
        if explicit.get("api_token"):
            return {"api_token": explicit["api_token"]}, "explicit api_token"
        if not (explicit.get("username") and explicit.get("key")):
            raise KaggleError(f"credentials need 'username' and 'key' (or 'api_token'); got keys {sorted(explicit)}")
        if token:  # kagglesdk always prefers a token it finds over a username/key it is given
            raise KaggleError(
                f"explicit username/key given but kagglesdk would use the token from {token_source}; "
                "unset it or pass {'api_token': ...}"
            )
        return {"username": explicit["username"], "password": explicit["key"]}, "explicit username/key"
    if token:
        return {"api_token": token}, f"access token from {token_source}"
    from_file, config_path = _read_kaggle_json()
    username = os.environ.get("KAGGLE_USERNAME") or from_file.get("username")
    key = os.environ.get("KAGGLE_KEY") or from_file.get("key")
    if username and key:
        source = "KAGGLE_USERNAME/KAGGLE_KEY" if os.environ.get("KAGGLE_KEY") else str(config_path)
        return {"username": username, "password": key}, source
    with open_client({}, timeout_s) as client:
        oauth = KaggleCredentials.load(client=client)  # ~/.kaggle/credentials.json, no network
        if oauth is not None:
            try:
                return {"api_token": oauth.get_access_token()}, "~/.kaggle/credentials.json"
            except requests.RequestException as exc:
                raise KaggleError(
                    f"refreshing the `kaggle auth login` token failed ({type(exc).__name__}); "
                    "run `kaggle auth login` again"
                ) from None
    raise KaggleError(f"no Kaggle credentials found: {_HOW_TO_AUTH}")


def _read_kaggle_json() -> tuple[dict, Path | None]:
    # Same search as kaggle.KaggleApi: $KAGGLE_CONFIG_DIR, else ~/.kaggle, else XDG config.
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    config_dir = os.environ.get("KAGGLE_CONFIG_DIR")
    for directory in [Path(config_dir)] if config_dir else [Path.home() / ".kaggle", xdg]:
        path = directory / "kaggle.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            raise KaggleError(f"{path} is unreadable or not JSON; fix it or delete it") from None
        return (data if isinstance(data, dict) else {}), path
    return {}, None


class _TimeoutAdapter(HTTPAdapter):
    """kagglesdk sends without a timeout, so a stalled connection would hang forever."""

    def __init__(self, timeout_s: float):
        super().__init__()
        self._timeout_s = timeout_s

    def send(self, request, **kwargs):
        kwargs["timeout"] = kwargs.get("timeout") or self._timeout_s
        return super().send(request, **kwargs)


def open_client(auth: dict, timeout_s: float):
    from kagglesdk import KaggleClient

    try:  # reads KAGGLE_API_ENVIRONMENT; raises a bare Exception for an unknown value
        client = KaggleClient(user_agent=_USER_AGENT, **auth)
    except Exception as exc:
        raise KaggleError(f"cannot configure the Kaggle client ({exc}); fix KAGGLE_API_ENVIRONMENT") from None
    client.__enter__()  # creates the requests session, so the adapter can be mounted
    # Mounting an adapter is requests' own way to set a default timeout; the session is
    # private to kagglesdk, hence the guard instead of a hard failure if it ever moves.
    session = getattr(client.http_client(), "_session", None)
    for prefix in ("http://", "https://") if isinstance(session, requests.Session) else ():
        session.mount(prefix, _TimeoutAdapter(timeout_s))
    return client
