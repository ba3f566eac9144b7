"""A bare git repository per hub repo, kept in step with the store, served by ``git http-backend``.

Every hub commit becomes a git commit with the same files (LFS files as LFS pointers, so
``git lfs pull`` fetches them through the LFS batch API), author and time; branches and tags
become ``refs/heads`` and ``refs/tags``. The store is the truth: the mirror is brought in step
after every change and for every repo at start-up (a kill between the two loses nothing).
Only fetches are served (``git-upload-pack``); pushes go through the API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from quantpub.hub.bodies import body_chunks
from quantpub.hub.errors import HubError
from quantpub.hub.store import Commit, Repo, Store, lfs_pointer

log = logging.getLogger(__name__)
GIT_TIMEOUT = 600
MAX_NEGOTIATION = 32 << 20  # upload-pack request bodies (wants and haves) are small


class GitMirror:
    """Bare repos under ``DATA_DIR/git/<type>/<namespace>/<name>.git``."""

    def __init__(self, store: Store):
        self.store = store
        self.root = store.root / "git"
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, repo: Repo) -> Path:
        return self.root / repo.type / repo.namespace / f"{repo.name}.git"

    def _git(self, repo: Repo, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
        proc = subprocess.run(["git", *args], input=input, capture_output=True, cwd=self.path(repo),
                              env={**os.environ, "GIT_DIR": str(self.path(repo)), **(env or {})}, timeout=GIT_TIMEOUT)
        if proc.returncode:
            raise RuntimeError(f"git {args[0]} failed in {self.path(repo)}: {proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode()

    def sync(self, repo: Repo) -> None:
        """Make the mirror's refs equal the store's: write missing commits, move and drop refs."""
        with self._guard:
            lock = self._locks.setdefault(repo.id, threading.Lock())
        with lock:
            path = self.path(repo)
            if not (path / "HEAD").exists():
                path.mkdir(parents=True, exist_ok=True)
                subprocess.run(["git", "init", "--bare", "--quiet", "--initial-branch=main", str(path)], check=True,
                               capture_output=True)
                self._git(repo, "config", "uploadpack.allowFilter", "true")
            want = {f"refs/heads/{n}": self._ensure(repo, c) for n, c in self.store.refs(repo, "branch")}
            want |= {f"refs/tags/{n}": self._ensure(repo, c) for n, c in self.store.refs(repo, "tag")}
            have = dict(line.split(" ", 1)[::-1] for line in
                        self._git(repo, "for-each-ref", "--format=%(objectname) %(refname)").splitlines())
            ops = [f"update {ref} {oid}" for ref, oid in want.items() if have.get(ref) != oid]
            ops += [f"delete {ref}" for ref in have if ref not in want]
            if ops:
                self._git(repo, "update-ref", "--stdin", input=("\n".join(ops) + "\n").encode())

    def remove(self, repo: Repo) -> None:
        shutil.rmtree(self.path(repo), ignore_errors=True)

    def sync_all(self) -> None:
        """Bring every repo's mirror in step (at start-up), and remove mirrors of repos that are gone."""
        known = set()
        for type_ in ("model", "dataset", "space"):
            for repo, _ in self.store.repos(type_):
                known.add(self.path(repo))
                try:
                    self.sync(repo)
                except RuntimeError as exc:
                    log.error("the git mirror of %s is behind the API: %s", repo.repo_id, exc)
        for git_dir in self.root.glob("*/*/*.git"):
            if git_dir not in known:
                shutil.rmtree(git_dir, ignore_errors=True)

    def _ensure(self, repo: Repo, oid: str) -> str:
        """The git commit of hub commit ``oid``, written (with its ancestors) if missing."""
        chain: list[Commit] = []
        while oid:
            c = self.store.commit_info(oid)
            if c.git_oid and self._exists(repo, c.git_oid):
                break
            chain.append(c)
            oid = c.parent
        parent_git = self.store.commit_info(oid).git_oid if oid else None
        for c in reversed(chain):
            parent_git = self._write_commit(repo, c, parent_git)
            self.store.set_git_oid(c.oid, parent_git)
        return parent_git

    def _exists(self, repo: Repo, git_oid: str) -> bool:
        return self._git(repo, "cat-file", "--batch-check", input=f"{git_oid}\n".encode()).split()[1] == "commit"

    def _write_commit(self, repo: Repo, c: Commit, parent_git: str | None) -> str:
        files = self.store.files(c.oid)
        listed = self._git(repo, "cat-file", "--batch-check",
                           input="".join(f"{e.git_oid}\n" for e in files.values()).encode())
        missing = {line.split()[0] for line in listed.splitlines() if line.endswith(" missing")}
        with tempfile.TemporaryDirectory(dir=self.store.tmp) as tmp:
            paths = []
            for e in files.values():
                if e.git_oid not in missing:
                    continue
                if e.lfs:
                    p = Path(tmp) / e.git_oid
                    p.write_bytes(lfs_pointer(e.sha256, e.size))
                    paths.append(str(p))
                else:
                    paths.append(str(self.store.blob_path(e.sha256)))
                missing.discard(e.git_oid)
            if paths:
                self._git(repo, "hash-object", "-w", "--no-filters", "--stdin-paths",
                          input=("\n".join(paths) + "\n").encode())
            index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            # -z: paths verbatim (a line-based list would unquote a path such as '"q"'); git skips a path
            # it refuses with only a warning, so the tree is checked against the commit's files after
            self._git(repo, "-c", "core.protectNTFS=true", "-c", "core.protectHFS=true", "update-index", "--add",
                      "-z", "--index-info", env=index,
                      input="".join(f"100644 {e.git_oid}\t{e.path}\0" for e in files.values()).encode())
            tree = self._git(repo, "write-tree", env=index).strip()
        stored = self._git(repo, "ls-tree", "-r", "-z", "--name-only", tree).split("\0")[:-1]
        if sorted(stored) != sorted(files):
            lost = sorted(set(files) - set(stored))
            raise RuntimeError(f"git cannot store {lost[:5]} of {repo.repo_id} commit {c.oid}: the mirror would "
                               "differ from the API; delete those files through the API")
        when = f"{int(c.created)} +0000"
        who = {"GIT_AUTHOR_NAME": c.author, "GIT_AUTHOR_EMAIL": f"{c.author}@quantpub.hub", "GIT_AUTHOR_DATE": when,
               "GIT_COMMITTER_NAME": c.author, "GIT_COMMITTER_EMAIL": f"{c.author}@quantpub.hub",
               "GIT_COMMITTER_DATE": when}
        message = (c.summary + ("\n\n" + c.description if c.description else "")).replace("\0", "") or "(no message)"
        args = ["commit-tree", tree, "-F", "-"] + (["-p", parent_git] if parent_git else [])
        return self._git(repo, *args, input=message.encode(), env=who).strip()


