"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests.

Why: the Hub is unreachable from CI and nothing on PyPI implements the upload side of its API, yet
the push / fetch code must be exercised with the real ``huggingface_hub`` client (no mocks in the
product). This server speaks the subset of the Hub's REST protocol that client uses, with the same
status codes and ``X-Error-Code`` headers, so the client raises its real exceptions
(``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``RemoteEntryNotFoundError``, 401/403
``HfHubHTTPError``) exactly as against huggingface.co.

Implemented (``{repo}`` is ``org/name``, revisions are URL-quoted branch names or 40-hex commit ids):

* ``POST /api/repos/create`` / ``DELETE /api/repos/delete``: 409 if it exists, 403 without write
  access to the namespace. A new repo gets an initial commit with ``.gitattributes``, as on the Hub.
* ``GET  /api/models/{repo}[/revision/{rev}]``: ``model_info`` / ``repo_info`` with ``sha`` and ``siblings``.
* ``POST|DELETE /api/models/{repo}/branch/{branch}``.
* ``POST /api/validate-yaml``: accepts any YAML (the client calls it before committing a README).
* ``POST /api/models/{repo}/preupload/{rev}``: ``uploadMode: lfs`` for binary files and the
  ``.gitattributes`` LFS patterns (``*.safetensors``, ``*.bin``), ``regular`` otherwise, as the Hub decides.
* ``POST /{repo}.git/info/lfs/objects/batch`` and ``PUT /lfs-upload/{sha256}``: git-lfs "basic" transfer
  (with ``HF_HUB_DISABLE_XET=1`` the client uses it); stored objects are recorded in ``lfs_objects``.
* ``POST /api/models/{repo}/commit/{rev}``: NDJSON ``header`` / ``file`` (base64) / ``lfsFile`` (by sha256) /
  ``deletedFile`` lines applied atomically (all or nothing), ``parentCommit`` checked (412).
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: file bytes with ``ETag``, ``X-Repo-Commit``,
  ``Content-Length`` (and ``Range`` support), 404 with ``RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound``.

Auth: ``Authorization: Bearer <token>``; ``tokens`` maps each valid token to the namespaces it may
write. An unknown token gets 401 ``Invalid credentials in Authorization header`` on every route (as
the Hub does); private repos are invisible (404 ``RepoNotFound``) without a token that can read them.

