"""The run ledger: one SQLite row per (model, variant), its state, attempts, error, timings, hashes.

States move forward only: planned -> validated -> evaluated -> carded -> published; any step
may end in failed (with the error and the attempt count). The ledger lives in the work dir on
the machine that drives the run; executors report back to it, they never write it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("planned", "validated", "evaluated", "carded", "published", "failed")
SCHEMA = """
CREATE TABLE IF NOT EXISTS variants (
    model TEXT NOT NULL, variant TEXT NOT NULL, method TEXT NOT NULL, repo TEXT NOT NULL, target TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, size INTEGER, manifest_sha256 TEXT,
    commit_oid TEXT, timings TEXT NOT NULL DEFAULT '{}', tools TEXT NOT NULL DEFAULT '{}', updated REAL NOT NULL,
    PRIMARY KEY (model, variant));
"""


@dataclass(frozen=True)
class Row:
    model: str
    variant: str
    method: str
    repo: str
    target: str
    state: str
    attempts: int
    error: str | None
    size: int | None
    manifest_sha256: str | None
    commit_oid: str | None
    timings: dict[str, float]
    tools: dict[str, str]


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def plan(self, model: str, variant: str, method: str, repo: str, target: str) -> None:
        """Add a planned row unless the variant is already known (a re-run keeps its history)."""
        self.db.execute("INSERT OR IGNORE INTO variants (model, variant, method, repo, target, state, updated) "
                        "VALUES (?,?,?,?,?, 'planned', ?)", (model, variant, method, repo, target, time.time()))

    def get(self, model: str, variant: str) -> Row:
        r = self.db.execute("SELECT model, variant, method, repo, target, state, attempts, error, size, "
                            "manifest_sha256, commit_oid, timings, tools FROM variants WHERE model=? AND variant=?",
                            (model, variant)).fetchone()
        if r is None:
            raise KeyError(f"{model} {variant} is not in the ledger {self.path}")
        return Row(*r[:11], json.loads(r[11]), json.loads(r[12]))

    def rows(self, model: str | None = None) -> list[Row]:
        keys = self.db.execute("SELECT model, variant FROM variants" + (" WHERE model=?" if model else "") +
                               " ORDER BY rowid", (model,) if model else ()).fetchall()
        return [self.get(m, v) for m, v in keys]

    def advance(self, model: str, variant: str, state: str, *, expect: tuple[str, ...] | None = None,
                **fields: Any) -> None:
        """Move a variant to ``state``; with ``expect``, refuse unless it is in one of those states."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        row = self.get(model, variant)
        if expect is not None and row.state not in expect:
            raise RuntimeError(f"{model} {variant}: expected state {' or '.join(expect)}, got {row.state}")
        sets, values = ["state=?", "updated=?"], [state, time.time()]
        for key, value in fields.items():
            if key == "timings":
                value = json.dumps({**row.timings, **value})
            elif key == "tools":
                value = json.dumps(value)
            sets.append(f"{key}=?")
            values.append(value)
        if state != "failed":
            sets.append("error=NULL")
        self.db.execute(f"UPDATE variants SET {', '.join(sets)} WHERE model=? AND variant=?",
                        (*values, model, variant))

    def fail(self, model: str, variant: str, error: str) -> None:
        self.db.execute("UPDATE variants SET state='failed', error=?, updated=? "
                        "WHERE model=? AND variant=?", (error[-2000:], time.time(), model, variant))

    def attempt(self, model: str, variant: str) -> None:
        self.db.execute("UPDATE variants SET attempts=attempts+1 WHERE model=? AND variant=?", (model, variant))


def render(rows: list[Row]) -> str:
    """The ``quantpub status`` table."""
    header = ("model", "variant", "state", "tries", "size", "commit", "error")
    lines = [(r.model.rstrip("/").rsplit("/", 1)[-1], r.variant, r.state, str(r.attempts),
              f"{r.size / 1e6:.1f} MB" if r.size else "-", (r.commit_oid or "-")[:10],
              (r.error or "").splitlines()[0][:60] if r.error else "") for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines]
    counts = {s: sum(r.state == s for r in rows) for s in STATES if any(r.state == s for r in rows)}
    out.append(", ".join(f"{n} {s}" for s, n in counts.items()) or "no variants")
    return "\n".join(out)
