"""What a person sees while ``quantpub run`` works, and the tables of ``quantpub status``.

On a terminal: a live view (rich) with totals and one row per variant of the models in flight:
its stage (queued, calibrating, quantizing layer i/n, validating, evaluating, uploading x/y MB),
elapsed time and an ETA. Elsewhere (CI, nohup, a log file): one plain line per state change.
Either way the run ends with a summary table. The console only reads: states come from the
ledger, progress from the scheduler's events.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from quantpub.formatting import metric as fmt_metric, seconds as fmt_seconds, size
from quantpub.ledger import DONE, FAILED, Ledger, Row, busy_fraction

ACTIVE = ("calibrating", "quantizing", "validating", "converting", "evaluating", "uploading", "downloading",
          "carding")
ENDED_STYLE = {"failed": "red", "crashed": "red", "interrupted": "yellow"}


def _size(n: int | None) -> str:
    return size(n) if n else "-"


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0][:200] if (text or "").strip() else "unknown error"


def short(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class VariantView:
    phase: str = "queued"
    since: float = field(default_factory=time.time)
    step: int | None = None
    steps: int | None = None
    stage: str = ""

    def progress(self) -> str:
        if self.step is None or not self.steps:
            return self.phase
        if self.phase == "uploading":
            return f"uploading {self.step / 1e6:.1f}/{self.steps / 1e6:.1f} MB"
        unit = "layer " if self.phase in ("quantizing", "calibrating") else ""
        return f"{self.phase} {unit}{self.step}/{self.steps}"

    def eta(self) -> float | None:
        if self.step and self.steps and self.step < self.steps:
            return (time.time() - self.since) / self.step * (self.steps - self.step)
        return None


class View:
    """State shared by the live and plain consoles: what each variant is doing, fed by events."""

    def __init__(self):
        self.started = time.time()
        self.variants: dict[tuple[str, str], VariantView] = {}
        self.stages: dict[tuple[str, str], str] = {}  # (model, stage) -> running / done / failed / lost
        self.ledger: Ledger | None = None
        self.plans: dict = {}
        self.built_seconds: dict[str, list[float]] = {}  # method -> seconds per estimated byte

    def start(self, plans, ledger: Ledger, scheduler) -> None:
        self.plans, self.ledger = plans, ledger

    def event(self, task, event: dict[str, Any]) -> None:
        variant, phase = event.get("variant"), event.get("phase")
        if phase == "placed":
            self.stages[(task.model, task.stage)] = "running"
            return
        if variant is None:
            return
        key = (task.model, variant)
        view = self.variants.setdefault(key, VariantView())
        if phase != view.phase or event.get("step") is None:
            if phase == "done" and view.phase in ACTIVE:
                self._learn(task.model, variant, time.time() - view.since)
            view.phase, view.since = phase, time.time()
        view.step, view.steps, view.stage = event.get("step"), event.get("steps"), task.stage

    def stage(self, task, status: str, detail: str | None) -> None:
        """A stage ended (or was lost): every variant row it carried leaves its progress state for how it ended."""
        self.stages[(task.model, task.stage)] = status
        if status == "running":
            return
        for (model, variant), view in self.variants.items():
            if model != task.model or view.stage != task.stage or view.phase not in ACTIVE:
                continue
            row = self.ledger.get(model, variant) if self.ledger else None
            if row is not None and row.state in ("failed", "crashed"):
                view.phase = row.state
            elif row is not None and row.state in DONE:
                view.phase = "done"
            else:  # the stage is gone and this variant did not finish: interrupted, built again or left planned
                view.phase = "interrupted"
            view.since, view.step, view.steps = time.time(), None, None

    def _learn(self, model: str, variant: str, seconds: float) -> None:
        job = next((j for j in self.plans[model].jobs if j.id == variant), None) if model in self.plans else None
        if job is not None and job.size:
            self.built_seconds.setdefault(job.method, []).append(seconds / job.size)

    def eta(self, rows: list[Row]) -> float | None:
        """Remaining build time: what has run (seconds per estimated byte, per method) times what remains."""
        left = 0.0
        for r in rows:
            if r.state in DONE or r.model not in self.plans:
                continue
            rates = self.built_seconds.get(r.method)
            job = next((j for j in self.plans[r.model].jobs if j.id == r.variant), None)
            if not rates or job is None:
                return None
            left += sum(rates) / len(rates) * job.size
        return left


class PlainConsole(View):
    """One line per state change, for logs and CI."""

    def __init__(self, stream=None, quiet: bool = False):
        super().__init__()
        self.out = stream or sys.stdout
        self.quiet = quiet
        self.said: set[tuple] = set()

    def line(self, text: str, force: bool = False) -> None:
        if force or not self.quiet:
            print(f"{time.strftime('%H:%M:%S')} {text}", file=self.out, flush=True)

    def start(self, plans, ledger, scheduler) -> None:
        super().start(plans, ledger, scheduler)
        variants = sum(len(p.jobs) for p in plans.values())
        self.line(f"{len(plans)} model{'s' * (len(plans) != 1)}, {variants} variants planned")

    def event(self, task, event: dict[str, Any]) -> None:
        super().event(task, event)
        variant, phase = event.get("variant"), event.get("phase")
        if phase == "placed":
            where = f" on {event.get('node')}" + (f" GPU {event['gpu']}" if event.get("gpu") else "")
            self.line(f"{short(task.model)}: {task.stage} started{where}")
        elif variant and phase == "done":
            row = self.ledger.get(task.model, variant) if self.ledger else None
            size = _size(row.size) if row else "-"
            self.line(f"{short(task.model)} {variant}: built and validated ({size})")

    def failed(self, model: str, variant: str, error: str, log: str | None, final: bool,
               ending: str = "failed") -> None:
        """A variant failed, crashed or was interrupted: one line when it will not be tried again in this run
        (the retries are in the run's log)."""
        if final:
            self.line(f"{short(model)} {variant}: {ending.upper()}: {_first_line(error)} (log: {log})", force=True)

    def stage(self, task, status: str, detail: str | None) -> None:
        super().stage(task, status, detail)
        if status == "done" and task.stage in ("evaluate", "publish"):
            self.line(f"{short(task.model)}: {task.stage} done")
        elif status in ("failed", "lost", "crashed"):
            self.line(f"{short(task.model)}: {task.stage} {status}: {detail} (log: {task.log})", force=True)

    def tick(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class LiveConsole(View):
    """The live view on a terminal."""

    def __init__(self, console: Console | None = None):
        super().__init__()
        self.console = console or Console(stderr=False)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False, auto_refresh=False)
        self._last = 0.0

    def start(self, plans, ledger, scheduler) -> None:
        super().start(plans, ledger, scheduler)
        self.live.start()
        self.tick()

    def stage(self, task, status: str, detail: str | None) -> None:
        super().stage(task, status, detail)
        if status in ("failed", "lost", "crashed"):
            self.live.console.print(f"[red]{short(task.model)}: {task.stage} {status}: {detail}[/] (log: {task.log})")

    def failed(self, model: str, variant: str, error: str, log: str | None, final: bool,
               ending: str = "failed") -> None:
        if final:
            self.live.console.print(f"[red]{short(model)} {variant}: {ending.upper()}:[/] {_first_line(error)} "
                                    f"(log: {log})")

    def tick(self) -> None:
        if time.time() - self._last < 0.25 or self.ledger is None:
            return
        self._last = time.time()
        self.live.update(self.render(), refresh=True)

    def render(self) -> Group:
        rows = [r for r in self.ledger.rows() if r.model in self.plans]
        return Group(self._totals(rows), self._table(rows))

    def _totals(self, rows: list[Row]) -> Text:
        models = list(self.plans)
        finished = [m for m in models if all(r.state in ("published", *FAILED) for r in rows if r.model == m)]
        flying = {m for (m, _), s in self.stages.items() if s == "running"}
        built = sum(r.state in DONE for r in rows)
        published = sum(r.state == "published" for r in rows)
        failed = sum(r.state in FAILED for r in rows)
        eta = self.eta(rows)
        return Text.from_markup(
            f"[bold]quantpub run[/]  models {len(finished)}/{len(models)} done, {len(flying)} in flight   "
            f"variants {built}/{len(rows)} built, {published} published"
            + (f", [red]{failed} failed[/]" if failed else "")
            + f"   elapsed {fmt_seconds(time.time() - self.started)}   ETA {fmt_seconds(eta)}")

    def _table(self, rows: list[Row]) -> Table:
        table = Table(box=None, pad_edge=False, show_edge=False)
        for name in ("variant", "branch / file", "stage", "size", "elapsed", "ETA"):
            table.add_column(name, no_wrap=True)
        running = {m for (m, _), s in self.stages.items() if s == "running"}
        shown = [m for m in self.plans if m in running] or [m for m in self.plans if any(
            r.model == m and r.state not in ("published", *FAILED) for r in rows)][:1] or list(self.plans)[-1:]
        for model in shown:
            busy = [stage for (m, stage), status in self.stages.items() if m == model and status == "running"]
            table.add_row(Text(short(model), style="bold"), "", Text(", ".join(busy), style="dim"))
            for r in rows:
                if r.model == model:
                    table.add_row(*self._cells(r))
        hidden = len(self.plans) - len(shown)
        if hidden:
            table.caption = f"{hidden} more model{'s' * (hidden != 1)} queued or finished (quantpub status)"
        return table

    def _cells(self, r: Row) -> tuple:
        view = self.variants.get((r.model, r.variant))
        active = view is not None and view.phase in ACTIVE
        if r.state in FAILED:
            stage, style = r.state, "red"
        elif active:
            stage, style = view.progress(), "yellow"
        elif r.state in DONE:  # the ledger hears of evaluations when the stage ends; the view, as each ends
            stage, style = ("evaluated" if view is not None and view.phase == "evaluated" and r.state == "validated"
                            else r.state), "green"
        elif view is not None and view.phase in ENDED_STYLE:
            stage, style = view.phase, ENDED_STYLE[view.phase]
        else:
            stage, style = "queued", "dim"
        eta = view.eta() if active else None
        return ("  " + r.variant, r.target, Text(stage, style=style), _size(r.size),
                fmt_seconds(time.time() - view.since) if active else "", fmt_seconds(eta) if eta is not None else "")

    def finish(self) -> None:
        """The last frame, drawn while the ledger is still open."""
        if self.ledger is not None and self.live.is_started:
            self.live.update(self.render(), refresh=True)
            self.live.stop()

    def close(self) -> None:
        if self.live.is_started:
            self.live.stop()


def summary_table(rows: list[Row], endpoint: str | None = None, namespace: str | None = None) -> Table:
    """Per variant (every format of a model side by side): its branch or file, size, bits per weight, PPL, KLD,
    state and commit; failures with reason and log."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for name in ("model", "variant", "branch / file", "size", "bits/w", "PPL", "KLD", "state", "commit"):
        table.add_column(name, no_wrap=True)
    for r in rows:
        metrics = r.metrics or {}
        state = Text(r.state, style="red" if r.state in FAILED else ("green" if r.state == "published" else ""))
        if r.interruptions:
            state.append(f" ({r.interruptions} interrupted)", style="dim")
        bpw = metrics.get("bits_per_weight")
        table.add_row(short(r.model), r.variant, r.target, _size(r.size), f"{bpw:.2f}" if bpw else "-",
                      fmt_metric(metrics.get("perplexity")),
                      fmt_metric(metrics.get("kld"), 3), state, (r.commit_oid or "-")[:10])
    return table


def summary_lines(rows: list[Row], endpoint: str | None, namespace: str | None, stage_errors: list[str]) -> list[str]:
    """The URLs to open and the failures, after the table."""
    lines = []
    repos = sorted({(r.repo if not namespace else f"{namespace}/{r.repo.split('/', 1)[1]}")
                    for r in rows if r.state == "published"})
    for repo in repos:
        lines.append(f"open {endpoint.rstrip('/')}/{repo}" if endpoint else f"published {repo}")
    for r in rows:
        if r.state in FAILED:
            reason = (r.error or "").strip().splitlines()[0][:300] if r.error else "unknown"
            log = f" (log: {r.log})" if r.log and "(log: " not in reason else ""
            lines.append(f"{r.state.upper()} {short(r.model)} {r.variant}: {reason}{log}")
    lines += [f"FAILED {e}" for e in stage_errors]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) or "no variants")
    return lines


ENDED_STAGES = ("crashed", "killed", "lost", "interrupted", "failed")


def status_view(ledger: Ledger, driver_alive: bool = True) -> Group:
    """``quantpub status``: the summary table, the last run's stages running now (or, when its driver is
    gone, interrupted) and those that ended without a result, and the totals."""
    rows = ledger.rows()
    parts: list[Any] = [summary_table(rows)]
    run = ledger.last_run()
    stages = ledger.stages(run) if run else []
    running = [s for s in stages if s.state == "running"]
    if running:
        title = "running" if driver_alive else "interrupted (driver gone): the run was stopped; run it again to resume"
        table = Table(box=None, pad_edge=False, show_edge=False, title=title, title_justify="left")
        for name in ("model", "stage", "node", "GPU", "pid", "for", "log"):
            table.add_column(name, no_wrap=True)
        for s in running:
            table.add_row(short(s.model), s.stage, s.node or "-", s.gpu or "-", str(s.pid or "-"),
                          fmt_seconds(time.time() - s.started) if driver_alive else "-", s.log or "")
        parts.append(table)
    ended = [s for s in stages if s.state in ENDED_STAGES]
    if ended:
        table = Table(box=None, pad_edge=False, show_edge=False, title="stages that ended without a result",
                      title_justify="left")
        for name in ("model", "stage", "try", "ended", "why", "log"):
            table.add_column(name, no_wrap=name != "why")
        for s in ended:
            table.add_row(short(s.model), s.stage, str(s.attempt), Text(s.state, style="red"),
                          _first_line(s.error) if s.error else "-", s.log or "")
        parts.append(table)
    parts += [Text(line) for line in summary_lines(rows, None, None, [])]
    if run:
        start, end = ledger.run_span(run)
        busy = busy_fraction(ledger.stages(run), start, end)
        if busy:
            parts.append(Text(f"run {run}, {fmt_seconds(end - start)}: slot busy " +
                              ", ".join(f"{slot} {share:.0%}" for slot, share in sorted(busy.items()))))
    return Group(*parts)


def make_console(quiet: bool, stream=None):
    """The live view on a terminal, plain lines elsewhere (or with ``quiet``: only failures)."""
    stream = stream or sys.stdout
    if not quiet and stream.isatty():
        return LiveConsole(Console(file=stream))
    return PlainConsole(stream, quiet=quiet)
