"""Fetch one file of a Kaggle dataset into a verified local cache, with the official kagglesdk.

The file lands in a verified cache (lib/kaggle_cache.py): ``cache_dir/<owner>__<name>/<file_name>``
plus a marker with its size and sha256, written last, so a CSV without a valid marker is never trusted.

We call ``kagglesdk`` directly rather than ``kaggle.KaggleApi``: importing the ``kaggle``
package authenticates at import time (a network call when a token is set), ``authenticate()``
calls ``exit(1)`` when no credentials exist, and its downloader prints to stdout and retries
with a fixed 2**n-second backoff we cannot shorten. The SDK (the CLI's own layer) is imported
lazily: it takes 0.3 s, and a cache hit never needs it.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import requests
from tqdm import tqdm

from lib.kaggle_auth import KaggleError, open_client, resolve_credentials
from lib.kaggle_cache import cache_valid, cached_path, discard_unverified, locked, publish

log = logging.getLogger("lenta_lora.kaggle")

LENTA_COLUMNS = ("url", "title", "text", "topic", "tags", "date")
_SLUG = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)/([A-Za-z0-9][A-Za-z0-9_.-]*)$")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_CHUNK = 1 << 20


class _Retryable(Exception):
    """A failure a fresh attempt may fix: truncated body, corrupt archive."""


def download_kaggle_file(
    dataset: str,
    file_name: str,
    cache_dir: Path,
    *,
    credentials: dict[str, str] | None = None,
    retries: int = 3,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
    expected_columns: tuple[str, ...] = LENTA_COLUMNS,
    version: int | None = None,
) -> Path:
    """Return the path of ``file_name`` (unpacked CSV) from Kaggle ``dataset`` ("owner/name").

    A verified cache hit makes no network call and needs no credentials. ``credentials`` is
    ``{"username", "key"}`` or ``{"api_token"}``; without it the kaggle CLI's sources are used.
    Network failures are retried ``retries`` times (delay ``backoff_s * 2**n``); ``timeout_s``
    bounds each connect/read. ``version`` (see `current_version`) pins the dataset version: a
    cached file of another version is downloaded again. Raises KaggleError.
    """
    match = _SLUG.match(dataset or "")
    if not match:
        raise KaggleError(
            f"dataset {dataset!r} is not 'owner/name' (e.g. yutkin/corpus-of-russian-news-articles-from-lenta)"
        )
    if not file_name or Path(file_name).name != file_name or file_name in (".", ".."):
        raise KaggleError(f"file_name {file_name!r} must be a plain file name such as 'lenta-ru-news.csv'")
    if retries < 0 or backoff_s < 0 or timeout_s <= 0:
        raise KaggleError("retries and backoff_s must be >= 0 and timeout_s > 0")
    owner, name = match.groups()
    cache_dir = Path(cache_dir).expanduser()
    csv_path = cached_path(dataset, file_name, cache_dir)
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KaggleError(
            f"cannot create cache directory {csv_path.parent}: {exc.strerror}; fix data.cache_dir"
        ) from None

    # One lock per dataset: a second process waits, then finds the first one's verified file.
    with locked(cache_dir / f".{owner}__{name}.lock"):
        if cache_valid(csv_path, dataset, file_name, version):
            log.info("using cached %s (size and sha256 verified)", csv_path)
            return csv_path
        discard_unverified(cache_dir, f".tmp-{owner}__{name}-", csv_path)
        auth, source = resolve_credentials(credentials, timeout_s)
        log.info("downloading %s from Kaggle dataset %s (credentials: %s)", file_name, dataset, source)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{owner}__{name}-", dir=cache_dir))
        try:
            fresh = _download_with_retries(
                auth, source, dataset, file_name, work, retries, backoff_s, timeout_s, version
            )
            _check_csv(fresh, dataset, file_name, expected_columns)
            size, digest = publish(fresh, csv_path, dataset, file_name, version)
            log.info("cached %s (%d bytes, sha256 %s)", csv_path, size, digest[:12])
            return csv_path
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _download_with_retries(auth, source, dataset, file_name, work, retries, backoff_s, timeout_s, version) -> Path:
    secrets = [value for name, value in auth.items() if name != "username"]
    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "attempt %d/%d for %s failed: %s; retrying in %.1fs",
                attempt,
                retries + 1,
                dataset,
                _describe(last, secrets),
                delay,
            )
            time.sleep(delay)
        try:
            return _attempt(auth, dataset, file_name, work, timeout_s, version)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise KaggleError(
                    f"Kaggle rejected the credentials ({source}) for {dataset} (HTTP {status}): "
                    "renew them under kaggle.com > Settings > API and check the account may "
                    "access the dataset; or use data.source: csv with data.path"
                ) from None
            if status == 404:
                raise KaggleError(
                    f"Kaggle has no dataset {dataset} with a file {file_name!r} (HTTP 404): "
                    "check the dataset and file names"
                ) from None
            if status not in _RETRY_STATUS:
                raise KaggleError(f"Kaggle answered HTTP {status} for {dataset}: {_describe(exc, secrets)}") from None
            last = exc
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
            _Retryable,
        ) as exc:
            last = exc
        except requests.RequestException as exc:  # e.g. too many redirects: a retry won't help
            raise KaggleError(f"Kaggle request for {dataset} failed: {_describe(exc, secrets)}") from None
        except OSError as exc:  # requests' errors are OSErrors too, so this is the local disk
            raise KaggleError(
                f"cannot write into {work.parent}: {exc.strerror or exc}; free space or change data.cache_dir"
            ) from None
    raise KaggleError(
        f"downloading {file_name!r} from Kaggle dataset {dataset} failed after {retries + 1} "
        f"attempts, last error: {_describe(last, secrets)}; check the network and retry"
    ) from None


def current_version(dataset: str, *, credentials: dict[str, str] | None = None, timeout_s: float = 30.0) -> int:
    """The dataset's current version number on Kaggle (GetDataset through the official client)."""
    from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetRequest

    if not _SLUG.match(dataset or ""):
        raise KaggleError(f"dataset {dataset!r} is not 'owner/name'")
    auth, source = resolve_credentials(credentials, timeout_s)
    request = ApiGetDatasetRequest()
    request.owner_slug, request.dataset_slug = dataset.split("/")
    try:
        with open_client(auth, timeout_s) as client:
            found = client.datasets.dataset_api_client.get_dataset(request)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise KaggleError(
            f"asking Kaggle for the version of {dataset} failed (HTTP {status}, credentials: {source})"
        ) from None
    except requests.RequestException as exc:
        raise KaggleError(
            f"asking Kaggle for the version of {dataset} failed: {_describe(exc, list(auth.values()))}"
        ) from None
    return int(found.current_version_number)


