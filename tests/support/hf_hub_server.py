"""A fake Hugging Face Hub on 127.0.0.1: enough of it for the real ``huggingface_hub`` client (and through it
``transformers``' ``from_pretrained``) to resolve a revision and download a model repo.

How the real client reaches it: ``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import, so the process that
downloads must be started with ``HF_ENDPOINT=hub.endpoint`` (plus its own ``HF_HOME``, and no ``HF_HUB_OFFLINE``).

    with running_hf_hub(tmp_path / "hub") as hub:
        sha = hub.publish("acme/tiny-lm", model_dir)    # the folder's files become a new commit of `main`
        ...  # a child with HF_ENDPOINT=hub.endpoint calls from_pretrained("acme/tiny-lm", revision="main")
        assert ("GET", f"/acme/tiny-lm/resolve/{sha}/model.safetensors") in hub.requests

transformers 5 resolves a branch to its commit once per from_pretrained (``GET /api/models/{repo}/revision/main``),
then fetches every file by that sha (HEAD, then GET unless cached), so files of one load never mix two commits. It
also lists the repo (``tree/{rev}?recursive=true``, and the folder ``additional_chat_templates``, absent: 404) and
probes optional files (tokenizer.model, added_tokens.json, special_tokens_map.json, chat_template.jinja,
adapter_config.json, generation_config.json): a HEAD each, answered 404 EntryNotFound when the repo lacks them.

What it emulates (model repos with ``namespace/name`` ids only, one branch ``main``, a linear history):
  GET  /api/models/{repo}[/revision/{rev}]       model_info / repo_info: id, sha, siblings (with size, blobId)
  GET  /api/models/{repo}/tree/{rev}[/{folder}]   list_repo_tree (snapshot_download), one page, ?recursive=
  HEAD /{repo}/resolve/{rev}/{file}               what hf_hub_download reads: X-Repo-Commit, ETag (the file's git
  GET  /{repo}/resolve/{rev}/{file}               blob sha1, quoted), Content-Length; the GET also sends the body
A revision is ``main`` or a full 40-hex commit sha; every commit stays downloadable by its sha. Errors carry the
``X-Error-Code`` the client maps to exceptions: ``RepoNotFound``, ``RevisionNotFound`` and ``EntryNotFound`` (the
last with ``X-Repo-Commit``, so the client caches the file's absence, as transformers expects of optional files).

What it does not: check a token (``hub.authorizations`` records the Authorization headers sent), private or
gated repos, tags and other branches, LFS pointers and redirects to a CDN (files are served by the Hub itself
with 200, never via Xet: no ``X-Xet-*`` header, so plain HTTP is used), Range requests (resumed downloads),
uploads through the client, datasets and spaces. Every request is recorded in
``hub.requests`` as (method, path without query); an unknown path gets a plain 404.

Blobs and the commit history live under ``root``: the same ``root`` and ``port`` again restart a stopped hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.net import free_port

REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (methods, pattern over the unquoted path, handler method name)
    ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"), "_info"),
    ("GET", re.compile(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "_tree"),
    ("GET HEAD", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)"), "_resolve"),
]


CHUNK = 1 << 20  # files are hashed and sent in 1 MiB pieces: a 5 GB base never sits in memory


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub, as the ETag of a non-LFS file) gives a file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_blob_sha1(path: Path) -> str:
    """`git_blob_sha1` of a file's content, read piece by piece."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while piece := f.read(CHUNK):
            digest.update(piece)
    return digest.hexdigest()


