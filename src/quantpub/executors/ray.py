"""Stages as Ray tasks: many models in flight across every GPU and machine of a cluster.

Each stage is one task declaring its resources (``num_gpus``, ``num_cpus``, ``memory`` from the
plan), run in a fresh worker process (``max_calls=1``: the memory and GPU of a finished stage are
given back). Ray places it; the driver keeps the ledger. A task whose worker or node dies comes
back ``lost`` and the scheduler starts it again (bounded), wherever Ray finds room; one whose
process died of a crash signal (which faulthandler names in the stage's log) comes back ``crashed``. Progress
events travel through a Ray queue actor. Files are exchanged through the work dir, which every
node must see at the same path (a shared filesystem); results are small and come back through Ray.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from quantpub.errors import QuantpubError
from quantpub.executors import Message, Task
from quantpub.executors.child import TRY_HEADER
from quantpub.isolate import crash_in_log

log = logging.getLogger(__name__)


def _ray_worker(task_id: int, fn, args: tuple, events, log_file: str, model: str, stage: str, verbose: bool,
                workdir: tuple[str, str] | None) -> Any:
    import ray

    from quantpub.executors.child import run_stage

    context = ray.get_runtime_context()
    os.environ["QUANTPUB_NODE"] = context.get_node_id()[:12]
    gpus = ray.get_gpu_ids()

    def send(kind: str, payload: Any) -> None:
        events.put_nowait((task_id, kind, payload))

    try:
        return run_stage(fn, args, send, log_file=log_file, model=model, stage=stage, verbose=verbose,
                         gpu_slot=",".join(str(g) for g in gpus) or None, workdir=workdir)
    except Exception as exc:  # noqa: BLE001 - a stage's own failure, reported as such (not as a lost worker)
        import traceback

        traceback.print_exc()
        return _Failed(type(exc).__name__, str(exc), traceback.format_exc())


class _Failed:
    """What a stage that raised returns: its exception may not unpickle on the driver, its text always does."""

    def __init__(self, type_name: str, message: str, trace: str):
        self.error = {"type": type_name, "message": message, "traceback": trace}


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, *, gpu_slots: int | None = None, cpus: int | None = None,
                 verbose: bool = False, temp_dir: str | None = None, env: dict[str, str] | None = None):
        import ray
        from ray.util.queue import Queue

        self.verbose = verbose
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                                      "logging_level": logging.WARNING,
                                      # workers on other nodes see the hub endpoint, offline mode and caches
                                      "runtime_env": {"env_vars": env or {}}}
            if address:
                kwargs["address"] = address
            else:  # a local cluster of this machine, with the slots the user asked for
                kwargs.update(num_cpus=cpus or os.cpu_count(), num_gpus=gpu_slots)
                if temp_dir:
                    kwargs["_temp_dir"] = temp_dir
            ray.init(**kwargs)
        self.ray = ray
        self.events = Queue(actor_options={"num_cpus": 0})
        self.refs: dict[Any, int] = {}
        self.logs: dict[int, str] = {}
        self.remote = ray.remote(max_calls=1)(_ray_worker)
        self.has_gpus = self.cluster_gpus() > 0

    def capacity(self) -> dict[str, float]:
        """The largest node's resources: a task asking for more could never be placed."""
        best: dict[str, float] = {}
        for node in self.ray.nodes():
            if node.get("Alive"):
                for key in ("GPU", "CPU", "memory"):
                    best[key] = max(best.get(key, 0.0), float(node["Resources"].get(key, 0.0)))
        return best

    def cluster_gpus(self) -> int:
        return int(self.ray.cluster_resources().get("GPU", 0))

    def submit(self, task: Task, gpu_index: int | None = None) -> None:
        r = task.resources
        largest = self.capacity()
        gpus = r.gpu if self.has_gpus else 0  # a cluster without GPUs runs GPU stages on CPU
        if r.memory and largest.get("memory", 0) < r.memory:
            raise QuantpubError(f"{task.stage} of {task.model} needs about {r.memory / 1e9:.1f} GB of host memory "
                                f"and the largest node offers {largest.get('memory', 0) / 1e9:.1f} GB")
        options: dict[str, Any] = {"num_cpus": min(r.cpus, max(1, int(largest.get("CPU", 1)))), "num_gpus": gpus,
                                   "max_retries": 0, "name": f"quantpub:{task.stage}"}
        if r.memory:
            options["memory"] = r.memory
        ref = self.remote.options(**options).remote(task.id, task.fn, task.args, self.events, task.log, task.model,
                                                    task.stage, self.verbose, task.workdir)
        self.refs[ref] = task.id
        self.logs[task.id] = task.log

    def poll(self, timeout: float) -> list[Message]:
        from ray.exceptions import RayError, RayTaskError

        messages = self._drain()
        if self.refs:
            ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout)
        else:
            ready = []
        messages += self._drain()  # events sent before a result must be seen before it
        for ref in ready:
            task_id = self.refs.pop(ref)
            try:
                value = self.ray.get(ref)
                messages.append(Message(task_id, "error", value.error) if isinstance(value, _Failed)
                                else Message(task_id, "result", value))
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                messages.append(Message(task_id, "error", {"type": type(cause).__name__, "message": str(cause),
                                                           "traceback": str(exc)}))
            except RayError as exc:  # the worker process or its node died, or the object was lost
                crash = crash_in_log(Path(self.logs[task_id]), since=TRY_HEADER)
                if crash:
                    messages.append(Message(task_id, "crashed", {"kind": "crashed", "reason": f"crashed: {crash}",
                                                                 "signal": crash}))
                else:
                    messages.append(Message(task_id, "lost", {"kind": "lost", "signal": None, "reason":
                                                              f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}))
        return messages

    def _drain(self) -> list[Message]:
        messages = []
        while not self.events.empty():
            for task_id, kind, payload in self.events.get_nowait_batch(self.events.qsize()):
                messages.append(Message(task_id, kind, payload))
        return messages

    def cancel(self, task_id: int) -> None:
        for ref, tid in list(self.refs.items()):
            if tid == task_id:
                self.ray.cancel(ref, force=True)

    def shutdown(self) -> None:
        for ref in list(self.refs):
            self.ray.cancel(ref, force=True)
        self.ray.shutdown()
