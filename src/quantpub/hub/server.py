"""The Hub HTTP API, as the unmodified ``huggingface_hub`` client uses it, over a ``Store``.

Endpoints (see the project's hub-api reference): repo create/delete/settings, validate-yaml,
branches and tags, refs, repo info by revision, tree, preupload, LFS batch with signed
upload/verify URLs (the client sends no token with the PUT), ndjson commits, commit history,
paths-info, whoami, and ``resolve/{rev}/{path}`` with ETag, X-Repo-Commit and byte ranges.

Writes need a token from the server's token table; private repos answer 404 without one, as
the Hub does. Tokens and query strings never reach the log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

from quantpub.hub.store import (COMMIT_RE, LFS_SUFFIXES, LFS_THRESHOLD, REPO_TYPES, SHA256_RE, FileEntry, Repo,
                                Store, StoreError, check_path, git_blob_oid, lfs_pointer, read_exact)

log = logging.getLogger(__name__)
MAX_JSON_BODY = 1 << 20
MAX_COMMIT_BODY = 256 << 20          # ndjson with base64 regular files (< 10 MB each by the LFS rule)
MAX_FILE_SIZE = 50 * 1000 ** 3       # the Hub's per-file limit
UPLOAD_URL_TTL = 24 * 3600
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass
class HubConfig:
    """``tokens`` maps token -> user name; ``secret`` signs LFS upload URLs."""
    data_dir: Path
    tokens: dict[str, str] = field(default_factory=dict)
    max_file_size: int = MAX_FILE_SIZE
    log_requests: bool = False  # one INFO line per request (``hub serve``); DEBUG otherwise
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))


def read_tokens(path: str | Path) -> dict[str, str]:
    """Token file: one ``user:token`` per line; blank lines and ``#`` comments ignored."""
    tokens = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, token = line.partition(":")
        if not sep or not user.strip() or len(token.strip()) < 8:
            raise ValueError(f"{path}:{n}: expected 'user:token' with a token of at least 8 characters")
        tokens[token.strip()] = user.strip()
    return tokens


def load_or_create_tokens(data_dir: str | Path, token_file: str | Path | None) -> tuple[dict[str, str], str]:
    """Tokens from ``token_file``, else from ``DATA_DIR/tokens``, created (mode 600) with one random token."""
    path = Path(token_file) if token_file else Path(data_dir) / "tokens"
    if token_file is None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"quantpub:hf_{secrets.token_hex(20)}\n")
    return read_tokens(path), str(path)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config: HubConfig, host: str = "127.0.0.1", port: int = 0):
        self.config = config
        self.store = Store(config.data_dir)
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def sign(self, oid: str, size: int, expires: int) -> str:
        return hmac.new(self.config.secret, f"{oid}:{size}:{expires}".encode(), hashlib.sha256).hexdigest()


