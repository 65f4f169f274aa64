"""The verified local cache of Kaggle files that lib/kaggle_source.py downloads into.

Layout: ``cache_dir/<owner>__<name>/<file_name>`` plus ``<file_name>.kaggle.json`` (dataset, file,
size, sha256, version). The marker is written last, after the file is in place, so a file without
a valid marker is never trusted; a process holding the dataset's lock (`locked`) removes such a
file, and the temporary folders of dead downloads, before it downloads again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("lenta_lora.kaggle")


@contextmanager
def locked(lock_path: Path):
    # flock is released by the kernel when the holder dies, so a killed download never
    # leaves a stale lock. The lock file itself stays: deleting it would race with waiters.
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish with %s", lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, on errors too


def marker_path(csv_path: Path) -> Path:
    """The marker file beside a cached CSV."""
    return csv_path.with_name(csv_path.name + ".kaggle.json")


def cached_path(dataset: str, file_name: str, cache_dir: str | Path) -> Path:
    """Where `download_kaggle_file` keeps `file_name` of `dataset`."""
    return Path(cache_dir).expanduser() / dataset.replace("/", "__", 1) / file_name


def cached_version(csv_path: Path) -> int | None:
    """The Kaggle dataset version the cached file was downloaded as (None: unknown or no cache)."""
    try:
        return json.loads(marker_path(Path(csv_path)).read_text()).get("version")
    except (OSError, ValueError):
        return None


def cache_valid(csv_path: Path, dataset: str, file_name: str, version: int | None = None) -> bool:
    """Whether the cached file is the one its marker describes (dataset, file, size, sha256; and `version`
    when given): only then is it used without a download."""
    try:
        meta = json.loads(marker_path(csv_path).read_text())
        size = csv_path.stat().st_size
    except (OSError, ValueError):
        return False
    if (meta.get("dataset"), meta.get("file_name"), meta.get("size")) != (dataset, file_name, size):
        return False
    if version is not None and meta.get("version") != version:
        log.info(
            "%s holds version %s of %s; Kaggle's current version is %s", csv_path, meta.get("version"), dataset, version
        )
        return False
    # Streaming the hash costs seconds on the 2 GB CSV and catches same-size edits and bit rot.
    return meta.get("sha256") == sha256(csv_path)


def discard_unverified(cache_dir: Path, tmp_prefix: str, csv_path: Path) -> None:
    # We hold the lock, so any temp dir with our prefix belongs to a dead process.
    for leftover in cache_dir.glob(tmp_prefix + "*"):
        log.warning("removing leftover partial download %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    for stale in [path for path in (csv_path, marker_path(csv_path)) if path.exists()]:
        log.warning("discarding unverified cache file %s", stale)
        stale.unlink()


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make both renames survive a power loss
    os.fsync(dir_fd)
    os.close(dir_fd)


def publish(fresh: Path, csv_path: Path, dataset: str, file_name: str, version: int | None) -> tuple[int, str]:
    """Move a checked download into place, then write its marker: (size, sha256)."""
    size, digest = fresh.stat().st_size, sha256(fresh)
    os.replace(fresh, csv_path)  # same filesystem: atomic
    marker = {"dataset": dataset, "file_name": file_name, "size": size, "sha256": digest, "version": version}
    write_json_atomic(marker_path(csv_path), {**marker, "downloaded_at": time.time()})
    return size, digest
