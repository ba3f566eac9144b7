"""quantpub run end to end: killed mid-run with SIGKILL, re-run, every variant published exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import commit_counts, ledger_rows

pytestmark = pytest.mark.slow
MATRIX = """\
gptq:
  variants:
    - {bits: 4, group_size: 128}
    - {bits: 4, group_size: 32, act_order: true}
awq:
  targets: [{}]
gguf:
  types: [Q4_K_M, Q8_0]
"""


@pytest.fixture(scope="module")
def setup(tiny_models, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "m.yaml").write_text(MATRIX)
    text = corpus.read_text()
    (root / "held-out.txt").write_text(text[-60_000:])
    return root, tiny_models("llama")


def command(root: Path, model: Path, corpus: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantpub", "run", str(root / "m.yaml"), "--model", str(model), "--work", str(work),
            "--calibration-file", str(corpus), "--eval-file", str(root / "held-out.txt"), "--device", "cpu",
            "--n-samples", "8", "--seq-len", "128", "--context", "128", "--windows", "2", *extra]


@pytest.fixture(scope="module")
def killed_and_resumed(setup, corpus, tmp_path_factory):
    root, model = setup
    work = tmp_path_factory.mktemp("work")
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    proc = subprocess.Popen(command(root, model, corpus, work), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    out = work / "tiny-llama"
    while time.monotonic() < deadline and proc.poll() is None:
        built = {p.parent.name for p in out.glob("*/quantpub.json")}
        if built and not {"gptq-4bit-32g-actorder_True", "awq-4bit-128g-GEMM"} <= built:
            break  # some variants finished, the GPU group is still working
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes
    proc.wait(60)
    before = {r.variant: r.state for r in ledger_rows(work)}
    finished = {p.parent.name for p in out.glob("*/quantpub.json")}  # on disk when killed
    stamps = {v: (work / "tiny-llama" / v / "quantpub.json").stat().st_mtime_ns for v in finished}
    done = subprocess.run(command(root, model, corpus, work), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, before, finished, stamps, done


def test_rerun_after_sigkill_publishes_everything_exactly_once(killed_and_resumed, local_hub_online):
    work, before, finished, stamps, done = killed_and_resumed
    assert finished and len(finished) < 5  # killed in the middle
    rows = ledger_rows(work)
    assert {r.variant: r.state for r in rows} == {v: "published" for v in before}
    assert all(r.commit_oid and len(r.commit_oid) == 40 for r in rows)
    counts = commit_counts(work)
    # initial commit + one per variant on its branch; branches start from main (initial + main variant)
    assert counts[("quantpub/tiny-llama-GPTQ", "main")] == 2
    assert counts[("quantpub/tiny-llama-GPTQ", "gptq-4bit-32g-actorder_True")] == 3
    assert counts[("quantpub/tiny-llama-AWQ", "main")] == 2
    assert counts[("quantpub/tiny-llama-GGUF", "main")] == 3


def test_nothing_finished_was_redone(killed_and_resumed):
    work, _, finished, stamps, _ = killed_and_resumed
    rows = {r.variant: r for r in ledger_rows(work)}
    for v in finished:
        assert (work / "tiny-llama" / v / "quantpub.json").stat().st_mtime_ns >= stamps[v]
        assert rows[v].attempts == 0, v  # built once, before the kill, and recognised by hash after it
    assert not list((work / "tiny-llama").glob(".partial-*"))


def test_a_third_run_changes_nothing(killed_and_resumed, setup, corpus, local_hub_online):
    work, *_ = killed_and_resumed
    root, model = setup
    before = commit_counts(work)
    rows_before = ledger_rows(work)
    trace = work.parent / "openat.trace"
    done = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(trace),
                           *command(root, model, corpus, work)], env={**os.environ, "HF_HUB_OFFLINE": "0"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert commit_counts(work) == before
    # every built file is read once (hashed by the reconcile at the start), not again by publishing
    built = {p for p in (work / "tiny-llama").glob("*/*") if p.parent.name in {r.variant for r in rows_before}
             and p.name != "quantpub.json"}
    opened = [line for line in trace.read_text().splitlines() if "ENOENT" not in line]
    reads = {p: sum(f'"{p}"' in line for line in opened) for p in built}
    assert built and all(n <= 1 for n in reads.values()), {str(p): n for p, n in reads.items() if n > 1}
    assert sum(reads.values()) == len(built)  # and every one of them once: the reconcile checks each hash
    assert {r.variant: r.attempts for r in ledger_rows(work)} == {r.variant: r.attempts for r in rows_before}
    assert all(r.attempts == 0 for r in rows_before)  # kills are interruptions, not failed attempts


def test_ray_executor_gives_the_same_ledger(killed_and_resumed, setup, corpus, tmp_path, local_hub_online):
    """Also with the GPTQ/AWQ group streamed layer by layer (``--stream always``), which the driver
    hands to the stage through Ray: the same variants, states and commits."""
    import json

    work, *_ = killed_and_resumed
    root, model = setup
    ray_work = tmp_path / "ray-work"
    done = subprocess.run(command(root, model, corpus, ray_work, "--executor", "ray", "--stream", "always"),
                          env={**os.environ, "HF_HUB_OFFLINE": "0"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    def shape(rows):
        return [(r.variant, r.method, r.repo, r.target, r.state, r.attempts) for r in rows]

    assert shape(ledger_rows(ray_work)) == shape(ledger_rows(work))
    assert commit_counts(ray_work) == commit_counts(work)
    streamed = {p.parent.name: json.loads(p.read_text()).get("streamed")
                for p in (ray_work / "tiny-llama").glob("*/quantpub.json")}
    assert streamed == {"gptq-4bit-128g-actorder_False": True, "gptq-4bit-32g-actorder_True": True,
                        "awq-4bit-128g-GEMM": True, "gguf-Q4_K_M": None, "gguf-Q8_0": None}


def test_an_edited_matrix_is_reported_and_only_what_is_new_is_built(setup, corpus, tmp_path, local_hub_online):
    """Between two runs one GGUF type is added to the matrix and one removed: the second run says so, builds the
    new one only, leaves the removed one (files, ledger row, hub) as it was and makes no commit on the branches
    of the variants that did not change."""
    root, model = setup
    edited = tmp_path / "inputs"
    edited.mkdir()
    (edited / "m.yaml").write_text(MATRIX)
    shutil.copy(root / "held-out.txt", edited / "held-out.txt")
    work = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    first = subprocess.run(command(edited, model, corpus, work), env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = commit_counts(work)
    q8 = work / "tiny-llama" / "gguf-Q8_0" / "quantpub.json"
    stamp = q8.stat().st_mtime_ns
    (edited / "m.yaml").write_text(MATRIX.replace("types: [Q4_K_M, Q8_0]", "types: [Q4_K_M, Q5_K_M]"))
    second = subprocess.run(command(edited, model, corpus, work), env=env, capture_output=True, text=True,
                            timeout=1500)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    said = second.stdout + second.stderr
    assert "the plan changed since the last run: new variants, to build: gguf-Q5_K_M" in said
    assert "no longer in the matrix, left as they are (built files and published branches are kept): gguf-Q8_0" in said
    rows = {r.variant: r.state for r in ledger_rows(work)}
    assert rows["gguf-Q5_K_M"] == "published" and rows["gguf-Q8_0"] == "published"  # left as it was
    assert q8.stat().st_mtime_ns == stamp
    after = commit_counts(work)
    for (repo, branch), n in before.items():
        if branch != "main":
            assert after[(repo, branch)] == n, (repo, branch)  # their variants did not change
    assert after[("quantpub/tiny-llama-GGUF", "main")] > before[("quantpub/tiny-llama-GGUF", "main")]
    from quantpub.ledger import Ledger

    ledger = Ledger(work / "ledger.sqlite3")
    try:
        last = ledger.last_run()
        built = [s.stage for s in ledger.stages(last) if s.stage.startswith("quantize")]
    finally:
        ledger.close()
    assert built == ["quantize-gguf"]  # nothing of the GPTQ/AWQ group was redone
