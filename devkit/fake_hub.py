"""A local stand-in for the Hugging Face Hub that speaks its HTTP protocol.

`FakeHub` is a real HTTP/1.1 server on 127.0.0.1 (random free port). The unmodified `huggingface_hub`
client works against it when pointed at it with `endpoint=` or `HF_ENDPOINT`:

- `GET /api/models/{repo_id}` and `.../revision/{revision}`: model info (`blobs=true` adds file metadata,
  `expand=...` selects properties);
- `GET /api/models/{repo_id}/tree/{revision}[/{path}]`: tree listing with `recursive`, `expand` and
  cursor pagination through a `Link: <...>; rel="next"` header;
- `POST /api/models/{repo_id}/paths-info/{revision}`: metadata of the given paths;
- `HEAD`/`GET /{repo_id}/resolve/{revision}/{path}`: file bytes with `X-Repo-Commit`, `ETag`,
  `X-Linked-Etag`/`X-Linked-Size` (LFS files) and single `Range` requests (206, 416). With
  `lfs_redirect=True`, LFS files answer 302 to `/cdn-lfs/{sha256}?...` on another host name, as the hub
  redirects to its CDN.

Errors carry the hub's `X-Error-Code` / `X-Error-Message` headers and a JSON `{"error": ...}` body, so the
client raises `RepositoryNotFoundError`, `GatedRepoError`, `RevisionNotFoundError` and
`RemoteEntryNotFoundError` exactly as it does against the real hub. Git object ids (blob, tree, commit) and
LFS pointers are computed the way git and git-lfs compute them.

Tests and benchmarks see what the server did through `FakeHub.requests` and `FakeHub.bytes_served`, and
break downloads on purpose with `set_throttle`, `fail_after` and `corrupt`.

One module although long: it is one protocol, and the repository model, the request handler and the
fault knobs share private types; split, the parts would only import each other's internals.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = [
    "LFS_SIZE_THRESHOLD",
    "LFS_SUFFIXES",
    "FakeHub",
    "HubFile",
    "RequestRecord",
    "is_lfs",
]

# Files the hub stores through LFS: the default .gitattributes patterns we care about, plus anything large.
LFS_SUFFIXES: tuple[str, ...] = (
    ".gguf",
    ".safetensors",
    ".bin",
    ".onnx",
    ".pt",
    ".pth",
    ".msgpack",
    ".h5",
    ".ot",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_DEFAULT_BRANCH = "main"
_API_PAGE_LIMIT_EXPANDED = 50  # the hub caps expanded tree pages at 50 entries
_MAX_REQUEST_BODY = 16 * 1024 * 1024
_WRITE_CHUNK = 64 * 1024
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_API_KEYWORDS = frozenset(
    {"revision", "tree", "paths-info", "refs", "commits", "resolve", "preupload", "commit"}
)
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def gguf_blob(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes with a GGUF magic: a model file that is only stored,
    never run; each ``seed`` gives other bytes."""
    out = bytearray(b"GGUF")
    counter = seed
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


def is_lfs(path: str, size: int) -> bool:
    """Whether the hub would store this file through LFS (and so publish its sha256)."""
    return path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD


def _git_hash(kind: str, body: bytes) -> str:
    return hashlib.sha1(b"%s %d\x00" % (kind.encode(), len(body)) + body).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in {"1", "true", "yes"}