async def http_backend(request: Request, mirror: GitMirror, repo: Repo, service_path: str) -> Response:
    """Run ``git http-backend`` (CGI) for a fetch: ``info/refs?service=git-upload-pack`` or ``git-upload-pack``."""
    query = request.url.query
    if service_path == "info/refs":
        if request.method not in ("GET", "HEAD") or query != "service=git-upload-pack":
            raise HubError(403, "this hub serves git fetches only (smart HTTP, git-upload-pack); push through the API")
    elif service_path != "git-upload-pack" or request.method != "POST":
        raise HubError(403, "this hub serves git fetches only (git-upload-pack); push through the API")
    git_dir = mirror.path(repo)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": str(git_dir.parent),
           "PATH_INFO": f"/{git_dir.name}/{service_path}", "REQUEST_METHOD": request.method,
           "QUERY_STRING": query, "GIT_HTTP_EXPORT_ALL": "1", "REMOTE_ADDR": "127.0.0.1",
           "CONTENT_TYPE": request.headers.get("content-type", "")}
    for header in ("content-length", "content-encoding", "git-protocol"):
        if header in request.headers:
            env["HTTP_" + header.upper().replace("-", "_")] = request.headers[header]
    if "content-length" in request.headers:
        env["CONTENT_LENGTH"] = request.headers["content-length"]
    proc = await asyncio.create_subprocess_exec("git", "http-backend", env=env, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        async for chunk in body_chunks(request, MAX_NEGOTIATION):
            proc.stdin.write(chunk)
            await proc.stdin.drain()
        proc.stdin.close()
        head = await asyncio.wait_for(proc.stdout.readuntil(b"\r\n\r\n"), GIT_TIMEOUT)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    status, headers = 200, {}
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.split()[0])
        elif name and name.lower() in ("content-type", "cache-control", "expires", "pragma"):
            headers[name] = value.strip()

    async def body():
        try:
            while chunk := await asyncio.wait_for(proc.stdout.read(1 << 16), GIT_TIMEOUT):
                yield chunk
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    return StreamingResponse(body(), status_code=status, headers=headers)
