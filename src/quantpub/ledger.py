"""The run ledger: SQLite state of every (model, variant) and of every stage a run started.

Variants move forward only: planned -> validated -> evaluated -> carded -> published; a build
may end in failed (an exception: the error, its log file and the attempt count) or crashed (native
code killed its process: the signal, the phase and the log). ``attempts`` counts failures and
crashes of the variant itself; a kill from outside or a lost worker is an ``interruption`` and
never uses up an attempt. Stages (prepare, quantize groups, evaluate, publish) are recorded per try with
start and end time and where they ran (node, GPU, pid), so utilisation can be computed from
the ledger alone. The ledger lives in the work dir; only the driver writes it. Every write is
one SQLite transaction (WAL, synchronous=FULL): a kill or a full disk never leaves it half-written.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("planned", "validated", "evaluated", "carded", "published", "failed", "crashed")
DONE = ("validated", "evaluated", "carded", "published")
FAILED = ("failed", "crashed")  # the variant's own failure: an attempt used
# how a stage try ended: done, failed (raised), crashed (a crash signal), killed (from outside), lost (no signal
# known: the node or worker vanished), interrupted (the driver stopped or died while it ran)
STAGE_STATES = ("running", "done", "failed", "crashed", "killed", "lost", "interrupted")
SCHEMA = """
CREATE TABLE IF NOT EXISTS variants (
    model TEXT NOT NULL, variant TEXT NOT NULL, method TEXT NOT NULL, repo TEXT NOT NULL, target TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, size INTEGER, manifest_sha256 TEXT,
    commit_oid TEXT, timings TEXT NOT NULL DEFAULT '{}', tools TEXT NOT NULL DEFAULT '{}', updated REAL NOT NULL,
    PRIMARY KEY (model, variant));
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started REAL NOT NULL, ended REAL, pid INTEGER NOT NULL, host TEXT NOT NULL,
    executor TEXT NOT NULL, exit_code INTEGER);
CREATE TABLE IF NOT EXISTS stages (
    id INTEGER PRIMARY KEY, run INTEGER NOT NULL, model TEXT NOT NULL, stage TEXT NOT NULL, try INTEGER NOT NULL,
    state TEXT NOT NULL, started REAL NOT NULL, ended REAL, node TEXT, gpu TEXT, pid INTEGER, error TEXT, log TEXT);