@dataclass
class FakeHub:
    endpoint: str
    root: Path  # blobs/<git sha1> and history.json: {repo_id: [{"sha": ..., "files": {name: blob}}, ...]}
    history: dict[str, list[dict]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: list[tuple[str, str, Path]] = field(default_factory=list)  # (repo, file, folder): publish_after_download
    authorizations: set[str] = field(default_factory=set)  # Authorization headers seen (a token is sent, not checked)

    def publish(self, repo_id: str, folder: Path) -> str:
        """Every file under `folder` (recursively) becomes the content of a new commit on `main` of `repo_id`
        (created if new); returns the commit's sha. Files of the previous commit that `folder` lacks are gone."""
        files = {}
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            files[path.relative_to(folder).as_posix()] = blob = file_blob_sha1(path)
            shutil.copyfile(path, self.root / "blobs" / blob)
        with self.lock:
            commits = self.history.setdefault(repo_id, [])
            seed = json.dumps([repo_id, len(commits), files], sort_keys=True).encode()
            commits.append({"sha": hashlib.sha1(seed).hexdigest(), "files": files})
            (self.root / "history.json").write_text(json.dumps(self.history, indent=1))
            return commits[-1]["sha"]

    def publish_after_download(self, repo_id: str, file_name: str, folder: Path) -> None:
        """Publish `folder` as the next commit of `repo_id` right after `file_name` was first served (a GET):
        the branch moves while a client is between two loads, as when a repo is updated during a long run."""
        with self.lock:
            self.pending.append((repo_id, file_name, Path(folder)))

    def commits(self, repo_id: str) -> list[str]:
        """The commit shas of `repo_id`, oldest first (the last one is `main`)."""
        with self.lock:
            return [commit["sha"] for commit in self.history.get(repo_id, [])]

    def seen(self, method: str, path_suffix: str) -> int:
        """How many `method` requests had a path ending with `path_suffix`."""
        with self.lock:
            return sum(m == method and p.endswith(path_suffix) for m, p in self.requests)

    def find(self, repo_id: str, revision: str | None) -> tuple[str | None, dict | None]:
        """(error code, commit) for `revision` of `repo_id`: main, or a full sha of any commit."""
        with self.lock:
            commits = self.history.get(repo_id)
            if not commits:
                return "RepoNotFound", None
            if revision in (None, "main"):
                return None, commits[-1]
            matches = [c for c in commits if c["sha"] == revision]
            return (None, matches[0]) if matches else ("RevisionNotFound", None)

    def size(self, blob: str) -> int:
        return (self.root / "blobs" / blob).stat().st_size


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects; bodies sized

        def log_message(self, *args) -> None:  # quiet: hub.requests records what matters
            pass

        def _route(self) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((self.command, path))
                if self.headers.get("Authorization"):
                    hub.authorizations.add(self.headers["Authorization"])
            for methods, pattern, name in ROUTES:
                match = pattern.fullmatch(path)
                if self.command in methods.split() and match:
                    error, commit = hub.find(match["repo"], match["rev"])
                    if error:
                        return self._send(404, json.dumps({"error": error}).encode(), {"X-Error-Code": error})
                    return getattr(self, name)(match, commit)
            self._send(404, b'{"error": "Not Found"}')

        do_GET = do_HEAD = _route

        def _info(self, match: re.Match, commit: dict) -> None:
            siblings = [{"rfilename": n, "size": hub.size(b), "blobId": b} for n, b in commit["files"].items()]
            info = {"id": match["repo"], "modelId": match["repo"], "sha": commit["sha"], "private": False}
            info |= {"gated": False, "disabled": False, "tags": [], "siblings": siblings}
            self._send(200, json.dumps(info).encode())

        def _tree(self, match: re.Match, commit: dict) -> None:
            entries = {}  # path -> entry, for files and the folders above them
            for name, blob in commit["files"].items():
                entries[name] = {"type": "file", "oid": blob, "size": hub.size(blob), "path": name}
                parts = name.split("/")
                for folder in ("/".join(parts[:i]) for i in range(1, len(parts))):
                    entries[folder] = {"type": "directory", "oid": git_blob_sha1(folder.encode()), "path": folder}
            prefix = (match["path"] or "").strip("/")
            if prefix and entries.get(prefix, {}).get("type") != "directory":
                return self._entry_not_found(commit)
            base = prefix + "/" if prefix else ""
            recursive = parse_qs(urlsplit(self.path).query).get("recursive") in (["true"], ["True"], ["1"])
            below = [(p[len(base) :], e) for p, e in sorted(entries.items()) if p.startswith(base)]
            tree = [e for rest, e in below if recursive or "/" not in rest]
            self._send(200, json.dumps(tree).encode())

        def _resolve(self, match: re.Match, commit: dict) -> None:
            blob = commit["files"].get(match["file"])
            if blob is None:
                return self._entry_not_found(commit)
            headers = {"X-Repo-Commit": commit["sha"], "ETag": f'"{blob}"', "Content-Type": "application/octet-stream"}
            self._send(200, hub.root / "blobs" / blob, headers)
            if self.command == "GET":
                with hub.lock:
                    due = [p for p in hub.pending if p[:2] == (match["repo"], match["file"])]
                    hub.pending = [p for p in hub.pending if p not in due]
                for repo_id, _, folder in due:
                    hub.publish(repo_id, folder)

        def _entry_not_found(self, commit: dict) -> None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit["sha"]}  # the client caches the absence
            self._send(404, b'{"error": "Entry not found"}', headers)

        def _send(self, status: int, body: bytes | Path, headers: dict[str, str] | None = None) -> None:
            """Answer with `body`: bytes, or a file sent piece by piece."""
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(body.stat().st_size if isinstance(body, Path) else len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if isinstance(body, Path):
                with body.open("rb") as f:
                    shutil.copyfileobj(f, self.wfile, CHUNK)
            else:
                self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def running_hf_hub(root: Path, port: int | None = None) -> Iterator[FakeHub]:
    """A fake Hub on 127.0.0.1:`port` (a free one by default) serving the repos kept under `root`, for the block."""
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    history = root / "history.json"
    port = port or free_port()
    hub = FakeHub(f"http://127.0.0.1:{port}", root, json.loads(history.read_text()) if history.exists() else {})
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(hub))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