Test hooks: :meth:`HubServer.fail_next` makes the next request to a route fail with a given status, or
run a function first (e.g. another client's commit, to race a push), :attr:`HubServer.requests` records
``(method, path)`` of every request, :meth:`HubServer.files` reads a revision's files and
:meth:`HubServer.commit` writes one directly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer"]

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def _upload_mode(path: str, sample: bytes) -> str:
    """The Hub sends binary files (and the LFS patterns of its default .gitattributes) through LFS."""
    return "lfs" if path.endswith((".safetensors", ".bin")) or b"\0" in sample else "regular"


def _git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob, which the Hub uses as a regular file's ETag and oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    date: float


@dataclass
class _Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if _COMMIT_RE.match(revision):
            return self.commits.get(revision)
        return None


class _HubError(Exception):
    """An HTTP error response, shaped like the Hub's (status, X-Error-Code, X-Error-Message)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """A threaded in-memory Hub on ``http://127.0.0.1:<port>``; use as a context manager.

    Args:
        tokens: Valid tokens mapped to the namespaces (users / orgs) they may write to.
    """

    def __init__(self, tokens: dict[str, list[str]] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> contents uploaded through LFS
        self._failures: dict[str, tuple[int, str] | Callable[[], None]] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hf-test-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ test hooks
    def fail_next(self, route: str, status: int = 500, message: str = "Internal Server Error (injected)",
                  *, before: Callable[[], None] | None = None) -> None:
        """Make the next request to ``route`` (``commit``, ``preupload``, ``resolve``, ``create``) fail, or,
        with ``before``, run that function first and then serve the request normally."""
        with self._lock:
            self._failures[route] = before or (status, message)

    def commit(self, repo_id: str, files: dict[str, bytes], message: str, branch: str = "main") -> str:
        """Commit ``files`` on top of ``branch`` directly (another client's push); return the commit id."""
        with self._lock:
            repo = self.repos[repo_id]
            commit = self._new_commit(repo, repo.branches[branch], message,
                                      {**repo.commits[repo.branches[branch]].files, **files})
            repo.branches[branch] = commit.oid
            return commit.oid

    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit id a branch points to."""
        with self._lock:
            return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """A revision's files, read directly from the server's state."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            assert commit is not None, revision
            return dict(commit.files)

    # ------------------------------------------------------------------ state changes (under lock)
    def _new_commit(self, repo: _Repo, parent: str | None, message: str, files: dict[str, bytes]) -> _Commit:
        self._counter += 1
        h = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{message}\0{self._counter}".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + _git_blob_sha1(files[path]).encode())
        commit = _Commit(h.hexdigest(), parent, message, files, time.time())
        repo.commits[commit.oid] = commit
        return commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer  # bound by HubServer.start

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, err: _HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, json.dumps({"error": err.message}).encode(), headers)

    def _user_namespaces(self) -> list[str] | None:
        """Namespaces the caller may write; ``None`` when anonymous. 401 for an unknown token."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _require_write(self, namespaces: list[str] | None, repo_id: str) -> None:
        if namespaces is None:
            raise _HubError(401, "You must be authenticated to write to this repository")
        if repo_id.split("/")[0] not in namespaces:
            raise _HubError(403, f"You don't have the rights to write to {repo_id}")

    def _repo(self, repo_id: str, namespaces: list[str] | None) -> _Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and repo_id.split("/")[0] not in (namespaces or [])):
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _injected(self, route: str) -> None:
        failure = self.hub._failures.pop(route, None)
        if callable(failure):
            failure()
        elif failure:
            raise _HubError(*failure)

    # ------------------------------------------------------------------ dispatch
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        query = parse_qs(url.query)
        body = self._body() if self.command in ("POST", "DELETE", "PUT") else b""
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
            try:
                self._route(path, query, body)
            except _HubError as err:
                self._error(err)

    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        namespaces = self._user_namespaces()
        m = self.command
        if path == "/api/validate-yaml" and m == "POST":
            return self._json({"errors": [], "warnings": []})
        if path == "/api/repos/create" and m == "POST":
            return self._create_repo(json.loads(body), namespaces)
        if path == "/api/repos/delete" and m == "DELETE":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            self._require_write(namespaces, repo_id)
            self._repo(repo_id, namespaces)
            del self.hub.repos[repo_id]
            return self._json({})

        lfs = re.match(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)
        if lfs and m == "POST":
            self._require_write(namespaces, lfs.group(1))
            return self._lfs_batch(json.loads(body))
        upload = re.match(r"^/lfs-upload/([0-9a-f]{64})$", path)
        if upload and m == "PUT":
            if hashlib.sha256(body).hexdigest() != upload.group(1):
                raise _HubError(400, "LFS object does not match its sha256")
            self.hub.lfs_objects[upload.group(1)] = body
            return self._json({})
        api = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(revision|preupload|commit|branch)(?:/(.*))?)?$", path)
        if api:
            repo_id, action, rest = api.group(1), api.group(2), unquote(api.group(3) or "")
            repo = self._repo(repo_id, namespaces)
            if action in (None, "revision") and m == "GET":
                return self._model_info(repo, rest or "main")
            if action == "preupload" and m == "POST":
                self._require_write(namespaces, repo_id)
                self._injected("preupload")
                commit = self._commit(repo, rest)
                files = json.loads(body)["files"]
                return self._json({"files": [{
                    "path": f["path"], "uploadMode": _upload_mode(f["path"], base64.b64decode(f["sample"])),
                    "shouldIgnore": False,
                    "oid": _git_blob_sha1(commit.files[f["path"]]) if f["path"] in commit.files else None,
                } for f in files]})
            if action == "commit" and m == "POST":
                self._require_write(namespaces, repo_id)
                return self._apply_commit(repo, rest, body)
            if action == "branch":
                self._require_write(namespaces, repo_id)
                return self._branch(repo, rest, body)
        res = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if res and m in ("GET", "HEAD"):
            return self._resolve(res.group(1), unquote(res.group(2)), unquote(res.group(3)), namespaces)
        raise _HubError(404, f"No route for {m} {path}")

    # ------------------------------------------------------------------ routes
    def _create_repo(self, payload: dict[str, Any], namespaces: list[str] | None) -> None:
        repo_id = f"{payload.get('organization') or (namespaces or ['anonymous'])[0]}/{payload['name']}"
        self._require_write(namespaces, repo_id)
        self._injected("create")
        if repo_id in self.hub.repos:
            raise _HubError(409, "You already created this model repo")
        repo = _Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        commit = self.hub._new_commit(repo, None, "initial commit", {".gitattributes": _GITATTRIBUTES})
        repo.branches["main"] = commit.oid
        self.hub.repos[repo_id] = repo
        base = f"http://{self.headers.get('Host')}"
        self._json({"url": f"{base}/{repo_id}", "name": repo_id, "id": repo_id})

    def _model_info(self, repo: _Repo, revision: str) -> None:
        commit = self._commit(repo, revision)
        iso = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date))
        self._json({
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.oid,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "library_name": "timm", "lastModified": iso, "createdAt": iso,
            "siblings": [{"rfilename": p, "size": len(d), "blobId": _git_blob_sha1(d)}
                         for p, d in sorted(commit.files.items())],
        })

    def _lfs_batch(self, payload: dict[str, Any]) -> None:
        """git-lfs batch API: an upload action for each object the store lacks, none for the others."""
        base = f"http://{self.headers.get('Host')}"
        self._json({"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"],
             **({} if o["oid"] in self.hub.lfs_objects else {"actions": {"upload": {"href": f"{base}/lfs-upload/{o['oid']}"}}})}
            for o in payload["objects"]]})

    def _branch(self, repo: _Repo, branch: str, body: bytes) -> None:
        if self.command == "DELETE":
            if branch not in repo.branches or branch == "main":
                raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del repo.branches[branch]
            return self._json({})
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self._commit(repo, start).oid
        self._json({})

    def _apply_commit(self, repo: _Repo, revision: str, body: bytes) -> None:
        if revision not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        self._injected("commit")  # before anything is read or stored: a racing commit, or a failure
        head = repo.commits[repo.branches[revision]]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)  # work on a copy: nothing changes unless every operation applies
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"Unsupported encoding {value.get('encoding')}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise _HubError(422, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = self.hub.lfs_objects[value["oid"]]
            else:
                raise _HubError(400, f"Unknown commit operation {key!r}")
        commit = self.hub._new_commit(repo, head.oid, header.get("summary", ""), files)
        repo.branches[revision] = commit.oid
        base = f"http://{self.headers.get('Host')}"
        self._json({"success": True, "commitOid": commit.oid, "commitUrl": f"{base}/{repo.repo_id}/commit/{commit.oid}"})

    def _resolve(self, repo_id: str, revision: str, filename: str, namespaces: list[str] | None) -> None:
        repo = self._repo(repo_id, namespaces)
        commit = self._commit(repo, revision)
        self._injected("resolve")
        if filename not in commit.files:
            raise _HubError(404, "Entry not found", "EntryNotFound")
        data = commit.files[filename]
        headers = {"ETag": f'"{_git_blob_sha1(data)}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        status = 200
        rng = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if rng and self.command == "GET":
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")


# ======================================================================================================
# pytest fixtures: import them into a test module (``from hf_server import hub_env, hub_server``)
# ======================================================================================================

import os  # noqa: E402
import socket  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

#: A token that may write to ``alice/*`` and ``bam-zoo/*``.
WRITE_TOKEN = "hf_test_write_" + "x" * 20
#: A valid token that may write only to ``bob/*``.
OTHER_TOKEN = "hf_test_other_" + "y" * 20


@pytest.fixture(scope="session")
def hub_server():
    """One server for the session; tests isolate themselves with unique repo names."""
    with HubServer({WRITE_TOKEN: ["alice", "bam-zoo"], OTHER_TOKEN: ["bob"]}) as server:
        yield server


@dataclass
class HubEnv:
    """What a test needs to talk to the test Hub: its server, token, cache and mirror folders."""

    server: HubServer
    endpoint: str
    token: str
    home: Path
    cache: Path
    mirror: Path
    monkeypatch: Any

    def repo_id(self, org: str = "alice") -> str:
        """A repo name no other test uses."""
        return f"{org}/bam-test-{uuid.uuid4().hex[:10]}"

    def set_endpoint(self, endpoint: str) -> None:
        _patch_hf(self.monkeypatch, ENDPOINT=endpoint.rstrip("/"))

    def unreachable(self) -> None:
        """Point the client at a local port nothing listens on: connection refused, instantly."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.set_endpoint(f"http://127.0.0.1:{port}")

    def offline(self, value: bool = True) -> None:
        _patch_hf(self.monkeypatch, HF_HUB_OFFLINE=value)

    def set_token(self, token: str | None) -> None:
        if token is None:
            self.monkeypatch.delenv("HF_TOKEN", raising=False)
        else:
            self.monkeypatch.setenv("HF_TOKEN", token)


def _patch_hf(monkeypatch: Any, **values: Any) -> None:
    """Set huggingface_hub's settings both as env vars (subprocesses) and as module constants.

    Why both: ``huggingface_hub.constants`` reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``,
    ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` once, at import; in-process calls only see
    changed constants. ``HUGGINGFACE_CO_URL_TEMPLATE`` is derived from the endpoint at import too
    and is what ``hf_hub_download`` formats download URLs with.
    """
    from huggingface_hub import constants

    env_names = {"ENDPOINT": "HF_ENDPOINT"}
    for name, value in values.items():
        env = env_names.get(name, name)
        if isinstance(value, bool):
            monkeypatch.setenv(env, "1" if value else "0")
        else:
            monkeypatch.setenv(env, str(value))
        monkeypatch.setattr(constants, name, value)
        if name == "ENDPOINT":
            monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", value + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hub_env(hub_server: HubServer, tmp_path: Path, monkeypatch: Any) -> HubEnv:
    """Point ``huggingface_hub`` at the test server with a fresh, temporary cache and token.

    Sets ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` / ``HF_HUB_CACHE`` (under ``tmp_path``),
    ``HF_HUB_DISABLE_XET=1`` (huggingface_hub 2.x uploads via Xet otherwise), ``HF_HUB_OFFLINE=0``,
    and ``BAM_ZOO_CHECKPOINTS`` (an empty mirror), as env vars *and* as
    ``huggingface_hub.constants`` values (see :func:`_patch_hf` for why both). The token file
    (``HF_TOKEN_PATH``) is moved under ``tmp_path`` too, so a developer's real ``hf auth login``
    token is never read or sent. Everything is restored by ``monkeypatch`` after the test.
    """
    home = tmp_path / "hf_home"
    cache = home / "hub"
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _patch_hf(monkeypatch, ENDPOINT=hub_server.url, HF_HOME=str(home), HF_HUB_CACHE=str(cache),
              HF_HUB_OFFLINE=False, HF_HUB_DISABLE_XET=True, HF_TOKEN_PATH=str(home / "token"),
              HF_STORED_TOKENS_PATH=str(home / "stored_tokens"))
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("BAM_ZOO_CHECKPOINTS", str(mirror))
    assert os.environ["HF_ENDPOINT"] == hub_server.url
    return HubEnv(hub_server, hub_server.url, WRITE_TOKEN, home, cache, mirror, monkeypatch)