def start_in_thread(config: HubConfig, host: str = "127.0.0.1", port: int = 0) -> tuple[HubServer, threading.Thread]:
    server = HubServer(config, host, port)
    thread = threading.Thread(target=server.serve_forever, name="quantpub-hub", daemon=True)
    thread.start()
    return server, thread


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer
    server_version = "quantpub-hub"

    # plumbing
    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-"):
        level = logging.INFO if self.server.config.log_requests else logging.DEBUG
        log.log(level, "%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self):
        self._body_read = False
        try:
            url = urlsplit(self.path)
            self.query = parse_qs(url.query)
            self.parts = [unquote(p) for p in url.path.split("/")[1:]]
            self.user = self._authenticate()
            self._route()
        except StoreError as exc:
            self._error(exc.status, str(exc), exc.code)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._error(400, f"malformed request: {exc}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - answer 500 and keep serving
            log.exception("internal error on %s %s", self.command, urlsplit(self.path).path)
            self._error(500, "internal server error")

    def _authenticate(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.server.config.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise StoreError(401, "invalid credentials in Authorization header")
        return user

    def _require_write(self) -> str:
        if self.user is None:
            raise StoreError(401, "a write token is required: pass token= or set HF_TOKEN")
        return self.user

    def _body(self, limit: int) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise StoreError(411, "chunked bodies are not accepted: send Content-Length")
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise StoreError(400, "negative Content-Length")
        if length > limit:
            self.close_connection = True
            raise StoreError(413, f"request body of {length} bytes exceeds the limit of {limit}")
        self._body_read = True
        data = b"".join(read_exact(self.rfile, length))
        if len(data) != length:
            raise StoreError(400, "request body shorter than Content-Length")
        return data

    def _json_body(self) -> dict:
        body = self._body(MAX_JSON_BODY)
        data = json.loads(body or b"{}")
        if not isinstance(data, dict):
            raise StoreError(400, "expected a JSON object")
        return data

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None, length: int | None = None):
        if not self._body_read and self.command in ("POST", "PUT") and self.headers.get("Content-Length"):
            self.close_connection = True  # the unread body would be parsed as the next request
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: dict[str, str] | None = None):
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        headers = dict(headers or {})
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message.encode("ascii", "replace").decode()[:500]
        try:
            self._json({"error": message}, status, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # routing
    def _route(self):
        p, m = self.parts, self.command
        if p[:1] == ["api"]:
            return self._route_api(p[1:], m)
        if p[:2] == ["lfs", "upload"] and len(p) == 3 and m == "PUT":
            return self._lfs_put(p[2])
        if p[:2] == ["lfs", "verify"] and len(p) == 3 and m == "POST":
            return self._lfs_verify(p[2])
        type_, rest = ("model", p)
        if p and p[0] in ("datasets", "spaces"):
            type_, rest = PLURAL[p[0]], p[1:]
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"] \
                and m == "POST":
            return self._lfs_batch(self._repo(type_, rest[0], rest[1][:-4], write=True))
        if len(rest) >= 5 and rest[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve(self._repo(type_, rest[0], rest[1]), rest[3], "/".join(rest[4:]))
        raise StoreError(404, f"no route for {m} {urlsplit(self.path).path}")

    def _route_api(self, p: list[str], m: str):
        if p == ["whoami-v2"] and m == "GET":
            if self.user is None:
                raise StoreError(401, "not logged in")
            return self._json({"type": "user", "name": self.user, "fullname": self.user, "orgs": [],
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if p == ["validate-yaml"] and m == "POST":
            return self._validate_yaml(self._json_body())
        if p == ["repos", "create"] and m == "POST":
            return self._create_repo(self._json_body())
        if p == ["repos", "delete"] and m == "DELETE":
            body = self._json_body()
            repo = self._repo(body.get("type") or "model", body.get("organization") or self.user or "",
                              body["name"], write=True)
            self.server.store.delete_repo(repo)
            return self._json({})
        if len(p) < 3 or p[0] not in PLURAL:
            raise StoreError(404, f"no route for {m} /api/{'/'.join(p)}")
        type_, ns, name, rest = PLURAL[p[0]], p[1], p[2], p[3:]
        write = m in ("POST", "PUT", "DELETE") and rest[:1] not in (["paths-info"],)
        repo = self._repo(type_, ns, name, write=write)
        if not rest and m == "GET":
            return self._info(repo, "main")
        if len(rest) == 2 and rest[0] == "revision" and m == "GET":
            return self._info(repo, rest[1])
        if rest == ["refs"] and m == "GET":
            return self._refs(repo)
        if len(rest) == 2 and rest[0] in ("branch", "tag") and m in ("POST", "DELETE"):
            return self._ref(repo, rest[0], rest[1])
        if len(rest) >= 2 and rest[0] == "tree" and m == "GET":
            return self._tree(repo, rest[1], "/".join(rest[2:]))
        if len(rest) == 2 and rest[0] == "preupload" and m == "POST":
            return self._preupload(repo, rest[1])
        if len(rest) == 2 and rest[0] == "commit" and m == "POST":
            return self._commit(repo, rest[1])
        if len(rest) == 2 and rest[0] == "commits" and m == "GET":
            return self._commits(repo, rest[1])
        if len(rest) == 2 and rest[0] == "paths-info" and m == "POST":
            return self._paths_info(repo, rest[1])
        if rest == ["settings"] and m == "PUT":
            body = self._json_body()
            if "private" in body:
                self.server.store.set_private(repo, bool(body["private"]))
            return self._json({})
        raise StoreError(404, f"no route for {m} /api/{'/'.join(p)}")

    def _repo(self, type_: str, namespace: str, name: str, *, write: bool = False) -> Repo:
        if type_ not in REPO_TYPES:
            raise StoreError(400, f"unknown repo type {type_!r}")
        if write:
            self._require_write()
        repo = self.server.store.get_repo(type_, namespace, name)
        if repo is None or (repo.private and self.user is None):
            raise StoreError(404, f"Repository Not Found: {namespace}/{name}", "RepoNotFound")
        return repo

    # handlers
    def _validate_yaml(self, body: dict):
        content = body.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            return self._json({"errors": [{"message": f"invalid YAML front matter: {exc}"}]}, 400)
        if meta is not None and not isinstance(meta, dict):
            return self._json({"errors": [{"message": "YAML front matter must be a mapping"}]}, 400)
        return self._json({"errors": [], "warnings": []})

    def _create_repo(self, body: dict):
        user = self._require_write()
        type_ = body.get("type") or "model"
        if type_ not in REPO_TYPES:
            raise StoreError(400, f"unknown repo type {type_!r}")
        namespace = body.get("organization") or user
        private = body.get("private", body.get("visibility") == "private")
        url = f"{self._base()}/{PREFIX[type_]}{namespace}/{body['name']}"
        try:
            repo = self.server.store.create_repo(type_, namespace, body["name"], bool(private), user)
        except StoreError as exc:
            if exc.status != 409:
                raise
            return self._json({"error": str(exc), "url": url}, 409)  # the client reads "url" even on 409
        return self._json({"url": url, "name": repo.repo_id})

    def _base(self) -> str:
        host = self.headers.get("Host") or f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        return f"http://{host}"

    def _info(self, repo: Repo, revision: str):
        store = self.server.store
        oid = store.resolve(repo, revision)
        files = store.files(oid)
        commit = store.commit_info(oid)
        siblings = []
        for e in files.values():
            item = {"rfilename": e.path, "size": e.size, "blobId": e.git_oid}
            if e.lfs:
                item["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
            siblings.append(item)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.created))
        self._json({"_id": f"{repo.id:024x}", "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.namespace,
                    "sha": oid, "lastModified": stamp, "createdAt": stamp, "private": repo.private,
                    "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                    "siblings": siblings, "usedStorage": sum(e.size for e in files.values())})

    def _refs(self, repo: Repo):
        store = self.server.store
        out = {kind + "es" if kind == "branch" else kind + "s":
               [{"name": n, "ref": f"refs/{'heads' if kind == 'branch' else 'tags'}/{n}", "targetCommit": c}
                for n, c in store.refs(repo, kind)] for kind in ("branch", "tag")}
        out["converts"] = []
        if self.query.get("include_prs"):
            out["pullRequests"] = []
        self._json(out)

    def _ref(self, repo: Repo, kind: str, name: str):
        store = self.server.store
        if self.command == "DELETE":
            store.delete_ref(repo, kind, name)
            return self._json({})
        body = self._json_body()
        if kind == "branch":
            store.create_ref(repo, "branch", name, body.get("startingPoint") or "main")
        else:
            store.create_ref(repo, "tag", body["tag"], name)
        self._json({})

    def _tree(self, repo: Repo, revision: str, path: str):
        store = self.server.store
        files = store.files(store.resolve(repo, revision))
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = check_path(path.strip("/")) + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise StoreError(404, f"{path} not found at {revision}", "EntryNotFound")
        items, dirs = [], set()
        for p, e in files.items():
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                d = prefix + "/".join(rest[:depth])
                if d not in dirs and (recursive or depth == 1):
                    dirs.add(d)
                    items.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()})
            if recursive or len(rest) == 1:
                items.append(_file_item(e))
        self._json(items)

    def _paths_info(self, repo: Repo, revision: str):
        store = self.server.store
        files = store.files(store.resolve(repo, revision))
        raw = self._body(MAX_JSON_BODY).decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(raw or "{}").get("paths", [])
        else:
            paths = parse_qs(raw).get("paths", [])
        items = []
        for path in paths:
            if path in files:
                items.append(_file_item(files[path]))
            elif any(p.startswith(path.rstrip("/") + "/") for p in files):
                items.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()})
        self._json(items)

    def _commits(self, repo: Repo, revision: str):
        store = self.server.store
        self._json([{"id": c.oid, "title": c.summary, "message": c.description, "authors": [{"user": c.author}],
                     "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(c.created))}
                    for c in store.history(store.resolve(repo, revision))])

    def _preupload(self, repo: Repo, revision: str):
        store = self.server.store
        files = store.files(store.resolve(repo, revision))
        out = []
        for f in self._json_body()["files"]:
            path = check_path(f["path"])
            sample = base64.b64decode(f.get("sample", ""))
            lfs = int(f.get("size", 0)) >= LFS_THRESHOLD or b"\0" in sample or path.lower().endswith(LFS_SUFFIXES)
            item = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in files:
                item["oid"] = files[path].sha256 if files[path].lfs else files[path].git_oid
            out.append(item)
        self._json({"files": out, "commitOid": store.resolve(repo, revision)})

    def _lfs_batch(self, repo: Repo):
        body = json.loads(self._body(MAX_JSON_BODY) or b"{}")
        if body.get("operation") != "upload":
            raise StoreError(400, "only the upload operation is supported")
        objects, expires = [], int(time.time()) + UPLOAD_URL_TTL
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid or size"}})
            elif size > self.server.config.max_file_size:
                objects.append({"oid": oid, "size": size, "error": {
                    "code": 413, "message": f"{size} bytes exceeds the per-file limit of "
                                            f"{self.server.config.max_file_size}; split the file"}})
            elif self.server.store.has_blob(oid, size):
                objects.append({"oid": oid, "size": size})
            else:
                q = f"size={size}&expires={expires}&sig={self.server.sign(oid, size, expires)}"
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self._base()}/lfs/upload/{oid}?{q}", "expires_in": UPLOAD_URL_TTL},
                    "verify": {"href": f"{self._base()}/lfs/verify/{oid}?{q}"}}})
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _check_signature(self, oid: str) -> int:
        try:
            size, expires, sig = (self.query[k][0] for k in ("size", "expires", "sig"))
            size, expires = int(size), int(expires)
        except (KeyError, ValueError):
            raise StoreError(403, "missing or malformed upload signature") from None
        if not hmac.compare_digest(sig, self.server.sign(oid, size, expires)) or expires < time.time():
            raise StoreError(403, "invalid or expired upload signature")
        return size

    def _lfs_put(self, oid: str):
        size = self._check_signature(oid)
        length = int(self.headers.get("Content-Length") or -1)
        if length != size:
            self.close_connection = True
            raise StoreError(400, f"Content-Length {length} does not match the announced size {size}")
        self._body_read = True
        self.server.store.put_blob(read_exact(self.rfile, size), size, expected=oid)
        self._json({})

    def _lfs_verify(self, oid: str):
        size = self._check_signature(oid)
        self._body(MAX_JSON_BODY)
        if not self.server.store.has_blob(oid, size):
            raise StoreError(404, f"object {oid} was not uploaded completely")
        self._json({})

    def _commit(self, repo: Repo, revision: str):
        user = self._require_write()
        if self.query.get("create_pr", ["0"])[0] not in ("0", "false", "False"):
            raise StoreError(400, "pull requests are not supported by this hub")
        header, add, delete, delete_folders = None, [], [], []
        store = self.server.store
        for line in self._body(MAX_COMMIT_BODY).splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                data = base64.b64decode(value["content"])
                sha = store.put_blob([data], len(data))
                add.append(FileEntry(check_path(value["path"]), sha, len(data), git_blob_oid(data), False))
            elif key == "lfsFile":
                oid, size = value["oid"], int(value["size"])
                add.append(FileEntry(check_path(value["path"]), oid, size,
                                     git_blob_oid(lfs_pointer(oid, size)), True))
            elif key == "deletedFile":
                delete.append(value["path"])
            elif key == "deletedFolder":
                delete_folders.append(value["path"])
            else:
                raise StoreError(400, f"unknown commit operation {key!r}")
        if header is None:
            raise StoreError(400, "commit without a header line")
        parent = header.get("parentCommit")
        if parent is not None and not COMMIT_RE.match(parent):
            raise StoreError(400, f"parentCommit {parent!r} is not a 40-hex commit id")
        oid = store.commit(repo, revision, summary=str(header.get("summary", "")),
                           description=str(header.get("description", "")), author=user, parent=parent,
                           add=add, delete=delete, delete_folders=delete_folders)
        self._json({"commitOid": oid, "commitUrl": f"{self._base()}/{PREFIX[repo.type]}{repo.repo_id}/commit/{oid}",
                    "success": True})

    def _resolve(self, repo: Repo, revision: str, path: str):
        store = self.server.store
        oid = store.resolve(repo, revision)
        entry = store.files(oid).get(path)
        if entry is None:
            return self._error(404, f"Entry not found: {path} at {revision}", "EntryNotFound",
                               headers={"X-Repo-Commit": oid})
        etag = entry.sha256 if entry.lfs else entry.git_oid
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        start, end = 0, entry.size - 1
        status = 200
        byte_range = self.headers.get("Range")
        if byte_range and entry.size:
            parsed = _parse_range(byte_range, entry.size)
            if parsed is None:
                return self._error(416, f"unsatisfiable range {byte_range!r} for {entry.size} bytes",
                                   headers={"Content-Range": f"bytes */{entry.size}", **headers})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = end - start + 1 if entry.size else 0
        self._send(status, b"", content_type="application/octet-stream", headers=headers, length=length)
        if self.command == "HEAD" or not length:
            return
        with store.blob_path(entry.sha256).open("rb") as fh:
            fh.seek(start)
            for chunk in read_exact(fh, length):
                self.wfile.write(chunk)


def _file_item(e: FileEntry) -> dict:
    item = {"type": "file", "path": e.path, "size": e.size, "oid": e.git_oid}
    if e.lfs:
        item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
    return item


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range -> inclusive (start, end), None if unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    return (start, end) if start <= end and start < size else None


def serve(config: HubConfig, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until interrupted (the ``quantpub hub serve`` command)."""
    server = HubServer(config, host, port)
    log.info("quantpub hub serving %s from %s (%d tokens configured)", server.url, config.data_dir,
             len(config.tokens))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
