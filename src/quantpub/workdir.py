"""The work dir: one run at a time (a lock naming its holder), and no half-built directory read as a result."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from quantpub.errors import MachineError, QuantpubError

LOCK = "run.lock"
WORK_ID = ".quantpub-work-id"


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
            raise MachineError(f"--work {self.path.parent}: in use by another quantpub run ({holder}); wait for it "
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


def run_in_progress(work: str | Path) -> bool:
    """Whether a quantpub run holds ``work``'s lock now (its driver is alive; a killed driver's lock is free)."""
    path = Path(work) / LOCK
    if path.resolve() in WorkLock._held:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock, if it was taken
    return False


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


def work_id(work: str | Path) -> str:
    """This work dir's identity (made once, by the driver): every stage checks it sees the same one."""
    path = Path(work) / WORK_ID
    if not path.is_file():
        tmp = path.with_name(f"{WORK_ID}.{os.getpid()}.partial")
        tmp.write_text(os.urandom(16).hex() + "\n")
        os.replace(tmp, path)
    return path.read_text().strip()


def check_shared(work: str | Path, expected: str) -> None:
    """Raise unless ``work`` here is the driver's work dir (on another node: a shared filesystem at the same path).

    Raises:
        QuantpubError: the work dir is missing or is another one on this node.
    """
    path = Path(work) / WORK_ID
    try:
        found = path.read_text().strip()
    except OSError:
        found = None
    if found != expected:
        raise QuantpubError(f"the work dir {work} on node {socket.gethostname()} is not the driver's "
                            f"({'missing' if found is None else 'another one'}): every node of the cluster must see "
                            "the work dir at the same path, on a shared filesystem")
