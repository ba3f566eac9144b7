"""The scheduler over (model, stage) tasks: many models in flight, every slot busy while work remains.

Tasks declare their resources (a GPU slot, cores, host memory, a network slot) and wait for the
tasks they come after. The scheduler starts every ready task that fits, in the order that
finishes models soonest (later stages of earlier models first), keeps at most ``window`` models
in flight (downloads and disk stay bounded on a queue of hundreds), and hands messages back to
the run: progress events, results, errors. A task whose worker was lost (killed from outside, its
node gone) is started again, at most ``max_lost`` times; that is recorded, not counted as a
failure of its variants. A task whose worker crashed (a crash signal: native code failed in it)
is not started again: the driver fails what it was working on and re-plans the rest. Every start
and end goes into the ledger with where it ran and how it ended.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from quantpub.errors import QuantpubError
from quantpub.executors import Message, Task
from quantpub.ledger import Ledger

log = logging.getLogger(__name__)
STAGE_RANK = {"prepare": 0, "quantize-gpu": 1, "quantize-gguf": 1, "evaluate": 2, "publish": 3}


class Executor(Protocol):
    name: str

    def submit(self, task: Task, gpu_index: int | None = None) -> None: ...
    def poll(self, timeout: float) -> list[Message]: ...
    def cancel(self, task_id: int) -> None: ...
    def shutdown(self) -> None: ...


class Handlers(Protocol):
    def bind(self, task: Task) -> tuple | None:
        """The task's arguments, decided when it starts (``None``: nothing left to do, skip it)."""

    def event(self, task: Task, event: dict[str, Any]) -> None: ...
    def result(self, task: Task, result: Any) -> None: ...
    def error(self, task: Task, error: dict[str, Any]) -> None: ...
    def crashed(self, task: Task, reason: str) -> None: ...
    def lost(self, task: Task, reason: str, retry: bool) -> None: ...


@dataclass
class Capacity:
    """What the scheduler may hand out at once; ``None`` leaves that resource to the executor (Ray)."""

    gpu: int
    cpus: int | None = None
    memory: int | None = None
    net: int = 2


@dataclass
class _Entry:
    task: Task
    order: int
    status: str = "waiting"  # waiting, running, done, failed, skipped
    lost: int = 0
    stage_row: int | None = None
    gpu_index: int | None = None
    after: set[int] = field(default_factory=set)