def _param(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


@dataclass(frozen=True)
class HubFile:
    """One file as the hub publishes it.

    `blob_id` is the git blob id (of the LFS pointer for LFS files); `lfs_sha256` and `pointer_size` are set
    only for LFS files. `etag` is what `ETag` / `X-Linked-Etag` carry on `/resolve`, unquoted.
    """

    path: str
    data: bytes
    blob_id: str
    lfs_sha256: str | None
    pointer_size: int | None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @property
    def etag(self) -> str:
        return self.lfs_sha256 if self.lfs_sha256 is not None else self.blob_id

    @classmethod
    def build(cls, path: str, data: bytes) -> HubFile:
        """Publish `data` at `path`, through LFS when `is_lfs` says so."""
        if is_lfs(path, len(data)):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = _lfs_pointer(sha256, len(data))
            return cls(path, data, _git_hash("blob", pointer), sha256, len(pointer))
        return cls(path, data, _git_hash("blob", data), None, None)


@dataclass(frozen=True)
class _Commit:
    sha: str
    parent: str | None
    title: str
    timestamp: float
    files: Mapping[str, HubFile]
    trees: Mapping[str, str]  # directory path ("" is the root) -> git tree id

    def entry_oid(self, path: str) -> str | None:
        """Git id of a file or directory at this commit, None when the path does not exist."""
        found = self.files.get(path)
        return found.blob_id if found is not None else self.trees.get(path)


@dataclass
class _Repo:
    repo_id: str
    private: bool
    gated: bool
    created_at: float
    mongo_id: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        name = revision.removeprefix("refs/heads/")
        if name in self.branches:
            return self.commits[self.branches[name]]
        if _SHA_RE.match(revision):
            return self.commits.get(revision)
        return None


@dataclass
class _Failure:
    nbytes: int
    remaining: int


@dataclass
class RequestRecord:
    """One request as the server saw it; appended to `FakeHub.requests` when its response starts.

    `path` is the raw (still percent-encoded) path, `query` the parsed query string, `headers` only
    `Range` and `Authorization` when sent. `bytes_sent` counts response body bytes and grows while a body
    streams. `repo_id` / `revision` / `filename` are filled for `/resolve` requests; `dropped` is set when
    `fail_after` cut the body short.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int = 0
    bytes_sent: int = 0
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    dropped: bool = False

    @property
    def range(self) -> str | None:
        return self.headers.get("Range")

    @property
    def is_file_body(self) -> bool:
        return self.method == "GET" and self.filename is not None


class _HubServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, hub: FakeHub, address: tuple[str, int]) -> None:
        self.hub = hub
        super().__init__(address, _Handler)


class _Reply(Exception):
    """Raised by route code to answer with a JSON error."""

    def __init__(self, status: int, message: str, code: str | None = None, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers


class FakeHub:
    """An in-process Hugging Face Hub on 127.0.0.1 for tests; see the module docstring for the protocol.

    Repos, branches and commits live in memory; every commit stays reachable by its sha. A request with
    `Authorization: Bearer <token>` is authenticated when the token is `token` (or one added with
    `add_token`); any other bearer token gets the hub's 401 "Invalid credentials", even on public repos.
    """

    def __init__(
        self, token: str = "hf_fake_token", *, tree_page_size: int = 1000, lfs_redirect: bool = False
    ) -> None:
        self.token = token
        # Entries per tree page (the hub uses 1000, and 50 with expand=true); small values exercise paging.
        self.tree_page_size = tree_page_size
        # Like the real hub, answer /resolve of LFS files with a 302 to a storage host (see `cdn_url`).
        self.lfs_redirect = lfs_redirect
        self._lock = threading.Lock()
        # Keyed by the lower-cased repo id: hub repo names are unique regardless of case.
        self._repos: dict[str, _Repo] = {}
        self._tokens: dict[str, bool] = {token: True}  # token -> may read gated repos
        self._log: list[RequestRecord] = []
        self._throttle: int | None = None
        self._total_throttle: int | None = None  # bytes/s shared by every body at once
        self._total_next = 0.0  # when the shared pace lets the next byte go
        self._failures: dict[str, _Failure] = {}
        self._corrupt: dict[tuple[str, str], bytes] = {}
        self._last_ts = 0
        self._server: _HubServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL, `http://127.0.0.1:<port>`; use it as `endpoint=` / `HF_ENDPOINT`."""
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def cdn_url(self) -> str:
        """Where LFS redirects point: this server under the name `localhost`.

        Clients compare host names, so to them it is another host, as the hub's CDN is: `huggingface_hub`
        stops at the 302, reads the file's metadata from it and downloads without the Authorization header.
        """
        return self.url.replace("://127.0.0.1:", "://localhost:")

    def start(self) -> None:
        """Bind a free port on 127.0.0.1 and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeHub is already started")
        self._stopping.clear()
        self._server = _HubServer(self, ("127.0.0.1", 0))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close open connections (idempotent)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        # Keep-alive connections would otherwise leave handler threads blocked on their next read.
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- content

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        private: bool = False,
        gated: bool = False,
        branch: str = _DEFAULT_BRANCH,
    ) -> str:
        """Create a model repo whose first commit on `branch` holds `files`; returns that commit's sha."""
        _check_repo_id(repo_id)
        with self._lock:
            if repo_id.lower() in self._repos:
                raise ValueError(f"repo {repo_id!r} already exists")
            now = time.time()
            repo = _Repo(
                repo_id=repo_id,
                private=private,
                gated=gated,
                created_at=now,
                mongo_id=hashlib.sha1(f"{repo_id}:{now}".encode()).hexdigest()[:24],
            )
            commit = self._make_commit(None, files, (), f"Initial commit of {repo_id}")
            repo.commits[commit.sha] = commit
            repo.branches[branch] = commit.sha
            self._repos[repo_id.lower()] = repo
            return commit.sha

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        delete: Sequence[str] = (),
        branch: str = _DEFAULT_BRANCH,
        message: str | None = None,
    ) -> str:
        """Add a commit on `branch`: `files` are added or replaced, `delete` (files or folders) removed.

        A branch that does not exist yet starts from the head of `main`. Returns the new sha; older commits
        stay reachable by sha.
        """
        with self._lock:
            repo = self._repo(repo_id)
            base_sha = repo.branches.get(branch) or repo.branches.get(_DEFAULT_BRANCH)
            base = repo.commits[base_sha] if base_sha is not None else None
            title = message or f"Update {len(files)} file(s), delete {len(delete)} path(s)"
            commit = self._make_commit(base, files, delete, title)
            repo.commits[commit.sha] = commit
            repo.branches[branch] = commit.sha
            return commit.sha

    def create_branch(self, repo_id: str, branch: str, *, revision: str = _DEFAULT_BRANCH) -> str:
        """Point a new branch (e.g. `refs/pr/1`) at `revision`; returns the commit sha it points at."""
        with self._lock:
            repo = self._repo(repo_id)
            if branch in repo.branches:
                raise ValueError(f"branch {branch!r} already exists in {repo_id!r}")
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f"unknown revision {revision!r} in {repo_id!r}")
            repo.branches[branch] = commit.sha
            return commit.sha

    def head(self, repo_id: str, branch: str = _DEFAULT_BRANCH) -> str:
        """Commit sha at the head of `branch`."""
        with self._lock:
            repo = self._repo(repo_id)
            if branch not in repo.branches:
                raise KeyError(f"unknown branch {branch!r} in {repo_id!r}")
            return repo.branches[branch]

    def file_info(self, repo_id: str, filename: str, revision: str = _DEFAULT_BRANCH) -> HubFile:
        """The published file (size, blob id, LFS sha256) at `revision`, as the API reports it."""
        with self._lock:
            commit = self._repo(repo_id).resolve(revision)
            if commit is None:
                raise KeyError(f"unknown revision {revision!r} in {repo_id!r}")
            return commit.files[filename]

    def delete_repo(self, repo_id: str) -> None:
        """Remove a repo; later requests for it get RepoNotFound."""
        with self._lock:
            self._repo(repo_id)
            del self._repos[repo_id.lower()]

    def add_token(self, token: str, *, gated_access: bool = True) -> None:
        """Accept another token; with `gated_access=False` it reads private repos, gated ones answer 403."""
        with self._lock:
            self._tokens[token] = gated_access

    # ---------------------------------------------------------------- observability

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of the requests served so far, oldest first."""
        with self._lock:
            return list(self._log)

    def bytes_served(self, repo_id: str | None = None, filename: str | None = None) -> int:
        """File-body bytes sent by `GET /resolve`, optionally for one repo and/or one path in the repo."""
        with self._lock:
            return sum(
                r.bytes_sent
                for r in self._log
                if r.is_file_body
                and (repo_id is None or (r.repo_id or "").lower() == repo_id.lower())
                and (filename is None or r.filename == filename)
            )

    def clear_log(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._log.clear()

    # ---------------------------------------------------------------- fault injection

    def set_throttle(self, bytes_per_second: int | None) -> None:
        """Pace every file body at `bytes_per_second` (None: full speed); applies to bodies in flight too."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        with self._lock:
            self._throttle = bytes_per_second

    def set_total_throttle(self, bytes_per_second: int | None) -> None:
        """Pace all file bodies together at `bytes_per_second` (None: no shared limit): an origin
        link of that speed, however many connections share it. Combines with `set_throttle`."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        with self._lock:
            self._total_throttle = bytes_per_second
            self._total_next = 0.0

    def _total_wait(self, nbytes: int) -> float:
        """Reserves `nbytes` of the shared pace; returns how long to wait before sending them."""
        with self._lock:
            rate = self._total_throttle
            if rate is None:
                return 0.0
            now = time.monotonic()
            start = max(now, self._total_next)
            self._total_next = start + nbytes / rate
            return self._total_next - now

    def fail_after(self, filename: str, nbytes: int, times: int = 1) -> None:
        """Drop the connection after `nbytes` of a body of `filename` (path in repo, any repo), `times` times.

        `nbytes` counts from the start of each response body, so a resumed `Range` request fails again after
        `nbytes` more while `times` lasts. A body no longer than `nbytes` is sent whole and uses up nothing.
        """
        if nbytes < 0 or times < 1:
            raise ValueError("nbytes must be >= 0 and times >= 1")
        with self._lock:
            self._failures[filename] = _Failure(nbytes, times)

    def corrupt(self, repo_id: str, filename: str, data: bytes) -> None:
        """Serve `data` for this file at every revision while the API, ETag and X-Linked-Size keep the
        published size and sha256; Content-Length and Content-Range follow the bytes actually sent."""
        with self._lock:
            self._repo(repo_id)
            self._corrupt[(repo_id.lower(), filename)] = bytes(data)

    def clear_faults(self) -> None:
        """Undo `set_throttle`, `set_total_throttle`, `fail_after` and `corrupt`."""
        with self._lock:
            self._throttle = None
            self._total_throttle = None
            self._failures.clear()
            self._corrupt.clear()

    # ---------------------------------------------------------------- internals (caller holds no lock)

    def _repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id.lower())
        if repo is None:
            raise KeyError(f"unknown repo {repo_id!r}")
        return repo

    def _make_commit(
        self, base: _Commit | None, files: Mapping[str, bytes], delete: Sequence[str], title: str
    ) -> _Commit:
        tree: dict[str, HubFile] = dict(base.files) if base is not None else {}
        for path in delete:
            doomed = [p for p in tree if p == path or p.startswith(path.rstrip("/") + "/")]
            if not doomed:
                raise ValueError(f"cannot delete {path!r}: no such file or folder")
            for p in doomed:
                del tree[p]
        for path, data in files.items():
            _check_path(path)
            tree[path] = HubFile.build(path, bytes(data))
        trees = _tree_ids(tree)
        # Strictly increasing commit times keep every sha unique and lastModified ordered.
        ts = max(int(time.time()), self._last_ts + 1)
        self._last_ts = ts
        lines = [f"tree {trees['']}"]
        if base is not None:
            lines.append(f"parent {base.sha}")
        ident = f"llmlb-fake-hub <fake-hub@localhost> {ts} +0000"
        lines += [f"author {ident}", f"committer {ident}", "", title, ""]
        sha = _git_hash("commit", "\n".join(lines).encode())
        return _Commit(sha, base.sha if base else None, title, ts, tree, trees)

    def _lookup(self, repo_id: str) -> _Repo | None:
        with self._lock:
            return self._repos.get(repo_id.lower())

    def _commit_for(self, repo: _Repo, revision: str) -> _Commit | None:
        with self._lock:
            return repo.resolve(revision)

    def _append(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)

    def _count_sent(self, record: RequestRecord, n: int) -> None:
        with self._lock:
            record.bytes_sent += n

    def _take_failure(self, filename: str, body_len: int) -> int | None:
        with self._lock:
            failure = self._failures.get(filename)
            if failure is None or failure.remaining <= 0 or body_len <= failure.nbytes:
                return None
            failure.remaining -= 1
            return failure.nbytes

    def _served_bytes(self, repo: _Repo, hub_file: HubFile) -> bytes:
        with self._lock:
            return self._corrupt.get((repo.repo_id.lower(), hub_file.path), hub_file.data)

    def _current_throttle(self) -> int | None:
        with self._lock:
            return self._throttle

    def _token_access(self, token: str) -> bool | None:
        """None: unknown token; otherwise whether it may read gated repos."""
        with self._lock:
            return self._tokens.get(token)

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) not in (1, 2) or not all(_REPO_PART_RE.match(p) for p in parts) or ".." in repo_id:
        raise ValueError(f"invalid repo id {repo_id!r}")


def _check_path(path: str) -> None:
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise ValueError(f"invalid path in repo {path!r}")


def _tree_ids(files: Mapping[str, HubFile]) -> dict[str, str]:
    """Git tree ids of every directory, computed bottom-up as `git write-tree` would."""
    children: dict[str, dict[str, tuple[str, str]]] = {"": {}}  # dir -> name -> (mode, oid or "")
    for path in files:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent, name = "/".join(parts[: depth - 1]), parts[depth - 1]
            prefix = "/".join(parts[:depth])
            if prefix in files:
                raise ValueError(f"{prefix!r} is both a file and a folder")
            children.setdefault(prefix, {})
            children.setdefault(parent, {})[name] = ("40000", "")
        parent = "/".join(parts[:-1])
        children.setdefault(parent, {})[parts[-1]] = ("100644", files[path].blob_id)
    ids: dict[str, str] = {}
    for directory in sorted(children, key=lambda d: d.count("/") + (1 if d else 0), reverse=True):
        entries = children[directory]
        # Git orders tree entries by name, comparing directory names as if they ended with "/".
        ordered = sorted(entries.items(), key=lambda kv: kv[0] + ("/" if kv[1][0] == "40000" else ""))
        body = b""
        for name, (mode, oid) in ordered:
            if mode == "40000":
                oid = ids[f"{directory}/{name}" if directory else name]
            body += f"{mode} {name}".encode() + b"\x00" + bytes.fromhex(oid)
        ids[directory] = _git_hash("tree", body)
    return ids


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llmlb-fake-hub/1"
    disable_nagle_algorithm = True  # small JSON replies must not wait on delayed ACKs
    timeout = 60

    _record: RequestRecord
    _started: bool

    @property
    def _hub(self) -> FakeHub:
        return cast(_HubServer, self.server).hub

    def setup(self) -> None:
        super().setup()
        self._hub._track(self.connection, alive=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._hub._track(self.connection, alive=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests read `FakeHub.requests` instead of stderr."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    # ---------------------------------------------------------------- plumbing

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        wanted = {"Range": self.headers.get("Range"), "Authorization": self.headers.get("Authorization")}
        self._record = RequestRecord(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k: v for k, v in wanted.items() if v is not None},
        )
        self._started = False
        try:
            body = self._read_body()
            self._route(split.path, body)
        except _Reply as reply:
            self._send_error(reply)
        except OSError:  # the client went away or the socket timed out: nothing left to answer
            self.close_connection = True
        except Exception as exc:  # a bug in the fake must surface as a 500, not a hung client
            if self._started:
                self.close_connection = True
            else:
                self._send_error(_Reply(500, f"fake hub error: {type(exc).__name__}: {exc}"))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_REQUEST_BODY:
            self.close_connection = True
            raise _Reply(413, "Request body too large")
        return self.rfile.read(length) if length else b""

    def _start(self, status: int, headers: Mapping[str, str], content_length: int) -> None:
        self._record.status = status
        # Logged before the headers leave, so a client that has its response always finds the record.
        self._hub._append(self._record)
        self._started = True
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(content_length))
        self.end_headers()

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._start(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, len(body))
        if self.command != "HEAD":
            self._hub._count_sent(self._record, len(body))
            self.wfile.write(body)

    def _send_error(self, reply: _Reply) -> None:
        # Header values must stay printable ASCII, whatever a request path smuggled into the message.
        safe = "".join(c if " " <= c <= "~" else "?" for c in reply.message)
        headers = {"X-Error-Message": safe, **reply.headers}
        if reply.code is not None:
            headers["X-Error-Code"] = reply.code
        self._send_json(reply.status, {"error": reply.message}, headers)

    # ---------------------------------------------------------------- routing

    def _route(self, raw_path: str, body: bytes) -> None:
        segments = raw_path.split("/")[1:]
        if segments and segments[-1] == "":
            segments.pop()
        method = self.command
        if segments[:2] == ["api", "models"] and len(segments) > 2:
            repo_id, tail = self._split_repo([unquote(s) for s in segments[2:]])
            if method in ("GET", "HEAD"):
                if not tail:
                    return self._model_info(repo_id, _DEFAULT_BRANCH)
                if tail[0] == "revision" and len(tail) > 1:
                    return self._model_info(repo_id, "/".join(tail[1:]))
                if tail[0] == "tree" and len(tail) > 1:
                    revision, rest = _take_revision(tail[1:])
                    return self._tree(repo_id, revision, "/".join(rest), raw_path)
            if method == "POST" and tail and tail[0] == "paths-info" and len(tail) > 1:
                return self._paths_info(repo_id, "/".join(tail[1:]), body)
        elif method in ("GET", "HEAD") and len(segments) == 2 and segments[0] == "cdn-lfs":
            return self._cdn(segments[1])
        elif method in ("GET", "HEAD"):
            resolved = self._split_resolve(segments)
            if resolved is not None:
                return self._resolve(*resolved)
        raise _Reply(404, "Sorry, we can't find the page you are looking for.")

    def _split_repo(self, parts: list[str]) -> tuple[str, list[str]]:
        """Split `namespace/name/...` or `name/...` into the repo id and the rest of the path."""
        if len(parts) >= 2 and self._hub._lookup(f"{parts[0]}/{parts[1]}") is not None:
            return f"{parts[0]}/{parts[1]}", parts[2:]
        if self._hub._lookup(parts[0]) is not None and (len(parts) == 1 or parts[1] in _API_KEYWORDS):
            return parts[0], parts[1:]
        if len(parts) >= 2 and parts[1] not in _API_KEYWORDS:
            return f"{parts[0]}/{parts[1]}", parts[2:]
        return parts[0], parts[1:]

    def _split_resolve(self, segments: list[str]) -> tuple[str, str, str] | None:
        """`[namespace/]name/resolve/{revision}/{path}` -> (repo id, revision, path)."""
        if len(segments) >= 4 and segments[1] == "resolve" and self._hub._lookup(unquote(segments[0])):
            repo_parts, rest = segments[:1], segments[2:]
        elif len(segments) >= 5 and segments[2] == "resolve":
            repo_parts, rest = segments[:2], segments[3:]
        elif len(segments) >= 4 and segments[1] == "resolve":
            repo_parts, rest = segments[:1], segments[2:]
        else:
            return None
        revision, path_parts = _take_revision([unquote(s) for s in rest])
        if not path_parts:
            return None
        return "/".join(unquote(p) for p in repo_parts), revision, "/".join(path_parts)

    # ---------------------------------------------------------------- access

    def _access(self, repo_id: str, *, download: bool) -> _Repo:
        """The repo if this request may see it, else the hub's error for this caller."""
        token_ok: bool | None = None  # None: anonymous
        gated_access = False
        auth = self.headers.get("Authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            access = self._hub._token_access(token.strip()) if scheme.lower() == "bearer" else None
            if access is None:
                raise _Reply(401, _INVALID_CREDENTIALS)
            token_ok, gated_access = True, access
        repo = self._hub._lookup(repo_id)
        if repo is None or (repo.private and not token_ok):
            # Without a token the hub cannot tell "missing" from "private": both are 401.
            raise _Reply(404 if token_ok else 401, "Repository not found", "RepoNotFound")
        if download and repo.gated and not gated_access:
            if not token_ok:
                raise _Reply(
                    401,
                    f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.",
                    "GatedRepo",
                )
            raise _Reply(
                403,
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self._base_url()}/{repo.repo_id} to ask for access.",
                "GatedRepo",
            )
        return repo

    def _commit_at(self, repo: _Repo, revision: str) -> _Commit:
        commit = self._hub._commit_for(repo, revision)
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self._hub.url

    # ---------------------------------------------------------------- API routes

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._access(repo_id, download=False)
        commit = self._commit_at(repo, revision)
        query = self._record.query
        blobs = _is_true(_param(query, "blobs"))
        siblings: list[dict[str, Any]] = []
        for path in sorted(commit.files):
            f = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.lfs_sha256 is not None:
                    sibling["lfs"] = {"sha256": f.lfs_sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(sibling)
        with self._hub._lock:
            stored = {f.blob_id: f.size for c in repo.commits.values() for f in c.files.values()}
        suffixes = {p.rsplit(".", 1)[-1] for p in commit.files if "." in p}
        tags = [t for t in ("gguf", "safetensors", "onnx") if t in suffixes]
        info: dict[str, Any] = {
            "_id": repo.mongo_id,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": _iso(commit.timestamp),
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": "gguf" if "gguf" in tags else None,
            "tags": tags,
            "siblings": siblings,
            "spaces": [],
            "createdAt": _iso(repo.created_at),
            "usedStorage": sum(stored.values()),
        }
        if _is_true(_param(query, "securityStatus")):
            info["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
        expand = [v for values in (query.get("expand"), query.get("expand[]")) for v in values or []]
        if expand:
            # The hub answers an expand request with only the asked properties; unknown ones are ignored.
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        self._send_json(200, info)

    def _tree(self, repo_id: str, revision: str, path: str, raw_path: str) -> None:
        repo = self._access(repo_id, download=False)
        query = self._record.query
        recursive = _is_true(_param(query, "recursive"))
        expand = _is_true(_param(query, "expand"))
        cursor = _param(query, "cursor")
        offset = 0
        if cursor is not None:
            try:
                state = json.loads(base64.urlsafe_b64decode(cursor.encode()))
                revision, offset = str(state["c"]), int(state["o"])
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise _Reply(400, "Invalid cursor") from None
        commit = self._commit_at(repo, revision)
        if path and path not in commit.trees:
            raise _Reply(404, f"Entry not found: {path}", "EntryNotFound", **{"X-Repo-Commit": commit.sha})
        prefix = f"{path}/" if path else ""
        paths = [p for p in (*commit.files, *commit.trees) if p and p.startswith(prefix)]
        if not recursive:
            paths = [p for p in paths if "/" not in p[len(prefix) :]]
        # Pre-order, siblings by name: a folder comes right before its contents.
        paths.sort(key=lambda p: p.split("/"))
        page_size = max(1, self._hub.tree_page_size)
        if expand:
            page_size = min(page_size, _API_PAGE_LIMIT_EXPANDED)
        page = paths[offset : offset + page_size]
        headers: dict[str, str] = {}
        if offset + page_size < len(paths):
            token = json.dumps({"c": commit.sha, "o": offset + page_size}).encode()
            params = {k: v for k, v in query.items() if k != "cursor"}
            params["cursor"] = [base64.urlsafe_b64encode(token).decode()]
            headers["Link"] = f'<{self._base_url()}{raw_path}?{urlencode(params, doseq=True)}>; rel="next"'
        entries = [self._entry(repo, commit, p, expand) for p in page]
        self._send_json(200, entries, headers)

    def _paths_info(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._access(repo_id, download=False)
        commit = self._commit_at(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        try:
            if "json" in content_type:
                payload = json.loads(body or b"{}")
                paths = [str(p) for p in payload.get("paths", [])]
                expand = bool(payload.get("expand", False))
            else:
                form = parse_qs(body.decode(), keep_blank_values=True)
                paths = form.get("paths", []) + form.get("paths[]", [])
                expand = _is_true(_param(form, "expand"))
        except (ValueError, AttributeError, UnicodeDecodeError):
            raise _Reply(400, "Invalid paths-info request body") from None
        found: list[dict[str, Any]] = []
        for p in dict.fromkeys(p.strip("/") for p in paths):
            # Unknown paths are skipped, as on the hub.
            if p and (p in commit.files or p in commit.trees):
                found.append(self._entry(repo, commit, p, expand))
        self._send_json(200, found)

    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        f = commit.files.get(path)
        entry: dict[str, Any]
        if f is None:
            entry = {"type": "directory", "oid": commit.trees[path], "size": 0, "path": path}
        else:
            entry = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
            if f.lfs_sha256 is not None:
                entry["lfs"] = {"oid": f.lfs_sha256, "size": f.size, "pointerSize": f.pointer_size}
        if expand:
            last = _last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": _iso(last.timestamp)}
            if f is not None:
                entry["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
        return entry

    # ---------------------------------------------------------------- file downloads

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        self._record.repo_id, self._record.revision, self._record.filename = repo_id, revision, path
        repo = self._access(repo_id, download=True)
        self._record.repo_id = repo.repo_id
        commit = self._commit_at(repo, revision)
        hub_file = commit.files.get(path)
        if hub_file is None:
            # The commit header lets the client cache the file's absence for this commit.
            raise _Reply(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": commit.sha})
        headers = {"ETag": f'"{hub_file.etag}"', "X-Repo-Commit": commit.sha}
        if hub_file.lfs_sha256 is not None:
            headers["X-Linked-Etag"] = f'"{hub_file.lfs_sha256}"'
            headers["X-Linked-Size"] = str(hub_file.size)
            if self._hub.lfs_redirect:
                query = urlencode({"repo": repo.repo_id, "commit": commit.sha, "path": path})
                location = f"{self._hub.cdn_url}/cdn-lfs/{hub_file.lfs_sha256}?{query}"
                self._start(302, {**headers, "Location": location}, 0)
                return
        self._send_file(repo, hub_file, headers)

    def _cdn(self, sha256: str) -> None:
        """The storage host an LFS redirect points at: a signed URL, so no Authorization is checked."""
        query = self._record.query
        repo_id, commit_sha, path = (_param(query, k) or "" for k in ("repo", "commit", "path"))
        self._record.repo_id, self._record.revision, self._record.filename = repo_id, commit_sha, path
        repo = self._hub._lookup(repo_id)
        commit = self._hub._commit_for(repo, commit_sha) if repo is not None else None
        hub_file = commit.files.get(path) if commit is not None else None
        if repo is None or hub_file is None or hub_file.lfs_sha256 != sha256:
            raise _Reply(404, "NoSuchKey")
        self._send_file(repo, hub_file, {"ETag": f'"{sha256}"'})

    def _send_file(self, repo: _Repo, hub_file: HubFile, headers: dict[str, str]) -> None:
        data = self._hub._served_bytes(repo, hub_file)
        headers = {
            **headers,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(hub_file.path.rsplit('/', 1)[-1])}",
        }
        try:
            span = _parse_range(self.headers.get("Range"), len(data))
        except _Unsatisfiable:
            raise _Reply(
                416, "Requested Range Not Satisfiable", **{**headers, "Content-Range": f"bytes */{len(data)}"}
            ) from None
        status, start, end = 200, 0, len(data)
        if span is not None:
            status, (start, end) = 206, span
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = memoryview(data)[start:end]
        limit = self._hub._take_failure(hub_file.path, len(body)) if self.command == "GET" else None
        self._record.dropped = limit is not None
        self._start(status, headers, len(body))
        if self.command == "HEAD":
            return
        self._stream(body if limit is None else body[:limit])
        if limit is not None:
            self.close_connection = True
            self.wfile.flush()
            # Shut the socket so the client sees a short body, exactly like a connection lost mid-transfer.
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _stream(self, body: memoryview) -> None:
        sent = 0
        while sent < len(body):
            rate = self._hub._current_throttle()
            size = _WRITE_CHUNK if rate is None else max(1, min(_WRITE_CHUNK, rate // 20))
            piece = body[sent : sent + size]
            # Wait before sending, so the last byte cannot arrive sooner than size / rate.
            wait = max(len(piece) / rate if rate is not None else 0.0, self._hub._total_wait(len(piece)))
            if wait > 0 and self._hub._stopping.wait(wait):
                raise ConnectionResetError("fake hub stopping")
            self._hub._count_sent(self._record, len(piece))
            self.wfile.write(piece)
            sent += len(piece)


def _take_revision(parts: list[str]) -> tuple[str, list[str]]:
    """First path parts naming a revision; `refs/pr/N`-style refs may arrive unencoded."""
    if len(parts) >= 3 and parts[0] == "refs" and parts[1] in {"pr", "convert", "heads", "tags"}:
        return "/".join(parts[:3]), parts[3:]
    return parts[0], parts[1:]


class _Unsatisfiable(Exception):
    """The range starts past the end of the body: 416."""


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Half-open (start, end) for a single `bytes=` range, or None to send the whole body.

    Malformed and multi-range headers are ignored (RFC 9110 allows serving the full body instead).
    Raises `_Unsatisfiable` for a range that selects nothing.
    """
    if header is None:
        return None
    match = _RANGE_RE.match(header)
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - suffix), size
    start = int(first)
    end = int(last) + 1 if last else size
    if last and end <= start:
        return None
    if start >= size:
        raise _Unsatisfiable
    return start, min(end, size)


def _last_commit(repo: _Repo, commit: _Commit, path: str) -> _Commit:
    """The commit that last changed `path`, walking first parents from `commit`."""
    oid = commit.entry_oid(path)
    current = commit
    while current.parent is not None:
        parent = repo.commits[current.parent]
        if parent.entry_oid(path) != oid:
            break
        current = parent
    return current
