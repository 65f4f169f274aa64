"""A fake Kaggle API for tests: enough of it for the official ``kagglesdk`` client to
authenticate and download one dataset file, with scripted failures.

How the real client reaches it: ``KAGGLE_API_ENVIRONMENT=TEST`` makes kagglesdk call
``http://localhost:7777/api/v1/...`` (the port is hard-coded in ``kagglesdk/kaggle_env.py``
and there is no endpoint override). Binding 7777 would collide between test runs, so the
server listens on a free port and acts as the HTTP *proxy* for that URL: requests honours
``http_proxy``/``HTTP_PROXY`` (unless ``no_proxy`` matches), and a proxy receives the
absolute URL in the request line. ``FakeKaggle.env()`` returns exactly these variables.

Like Kaggle, ``DownloadDataset`` answers with a 302 to a signed storage URL on another host
(``storage.kaggle.test``), so the client drops the Authorization header on the redirect, as it
does with Google Cloud Storage; ``auth_leaks`` counts storage requests that still carry one.

Like Kaggle, the dataset has numbered versions: ``GetDataset`` answers ``currentVersionNumber``,
``publish(csv_bytes)`` adds a new current version, and ``DownloadDataset`` serves the version its
request names (``datasetVersionNumber``; the current one when it names none).

Each ``DownloadDataset`` call takes the next behaviour from ``script`` (then ``default``):
  good       the file (zip, or plain when ``zipped=False``)
  corrupt    a truncated archive delivered with a matching Content-Length (looks complete)
  crc        a well-formed (stored) archive whose member has one flipped byte: only the CRC-32
             check can tell
  drop       full Content-Length announced, half the body sent, connection closed
  stall      headers sent, then silence for ``stall_s`` seconds (client read timeout)
  slow       the good file, sent in pieces over ``slow_s`` seconds (to overlap two clients)
  error503   HTTP 503 from the API itself
  storage503 HTTP 503 from the storage URL (whose query string holds a fake signature)
"""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

STORAGE_HOST = "storage.kaggle.test"
SIGNATURE = "fake-signature-0123456789"  # stands in for a GCS signed-URL signature
SECRET = "kGl-SeCrEt-4e1f9a77c0d2"  # the API key of the `fake_kaggle` fixture: no file may keep it
LENTA_HEADER = ["url", "title", "text", "topic", "tags", "date"]


