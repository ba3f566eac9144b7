"""The scheduler's decisions, driven by a scripted executor: order, slots, memory, window, lost workers."""

from __future__ import annotations

import pytest

from quantpub.executors import Message, Resources, Task
from quantpub.ledger import Ledger, StageRow, busy_fraction
from quantpub.scheduler import Capacity, Scheduler


class ScriptedExecutor:
    """Each submitted task ends on the next poll: lost if listed in ``lose`` (once per listing), crashed if in
    ``crash``, else done."""

    name = "scripted"

    def __init__(self, lose: list[tuple[str, str]] | None = None, crash: list[tuple[str, str]] | None = None):
        self.lose = list(lose or [])
        self.crash = list(crash or [])
        self.running: list[Task] = []
        self.started: list[tuple[str, str, int | None]] = []  # (model, stage, gpu slot) in start order
        self.concurrent: list[set[tuple[str, str]]] = []

    def submit(self, task: Task, gpu_index: int | None = None) -> None:
        self.running.append(task)
        self.started.append((task.model, task.stage, gpu_index))

    def poll(self, timeout: float) -> list[Message]:
        self.concurrent.append({(t.model, t.stage) for t in self.running})
        done, self.running = self.running, []
        messages = []
        for t in done:
            messages.append(Message(t.id, "placed", {"node": "n1", "gpu": "0" if t.resources.gpu else None,
                                                     "pid": 100 + t.id}))
            if (t.model, t.stage) in self.lose:
                self.lose.remove((t.model, t.stage))
                messages.append(Message(t.id, "lost", {"kind": "killed", "reason": "killed by SIGKILL",
                                                       "signal": "SIGKILL"}))
            elif (t.model, t.stage) in self.crash:
                self.crash.remove((t.model, t.stage))
                messages.append(Message(t.id, "crashed", {"kind": "crashed", "reason": "crashed: SIGSEGV",
                                                          "signal": "SIGSEGV"}))
            else:
                messages.append(Message(t.id, "result", f"{t.model}:{t.stage}"))
        return messages

    def cancel(self, task_id: int) -> None:
        pass

    def shutdown(self) -> None:
        pass


class Recorder:
    def __init__(self, skip: set[tuple[str, str]] = frozenset()):
        self.skip = skip
        self.results, self.errors, self.lost_calls, self.crashes = [], [], [], []

    def bind(self, task):
        return None if (task.model, task.stage) in self.skip else ("args",)

    def event(self, task, event):
        pass

    def result(self, task, result):
        self.results.append(result)

    def error(self, task, error):
        self.errors.append((task.model, task.stage, error["message"]))

    def lost(self, task, reason, retry):
        self.lost_calls.append((task.model, task.stage, retry))

    def crashed(self, task, reason):
        self.crashes.append((task.model, task.stage, reason))


def noop():
    return None


def pipeline(s: Scheduler, model: str, memory: int = 0) -> None:
    def add(stage, resources, after):
        return s.add(Task(s.new_id(), model, stage, noop, (), resources, f"/logs/{model}/{stage}.log", after)).id

    prepare = add("prepare", Resources(net=1, cpus=0), [])
    gpu = add("quantize-gpu", Resources(gpu=1, memory=memory), [prepare])
    gguf = add("quantize-gguf", Resources(cpus=2), [prepare])
    evaluate = add("evaluate", Resources(gpu=1), [gpu, gguf])
    add("publish", Resources(net=1, cpus=0), [gpu, gguf, evaluate])


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    yield ledger
    ledger.close()


def make(ledger, executor, handlers, capacity, **kw) -> Scheduler:
    return Scheduler(executor, ledger, ledger.start_run("scripted", 1), handlers, capacity, **kw)


def test_later_stages_of_earlier_models_go_first(ledger):
    ex, rec = ScriptedExecutor(), Recorder()
    s = make(ledger, ex, rec, Capacity(gpu=1, cpus=3, memory=10, net=2))
    for m in ("A", "B"):
        pipeline(s, m)
    s.run()
    gpu_order = [(m, st) for m, st, slot in ex.started if slot is not None]
    assert gpu_order == [("A", "quantize-gpu"), ("A", "evaluate"), ("B", "quantize-gpu"), ("B", "evaluate")]
    assert len(rec.results) == 10 and not rec.errors
    assert any(len({m for m, _ in c}) == 2 for c in ex.concurrent)  # both models in flight at once


def test_two_gpu_slots_run_two_models_at_once(ledger):
    ex = ScriptedExecutor()
    s = make(ledger, ex, Recorder(), Capacity(gpu=2, cpus=8, memory=10, net=2))
    for m in ("A", "B"):
        pipeline(s, m)
    s.run()
    assert any({("A", "quantize-gpu"), ("B", "quantize-gpu")} <= c for c in ex.concurrent)
    slots = {(m, st): slot for m, st, slot in ex.started if slot is not None}
    assert {slots[("A", "quantize-gpu")], slots[("B", "quantize-gpu")]} == {0, 1}


def test_the_window_bounds_models_in_flight(ledger):
    ex = ScriptedExecutor()
    s = make(ledger, ex, Recorder(), Capacity(gpu=4, cpus=64, memory=10, net=8), window=2)
    for m in "ABCDE":
        pipeline(s, m)
    s.run()
    for running in ex.concurrent:
        assert len({m for m, _ in running}) <= 2, running


def test_memory_the_machine_does_not_have_is_refused_with_the_numbers(ledger):
    ex, rec = ScriptedExecutor(), Recorder()
    s = make(ledger, ex, rec, Capacity(gpu=1, cpus=4, memory=int(8e9), net=2))
    pipeline(s, "big", memory=int(20e9))
    pipeline(s, "small", memory=int(1e9))
    s.run()
    assert rec.errors == [("big", "quantize-gpu", "needs about 20.0 GB of host memory by the plan's estimate and "
                                                  "this machine has 8.0 GB")]
    assert ("small", "quantize-gpu", 0) in ex.started
    assert ("big", "publish", None) in ex.started  # the rest of the model still runs (what was built is published)


