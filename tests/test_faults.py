"""Survive every kill: SIGKILL at stage boundaries and mid-stage, a lost worker, two runs on one work dir,
a full disk. After each, the same command publishes every variant exactly once and leaves no .partial-*."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import commit_counts, ledger_rows, SMALL_MATRIX

pytestmark = pytest.mark.slow
MATRIX = SMALL_MATRIX
VARIANTS = {"gptq-4bit-128g-actorder_False", "gptq-4bit-32g-actorder_True", "gguf-Q4_K_M", "gguf-Q8_0"}
EXPECTED_COMMITS = {("quantpub/tiny-llama-GPTQ", "main"): 2,  # the initial commit, then the main variant
                    ("quantpub/tiny-llama-GPTQ", "gptq-4bit-32g-actorder_True"): 3,  # from main, then its own
                    ("quantpub/tiny-llama-GGUF", "main"): 3}  # the initial commit, then one per type
ENV = {**os.environ, "HF_HUB_OFFLINE": "0"}


@pytest.fixture(scope="module")
def inputs(tiny_models, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    (root / "m.yaml").write_text(MATRIX)
    (root / "held-out.txt").write_text(corpus.read_text()[-60_000:])
    return root, tiny_models("llama"), corpus


def command(inputs, work: Path, *extra: str) -> list[str]:
    root, model, corpus = inputs
    return [sys.executable, "-m", "quantpub", "run", str(root / "m.yaml"), "--model", str(model), "--work", str(work),
            "--calibration-file", str(corpus), "--eval-file", str(root / "held-out.txt"), "--device", "cpu",
            "--n-samples", "4", "--seq-len", "64", "--context", "64", "--windows", "2", *extra]


def stages(work: Path, last_run_only: bool = False) -> list[tuple[str, str, int | None]]:
    """(stage, state, pid) of every stage row so far (of the newest run), read as a second process would."""
    path = work / "ledger.sqlite3"
    if not path.is_file():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            where = " WHERE run=(SELECT max(id) FROM runs)" if last_run_only else ""
            return db.execute(f"SELECT stage, state, pid FROM stages{where} ORDER BY id").fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError:
        return []  # the table is being created


def start(inputs, work: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(command(inputs, work, *extra), env=ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def kill_run(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every worker it started
    proc.wait(60)


def finish(inputs, work: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command(inputs, work), env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def assert_published_once(work: Path) -> None:
    rows = {r.variant: r for r in ledger_rows(work)}
    assert {v: r.state for v, r in rows.items()} == {v: "published" for v in VARIANTS}
    assert all(r.attempts == 0 for r in rows.values()), {v: r.attempts for v, r in rows.items()}
    assert commit_counts(work) == EXPECTED_COMMITS
    assert not list(work.glob("*/.partial-*"))
    db = sqlite3.connect(work / "ledger.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


def runs(work: Path) -> int:
    path = work / "ledger.sqlite3"
    if not path.is_file():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT count(*) FROM runs").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0


def running(work: Path, stage: str) -> bool:
    """The newest run has ``stage`` running in a worker."""
    return any(s == stage and state == "running" and pid for s, state, pid in stages(work, last_run_only=True))


def published_some(work: Path) -> bool:
    path = work / "ledger.sqlite3"
    if not path.is_file():
        return False
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT count(*) FROM variants WHERE state='published'").fetchone()[0] > 0
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()


KILL_POINTS = {
    "mid-quantize": lambda work: running(work, "quantize-gpu") and any(
        (work / "tiny-llama" / v / "quantpub.json").is_file() for v in VARIANTS),
    "evaluate starts": lambda work: running(work, "evaluate"),
    "mid-publish": published_some,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_the_same_command_publishes_everything_once(inputs, tmp_path, local_hub_online, point):
    work = tmp_path / "work"
    proc = start(inputs, work)
    wait_for(proc, lambda: KILL_POINTS[point](work), point)
    kill_run(proc)
    finish(inputs, work)
    assert_published_once(work)
    runs = sqlite3.connect(work / "ledger.sqlite3").execute("SELECT count(*) FROM runs").fetchone()[0]
    assert runs == 2


def test_kills_are_not_attempts(inputs, tmp_path, local_hub_online):
    """Two kills during quantization, then a third run still builds every variant (max attempts is 2)."""
    work = tmp_path / "work"
    for i in range(2):
        proc = start(inputs, work)
        wait_for(proc, lambda: runs(work) == i + 1 and running(work, "quantize-gpu"), "quantization")
        time.sleep(1.0)
        kill_run(proc)
    interrupted = [s for s in stages(work) if s[1] == "interrupted"]
    assert len(interrupted) >= 2  # the killed driver left them running; the next run marked them
    finish(inputs, work)
    assert_published_once(work)
    assert sum(r.interruptions for r in ledger_rows(work)) >= 1


def test_a_lost_gptq_worker_fails_nothing_and_is_restarted(inputs, tmp_path, local_hub_online):
    work = tmp_path / "work"
    proc = start(inputs, work)
    wait_for(proc, lambda: running(work, "quantize-gpu"), "the GPTQ group")
    pid = next(p for s, state, p in stages(work) if s == "quantize-gpu" and state == "running")
    time.sleep(2.0)
    os.kill(pid, signal.SIGKILL)  # the worker only: the driver sees it lost
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "quantize-gpu lost: killed by SIGKILL" in out  # from outside: an interruption, started again
    assert_published_once(work)
    states = [(s, state) for s, state, _ in stages(work) if s == "quantize-gpu"]
    assert states[0] == ("quantize-gpu", "killed") and states[-1] == ("quantize-gpu", "done")
    assert all(r.attempts == 0 and r.state == "published" for r in ledger_rows(work))
    gguf = [s for s in stages(work) if s[0] == "quantize-gguf"]
    assert [s[1] for s in gguf] == ["done"]  # the GGUF group never noticed


def test_two_runs_on_one_work_dir(inputs, tmp_path, local_hub_online):
    work = tmp_path / "work"
    first = start(inputs, work)
    wait_for(first, lambda: running(work, "quantize-gpu"), "the first run to start")
    second = subprocess.run(command(inputs, work), env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 4  # the machine: another run holds the work dir
    assert second.stderr.strip().splitlines() == [
        line for line in second.stderr.strip().splitlines() if line.startswith("error: ")]
    assert f"in use by another quantpub run (pid {first.pid}" in second.stderr
    kill_run(first)  # its lock dies with it: the next run takes it over
    finish(inputs, work)
    assert_published_once(work)


def test_a_partial_directory_is_never_published(inputs, tmp_path, local_hub_online):
    work = tmp_path / "work"
    out = work / "tiny-llama"
    fake = out / ".partial-gptq-4bit-128g-actorder_False-999"
    fake.mkdir(parents=True)
    (fake / "model.safetensors").write_bytes(b"unvalidated")
    (fake / "quantpub.json").write_text(json.dumps({"variant": "gptq-4bit-128g-actorder_False", "method": "gptq",
                                                    "repo": "quantpub/tiny-llama-GPTQ", "branch": "main",
                                                    "files": {}}))
    finish(inputs, work)
    assert not fake.exists()
    assert_published_once(work)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_rerun_recovers(inputs, tmp_path, small_disk, local_hub_online):
    work = small_disk / "work"
    proc = start(inputs, work)
    wait_for(proc, lambda: running(work, "quantize-gpu"), "quantization")
    filler = small_disk / "filler"
    with filler.open("wb") as fh:  # another program fills the disk under the run
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
        except OSError:
            pass
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 4, out[-2000:] + err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and ("no space left" in errors[0] or "disk" in errors[0] and "full" in errors[0]), err
    assert "Traceback" not in err
    filler.unlink()
    finish(inputs, work)
    assert_published_once(work)


def test_status_after_a_killed_driver_says_it_is_gone(inputs, tmp_path, local_hub_online):
    """The ledger still says "running" (nobody was left to say otherwise); status sees the lock is free."""
    work = tmp_path / "work"
    proc = start(inputs, work)
    wait_for(proc, lambda: running(work, "quantize-gpu"), "quantization")
    kill_run(proc)
    done = subprocess.run([sys.executable, "-m", "quantpub", "status", "--work", str(work)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "interrupted (driver gone)" in done.stdout and "quantize-gpu" in done.stdout
    assert not any(line.strip() == "running" for line in done.stdout.splitlines())
