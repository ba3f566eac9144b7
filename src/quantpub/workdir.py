"""The work dir: one run at a time (a lock naming its holder), and no half-built directory read as a result."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from quantpub.errors import QuantpubError

LOCK = "run.lock"


class WorkLock:
    """An exclusive ``flock`` on ``WORK/run.lock``, which records the holder's pid, host and start time.

    The kernel drops the lock when its process dies, so a lock left by a killed run is simply
    taken over by the next one.
    """

    _held: dict[Path, int] = {}  # lock files this process holds, and how many times (re-entering is free)

    def __init__(self, work: str | Path):
        self.path = (Path(work) / LOCK).resolve()
        self.fd: int | None = None

    def __enter__(self) -> WorkLock:
        if self.path in WorkLock._held:
            WorkLock._held[self.path] += 1
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise QuantpubError(f"--work {self.path.parent}: cannot create {LOCK} ({exc.strerror}); "
                                "choose a writable --work") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise QuantpubError(f"--work {self.path.parent}: in use by another quantpub run ({holder}); wait for it "
                                "to finish, or use another --work") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n", 0)
        self.fd = fd
        WorkLock._held[self.path] = 1
        return self

    def __exit__(self, *exc) -> None:
        WorkLock._held[self.path] -= 1
        if WorkLock._held[self.path] == 0 and self.fd is not None:
            del WorkLock._held[self.path]
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def remove_partials(out: Path) -> int:
    """Delete ``.partial-*`` build directories (a killed run's unfinished variants); returns how many."""
    removed = 0
    for path in Path(out).glob(".partial-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
