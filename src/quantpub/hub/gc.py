"""Garbage collection: blobs that no commit references, older than a minimum age, found and removed.

Blobs of refused or abandoned commits, of LFS uploads never committed and of deleted repos stay on
disk until this runs: by hand (``quantpub hub gc``, through a running hub or on a stopped one) or
every ``gc_every`` seconds in a running hub (``Sweeper``). It is safe beside serving: each removal
re-checks, under the store's ``gc_lock``, that no commit references the blob, that no request in
progress holds it and that it is still old, while a commit checks its blobs and lands under the
same lock; so a blob named by a commit that lands during collection is never removed. The
minimum age protects an upload whose commit is still to come (huggingface_hub uploads every
file of a commit before committing: give it the longest upload's time).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantpub import formatting
from quantpub.hub.store import Store

log = logging.getLogger(__name__)
BATCH = 256  # blobs re-checked and removed per hold of the store's lock


@dataclass
class GcReport:
    unreferenced: list[str] = field(default_factory=list)  # sha256 of the blobs removed (or to remove)
    bytes: int = 0
    deleted: bool = False
    kept_recent: int = 0
    kept_committed: int = 0  # candidates that a commit (or a request in progress) took before their removal

    def __str__(self) -> str:
        size = f"{len(self.unreferenced)} unreferenced blobs, {formatting.size(self.bytes)}"
        recent = f" ({self.kept_recent} younger than the minimum age kept)" if self.kept_recent else ""
        if self.deleted:
            return f"removed {size}{recent}"
        return f"would remove {size}{recent}; dry run: pass --delete to remove them"

    def to_dict(self) -> dict:
        return asdict(self)


def collect(store: Store, *, delete: bool = False, min_age: float = 24 * 3600.0) -> GcReport:
    """Find (and with ``delete`` remove) blobs that no commit references and are ``min_age`` seconds old."""
    db = store.db()
    referenced = {row[0] for row in db.execute("SELECT DISTINCT sha256 FROM files")}
    report, now, candidates = GcReport(deleted=delete), time.time(), []
    for path in sorted(store.blobs.glob("*/*")):
        if path.name in referenced or path.name in store.holds:
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if now - stat.st_mtime < min_age:
            report.kept_recent += 1
        else:
            candidates.append((path, stat.st_size))
    if not delete:
        report.unreferenced, report.bytes = [p.name for p, _ in candidates], sum(s for _, s in candidates)
        return report
    for start in range(0, len(candidates), BATCH):
        with store.gc_lock:
            for path, size in candidates[start:start + BATCH]:
                if not _still_garbage(store, path, min_age):
                    report.kept_committed += 1
                    continue
                path.unlink()
                db.execute("DELETE FROM uploads WHERE sha256=?", (path.name,))
                report.unreferenced.append(path.name)
                report.bytes += size
    return report


def _still_garbage(store: Store, path: Path, min_age: float) -> bool:
    """Under the store's lock: unreferenced, not held, and still old (an upload may have renewed it)."""
    if path.name in store.holds or store.db().execute("SELECT 1 FROM files WHERE sha256=? LIMIT 1",
                                                      (path.name,)).fetchone():
        return False
    try:
        return time.time() - path.stat().st_mtime >= min_age
    except FileNotFoundError:
        return False


def collect_offline(data_dir: str | Path, *, delete: bool = False, min_age: float = 24 * 3600.0) -> GcReport:
    """``collect`` over a data dir no hub serves (takes its lock: HubLockedError if one does)."""
    store = Store(data_dir)
    try:
        return collect(store, delete=delete, min_age=min_age)
    finally:
        store.close()


class Sweeper:
    """A running hub's automatic collection: every ``every`` seconds, blobs ``min_age`` seconds old."""

    def __init__(self, store: Store, every: float, min_age: float):
        self.store, self.every, self.min_age = store, every, min_age

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.every):
            try:
                report = collect(self.store, delete=True, min_age=self.min_age)
            except Exception:  # noqa: BLE001 - a failed sweep is logged; the next one tries again
                log.exception("garbage collection failed")
                continue
            if report.unreferenced:
                log.info("garbage collection: %s", report)