class Scheduler:
    def __init__(self, executor: Executor, ledger: Ledger, run_id: int, handlers: Handlers, capacity: Capacity, *,
                 window: int | None = None, max_lost: int = 2, on_tick: Callable[[], None] | None = None):
        self.executor, self.ledger, self.run_id, self.handlers = executor, ledger, run_id, handlers
        self.capacity, self.max_lost, self.on_tick = capacity, max_lost, on_tick
        self.window = window or max(2, 2 * capacity.gpu + 1)
        self.entries: dict[int, _Entry] = {}
        self.model_order: dict[str, int] = {}
        self.free_gpus = list(range(capacity.gpu))
        self._next_id = 1

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def add(self, task: Task) -> Task:
        self.model_order.setdefault(task.model, len(self.model_order))
        self.entries[task.id] = _Entry(task, len(self.entries), after=set(task.after))
        return task

    def also_after(self, task_id: int, other: int) -> None:
        """Make a waiting task wait for one more (a retry of what it depends on)."""
        entry = self.entries.get(task_id)
        if entry is not None and entry.status == "waiting":
            entry.after.add(other)

    def tasks(self, model: str | None = None) -> list[tuple[Task, str]]:
        return [(e.task, e.status) for e in self.entries.values() if model is None or e.task.model == model]

    def run(self) -> None:
        """Until every task has ended."""
        try:
            while any(e.status in ("waiting", "running") for e in self.entries.values()):
                self._start_ready()
                if not any(e.status == "running" for e in self.entries.values()):
                    if self._stuck():
                        continue
                for message in self.executor.poll(0.25):
                    self._handle(message)
                if self.on_tick:
                    self.on_tick()
        finally:
            for entry in self.entries.values():
                if entry.status == "running":
                    self.executor.cancel(entry.task.id)
                    if entry.stage_row is not None:
                        self.ledger.stage_ended(entry.stage_row, "interrupted", "the run stopped")

    # starting

    def _ready(self) -> list[_Entry]:
        ready = [e for e in self.entries.values() if e.status == "waiting" and
                 all(self.entries[a].status in ("done", "failed", "skipped") for a in e.after if a in self.entries)]
        return sorted(ready, key=lambda e: (self.model_order[e.task.model], -STAGE_RANK.get(e.task.stage, 0), e.order))

    def _in_flight(self) -> set[str]:
        started = {e.task.model for e in self.entries.values() if e.status != "waiting"}
        unfinished = {e.task.model for e in self.entries.values() if e.status in ("waiting", "running")}
        return started & unfinished

    def _start_ready(self) -> None:
        for entry in self._ready():
            task = entry.task
            flying = self._in_flight()
            if task.model not in flying and len(flying) >= self.window:
                continue
            if not self._fits(task):
                continue
            self._start(entry)

    def _fits(self, task: Task) -> bool:
        r, cap = task.resources, self.capacity
        running = [e.task.resources for e in self.entries.values() if e.status == "running"]
        if r.gpu and not self.free_gpus:
            return False
        if r.net and sum(x.net for x in running) + r.net > cap.net:
            return False
        if cap.cpus is not None and running and sum(x.cpus for x in running) + min(r.cpus, cap.cpus) > cap.cpus:
            return False
        if cap.memory is not None and running and sum(x.memory for x in running) + r.memory > cap.memory:
            return False
        return True

    def _start(self, entry: _Entry) -> None:
        task = entry.task
        cap = self.capacity
        if cap.memory is not None and task.resources.memory > cap.memory:
            self._refuse(entry, f"needs about {task.resources.memory / 1e9:.1f} GB of host memory by the plan's "
                                f"estimate and this machine has {cap.memory / 1e9:.1f} GB")
            return
        try:
            args = self.handlers.bind(task)
        except QuantpubError as exc:
            self._refuse(entry, str(exc))
            return
        if args is None:
            entry.status = "skipped"
            return
        task.args = args
        entry.gpu_index = self.free_gpus.pop(0) if task.resources.gpu else None
        entry.stage_row = self.ledger.stage_started(self.run_id, task.model, task.stage, log=task.log)
        try:
            self.executor.submit(task, entry.gpu_index)
        except QuantpubError as exc:
            self._release(entry)
            self.ledger.stage_ended(entry.stage_row, "failed", str(exc))
            entry.status = "failed"
            self.handlers.error(task, {"type": type(exc).__name__, "message": str(exc), "traceback": ""})
            return
        entry.status = "running"
        log.info("started %s of %s%s", task.stage, task.model,
                 f" on slot {entry.gpu_index}" if entry.gpu_index is not None else "")

    def _refuse(self, entry: _Entry, reason: str) -> None:
        entry.status = "failed"
        row = self.ledger.stage_started(self.run_id, entry.task.model, entry.task.stage, log=entry.task.log)
        self.ledger.stage_ended(row, "failed", reason)
        self.handlers.error(entry.task, {"type": "ResourceError", "message": reason, "traceback": ""})

    def _stuck(self) -> bool:
        """Nothing runs: a ready task that does not fit an empty machine can never start; refuse it."""
        ready = self._ready()
        if not ready:
            waiting = [e for e in self.entries.values() if e.status == "waiting"]
            for e in waiting:  # waiting on tasks that no longer exist
                e.after = {a for a in e.after if a in self.entries}
            return False
        self._start(ready[0])
        return True

    # messages

    def _handle(self, message: Message) -> None:
        entry = self.entries.get(message.task)
        if entry is None or entry.status != "running":
            return
        task = entry.task
        if message.kind == "event":
            self.handlers.event(task, message.payload)
        elif message.kind == "placed":
            where = message.payload
            self.ledger.stage_placed(entry.stage_row, node=where.get("node"), gpu=where.get("gpu"),
                                     pid=where.get("pid"))
            self.handlers.event(task, {"phase": "placed", "variant": None, **where, "time": time.time()})
        elif message.kind == "result":
            self._release(entry)
            entry.status = "done"
            self.ledger.stage_ended(entry.stage_row, "done")
            self.handlers.result(task, message.payload)
        elif message.kind == "error":
            self._release(entry)
            entry.status = "failed"
            error = message.payload
            self.ledger.stage_ended(entry.stage_row, "failed", f"{error['type']}: {error['message']}")
            self.handlers.error(task, error)
        elif message.kind == "crashed":
            self._release(entry)
            entry.status = "failed"
            self.ledger.stage_ended(entry.stage_row, "crashed", message.payload["reason"])
            self.handlers.crashed(task, message.payload["reason"])
        elif message.kind == "lost":
            self._release(entry)
            ending = message.payload
            self.ledger.stage_ended(entry.stage_row, ending["kind"], ending["reason"])
            entry.lost += 1
            retry = entry.lost <= self.max_lost
            entry.status = "waiting" if retry else "failed"
            log.warning("%s of %s: %s%s", task.stage, task.model, ending["reason"],
                        "; starting it again" if retry else f"; lost {entry.lost} times, giving up")
            self.handlers.lost(task, ending["reason"], retry)

    def _release(self, entry: _Entry) -> None:
        if entry.gpu_index is not None:
            self.free_gpus.append(entry.gpu_index)
            self.free_gpus.sort()
            entry.gpu_index = None
