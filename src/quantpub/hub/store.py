"""Durable storage for the local hub: content-addressed blobs on disk, metadata in SQLite.

Layout of the data dir::

    hub.sqlite3          repos, commits (each a full snapshot of its files), branches and tags
    blobs/ab/<sha256>    file contents, written to tmp/ first, verified, then renamed in place
    tmp/                 uploads in progress; emptied at start-up

A commit is one SQLite transaction that checks the branch head it builds on and moves it with
a compare-and-swap, so two commits to different branches never interfere and a stale parent
is refused. A blob becomes visible only through a commit, and a commit may only name blobs
that are completely stored, so a killed server never serves a partial file.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

REPO_TYPES = ("model", "dataset", "space")
NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
LFS_THRESHOLD = 10 * 1024 * 1024
# Extensions the Hub's default .gitattributes sends to LFS (a subset: the ones model repos use).
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".model",
                ".npy", ".npz", ".pkl", ".parquet", ".arrow", ".zip", ".gz", ".tar", ".zst", ".png", ".jpg")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)

SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (
    id INTEGER PRIMARY KEY, type TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    private INTEGER NOT NULL, created REAL NOT NULL, UNIQUE (type, namespace, name));
CREATE TABLE IF NOT EXISTS commits (
    oid TEXT PRIMARY KEY, repo_id INTEGER NOT NULL, parent TEXT, summary TEXT NOT NULL,
    description TEXT NOT NULL, author TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    commit_oid TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    git_oid TEXT NOT NULL, lfs INTEGER NOT NULL, PRIMARY KEY (commit_oid, path));
CREATE TABLE IF NOT EXISTS refs (
    repo_id INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, commit_oid TEXT NOT NULL,
    PRIMARY KEY (repo_id, kind, name));
"""


class StoreError(Exception):
    """A request the store refuses; ``status`` and ``code`` become the HTTP answer."""

    def __init__(self, status: int, message: str, code: str | None = None):
        self.status, self.code = status, code
        super().__init__(message)


