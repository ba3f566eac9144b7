"""The scheduler's handlers for ``quantpub run``: every model's tasks, and stage results turned into ledger states.

The driver process alone writes the ledger: the scheduler calls ``Driver`` when it binds a
task's arguments, when a stage reports an event or a result, and when a stage fails; the
stages themselves (``stages.py``) only return what they did.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantpub import formatting, isolate, machine, naming, stages
from quantpub.artifacts import MANIFEST, sha256_file
from quantpub.backends import BACKENDS, STAGES, Stage, backend, stage_methods
from quantpub.errors import QuantpubError
from quantpub.manifest import read as read_manifest
from quantpub.executors import Resources, Task
from quantpub.ledger import DONE, FAILED, Ledger
from quantpub.plan import Plan, plan_from, write_plan
from quantpub.plan_record import PLAN_FILE, changes, read as read_record
from quantpub.scheduler import Scheduler
from quantpub.stages import RunOptions
from quantpub.workdir import remove_partials, work_id

log = logging.getLogger(__name__)

GIB = 1 << 30
ENDED = ("failed", "crashed", "interrupted")  # progress phases that end a variant's try
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device", as OSError words it


@dataclass
class Summary:
    endpoint: str
    ledger: str
    work: str
    run_id: int
    repos: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)          # "model variant" of failed variants
    stage_errors: list[str] = field(default_factory=list)    # one line per stage that failed (with its log)
    seconds: float = 0.0
    publish_errors: int = 0  # how many of the stage errors are publish stages' (the hub failed)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stage_errors

    @property
    def only_publishing_failed(self) -> bool:
        """Every variant was built; what failed was the hub (a re-run publishes what is left)."""
        return not self.failed and len(self.stage_errors) == self.publish_errors > 0


class Driver:
    """The scheduler's handlers: builds each model's tasks and turns stage results into ledger states."""

    def __init__(self, work: Path, ledger: Ledger, run_id: int, plans: dict[str, Plan], endpoint: str,
                 token: str | None, options: RunOptions, observer):
        self.work, self.ledger, self.run_id = work, ledger, run_id
        self.plans, self.endpoint, self.token, self.options = plans, endpoint, token, options
        self.observer = observer
        self.scheduler: Scheduler | None = None
        self.sources: dict[str, str] = {}
        self.streamed: dict[str, bool] = {}  # model -> its GPTQ/AWQ group streams layers from the checkpoint
        self.active: dict[int, dict[str, str]] = {}  # task id -> variant -> last phase
        self.stage_errors: list[str] = []
        self.plan_changes: list[str] = []  # what edited matrices changed, one line each, for the summary
        self.publish_errors = 0
        self.repos: dict[str, set[str]] = {}
        self.workdir = (str(work), work_id(work))

    def out(self, model: str) -> Path:
        return self.work / naming.model_basename(model)

    def log_file(self, model: str, stage: str) -> str:
        return str(self.out(model) / "logs" / f"{stage}.log")

    # planning

    def plan_all(self, models: list[str]) -> None:
        for model in models:
            out = self.out(model)
            out.mkdir(parents=True, exist_ok=True)
            removed = remove_partials(out)
            if removed:
                log.info("%s: removed %d unfinished build directories from an earlier run", model, removed)
            plan = self.plans[model] = self._record_plan(model, out)
            for job in plan.jobs:
                self.ledger.plan(model, job.id, job.method, job.repo, job.target)
            self._reconcile(model, [j.id for j in plan.jobs])
            self._count_stopped(model)
            if Path(model).is_dir():
                self.sources[model] = model
            self._add_tasks(model, plan)
        if self.observer:
            self.observer.start(self.plans, self.ledger, self.scheduler)

    def _record_plan(self, model: str, out: Path) -> Plan:
        """Write the model's plan (``OUT/plan.json``, the texts it reads snapshotted): every stage reads its jobs
        from it. A plan recorded by an earlier run that differs (an edited matrix) is reported, then replaced."""
        o = self.options
        earlier = read_record(out) if (out / PLAN_FILE).is_file() else None
        plan = write_plan(self.plans[model], out, calibration_file=o.calibration_file, eval_file=o.eval_file,
                          evaluation=o.evaluate)
        if earlier is not None:
            try:
                before = [j.id for j in plan_from(earlier).jobs]
            except QuantpubError:  # recorded by a quantpub whose matrix schema was another
                before = []
            for line in changes(earlier, plan.record, before, [j.id for j in plan.jobs]):
                log.warning("%s: the plan changed since the last run: %s", plan.facts.name, line)
                self.plan_changes.append(f"{plan.facts.name}: {line}")
        return plan

    def _add_tasks(self, model: str, plan: Plan) -> None:
        from quantpub import estimate

        s = self.scheduler
        device = "cpu" if self.options.device == "cpu" else "cuda"

        def task(stage: str, fn: Callable, resources: Resources, after: list[int]) -> int:
            return s.add(Task(s.new_id(), model, stage, fn, (), resources, self.log_file(model, stage), after,
                              workdir=self.workdir)).id

        prepare = task("prepare", stages.prepare, Resources(net=1, cpus=0), [])
        groups = []
        for stage in STAGES.values():  # one quantize task per stage the model's formats need
            jobs = [j for j in plan.jobs if backend(j.method).stage == stage.name]
            if not jobs:
                continue
            if stage.gpu:
                memory, self.streamed[model] = self._stage_memory(plan, stage, jobs, device)
                resources = Resources(gpu=1, cpus=1, memory=memory)
            else:
                resources = Resources(cpus=min(4, machine.cpu_count()), memory=stage.host_memory(plan, jobs, device))
            groups.append(task(stage.name, stages.build_group, resources, [prepare]))
        evaluate = task("evaluate", stages.evaluate, Resources(
            gpu=1, cpus=1, memory=estimate.evaluation_host_memory(plan, device)), groups)
        task("publish", stages.publish, Resources(net=1, cpus=0, memory=GIB // 4), [*groups, evaluate])

    def _stage_memory(self, plan: Plan, stage: Stage, jobs: list, device: str) -> tuple[int, bool]:
        """A stage's host memory, and whether it streams the model layer by layer (``--stream``; ``auto``: when
        the whole-model estimate exceeds the largest machine, this one or the Ray cluster's largest node)."""
        memory, stream = stage.streaming(plan, jobs, device, self.options.stream, self.largest_memory())
        if stream and self.options.stream == "auto":
            log.info("%s: %s needs more memory than a machine has with the whole model loaded; streaming layers "
                     "from the checkpoint (about %s)", plan.facts.name, stage.name, formatting.size(memory))
        return memory, stream

    def largest_memory(self) -> int | None:
        s = self.scheduler
        if s is None:
            return None
        if s.capacity.memory is not None:
            return s.capacity.memory
        capacity = getattr(s.executor, "capacity", None)
        found = capacity().get("memory") if callable(capacity) else None
        return int(found) if found else None

    # the scheduler's handlers

    def bind(self, task: Task) -> tuple | None:
        model, o = task.model, self.options
        out = str(self.out(model))
        if task.stage == "prepare":
            return None if model in self.sources else (model, str(self.work))
        source = self.sources.get(model)
        if source is None:  # prepare failed, and failed every variant of the model with its reason
            return None
        if task.stage in STAGES:
            planned = {j.id for j in self.plans[model].jobs}  # a variant the matrix no longer has is left alone
            methods = stage_methods(task.stage)
            todo = [r.variant for r in self.ledger.rows(model) if r.method in methods and r.state not in DONE
                    and r.attempts < o.max_attempts and r.variant in planned]
            if not todo:
                return None
            self.active[task.id] = {v: "queued" for v in todo}
            return (out, source, todo, o, self.streamed.get(model, False))
        if task.stage == "evaluate":
            if not o.evaluate or not self._unevaluated(model):
                return None
            return (source, out, o)
        if task.stage == "publish":
            todo = [r.variant for r in self.ledger.rows(model) if r.state in DONE]
            return (out, self.endpoint, self.token, todo, o) if todo else None
        raise ValueError(f"unknown stage {task.stage}")

    def event(self, task: Task, event: dict[str, Any]) -> None:
        variant, phase = event.get("variant"), event.get("phase")
        if task.stage in STAGES and variant:
            self.active.setdefault(task.id, {})[variant] = phase
            if phase == "done":
                self._record_build(task.model, variant, None)
            elif phase in ENDED:
                self._record_build(task.model, variant, event.get("error") or phase, task.log, phase)
        elif task.stage == "evaluate" and variant and phase in ENDED:
            self._record_build(task.model, variant, event.get("error") or phase, task.log, phase)
        elif task.stage == "publish" and variant and phase == "published":
            self.ledger.advance(task.model, variant, "published", commit_oid=event["commit"])
        if self.observer:
            self.observer.event(task, event)

    def result(self, task: Task, result: Any) -> None:
        model = task.model
        if task.stage == "prepare":
            self.sources[model] = result
        elif task.stage in STAGES:
            recorded = self.active.pop(task.id, {})
            for variant, ended in result.items():
                if recorded.get(variant) not in ("done", *ENDED):
                    self._record_build(model, variant, ended and ended["error"], task.log if ended else None,
                                       ended["ending"] if ended else "failed")
            self._retry(task, [v for v, ended in result.items() if ended and ended["ending"] != "crashed"])
        elif task.stage == "evaluate":
            for variant, ended in result.items():
                if self.ledger.get(model, variant).state not in DONE:
                    continue  # its crash was recorded when it happened
                if ended is not None:  # the event did not reach us
                    self._record_build(model, variant, ended["error"], task.log, ended["ending"])
                elif (self.out(model) / variant / MANIFEST).is_file():
                    self._record_build(model, variant, None)  # its manifest now has the evaluation
        elif task.stage == "publish":
            for published in result:
                self.ledger.advance(model, published.variant, "published", commit_oid=published.commit)
                self.repos.setdefault(model, set()).add(published.repo)
        if self.observer:
            self.observer.stage(task, "done", None)

    def error(self, task: Task, error: dict[str, Any]) -> None:
        model = task.model
        line = f"{error['type']}: {error['message']}".strip().splitlines()[0][:300]
        if NO_SPACE in line:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.work))
        if task.stage == "prepare" or task.stage in STAGES:
            methods = tuple(BACKENDS) if task.stage == "prepare" else stage_methods(task.stage)
            recorded = self.active.pop(task.id, {})
            for row in self.ledger.rows(model):
                if row.method in methods and row.state not in DONE and recorded.get(row.variant) not in ENDED:
                    self._record_build(model, row.variant, f"{task.stage} failed: {line}", task.log)
        else:
            self.stage_errors.append(f"{model}: {task.stage} failed: {line} (log: {task.log})")
            self.publish_errors += task.stage == "publish"
        log.error("%s of %s failed: %s (log: %s)", task.stage, model, line, task.log)
        if self.observer:
            self.observer.stage(task, "failed", line)

    def crashed(self, task: Task, reason: str) -> None:
        """The stage's own process was killed by a crash signal (native code in a step it shares, like the
        conversion or the calibration pass): the variants it was working on fail with that crash, once;
        the ones it had not started are built again by a new task."""
        model = task.model
        last = isolate.last_words(isolate.tail(Path(task.log)))
        if task.stage in STAGES:
            phases = self.active.pop(task.id, {})
            self._reconcile(model, list(phases))  # variants finished before the crash count
            waiting = []
            for variant, phase in phases.items():
                if phase in ("done", *ENDED) or self.ledger.get(model, variant).state in DONE:
                    continue
                if phase == "queued":
                    waiting.append(variant)
                    continue
                error = f"{reason} during {task.stage} ({phase}) of {variant} (log: {task.log})" + \
                    (f": {last[:200]}" if last else "")
                self._record_build(model, variant, error, task.log, "crashed")
            self._retry(task, waiting)
        else:
            self.stage_errors.append(f"{model}: {task.stage} {reason} (log: {task.log})" + (f": {last[:200]}" if last else ""))
        log.error("%s of %s %s (log: %s)", task.stage, model, reason, task.log)
        if self.observer:
            self.observer.stage(task, "crashed", reason)

    def lost(self, task: Task, reason: str, retry: bool) -> None:
        model = task.model
        if task.stage in STAGES:
            phases = self.active.pop(task.id, {})
            self._reconcile(model, list(phases))  # variants finished before the worker died count
            for variant, phase in phases.items():
                if phase not in ("done", "failed", "queued") and self.ledger.get(model, variant).state not in DONE:
                    self.ledger.interrupt(model, variant, f"worker lost during {phase}: {reason}", task.log)
        if not retry:
            self.stage_errors.append(f"{model}: {task.stage}: the worker was lost {self.scheduler.max_lost + 1} times "
                                     f"({reason}); re-run to try again (log: {task.log})")
        if self.observer:
            self.observer.stage(task, "lost", reason)

    # helpers

    def _count_stopped(self, model: str) -> None:
        """Variants a killed run was building: one interruption each (not an attempt)."""
        for stopped_model, stage, log_file in self.ledger.interrupted_stages:
            if stopped_model == model and stage in STAGES:
                for row in self.ledger.rows(model):
                    if row.method in stage_methods(stage) and row.state not in DONE:
                        self.ledger.interrupt(model, row.variant, f"the run was stopped during {stage}", log_file)

    def _retry(self, task: Task, variants: list[str]) -> None:
        """Build ``variants`` again in this run, before evaluation and publishing, where they have attempts left
        (failed ones, interrupted ones, ones a crashed task never started). A crashed variant waits for a
        re-run: native crashes repeat."""
        again = [v for v in variants if self.ledger.get(task.model, v).state not in (*DONE, "crashed")
                 and self.ledger.get(task.model, v).attempts < self.options.max_attempts]
        if not again:
            return
        s = self.scheduler
        retry = s.add(Task(s.new_id(), task.model, task.stage, task.fn, (), task.resources, task.log, [],
                           workdir=task.workdir))
        for other, status in s.tasks(task.model):
            if other.stage in ("evaluate", "publish") and status == "waiting":
                s.also_after(other.id, retry.id)
        log.info("%s: %s failed; building again (attempt %d of %d)", task.model, ", ".join(again),
                 self.ledger.get(task.model, again[0]).attempts + 1, self.options.max_attempts)

    def _unevaluated(self, model: str) -> bool:
        for row in self.ledger.rows(model):
            path = self.out(model) / row.variant
            if row.state in DONE and (path / MANIFEST).is_file() and not read_manifest(path).evaluation:
                return True
        return False

    def _reconcile(self, model: str, variants: list[str]) -> None:
        """Trust the files, checked by hash: a finished directory counts, a changed or missing one is rebuilt."""
        from quantpub.publish import local_files

        out = self.out(model)
        for variant in variants:
            row = self.ledger.get(model, variant)
            manifest_path = out / variant / MANIFEST
            ok = False
            if manifest_path.is_file():
                try:
                    local_files(out / variant, read_manifest(out / variant), None)  # every file, hashed once
                    ok = True
                except QuantpubError as exc:
                    log.warning("%s: %s; rebuilding it", variant, exc)
                    shutil.rmtree(out / variant)
            # a crash in evaluation left good files: a re-run evaluates them again while attempts are left
            if ok and (row.state in ("planned", "failed") or
                       row.state == "crashed" and row.attempts < self.options.max_attempts):
                self._record_build(model, variant, None)
            elif ok and row.state in DONE and row.manifest_sha256 != sha256_file(manifest_path):
                self._record_build(model, variant, None)  # evaluated since: the manifest changed, not the files
            elif not ok and row.state in DONE:
                log.warning("%s: the ledger says %s but its files are gone; rebuilding it", variant, row.state)
                self.ledger.advance(model, variant, "planned")

    def _record_build(self, model: str, variant: str, error: str | None, log_file: str | None = None,
                      ending: str = "failed") -> None:
        """A variant's build (or evaluation) ended: built (no ``error``), or ``ending`` failed / crashed /
        interrupted with ``error``. A crash identical to the variant's last one stops its retries."""
        if error:
            if NO_SPACE in error or ending == "interrupted":  # not the variant's fault: no attempt used
                self.ledger.interrupt(model, variant, error, log_file)
                if NO_SPACE in error:  # the machine's problem: the run stops
                    raise OSError(errno.ENOSPC, "No space left on device", str(self.work))
                if self.observer:
                    self.observer.failed(model, variant, error, log_file, False, ending)
                return
            row = self.ledger.get(model, variant)
            again = ending == "crashed" and row.state == "crashed" and _signature(row.error) == _signature(error)
            self.ledger.fail(model, variant, error, log_file, state="crashed" if ending == "crashed" else "failed",
                             attempts_at_least=self.options.max_attempts if again else 0)
            if again:
                log.warning("%s: the same crash as last time (%s); not retrying it again", variant, _signature(error))
            if self.observer:
                final = self.ledger.get(model, variant).attempts >= self.options.max_attempts or ending == "crashed"
                self.observer.failed(model, variant, error, log_file, final, ending)
            return
        path = self.out(model) / variant
        manifest = read_manifest(path)
        timings = manifest.timings()
        if manifest.evaluation and manifest.evaluation.seconds is not None:
            timings["evaluate_seconds"] = manifest.evaluation.seconds
        metrics = manifest.evaluation.metrics() if manifest.evaluation else {}
        if model in self.plans:
            metrics["bits_per_weight"] = round(manifest.size * 8 / self.plans[model].facts.total_params, 3)
        self.ledger.advance(model, variant, "evaluated" if manifest.evaluation else "validated", size=manifest.size,
                            manifest_sha256=sha256_file(path / MANIFEST), tools=manifest.tools, timings=timings,
                            metrics=metrics)

    def summary(self, seconds: float) -> Summary:
        rows = self.ledger.rows()
        namespace = self.options.namespace
        repos = sorted({naming.in_namespace(r.repo, namespace) for r in rows
                        if r.state == "published" and r.model in self.plans})
        return Summary(endpoint=self.endpoint, ledger=str(self.ledger.path), work=str(self.work), run_id=self.run_id,
                       repos=repos, failed=[f"{r.model} {r.variant}" for r in rows
                                            if r.model in self.plans and r.state in FAILED],
                       stage_errors=self.stage_errors, seconds=seconds, publish_errors=self.publish_errors)


def _signature(error: str | None) -> str:
    """What makes two crashes of a variant the same crash: the message without its log path and last lines."""
    return (error or "").split(" (log: ", 1)[0]