"""
# Columns added after the first release; a ledger from an older quantpub gains them on open.
ADDED_COLUMNS = {"interruptions": "INTEGER NOT NULL DEFAULT 0", "metrics": "TEXT NOT NULL DEFAULT '{}'",
                 "log": "TEXT"}
VARIANT_COLUMNS = ("model", "variant", "method", "repo", "target", "state", "attempts", "error", "size",
                   "manifest_sha256", "commit_oid", "timings", "tools", "interruptions", "metrics", "log", "updated")


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
    interruptions: int = 0
    metrics: dict[str, Any] | None = None  # measured quality (perplexity, kld, ...) from the manifest
    log: str | None = None  # the log file of the last failure or interruption
    updated: float = 0.0


@dataclass(frozen=True)
class StageRow:
    id: int
    run: int
    model: str
    stage: str
    attempt: int
    state: str
    started: float
    ended: float | None
    node: str | None
    gpu: str | None
    pid: int | None
    error: str | None
    log: str | None


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.interrupted_stages: list[tuple[str, str, str | None]] = []  # filled by start_run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(variants)")}
        for name, decl in ADDED_COLUMNS.items():
            if name not in have:
                self.db.execute(f"ALTER TABLE variants ADD COLUMN {name} {decl}")

    def close(self) -> None:
        self.db.close()

    # variants

    def plan(self, model: str, variant: str, method: str, repo: str, target: str) -> None:
        """Add a planned row unless the variant is already known (a re-run keeps its history)."""
        self.db.execute("INSERT OR IGNORE INTO variants (model, variant, method, repo, target, state, updated) "
                        "VALUES (?,?,?,?,?, 'planned', ?)", (model, variant, method, repo, target, time.time()))

    def get(self, model: str, variant: str) -> Row:
        r = self.db.execute(f"SELECT {', '.join(VARIANT_COLUMNS)} FROM variants WHERE model=? AND variant=?",
                            (model, variant)).fetchone()
        if r is None:
            raise KeyError(f"{model} {variant} is not in the ledger {self.path}")
        return _row(r)

    def rows(self, model: str | None = None) -> list[Row]:
        query = f"SELECT {', '.join(VARIANT_COLUMNS)} FROM variants" + (" WHERE model=?" if model else "")
        return [_row(r) for r in self.db.execute(query + " ORDER BY rowid", (model,) if model else ())]

    def models(self) -> list[str]:
        return [m for (m,) in self.db.execute("SELECT model FROM variants GROUP BY model ORDER BY min(rowid)")]

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
            elif key in ("tools", "metrics"):
                value = json.dumps(value)
            sets.append(f"{key}=?")
            values.append(value)
        if state not in FAILED:
            sets += ["error=NULL", "log=NULL"]
        self.db.execute(f"UPDATE variants SET {', '.join(sets)} WHERE model=? AND variant=?",
                        (*values, model, variant))

    def fail(self, model: str, variant: str, error: str, log: str | None = None, *, state: str = "failed",
             attempts_at_least: int = 0) -> None:
        """A failure (``state`` failed) or crash (``crashed``) of the variant itself: it uses up one attempt,
        and with ``attempts_at_least`` at least that many (a repeated identical crash uses up all of them)."""
        if state not in FAILED:
            raise ValueError(f"not a failure state: {state!r}")
        self.db.execute("UPDATE variants SET state=?, error=?, log=?, attempts=max(attempts+1, ?), updated=? "
                        "WHERE model=? AND variant=?",
                        (state, error[-2000:], log, attempts_at_least, time.time(), model, variant))

    def interrupt(self, model: str, variant: str, reason: str, log: str | None = None) -> None:
        """The variant's worker was killed or lost while building it: not an attempt."""
        self.db.execute("UPDATE variants SET interruptions=interruptions+1, error=?, log=?, updated=? "
                        "WHERE model=? AND variant=?", (reason[-2000:], log, time.time(), model, variant))

    # runs and stages

    def start_run(self, executor: str, pid: int) -> int:
        """Open a run; stages an earlier driver left running (it was killed) become ``interrupted``.

        ``interrupted_stages`` then lists them as (model, stage, log), for the run to account for.
        """
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.interrupted_stages = self.db.execute(
                "SELECT model, stage, log FROM stages WHERE state='running'").fetchall()
            self.db.execute("UPDATE stages SET state='interrupted', ended=?, error='the run was stopped' "
                            "WHERE state='running'", (now,))
            cur = self.db.execute("INSERT INTO runs (started, pid, host, executor) VALUES (?,?,?,?)",
                                  (now, pid, socket.gethostname(), executor))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return int(cur.lastrowid)

    def end_run(self, run: int, exit_code: int) -> None:
        self.db.execute("UPDATE runs SET ended=?, exit_code=? WHERE id=?", (time.time(), exit_code, run))

    def stage_started(self, run: int, model: str, stage: str, *, node: str | None = None, gpu: str | None = None,
                      pid: int | None = None, log: str | None = None) -> int:
        attempt = 1 + self.db.execute("SELECT count(*) FROM stages WHERE model=? AND stage=? AND run=?",
                                      (model, stage, run)).fetchone()[0]
        cur = self.db.execute("INSERT INTO stages (run, model, stage, try, state, started, node, gpu, pid, log) "
                              "VALUES (?,?,?,?, 'running', ?,?,?,?,?)",
                              (run, model, stage, attempt, time.time(), node, gpu, pid, log))
        return int(cur.lastrowid)

    def stage_placed(self, stage_id: int, *, node: str | None, gpu: str | None, pid: int | None) -> None:
        """Where a stage really runs, once its worker reports in."""
        self.db.execute("UPDATE stages SET node=coalesce(?, node), gpu=coalesce(?, gpu), pid=coalesce(?, pid) "
                        "WHERE id=?", (node, gpu, pid, stage_id))

    def stage_ended(self, stage_id: int, state: str, error: str | None = None) -> None:
        if state not in STAGE_STATES:
            raise ValueError(f"unknown stage state {state!r}")
        self.db.execute("UPDATE stages SET state=?, ended=?, error=? WHERE id=?",
                        (state, time.time(), error[-2000:] if error else None, stage_id))

    def stages(self, run: int | None = None) -> list[StageRow]:
        query = "SELECT id, run, model, stage, try, state, started, ended, node, gpu, pid, error, log FROM stages"
        return [StageRow(*r) for r in self.db.execute(query + (" WHERE run=?" if run else "") + " ORDER BY id",
                                                       (run,) if run else ())]

    def run_span(self, run: int) -> tuple[float, float]:
        """When a run started, and when it ended (now, if it has not)."""
        started, ended = self.db.execute("SELECT started, ended FROM runs WHERE id=?", (run,)).fetchone()
        return started, ended or time.time()

    def run_driver(self, run: int) -> tuple[int, str, float | None]:
        """(pid, host, ended) of the driver of ``run``."""
        pid, host, ended = self.db.execute("SELECT pid, host, ended FROM runs WHERE id=?", (run,)).fetchone()
        return pid, host, ended

    def last_run(self) -> int | None:
        r = self.db.execute("SELECT max(id) FROM runs").fetchone()
        return r[0]


def _row(r: tuple) -> Row:
    values = dict(zip(VARIANT_COLUMNS, r))
    for key in ("timings", "tools", "metrics"):
        values[key] = json.loads(values[key] or "{}")
    return Row(**values)


def busy_fraction(stages: list[StageRow], start: float, end: float) -> dict[str, float]:
    """Per slot (node and GPU, or node for CPU-only stages): the share of [start, end] a stage ran there."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for s in stages:
        if s.ended is None:
            continue
        slot = f"{s.node or '?'}/{s.gpu}" if s.gpu else None
        if slot:
            spans.setdefault(slot, []).append((max(s.started, start), min(s.ended, end)))
    total = max(end - start, 1e-9)
    out = {}
    for slot, items in spans.items():
        merged, busy = sorted(items), 0.0
        cur_s, cur_e = merged[0]
        for s, e in merged[1:]:
            if s > cur_e:
                busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy += cur_e - cur_s
        out[slot] = busy / total
    return out