def lenta_csv(rows: int = 3, index_column: bool = False) -> bytes:
    """A tiny CSV shaped like lenta-ru-news.csv (optionally with pandas' unnamed index)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(([""] if index_column else []) + LENTA_HEADER)
    for i in range(rows):
        row = [
            f"https://lenta.ru/news/{i}",
            f"Заголовок {i}",
            f"Текст новости номер {i}.",
            "Россия",
            "Общество",
            "2019/12/14",
        ]
        writer.writerow(([str(i)] if index_column else []) + row)
    return buf.getvalue().encode("utf-8")


def zip_bytes(name: str, data: bytes, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as archive:
        archive.writestr(name, data)
    return buf.getvalue()


class FakeKaggle:
    def __init__(
        self,
        *,
        dataset: str = "yutkin/corpus-of-russian-news-articles-from-lenta",
        file_name: str = "lenta-ru-news.csv",
        csv_bytes: bytes | None = None,
        zipped: bool = True,
        username: str = "alice",
        key: str = "k3y-s3cret-abc",
        token: str | None = None,
        refresh_token: str | None = None,
    ):
        self.dataset, self.file_name, self.zipped = dataset, file_name, zipped
        self.versions = {1: csv_bytes if csv_bytes is not None else lenta_csv()}  # number -> that version's CSV
        self.version_calls = 0
        self.downloaded_versions: list[int] = []
        self.username, self.key, self.token, self.refresh_token = username, key, token, refresh_token
        self.script: list[str] = []
        self.default = "good"
        self.stall_s, self.slow_s = 2.0, 1.0
        self.api_calls = self.file_requests = self.token_calls = self.auth_leaks = 0
        self.file_started = threading.Event()  # set when a storage body starts flowing
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def version(self) -> int:
        return max(self.versions)

    @property
    def csv_bytes(self) -> bytes:
        return self.versions[self.version]

    @csv_bytes.setter
    def csv_bytes(self, data: bytes) -> None:  # replaces the current version's file in place
        self.versions[self.version] = data

    def publish(self, csv_bytes: bytes) -> int:
        """A new version of the dataset becomes current (as an owner's upload does); returns its number."""
        with self._lock:
            self.versions[self.version + 1] = csv_bytes
            return self.version

    def payload_of(self, version: int, csv_bytes: bytes | None = None) -> bytes:
        data = self.versions[version] if csv_bytes is None else csv_bytes
        return zip_bytes(self.file_name, data) if self.zipped else data

    @property
    def payload(self) -> bytes:
        return self.payload_of(self.version)

    @property
    def served_name(self) -> str:
        # Kaggle wraps large files: a request for foo.csv is served as foo.csv.zip.
        return self.file_name + (".zip" if self.zipped else "")

    def env(self) -> dict[str, str]:
        """Environment that points the official client at this server."""
        proxy = f"http://127.0.0.1:{self.port}"
        return {
            "KAGGLE_API_ENVIRONMENT": "TEST",
            "http_proxy": proxy,
            "HTTP_PROXY": proxy,
            "no_proxy": "",
            "NO_PROXY": "",
        }

    def start(self) -> "FakeKaggle":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FakeKaggle":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def next_behaviour(self) -> str:
        with self._lock:
            return self.script.pop(0) if self.script else self.default

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme == "Basic":
            return value == base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
        return scheme == "Bearer" and self.token is not None and value == self.token


def _make_handler(server: FakeKaggle):
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so "drop" cleanly ends the socket.
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_POST(self) -> None:
            path = urlsplit(self.path).path  # absolute URL when used as a proxy
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if path == "/api/v1/users.AccountService/GenerateAccessToken":
                return self._token(body)
            if path == "/api/v1/datasets.DatasetApiService/GetDataset":
                return self._dataset(body)
            if path != "/api/v1/datasets.DatasetApiService/DownloadDataset":
                return self._json(404, {"code": 404, "message": "Not found"})
            with server._lock:
                server.api_calls += 1  # every DownloadDataset call, rejected ones included
            if not server.authorized(self.headers.get("Authorization")):
                return self._json(401, {"code": 401, "message": "Unauthenticated"})
            wanted = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
            if wanted != server.dataset or body.get("fileName") != server.file_name:
                return self._json(404, {"code": 404, "message": "Not found"})
            version = int(body.get("datasetVersionNumber") or server.version)
            if version not in server.versions:
                return self._json(404, {"code": 404, "message": f"No version {version}"})
            behaviour = server.next_behaviour()
            if behaviour == "error503":
                return self._json(503, {"code": 503, "message": "Service Unavailable"})
            self.send_response(302)
            self.send_header(
                "Location",
                f"http://{STORAGE_HOST}/files/{behaviour}/{version}/{server.served_name}?X-Goog-Signature={SIGNATURE}",
            )
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            parts = urlsplit(self.path).path.split("/")  # ['', 'files', behaviour, version, name]
            if len(parts) != 5 or parts[1] != "files":
                return self._json(404, {"code": 404, "message": "Not found"})
            with server._lock:
                server.file_requests += 1
                server.auth_leaks += "Authorization" in self.headers
                server.downloaded_versions.append(int(parts[3]))
            self._file(parts[2], int(parts[3]))

        def _dataset(self, body: dict) -> None:
            with server._lock:
                server.version_calls += 1
            if not server.authorized(self.headers.get("Authorization")):
                return self._json(401, {"code": 401, "message": "Unauthenticated"})
            if f"{body.get('ownerSlug')}/{body.get('datasetSlug')}" != server.dataset:
                return self._json(404, {"code": 404, "message": "Not found"})
            self._json(200, {"ref": server.dataset, "currentVersionNumber": server.version})

        def _file(self, behaviour: str, version: int) -> None:
            data = server.payload_of(version)
            if behaviour == "storage503":
                return self._json(503, {"error": "backend unavailable"})
            if behaviour == "corrupt":
                data = data[: len(data) // 2]
            elif behaviour == "crc":
                data = bytearray(zip_bytes(server.file_name, server.versions[version], zipfile.ZIP_STORED))
                data[30 + len(server.file_name) + 40] ^= 0x01  # a byte of the stored CSV itself
                data = bytes(data)
            self.send_response(200)
            self.send_header("Content-Type", "application/zip" if server.zipped else "text/csv")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            server.file_started.set()
            try:
                if behaviour == "drop":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if behaviour == "stall":
                    time.sleep(server.stall_s)
                if behaviour == "slow":
                    for i in range(10):
                        self.wfile.write(data[i * len(data) // 10 : (i + 1) * len(data) // 10])
                        self.wfile.flush()
                        time.sleep(server.slow_s / 10)
                    return
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (read timeout): expected in "stall"

        def _token(self, body: dict) -> None:
            with server._lock:
                server.token_calls += 1
            if server.refresh_token is None or body.get("refreshToken") != server.refresh_token:
                return self._json(401, {"code": 401, "message": "Unauthenticated"})
            self._json(200, {"token": server.token, "expiresIn": 3600, "userName": server.username})

        def _json(self, status: int, payload: dict) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    return Handler


def isolated_home(tmp_path: Path, monkeypatch) -> Path:
    """A HOME (and Kaggle and XDG config folders) of the test's own, with no Kaggle credential or
    environment variable from the machine: the client finds only what the test gives it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for var in (
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "KAGGLE_API_TOKEN",
        "KAGGLE_API_V1_TOKEN",
        "KAGGLE_KERNEL_RUN_TYPE",
        "KAGGLE_API_ENVIRONMENT",
    ):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    """A running FakeKaggle serving the bundled sample as version 1, its variables and credentials set in
    this process's environment (so a child process started from it talks to the fake too), and a HOME
    of the test's own."""
    from lib.config import SAMPLE_CSV

    isolated_home(tmp_path, monkeypatch)
    with FakeKaggle(csv_bytes=SAMPLE_CSV.read_bytes(), username="alice", key=SECRET) as fake:
        for name, value in fake.env().items():
            monkeypatch.setenv(name, value)
        # The client's `localhost:7777` goes through the fake (a proxy); Prefect's own API on
        # 127.0.0.1 must not.
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setenv("KAGGLE_USERNAME", "alice")
        monkeypatch.setenv("KAGGLE_KEY", SECRET)
        yield fake
