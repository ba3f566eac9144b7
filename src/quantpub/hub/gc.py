"""``quantpub hub gc``: find, and on request delete, blobs that no commit references.

Blobs of refused or abandoned commits, of LFS uploads never committed and of deleted repos
stay on disk until this runs. It takes the data dir's lock, so it never runs beside a server,
and it keeps blobs younger than ``min_age`` seconds (an upload whose commit may still come).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from quantpub.hub.git import GitMirror
from quantpub.hub.store import Store


@dataclass
class GcReport:
    unreferenced: list[Path]
    bytes: int
    deleted: bool
    kept_recent: int

    def __str__(self) -> str:
        size = f"{len(self.unreferenced)} unreferenced blobs, {self.bytes / 1e6:.1f} MB"
        recent = f" ({self.kept_recent} younger than the minimum age kept)" if self.kept_recent else ""
        if self.deleted:
            return f"removed {size}{recent}"
        return f"would remove {size}{recent}; dry run: pass --delete to remove them"


def collect(data_dir: str | Path, *, delete: bool = False, min_age: float = 3600.0) -> GcReport:
    store = Store(data_dir)
    try:
        db = store._db()
        referenced = {row[0] for row in db.execute("SELECT DISTINCT sha256 FROM files")}
        now, found, total, recent = time.time(), [], 0, 0
        for path in sorted(store.blobs.glob("*/*")):
            if path.name in referenced:
                continue
            stat = path.stat()
            if now - stat.st_mtime < min_age:
                recent += 1
                continue
            found.append(path)
            total += stat.st_size
        if delete:
            for path in found:
                path.unlink(missing_ok=True)
                db.execute("DELETE FROM uploads WHERE sha256=?", (path.name,))
            known = {(r.type, r.namespace, r.name) for r, _ in store.repos("model") + store.repos("dataset")
                     + store.repos("space")}
            mirror = GitMirror(store)
            for git_dir in mirror.root.glob("*/*/*.git"):
                if (git_dir.parts[-3], git_dir.parts[-2], git_dir.name[:-4]) not in known:
                    shutil.rmtree(git_dir, ignore_errors=True)
        return GcReport(found, total, delete, recent)
    finally:
        store.close()