@dataclass(frozen=True)
class Repo:
    id: int
    type: str
    namespace: str
    name: str
    private: bool

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int
    git_oid: str
    lfs: bool


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    author: str
    created: float


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def check_path(path: str) -> str:
    """A repo file path: relative, '/'-separated, no '.', '..' or empty parts, nothing under .git."""
    parts = path.split("/")
    if (not path or len(path) > 1000 or "\\" in path or "\0" in path or path.startswith("/")
            or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git"):
        raise StoreError(400, f"invalid file path {path!r}")
    return path


def check_name(name: str, what: str) -> str:
    if not NAME_RE.match(name or "") or ".." in name:
        raise StoreError(400, f"invalid {what} {name!r}: use letters, digits, '-', '_' and '.'")
    return name


def check_branch(name: str) -> str:
    if (not name or len(name) > 200 or name.startswith(("refs/", "/", "-")) or name.endswith(("/", ".lock"))
            or ".." in name or "//" in name or any(c in name for c in " ~^:?*[\\\0") or COMMIT_RE.match(name)):
        raise StoreError(400, f"invalid branch name {name!r}")
    return name


class Store:
    """All repos of one hub. Thread-safe: one SQLite connection per thread."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.blobs, self.tmp = self.root / "blobs", self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():  # uploads cut off by a kill: never referenced by any commit
            leftover.unlink()
        self._local = threading.local()
        with self._db() as db:
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "hub.sqlite3", timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    # blobs
    def blob_path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise StoreError(400, f"invalid sha256 {sha256!r}")
        return self.blobs / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_blob(self, chunks: Iterable[bytes], size: int, expected: str | None = None) -> str:
        """Store exactly ``size`` bytes; verify ``expected`` sha256 before the blob becomes visible."""
        tmp = self.tmp / uuid.uuid4().hex
        digest, written = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as fh:
                for chunk in chunks:
                    digest.update(chunk)
                    fh.write(chunk)
                    written += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            if written != size:
                raise StoreError(400, f"upload ended after {written} of {size} bytes")
            sha = digest.hexdigest()
            if expected is not None and sha != expected:
                raise StoreError(400, f"content sha256 {sha} does not match {expected}")
            final = self.blob_path(sha)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return sha
        finally:
            tmp.unlink(missing_ok=True)

    # repos
    def create_repo(self, type_: str, namespace: str, name: str, private: bool, author: str) -> Repo:
        check_name(namespace, "namespace")
        check_name(name, "repo name")
        db = self._db()
        sha = self.put_blob([GITATTRIBUTES.encode()], len(GITATTRIBUTES))
        with _transaction(db):
            try:
                cur = db.execute("INSERT INTO repos (type, namespace, name, private, created) VALUES (?,?,?,?,?)",
                                 (type_, namespace, name, int(private), time.time()))
            except sqlite3.IntegrityError:
                raise StoreError(409, f"repository {namespace}/{name} already exists") from None
            repo = Repo(cur.lastrowid, type_, namespace, name, private)
            data = GITATTRIBUTES.encode()
            entry = FileEntry(".gitattributes", sha, len(data), git_blob_oid(data), False)
            oid = self._insert_commit(db, repo, None, "initial commit", "", author, {entry.path: entry})
            db.execute("INSERT INTO refs VALUES (?, 'branch', 'main', ?)", (repo.id, oid))
        return repo

    def get_repo(self, type_: str, namespace: str, name: str) -> Repo | None:
        row = self._db().execute("SELECT id, type, namespace, name, private FROM repos "
                                 "WHERE type=? AND namespace=? AND name=?", (type_, namespace, name)).fetchone()
        return Repo(row[0], row[1], row[2], row[3], bool(row[4])) if row else None

    def delete_repo(self, repo: Repo) -> None:
        db = self._db()
        with _transaction(db):
            db.execute("DELETE FROM files WHERE commit_oid IN (SELECT oid FROM commits WHERE repo_id=?)", (repo.id,))
            db.execute("DELETE FROM commits WHERE repo_id=?", (repo.id,))
            db.execute("DELETE FROM refs WHERE repo_id=?", (repo.id,))
            db.execute("DELETE FROM repos WHERE id=?", (repo.id,))

    def set_private(self, repo: Repo, private: bool) -> None:
        self._db().execute("UPDATE repos SET private=? WHERE id=?", (int(private), repo.id))

    # refs and commits
    def refs(self, repo: Repo, kind: str) -> list[tuple[str, str]]:
        return self._db().execute("SELECT name, commit_oid FROM refs WHERE repo_id=? AND kind=? ORDER BY name",
                                  (repo.id, kind)).fetchall()

    def resolve(self, repo: Repo, revision: str) -> str:
        """Branch, tag or full commit id -> commit id; RevisionNotFound otherwise."""
        db = self._db()
        for kind in ("branch", "tag"):
            row = db.execute("SELECT commit_oid FROM refs WHERE repo_id=? AND kind=? AND name=?",
                             (repo.id, kind, revision)).fetchone()
            if row:
                return row[0]
        if COMMIT_RE.match(revision) and db.execute("SELECT 1 FROM commits WHERE oid=? AND repo_id=?",
                                                    (revision, repo.id)).fetchone():
            return revision
        raise StoreError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def create_ref(self, repo: Repo, kind: str, name: str, start: str) -> None:
        if kind == "branch":
            check_branch(name)
        oid = self.resolve(repo, start)
        try:
            self._db().execute("INSERT INTO refs VALUES (?,?,?,?)", (repo.id, kind, name, oid))
        except sqlite3.IntegrityError:
            raise StoreError(409, f"{kind} {name} already exists in {repo.repo_id}") from None

    def delete_ref(self, repo: Repo, kind: str, name: str) -> None:
        if kind == "branch" and name == "main":
            raise StoreError(403, "the main branch cannot be deleted")
        if not self._db().execute("DELETE FROM refs WHERE repo_id=? AND kind=? AND name=?",
                                  (repo.id, kind, name)).rowcount:
            raise StoreError(404, f"{kind} {name} not found in {repo.repo_id}", "RevisionNotFound")

    def files(self, commit_oid: str) -> dict[str, FileEntry]:
        rows = self._db().execute("SELECT path, sha256, size, git_oid, lfs FROM files WHERE commit_oid=? "
                                  "ORDER BY path", (commit_oid,)).fetchall()
        return {r[0]: FileEntry(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows}

    def commit_info(self, oid: str) -> Commit:
        r = self._db().execute("SELECT oid, parent, summary, description, author, created FROM commits WHERE oid=?",
                               (oid,)).fetchone()
        return Commit(*r)

    def history(self, oid: str) -> list[Commit]:
        out = []
        while oid:
            c = self.commit_info(oid)
            out.append(c)
            oid = c.parent
        return out

    def commit(self, repo: Repo, branch: str, *, summary: str, description: str, author: str,
               parent: str | None, add: list[FileEntry], delete: list[str], delete_folders: list[str]) -> str:
        """Apply one commit to ``branch``; 412 when ``parent`` is given and is not the branch head."""
        for e in add:
            if not self.has_blob(e.sha256, e.size):
                raise StoreError(422, f"{e.path}: content {e.sha256} was never uploaded")
        db = self._db()
        with _transaction(db):
            row = db.execute("SELECT commit_oid FROM refs WHERE repo_id=? AND kind='branch' AND name=?",
                             (repo.id, branch)).fetchone()
            if row is None:
                raise StoreError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = row[0]
            if parent is not None and parent != head:
                raise StoreError(412, f"parent commit {parent} is not the head of {branch} ({head}); "
                                      "fetch the branch again and retry")
            tree = self.files(head)
            for path in delete:
                if tree.pop(check_path(path), None) is None:
                    raise StoreError(404, f"cannot delete {path}: not in {branch}", "EntryNotFound")
            for folder in delete_folders:
                prefix = check_path(folder.rstrip("/")) + "/"
                for path in [p for p in tree if p.startswith(prefix)]:
                    del tree[path]
            for e in add:
                check_path(e.path)
                tree[e.path] = e
            oid = self._insert_commit(db, repo, head, summary, description, author, tree)
            db.execute("UPDATE refs SET commit_oid=? WHERE repo_id=? AND kind='branch' AND name=? AND commit_oid=?",
                       (oid, repo.id, branch, head))
        return oid

    def _insert_commit(self, db, repo: Repo, parent: str | None, summary: str, description: str, author: str,
                       tree: dict[str, FileEntry]) -> str:
        created = time.time()
        listing = "".join(f"{e.path}\0{e.git_oid}\n" for e in sorted(tree.values(), key=lambda e: e.path))
        oid = hashlib.sha1(f"repo {repo.id}\nparent {parent}\ntime {created!r}\nauthor {author}\n"
                           f"{summary}\n{description}\n{listing}".encode()).hexdigest()
        db.execute("INSERT INTO commits VALUES (?,?,?,?,?,?,?)",
                   (oid, repo.id, parent, summary, description, author, created))
        db.executemany("INSERT INTO files VALUES (?,?,?,?,?,?)",
                       [(oid, e.path, e.sha256, e.size, e.git_oid, int(e.lfs)) for e in tree.values()])
        return oid


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def read_exact(stream: BinaryIO, size: int, block: int = 1 << 20) -> Iterator[bytes]:
    """Yield exactly ``size`` bytes from ``stream`` (fewer only if it ends early)."""
    left = size
    while left > 0:
        chunk = stream.read(min(block, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