def test_stages_whose_memory_does_not_fit_now_wait(ledger):
    ex = ScriptedExecutor()
    s = make(ledger, ex, Recorder(), Capacity(gpu=2, cpus=8, memory=10, net=2))
    pipeline(s, "A", memory=6)
    pipeline(s, "B", memory=6)
    s.run()
    assert not any({("A", "quantize-gpu"), ("B", "quantize-gpu")} <= c for c in ex.concurrent)


def test_a_lost_worker_is_retried_then_given_up_and_recorded(ledger):
    lose = [("A", "quantize-gguf")] * 2 + [("B", "quantize-gguf")] * 3
    ex, rec = ScriptedExecutor(lose), Recorder()
    s = make(ledger, ex, rec, Capacity(gpu=1, cpus=4, memory=10, net=2), max_lost=2)
    pipeline(s, "A")
    pipeline(s, "B")
    s.run()
    assert sorted(rec.lost_calls) == [("A", "quantize-gguf", True), ("A", "quantize-gguf", True),
                                      ("B", "quantize-gguf", False), ("B", "quantize-gguf", True),
                                      ("B", "quantize-gguf", True)]
    tries = [(r.model, r.attempt, r.state, r.node, r.pid is not None) for r in ledger.stages()
             if r.stage == "quantize-gguf"]
    assert sorted(tries) == [("A", 1, "killed", "n1", True), ("A", 2, "killed", "n1", True),
                             ("A", 3, "done", "n1", True), ("B", 1, "killed", "n1", True),
                             ("B", 2, "killed", "n1", True), ("B", 3, "killed", "n1", True)]
    assert ("B", "publish", None) in ex.started  # the model's other work goes on


def test_a_crashed_worker_is_not_restarted_and_is_recorded_as_crashed(ledger):
    """A crash signal is the work's own failure: the scheduler hands it to the driver, never restarts it."""
    ex, rec = ScriptedExecutor(crash=[("A", "quantize-gguf")]), Recorder()
    s = make(ledger, ex, rec, Capacity(gpu=1, cpus=4, memory=10, net=2))
    pipeline(s, "A")
    s.run()
    assert rec.crashes == [("A", "quantize-gguf", "crashed: SIGSEGV")] and rec.lost_calls == []
    assert [(r.state, r.error) for r in ledger.stages() if r.stage == "quantize-gguf"] == [("crashed", "crashed: SIGSEGV")]
    assert ("A", "publish", None) in ex.started


def test_a_task_with_nothing_to_do_is_skipped(ledger):
    ex = ScriptedExecutor()
    s = make(ledger, ex, Recorder(skip={("A", "prepare"), ("A", "evaluate")}), Capacity(gpu=1, cpus=4, memory=10))
    pipeline(s, "A")
    s.run()
    assert [st for _, st, _ in ex.started] == ["quantize-gpu", "quantize-gguf", "publish"]
    assert [r.stage for r in ledger.stages()] == ["quantize-gpu", "quantize-gguf", "publish"]


def test_a_new_run_marks_what_a_killed_driver_left_running(ledger):
    run = ledger.start_run("local", 1)
    row = ledger.stage_started(run, "A", "quantize-gpu")
    ledger.start_run("local", 2)
    assert [(r.id, r.state) for r in ledger.stages()] == [(row, "interrupted")]


def test_busy_fraction_merges_overlapping_stages_per_slot():
    def stage(start, end, gpu, node="n1"):
        return StageRow(0, 1, "m", "s", 1, "done", start, end, node, gpu, 1, None, None)

    spans = [stage(0, 4, "0"), stage(2, 6, "0"), stage(8, 10, "0"), stage(0, 10, "1"), stage(0, 10, None),
             stage(0, 5, "0", node="n2")]
    assert busy_fraction(spans, 0, 10) == {"n1/0": 0.8, "n1/1": 1.0, "n2/0": 0.5}


def test_a_node_that_does_not_see_the_work_dir_says_so(tmp_path):
    from quantpub.errors import QuantpubError
    from quantpub.workdir import check_shared, work_id

    shared = tmp_path / "work"
    shared.mkdir()
    ident = work_id(shared)
    assert work_id(shared) == ident
    check_shared(shared, ident)  # the same directory: fine
    elsewhere = tmp_path / "node2-local"
    elsewhere.mkdir()
    with pytest.raises(QuantpubError, match="not the driver's \\(missing\\).*shared filesystem"):
        check_shared(elsewhere, ident)
    work_id(elsewhere)
    with pytest.raises(QuantpubError, match="another one"):
        check_shared(elsewhere, ident)


def test_a_stage_started_where_the_work_dir_is_not_shared_fails_with_that_reason(tmp_path):
    import time

    from quantpub.executors.local import LocalExecutor
    from quantpub.workdir import work_id

    driver_side = tmp_path / "work"
    driver_side.mkdir()
    ident = work_id(driver_side)
    node_side = tmp_path / "not-shared"
    node_side.mkdir()
    executor = LocalExecutor([None])
    task = Task(1, "m", "prepare", noop, (), Resources(), str(node_side / "logs" / "prepare.log"),
                workdir=(str(node_side), ident))
    executor.submit(task)
    messages = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(m.kind in ("error", "lost", "result") for m in messages):
        messages += executor.poll(0.5)
    executor.shutdown()
    error = next(m for m in messages if m.kind == "error").payload
    assert "not the driver's (missing)" in error["message"] and "shared filesystem" in error["message"]
