"""Durable storage for the local hub: content-addressed blobs on disk, metadata in SQLite.

Layout of the data dir::

    hub.sqlite3          repos, commits (each a full snapshot of its files), branches, tags, uploads
    blobs/ab/<sha256>    file contents, written to tmp/ first, verified, then renamed in place
    tmp/                 uploads in progress; emptied at start-up
    git/                 a bare git repository per repo, kept in step by ``GitMirror``
    lock                 held (flock) by the one process that serves this data dir

A commit is one SQLite transaction that checks the branch head it builds on and moves it with
a compare-and-swap, so two commits to different branches never interfere and a stale parent
is refused. A blob becomes visible only through a commit, and a commit may only name blobs
that are completely stored, so a killed server never serves a partial file. ``gc_lock`` is
taken by a commit from its check that its blobs are stored to its end, by a blob moving into
place, and by garbage collection for each removal, so a blob a commit names is never removed.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from quantpub.hub.blobs import BlobWriter, Holds, announce, lock_data_dir
from quantpub.hub.errors import HubError, not_stored
from quantpub.hub.names import (COMMIT_RE, SHA256_RE, check_name, check_namespace, check_path, check_ref,
                               tree_clash)
from quantpub.hub.quota import check_quota

REPO_TYPES = ("model", "dataset", "space")
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
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT NOT NULL, user TEXT NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sha256, user));
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files (sha256);
CREATE INDEX IF NOT EXISTS commits_by_repo ON commits (repo_id);
"""


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
    git_oid: str | None = None


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class Store:
    """All repos of one hub. Thread-safe: one SQLite connection per thread. Holds the data dir's lock."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock_fd: int | None = lock_data_dir(self.root)
        self.blobs, self.tmp = self.root / "blobs", self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():  # uploads cut off by a kill: never referenced by any commit
            leftover.unlink()
        self._local = threading.local()
        self.gc_lock = threading.RLock()
        self.holds = Holds()
        db = self.db()
        db.executescript(SCHEMA)
        if "git_oid" not in {r[1] for r in db.execute("PRAGMA table_info(commits)")}:
            db.execute("ALTER TABLE commits ADD COLUMN git_oid TEXT")
        if "size" not in {r[1] for r in db.execute("PRAGMA table_info(uploads)")}:
            db.execute("ALTER TABLE uploads ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
        db.execute("CREATE INDEX IF NOT EXISTS commits_by_git_oid ON commits (git_oid)")

    def close(self) -> None:
        """Release the data dir (the lock); connections of other threads close with them."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def announce(self, url: str) -> None:
        """Say in the lock file where this hub serves (``quantpub hub gc`` collects through it)."""
        announce(self._lock_fd, url)

    def db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "hub.sqlite3", timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    # blobs
    def blob_path(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
            raise HubError(400, f"invalid sha256 {sha256!r}")
        return self.blobs / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_blob(self, chunks: Iterable[bytes], size: int, expected: str | None = None) -> str:
        """Store exactly ``size`` bytes; verify ``expected`` sha256 before the blob becomes visible."""
        writer = self.blob_writer(size, expected)
        try:
            for chunk in chunks:
                writer.write(chunk)
            return writer.finish()
        finally:
            writer.abort()

    def blob_writer(self, size: int, expected: str | None = None) -> BlobWriter:
        return BlobWriter(self.tmp, self.blob_path, self.gc_lock, size, expected)

    def touch_blob(self, sha256: str) -> bool:
        """Mark a stored blob as recently wanted (garbage collection keeps young blobs); False if gone."""
        with self.gc_lock:
            try:
                os.utime(self.blob_path(sha256))
            except FileNotFoundError:
                return False
        return True

    # repos
    def create_repo(self, type_: str, namespace: str, name: str, private: bool, author: str) -> Repo:
        check_namespace(namespace)
        check_name(name, "repo name")
        db = self.db()
        data = GITATTRIBUTES.encode()
        entry = FileEntry(".gitattributes", hashlib.sha256(data).hexdigest(), len(data), git_blob_oid(data), False)
        with self.holds.hold() as hold:
            hold(entry.sha256)
            self.put_blob([data], len(data))
            with _transaction(db):
                clash = db.execute("SELECT namespace, name FROM repos WHERE type=? AND lower(namespace)=lower(?) "
                                   "AND lower(name)=lower(?)", (type_, namespace, name)).fetchone()
                if clash:
                    raise HubError(409, f"repository {clash[0]}/{clash[1]} already exists")
                cur = db.execute("INSERT INTO repos (type, namespace, name, private, created) VALUES (?,?,?,?,?)",
                                 (type_, namespace, name, int(private), time.time()))
                repo = Repo(cur.lastrowid, type_, namespace, name, private)
                oid = self._insert_commit(db, repo, None, "initial commit", "", author, {entry.path: entry})
                db.execute("INSERT INTO refs VALUES (?, 'branch', 'main', ?)", (repo.id, oid))
        return repo

    def get_repo(self, type_: str, namespace: str, name: str) -> Repo | None:
        row = self.db().execute("SELECT id, type, namespace, name, private FROM repos "
                                 "WHERE type=? AND namespace=? AND name=?", (type_, namespace, name)).fetchone()
        return Repo(row[0], row[1], row[2], row[3], bool(row[4])) if row else None

    def repos(self, type_: str = "model") -> list[tuple[Repo, float]]:
        """Every repo of a type with the time of the last commit on main, newest first."""
        rows = self.db().execute(
            "SELECT r.id, r.type, r.namespace, r.name, r.private, c.created FROM repos r "
            "JOIN refs f ON f.repo_id=r.id AND f.kind='branch' AND f.name='main' JOIN commits c ON c.oid=f.commit_oid "
            "WHERE r.type=? ORDER BY c.created DESC, r.namespace, r.name", (type_,)).fetchall()
        return [(Repo(r[0], r[1], r[2], r[3], bool(r[4])), r[5]) for r in rows]

    def delete_repo(self, repo: Repo) -> None:
        """Forget the repo; its blobs stay until ``quantpub hub gc`` finds them unreferenced."""
        db = self.db()
        with _transaction(db):
            db.execute("DELETE FROM files WHERE commit_oid IN (SELECT oid FROM commits WHERE repo_id=?)", (repo.id,))
            db.execute("DELETE FROM commits WHERE repo_id=?", (repo.id,))
            db.execute("DELETE FROM refs WHERE repo_id=?", (repo.id,))
            db.execute("DELETE FROM repos WHERE id=?", (repo.id,))

    def set_private(self, repo: Repo, private: bool) -> None:
        self.db().execute("UPDATE repos SET private=? WHERE id=?", (int(private), repo.id))

    # who may see a blob
    def blob_owners(self, sha256: str) -> list[tuple[str, bool]]:
        """(namespace, private) of every repo with a commit that references the blob."""
        return [(r[0], bool(r[1])) for r in self.db().execute(
            "SELECT DISTINCT r.namespace, r.private FROM files f JOIN commits c ON c.oid=f.commit_oid "
            "JOIN repos r ON r.id=c.repo_id WHERE f.sha256=?", (sha256,))]

    def repo_has_blob(self, repo: Repo, sha256: str) -> int | None:
        """The size of the blob if a commit of ``repo`` references it, else None."""
        row = self.db().execute("SELECT f.size FROM files f JOIN commits c ON c.oid=f.commit_oid "
                                 "WHERE c.repo_id=? AND f.sha256=? LIMIT 1", (repo.id, sha256)).fetchone()
        return row[0] if row else None

    def record_upload(self, sha256: str, user: str, size: int) -> None:
        self.db().execute("INSERT OR REPLACE INTO uploads (sha256, user, created, size) VALUES (?,?,?,?)",
                           (sha256, user, time.time(), size))

    def uploaded_by(self, sha256: str, user: str) -> bool:
        return self.db().execute("SELECT 1 FROM uploads WHERE sha256=? AND user=?", (sha256, user)).fetchone() \
            is not None

    # refs and commits
    def refs(self, repo: Repo, kind: str) -> list[tuple[str, str]]:
        return self.db().execute("SELECT name, commit_oid FROM refs WHERE repo_id=? AND kind=? ORDER BY name",
                                  (repo.id, kind)).fetchall()

    def resolve(self, repo: Repo, revision: str) -> str:
        """Full commit id (the hub's or the git mirror's), then branch, then tag -> commit id."""
        db = self.db()
        if isinstance(revision, str) and COMMIT_RE.fullmatch(revision):
            row = db.execute("SELECT oid FROM commits WHERE repo_id=? AND (oid=? OR git_oid=?)",
                             (repo.id, revision, revision)).fetchone()
            if row:
                return row[0]
        for kind in ("branch", "tag"):
            row = db.execute("SELECT commit_oid FROM refs WHERE repo_id=? AND kind=? AND name=?",
                             (repo.id, kind, revision)).fetchone()
            if row:
                return row[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def create_ref(self, repo: Repo, kind: str, name: str, start: str) -> None:
        """A new branch or tag at ``start``; refused if any branch or tag already has the name."""
        check_ref(kind, name)
        db = self.db()
        with _transaction(db):
            oid = self.resolve(repo, start)
            row = db.execute("SELECT kind FROM refs WHERE repo_id=? AND name=?", (repo.id, name)).fetchone()
            if row:
                raise HubError(409, f"{kind} {name!r} would clash with the {row[0]} of that name in {repo.repo_id}")
            db.execute("INSERT INTO refs VALUES (?,?,?,?)", (repo.id, kind, name, oid))

    def delete_ref(self, repo: Repo, kind: str, name: str) -> None:
        if kind == "branch" and name == "main":
            raise HubError(403, "the main branch cannot be deleted")
        if not self.db().execute("DELETE FROM refs WHERE repo_id=? AND kind=? AND name=?",
                                  (repo.id, kind, name)).rowcount:
            raise HubError(404, f"{kind} {name} not found in {repo.repo_id}", "RevisionNotFound")

    def files(self, commit_oid: str) -> dict[str, FileEntry]:
        rows = self.db().execute("SELECT path, sha256, size, git_oid, lfs FROM files WHERE commit_oid=? "
                                  "ORDER BY path", (commit_oid,)).fetchall()
        return {r[0]: FileEntry(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows}

    def commit_info(self, oid: str) -> Commit:
        r = self.db().execute("SELECT oid, parent, summary, description, author, created, git_oid FROM commits "
                               "WHERE oid=?", (oid,)).fetchone()
        return Commit(*r)

    def set_git_oid(self, oid: str, git_oid: str) -> None:
        self.db().execute("UPDATE commits SET git_oid=? WHERE oid=?", (git_oid, oid))

    def history(self, oid: str, limit: int = 1000) -> list[Commit]:
        out = []
        while oid and len(out) < limit:
            c = self.commit_info(oid)
            out.append(c)
            oid = c.parent
        return out

    def commit(self, repo: Repo, branch: str, *, summary: str, description: str, author: str,
               parent: str | None, add: list[FileEntry], delete: list[str], delete_folders: list[str],
               quota: int | None = None) -> str:
        """Apply one commit to ``branch``; 412 when ``parent`` is given and is not the branch head, 413
        when the repo's namespace would store more than ``quota`` bytes."""
        for e in add:
            check_path(e.path)
        db = self.db()
        with self.gc_lock, _transaction(db):
            for e in add:
                if not self.has_blob(e.sha256, e.size):
                    raise not_stored(e.path, e.sha256)
            if quota is not None:
                check_quota(db, quota, repo.namespace, {e.sha256: e.size for e in add})
            row = db.execute("SELECT commit_oid FROM refs WHERE repo_id=? AND kind='branch' AND name=?",
                             (repo.id, branch)).fetchone()
            if row is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = row[0]
            if parent is not None and parent != head:
                raise HubError(412, f"parent commit {parent} is not the head of {branch} ({head}); "
                                    "fetch the branch again and retry")
            tree = self.files(head)
            for path in delete:  # any stored path may go, also one that today's rules would refuse
                if tree.pop(path, None) is None:
                    raise HubError(404, f"cannot delete {path}: not in {branch}", "EntryNotFound")
            for folder in delete_folders:
                prefix = folder.rstrip("/") + "/"
                for path in [p for p in tree if p.startswith(prefix)]:
                    del tree[path]
            for e in add:
                tree[e.path] = e
            clash = tree_clash(tree)
            if clash:
                raise HubError(400, f"{clash[0]} would be both a file and the folder of {clash[1]} in {branch}; "
                                    f"git cannot store that: delete {clash[0]} in the same commit, or rename one")
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
        db.execute("INSERT INTO commits (oid, repo_id, parent, summary, description, author, created) "
                   "VALUES (?,?,?,?,?,?,?)", (oid, repo.id, parent, summary, description, author, created))
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
