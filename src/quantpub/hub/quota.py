"""Storage per namespace: what its repos hold, what an upload or a commit would add, the quota."""

from __future__ import annotations

import sqlite3

from quantpub.formatting import size
from quantpub.hub.errors import HubError

_REFERENCED_IN = ("SELECT 1 FROM files f JOIN commits c ON c.oid=f.commit_oid JOIN repos r ON r.id=c.repo_id "
                  "WHERE f.sha256=? AND r.namespace=? LIMIT 1")


def namespace_usage(db: sqlite3.Connection, namespace: str) -> int:
    """Bytes of the distinct blobs that commits of the namespace's repos reference (history included)."""
    return db.execute("SELECT coalesce(sum(size), 0) FROM (SELECT DISTINCT f.sha256, f.size FROM files f "
                      "JOIN commits c ON c.oid=f.commit_oid JOIN repos r ON r.id=c.repo_id WHERE r.namespace=?)",
                      (namespace,)).fetchone()[0]


def new_in_namespace(db: sqlite3.Connection, namespace: str, blobs: dict[str, int]) -> int:
    """Bytes that ``blobs`` ({sha256: size}) add to the namespace: those none of its commits references."""
    return sum(size for sha, size in blobs.items() if not db.execute(_REFERENCED_IN, (sha, namespace)).fetchone())


def pending_uploads(db: sqlite3.Connection, user: str) -> int:
    """Bytes ``user`` uploaded through LFS that no commit references yet."""
    return db.execute("SELECT coalesce(sum(size), 0) FROM uploads u WHERE user=? AND NOT EXISTS "
                      "(SELECT 1 FROM files f WHERE f.sha256=u.sha256)", (user,)).fetchone()[0]


def check_quota(db: sqlite3.Connection, quota: int, namespace: str, blobs: dict[str, int], pending: int = 0) -> None:
    """413 when storing ``blobs`` ({sha256: size}; plus ``pending`` bytes not yet committed) would take
    the namespace past ``quota`` bytes."""
    used, adding = namespace_usage(db, namespace) + pending, new_in_namespace(db, namespace, blobs)
    if used + adding > quota:
        raise HubError(413, f"storage quota of {namespace} exceeded: {size(used)} stored and "
                            f"{size(adding)} more would pass {size(quota)}; delete repos you no longer "
                            "need, or ask the hub's operator for a larger quota", "StorageQuotaExceeded")
