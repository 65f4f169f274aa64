"""Tests for lib.kaggle_source against a fake Kaggle API (tests/support/kaggle_server.py).

The official kagglesdk client runs unmodified: it is pointed at the fake server only through
the environment (KAGGLE_API_ENVIRONMENT=TEST plus http_proxy), and HOME / KAGGLE_CONFIG_DIR /
XDG_CONFIG_HOME are temporary directories so no real credentials are ever read.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from lib.kaggle_source import KaggleError, download_kaggle_file
from tests.support.kaggle_server import SIGNATURE, FakeKaggle, isolated_home, lenta_csv

DATASET = "yutkin/corpus-of-russian-news-articles-from-lenta"
FILE = "lenta-ru-news.csv"
KEY = "k3y-s3cret-abc"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    return isolated_home(tmp_path, monkeypatch)


@pytest.fixture
def server(home, monkeypatch):
    with FakeKaggle(key=KEY) as fake:
        for name, value in fake.env().items():
            monkeypatch.setenv(name, value)
        yield fake


@pytest.fixture
def creds(monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", KEY)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def fetch(cache: Path, dataset: str = DATASET, **kwargs) -> Path:
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("timeout_s", 5.0)
    return download_kaggle_file(dataset, FILE, cache, **kwargs)


def entry(cache: Path) -> Path:
    return cache / "yutkin__corpus-of-russian-news-articles-from-lenta"


def assert_nothing_cached(cache: Path) -> None:
    assert not (entry(cache) / FILE).exists()
    assert not (entry(cache) / (FILE + ".kaggle.json")).exists()
    assert not list(cache.glob(".tmp-*"))


# --- happy paths and the cache ----------------------------------------------------------


def test_downloads_zip_unpacks_and_writes_marker(server, creds, cache):
    path = fetch(cache)
    assert path == entry(cache) / FILE
    assert path.read_bytes() == server.csv_bytes
    marker = json.loads((entry(cache) / (FILE + ".kaggle.json")).read_text())
    assert marker["size"] == len(server.csv_bytes) and marker["dataset"] == DATASET
    assert len(marker["sha256"]) == 64
    assert (server.api_calls, server.file_requests) == (1, 1)
    assert server.auth_leaks == 0  # the credential stays off the storage redirect
    assert not list(cache.glob(".tmp-*"))


def test_plain_csv_with_unnamed_index_column(server, creds, cache):
    server.zipped = False
    server.csv_bytes = lenta_csv(index_column=True)
    assert fetch(cache).read_bytes() == server.csv_bytes


def test_second_call_uses_cache_without_network_or_credentials(server, creds, cache, monkeypatch):
    first = fetch(cache)
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # any network use would now fail
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert fetch(cache) == first
    assert (server.api_calls, server.file_requests) == (1, 1)


def test_cached_file_changed_in_place_is_fetched_again(server, creds, cache):
    path = fetch(cache)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # same size, different content: only the sha256 notices
    path.write_bytes(bytes(data))
    assert fetch(cache).read_bytes() == server.csv_bytes
    assert server.file_requests == 2


def test_leftover_partial_download_is_discarded(server, creds, cache):
    # A process killed mid-download leaves a temp dir, or a CSV without its marker.
    leftover = cache / ".tmp-yutkin__corpus-of-russian-news-articles-from-lenta-dead"
    leftover.mkdir(parents=True)
    (leftover / "download.part").write_bytes(server.payload[:40])
    entry(cache).mkdir(parents=True)
    (entry(cache) / FILE).write_bytes(server.csv_bytes[:50])
    assert fetch(cache).read_bytes() == server.csv_bytes
    assert server.file_requests == 1
    assert not leftover.exists()


@pytest.mark.slow  # two interpreters, about 4 s
def test_two_processes_share_one_download(server, creds, cache):
    server.default, server.slow_s = "slow", 3.0
    script = (
        "import logging, sys; from pathlib import Path; logging.basicConfig(level=logging.INFO);"
        "from lib.kaggle_source import download_kaggle_file as d;"
        "print(d(sys.argv[1], sys.argv[2], Path(sys.argv[3])))"
    )
    command = [sys.executable, "-c", script, DATASET, FILE, str(cache)]

    def start():
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start()
    assert server.file_started.wait(20), "first process never started downloading"
    second = start()  # starts while the first one holds the lock mid-download
    (out1, err1), (out2, err2) = first.communicate(timeout=60), second.communicate(timeout=60)
    assert (first.returncode, second.returncode) == (0, 0), err1 + err2
    assert out1 == out2 and Path(out1.strip()).read_bytes() == server.csv_bytes
    assert "waiting for another process" in err2
    assert server.file_requests == 1


# --- damaged transfers ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["corrupt", "crc", "drop", "error503", "storage503"])
def test_transient_failure_is_retried_then_succeeds(server, creds, cache, damage):
    server.script = [damage, damage]
    assert fetch(cache, retries=2).read_bytes() == server.csv_bytes
    assert server.api_calls == 3


def test_always_corrupt_zip_raises_and_caches_nothing(server, creds, cache):
    server.default = "corrupt"
    with pytest.raises(KaggleError, match=r"failed after 3 attempts.*corrupt zip") as err:
        fetch(cache, retries=2)
    assert DATASET in str(err.value)
    assert server.file_requests == 3
    assert_nothing_cached(cache)


def test_always_dropping_connection_raises_after_bounded_retries(server, creds, cache):
    server.default = "drop"
    with pytest.raises(KaggleError, match=r"failed after 4 attempts") as err:
        fetch(cache, retries=3)
    assert DATASET in str(err.value)
    assert server.file_requests == 4
    assert_nothing_cached(cache)


def test_stalled_server_times_out_and_is_retried(server, creds, cache):
    server.script, server.stall_s = ["stall"], 1.0
    assert fetch(cache, retries=1, timeout_s=0.2).read_bytes() == server.csv_bytes
    server.default = "stall"
    with pytest.raises(KaggleError, match=r"failed after 2 attempts"):
        fetch(cache / "other", retries=1, timeout_s=0.2)


def test_signed_url_never_appears_in_the_error(server, creds, cache):
    server.default = "storage503"
    with pytest.raises(KaggleError, match="503") as err:
        fetch(cache, retries=1)
    assert SIGNATURE not in "".join(traceback.format_exception(err.value))


# --- credentials and client errors ----------------------------------------------------------


def test_rejected_key_is_not_retried_and_never_leaks(server, cache, monkeypatch, caplog, capsys):
    wrong = "wrong-s3cret-key-xyz"
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", wrong)
    caplog.set_level(logging.DEBUG)  # includes kagglesdk, requests and urllib3 debug output
    with pytest.raises(KaggleError, match=r"rejected the credentials \(KAGGLE_USERNAME/KAGGLE_KEY\).*401") as err:
        fetch(cache, retries=3)
    assert server.api_calls == 1
    captured = capsys.readouterr()
    for text in ("".join(traceback.format_exception(err.value)), caplog.text, captured.out, captured.err):
        assert wrong not in text


def test_missing_dataset_is_a_clear_404(server, creds, cache):
    with pytest.raises(KaggleError, match=r"no dataset yutkin/nope .*404"):
        fetch(cache, dataset="yutkin/nope", retries=3)
    assert server.api_calls == 1  # not retried


def test_no_credentials_says_what_to_set(server, cache):
    with pytest.raises(KaggleError) as err:
        fetch(cache)
    message = str(err.value)
    for hint in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "kaggle.json", "data.source: csv", "data.path"):
        assert hint in message
    assert server.api_calls == 0


def test_kaggle_json_in_config_dir(server, home, cache):
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "alice", "key": KEY}))
    assert fetch(cache).read_bytes() == server.csv_bytes


def test_explicit_credentials(server, cache):
    assert fetch(cache, credentials={"username": "alice", "key": KEY}).exists()
    with pytest.raises(KaggleError, match=r"got keys \['user'\]") as err:
        fetch(cache / "other", credentials={"user": KEY})
    assert KEY not in str(err.value)


def test_api_token_from_environment(server, cache, monkeypatch):
    server.token = "tok-from-env-123"
    monkeypatch.setenv("KAGGLE_API_TOKEN", server.token)
    assert fetch(cache).read_bytes() == server.csv_bytes


def test_explicit_key_conflicting_with_env_token_is_refused(server, cache, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "tok-from-env-123")
    with pytest.raises(KaggleError, match="KAGGLE_API_TOKEN"):
        fetch(cache, credentials={"username": "alice", "key": KEY})
    assert server.api_calls == 0


def test_oauth_login_credentials_are_refreshed_and_used(server, home, cache):
    server.token, server.refresh_token = "tok-oauth-456", "refresh-789"
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "credentials.json").write_text(json.dumps({"refresh_token": "refresh-789"}))
    assert fetch(cache).read_bytes() == server.csv_bytes
    assert server.token_calls == 1


def test_wrong_file_content_is_rejected_not_retried(server, creds, cache):
    server.csv_bytes = b"id,value\n1,2\n"
    with pytest.raises(KaggleError, match=r"lacks columns"):
        fetch(cache, retries=3)
    assert server.api_calls == 1
    assert_nothing_cached(cache)


@pytest.mark.parametrize("dataset", ["no-slash", "a/b/c", "../x", ""])
def test_malformed_dataset_name(cache, dataset):
    with pytest.raises(KaggleError, match="owner/name"):
        fetch(cache, dataset=dataset)


def test_current_version_is_asked_and_a_moved_version_is_downloaded_again(server, creds, cache):
    from lib.kaggle_cache import cached_version
    from lib.kaggle_source import current_version

    assert current_version(DATASET) == 1
    path = fetch(cache, version=1)
    assert cached_version(path) == 1 and fetch(cache, version=1) == path  # same version: the cache
    assert server.downloaded_versions == [1]
    server.publish(lenta_csv(rows=5))
    assert current_version(DATASET) == 2
    assert fetch(cache, version=2) == path and cached_version(path) == 2
    assert server.downloaded_versions == [1, 2] and path.read_bytes() == lenta_csv(rows=5)
    assert fetch(cache, version=1).read_bytes() == lenta_csv()  # a pinned older version is served as such
    with pytest.raises(KaggleError, match="version of no/such failed .HTTP 404"):
        current_version("no/such")