def _attempt(auth: dict, dataset: str, file_name: str, work: Path, timeout_s: float, version: int | None) -> Path:
    from kagglesdk.datasets.types.dataset_api_service import ApiDownloadDatasetRequest

    request = ApiDownloadDatasetRequest()
    request.owner_slug, request.dataset_slug = dataset.split("/")
    request.file_name = file_name
    if version:
        request.dataset_version_number = version
    body = work / "download.part"
    with open_client(auth, timeout_s) as client:
        # POST DownloadDataset answers 302 to a signed storage URL; requests follows it and
        # kagglesdk returns the streamed file response (body not read yet).
        response = client.datasets.dataset_api_client.download_dataset(request)
        with response:
            # Content-Length counts wire bytes; with a Content-Encoding requests hands us more.
            encoded = response.headers.get("Content-Encoding", "identity") != "identity"
            expected = None if encoded else int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with (
                open(body, "wb") as out,
                tqdm(total=expected, unit="B", unit_scale=True, desc=file_name, disable=None, leave=False) as bar,
            ):  # None: TTY only
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
    if expected is not None and received != expected:
        raise _Retryable(f"truncated body: {received} of {expected} bytes")
    return _unpack(body, file_name, work)


def _unpack(body: Path, file_name: str, work: Path) -> Path:
    """Kaggle serves large files as <file_name>.zip and small ones plain: sniff, not trust names."""
    target = work / file_name
    with open(body, "rb") as handle:
        if handle.read(2) != b"PK":  # no zip magic: the plain file (a truncated zip keeps it)
            return body.replace(target)
    try:
        with zipfile.ZipFile(body) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            chosen = [m for m in members if Path(m.filename).name == file_name] or (
                members if len(members) == 1 else []
            )
            if not chosen:
                raise KaggleError(
                    f"the archive for {file_name!r} holds {[m.filename for m in members][:10]}, "
                    "not that file: check the file name"
                )
            # Reading a member to its end checks its CRC-32: the same test zipfile.testzip()
            # does, without decompressing the 2 GB twice. We write to a fixed name (no zip-slip).
            with archive.open(chosen[0]) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _Retryable(f"corrupt zip archive ({exc})") from None
    body.unlink()
    return target


def _check_csv(path: Path, dataset: str, file_name: str, expected: tuple[str, ...]) -> None:
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).decode("utf-8-sig", errors="replace")
    if not (lines := head.splitlines()) or not lines[0].strip():
        raise KaggleError(f"{file_name!r} from {dataset} is empty: check the file name")
    header = [column.strip() for column in next(csv.reader([lines[0]]))]
    columns = header[1:] if header[0] in ("", "Unnamed: 0") else header  # pandas' saved index
    missing = [column for column in expected if column not in columns]
    if missing:
        raise KaggleError(
            f"{file_name!r} from {dataset} lacks columns {missing} (header {header[:8]}): is it the right file?"
        )
    if len(lines) < 2 or not any(line.strip() for line in lines[1:]):
        raise KaggleError(f"{file_name!r} from {dataset} has a header but no rows")


def _describe(exc: BaseException | None, secrets: list[str]) -> str:
    """One line about an error, without URL query strings (signed URLs) or credential values."""
    text = str(exc) if isinstance(exc, _Retryable) else f"{type(exc).__name__}: {exc}"
    text = re.sub(r"(https?://[^\s?'\"]+)\?[^\s'\")]*", r"\1?<redacted>", text)
    for secret in filter(None, secrets):
        text = text.replace(secret, "<redacted>")
    return " ".join(text.split())[:300]
