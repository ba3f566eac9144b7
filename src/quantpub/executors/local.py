"""Stages as worker processes on this machine, one process per stage.

Each stage gets its own process (spawned, so no state leaks from the driver), so the death of
one (a kill, the OOM killer, a crash in C code) loses only that stage: the driver sees the
process gone without a result and reports how it ended from its exit status: ``crashed`` (a
crash signal), or ``lost`` as killed from outside (with "probably out of memory" when the cgroup's
OOM-kill count rose or the process tree's sampled peak came near the machine's memory). Results,
errors and progress events come back over one pipe (a ``SimpleQueue``: a stage's ``put`` has written
its event before it returns, so the phase a stage reported just before it crashed reaches the
driver, which names the variant that crash belongs to; a ``Queue``'s feeder thread would lose it
with the process). GPU slots are given to a stage through ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import traceback
from typing import Any

from quantpub import machine
from quantpub.executors import Message, Task

log = logging.getLogger(__name__)
_CTX = multiprocessing.get_context("spawn")


def _worker(task_id: int, fn, args: tuple, out, log_file: str, model: str, stage: str, verbose: bool,
            gpu_slot: str | None, parent: int, workdir: tuple[str, str] | None) -> None:
    from quantpub.executors.child import run_stage, watch_parent

    watch_parent(parent)

    def send(kind: str, payload: Any) -> None:
        out.put((task_id, kind, payload))

    try:
        result = run_stage(fn, args, send, log_file=log_file, model=model, stage=stage, verbose=verbose,
                           gpu_slot=gpu_slot, workdir=workdir)
    except BaseException as exc:  # noqa: BLE001 - everything is reported; the process then ends
        traceback.print_exc()
        send("error", {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()})
    else:
        send("result", result)
    out.close()


class LocalExecutor:
    """``gpu_slots``: visible GPU indices (``["0", "1"]``), or ``None`` entries for CPU slots."""

    name = "local"

    def __init__(self, gpu_slots: list[str | None], verbose: bool = False):
        self.gpu_slots = gpu_slots
        self.verbose = verbose
        self.queue = _CTX.SimpleQueue()  # written by the stages, read by one thread into ``inbox``
        self.inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._forward, daemon=True, name="stage-messages").start()
        self.procs: dict[int, Any] = {}
        self.slot_of: dict[int, int] = {}
        self.finished: set[int] = set()
        self.tasks: dict[int, Task] = {}
        self.peaks: dict[int, int] = {}  # task id -> the largest resident size of its process tree seen
        self.oom_before = machine.oom_kills()

    def capacity(self) -> dict[str, int]:
        return {"gpu": len(self.gpu_slots)}

    def submit(self, task: Task, gpu_index: int | None = None) -> None:
        gpu = self.gpu_slots[gpu_index] if gpu_index is not None else None
        label = gpu if gpu is not None else (f"slot{gpu_index}" if gpu_index is not None else None)
        env_backup = os.environ.get("CUDA_VISIBLE_DEVICES")
        # The child reads CUDA_VISIBLE_DEVICES at start: a GPU stage sees its GPU, a CPU stage none.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else ""
        try:
            proc = _CTX.Process(target=_worker, name=f"quantpub-{task.stage}",
                                args=(task.id, task.fn, task.args, self.queue, task.log, task.model, task.stage,
                                      self.verbose, label, os.getpid(), task.workdir), daemon=False)
            proc.start()
        finally:
            if env_backup is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = env_backup
        self.procs[task.id] = proc
        self.tasks[task.id] = task

    def poll(self, timeout: float) -> list[Message]:
        """Messages from running stages; a process that ended without a result is ``lost``."""
        messages = self._drain(timeout)
        for task_id, proc in list(self.procs.items()):
            if proc.exitcode is None:
                self.peaks[task_id] = max(self.peaks.get(task_id, 0), machine.tree_rss(proc.pid))
                continue
            messages += self._drain(0.2)  # what it sent just before it ended
            proc.join()
            del self.procs[task_id]
            task = self.tasks.pop(task_id)
            peak = self.peaks.pop(task_id, None)
            if task_id not in self.finished:
                end = machine.ending(proc.exitcode, peak=peak, oom_before=self.oom_before,
                                     estimate=task.resources.memory or None)
                self.oom_before = machine.oom_kills()
                reason = f"{end.reason} (worker pid {proc.pid})" if end.kind != "crashed" else end.reason
                messages.append(Message(task_id, "crashed" if end.kind == "crashed" else "lost",
                                        {"kind": end.kind, "reason": reason, "signal": end.signal}))
        return messages

    def _forward(self) -> None:
        while True:
            try:
                item = self.queue.get()
            except (EOFError, OSError):  # closed at shutdown
                return
            self.inbox.put(item)

    def _drain(self, timeout: float) -> list[Message]:
        messages = []
        try:
            item = self.inbox.get(timeout=timeout)
            while True:
                task_id, kind, payload = item
                if kind in ("result", "error"):
                    self.finished.add(task_id)
                messages.append(Message(task_id, kind, payload))
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        return messages

    def cancel(self, task_id: int) -> None:
        proc = self.procs.get(task_id)
        if proc is not None and proc.exitcode is None:
            proc.kill()

    def shutdown(self) -> None:
        for task_id in list(self.procs):
            self.cancel(task_id)
        for proc in self.procs.values():
            proc.join(10)
        self.queue.close()
