"""A loopback HTTP proxy in front of a real server that loses chosen answers: what a flaky network or
gateway does to a client. The request reaches the server and is carried out there; the client gets an
error instead of the server's answer (a 502, say, which MLflow's client retries, POST included).

    with lossy_proxy(mlflow_server.uri) as proxy:
        proxy.lose_answer("POST", "/model-versions/create", status=502)  # once, the next such request
        client = MlflowClient(proxy.uri, proxy.uri)                      # everything else passes through
        ...
        proxy.seen("POST", "/model-versions/create")                     # how many reached the server

Only loopback, only HTTP/1.1 requests with a Content-Length (or chunked) body; answers are buffered.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Loss:
    method: str
    path: str  # matched against the end of the request path (before any query)
    status: int
    body: dict
    left: int = 1


@dataclass
class LossyProxy:
    uri: str
    upstream: str
    losses: list[Loss] = field(default_factory=list)
    log: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status the client got)
    lock: threading.Lock = field(default_factory=threading.Lock)
    first_losses: tuple[set[str], int] | None = None  # see lose_every_first_answer
    lost_once: set[tuple[str, str]] = field(default_factory=set)

    def lose_answer(self, method: str, path: str, status: int = 502, body: dict | None = None, times: int = 1) -> None:
        """The next `times` requests `method` ... `path` reach the server; the client gets `status`
        with `body` (JSON) instead of the server's answer."""
        with self.lock:
            self.losses.append(Loss(method, path, status, body or {"error": "answer lost by the test proxy"}, times))

    def lose_every_first_answer(self, methods=("POST", "PUT", "PATCH", "DELETE"), status: int = 502) -> None:
        """From now on, the first answer to each distinct `method` ... path (every call that changes
        something, by default) is lost with `status`: one flaky gateway hit per kind of write."""
        with self.lock:
            self.first_losses = (set(methods), status)

    def seen(self, method: str, path: str) -> list[int]:
        """The statuses the client got for each `method` ... `path` request that reached the server."""
        return [status for m, p, status in self.log if m == method and p.endswith(path)]

    def take_loss(self, method: str, path: str) -> Loss | None:
        with self.lock:
            if self.first_losses and method in self.first_losses[0] and (method, path) not in self.lost_once:
                self.lost_once.add((method, path))
                return Loss(method, path, self.first_losses[1], {"error": "answer lost by the test proxy"})
            for loss in self.losses:
                if loss.left and loss.method == method and path.endswith(loss.path):
                    loss.left -= 1
                    return loss
        return None


def _handler(proxy: LossyProxy) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: the log list records what matters
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _relay(self) -> None:
            body = self._body()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"content-length"}}
            if body or self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                status, reply, reply_headers = answer.status, answer.read(), answer.getheaders()
            finally:
                upstream.close()
            path = urlsplit(self.path).path
            loss = proxy.take_loss(self.command, path)
            if loss is not None:  # the server acted; its answer is dropped here
                status, reply = loss.status, json.dumps(loss.body).encode()
                reply_headers = [("Content-Type", "application/json")]
            with proxy.lock:
                proxy.log.append((self.command, path, status))
            self.send_response(status)
            for key, value in reply_headers:
                if key.lower() not in HOP_BY_HOP | {"content-length"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

    return Handler


@contextlib.contextmanager
def lossy_proxy(upstream: str) -> Iterator[LossyProxy]:
    """A proxy on a free loopback port in front of `upstream` (http://host:port), for the block's duration."""
    proxy = LossyProxy(uri="", upstream=upstream.rstrip("/"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.uri = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="lossy-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
