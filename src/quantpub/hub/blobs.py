"""The files of a data dir: its lock, blobs written whole before they appear, and the blobs held by
requests in progress (which garbage collection leaves alone)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from quantpub.hub.errors import HubError, HubLockedError


def lock_data_dir(root: Path) -> int:
    """Take ``root/lock`` (flock, released when the process ends); HubLockedError if taken.

    The lock file holds the holder's pid, and once it serves, its URL (``announce``), so that
    ``quantpub hub gc`` can collect through a running hub."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").split()
        os.close(fd)
        pid, url = (holder + ["unknown"])[0], holder[1] if len(holder) > 1 else None
        raise HubLockedError(f"{root} is in use by another quantpub hub process (pid {pid}"
                             + (f", serving {url}" if url else "") + "); stop it first, or use another --data-dir",
                             url=url) from None
    announce(fd, None)
    return fd


def announce(fd: int, url: str | None) -> None:
    """Write this process's pid (and the URL it serves) into the lock file ``fd``."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{url or ''}\n".encode(), 0)


class Holds:
    """sha256s that requests in progress have stored or named and not yet committed."""

    def __init__(self):
        self._lock, self._count = threading.Lock(), Counter()

    @contextmanager
    def hold(self) -> Iterator[Callable[[str], None]]:
        """Yields ``add(sha256)``: each sha256 added stays held until the block ends."""
        held: set[str] = set()

        def add(sha: str) -> None:
            with self._lock:
                if sha not in held:
                    held.add(sha)
                    self._count[sha] += 1
        try:
            yield add
        finally:
            with self._lock:
                for sha in held:
                    self._count[sha] -= 1
                    if not self._count[sha]:
                        del self._count[sha]

    def __contains__(self, sha: str) -> bool:
        with self._lock:
            return sha in self._count


class BlobWriter:
    """One blob being written to ``tmp/``: ``write`` chunks, then ``finish`` (verify, rename) or ``abort``."""

    def __init__(self, tmp: Path, blob_path: Callable[[str], Path], lock, size: int, expected: str | None):
        """``blob_path(sha256)``: where the blob goes; ``lock``: taken for the rename (the store's gc_lock)."""
        self.blob_path, self.lock, self.size, self.expected = blob_path, lock, size, expected
        self.tmp = tmp / uuid.uuid4().hex
        self.fh = self.tmp.open("wb")
        self.digest, self.written = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.size:
            raise HubError(400, f"upload is longer than the announced {self.size} bytes")
        self.digest.update(chunk)
        self.fh.write(chunk)

    def finish(self) -> str:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if self.written != self.size:
            raise HubError(400, f"upload ended after {self.written} of {self.size} bytes")
        sha = self.digest.hexdigest()
        if self.expected is not None and sha != self.expected:
            raise HubError(400, f"content sha256 {sha} does not match {self.expected}")
        final = self.blob_path(sha)
        final.parent.mkdir(exist_ok=True)
        with self.lock:  # garbage collection sees the blob either gone or fresh
            os.replace(self.tmp, final)
        fsync_dir(final.parent)
        return sha

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
