"""A native crash costs one variant, never the job: crashes injected into the README example run and into a
stage's own process, told apart from kills; what the ledger, the summary and ``quantpub status`` say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ledger_rows, SMALL_MATRIX

pytestmark = pytest.mark.slow
CRASHES = "validate:gguf-Q4_K_M,validate:gptq-4bit-32g-actorder_True"
PROGRESS = ("calibrating", "quantizing", "validating", "converting", "evaluating", "uploading")


def quantpub(*args: str, crash: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    env.pop("QUANTPUB_TEST_CRASH", None)
    if crash:
        env["QUANTPUB_TEST_CRASH"] = crash
    return subprocess.run([sys.executable, "-m", "quantpub", *args], env=env, capture_output=True, text=True,
                          timeout=1500, cwd=cwd)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README's example run (tiny llama, thebloke.yaml: 19 variants), twice, with two native crashes."""
    work = tmp_path_factory.mktemp("example") / "work"
    first = quantpub("run", "--work", str(work), crash=CRASHES)
    rows_after_first = {r.variant: r for r in ledger_rows(work)}
    second = quantpub("run", "--work", str(work), crash=CRASHES)
    return work, first, rows_after_first, second


def test_the_other_variants_are_published_and_the_crashes_named(example):
    work, first, rows, _ = example
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    crashed = {v for v, r in rows.items() if r.state == "crashed"}
    assert crashed == {"gguf-Q4_K_M", "gptq-4bit-32g-actorder_True"}
    assert all(r.state == "published" for v, r in rows.items() if v not in crashed) and len(rows) == 19
    for variant, group in (("gguf-Q4_K_M", "quantize-gguf"), ("gptq-4bit-32g-actorder_True", "quantize-gpu")):
        row = rows[variant]
        log = work / "tiny-llama" / "logs" / group / f"{variant}.log"
        assert row.attempts == 1 and row.interruptions == 0  # crashed: an attempt, not an interruption
        assert row.error.startswith(f"crashed: SIGSEGV during validate of {variant} (log: {log})")
        assert "Fatal Python error: Segmentation fault" in log.read_text()
        line = next(line for line in first.stdout.splitlines() if line.startswith(f"CRASHED tiny-llama {variant}:"))
        assert "SIGSEGV" in line and str(log) in line
    assert "17 published, 2 crashed" in first.stdout


def test_status_names_the_crashes_and_no_stale_progress(example):
    work, *_ = example
    done = quantpub("status", "--work", str(work))
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("tiny-llama ")]
    assert len(rows) == 19
    assert sum(" crashed " in line for line in rows) == 2 and sum(" published " in line for line in rows) == 17
    assert not any(phase in done.stdout for phase in PROGRESS)
    assert "running" not in done.stdout  # the driver finished: nothing is shown as running


def test_a_rerun_retries_a_crash_once_then_stops(example):
    work, _, _, second = example
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    rows = {r.variant: r for r in ledger_rows(work)}
    for variant in ("gguf-Q4_K_M", "gptq-4bit-32g-actorder_True"):
        assert rows[variant].state == "crashed" and rows[variant].attempts == 2  # tried once more, then given up
    third = quantpub("run", "--work", str(work), crash=CRASHES)
    assert third.returncode == 1
    rows = {r.variant: r for r in ledger_rows(work)}
    assert {v: r.attempts for v, r in rows.items() if r.state == "crashed"} == {
        "gguf-Q4_K_M": 2, "gptq-4bit-32g-actorder_True": 2}  # the same crash twice: not tried again


def test_a_crash_in_the_stage_process_fails_the_variant_it_was_building(tiny_models, corpus, tmp_path):
    """The calibration pass runs in the GPTQ group's own process: a crash there ends the stage; the variant it
    was quantizing fails as crashed, the one already built stays, the GGUF group and publishing go on."""
    matrix = tmp_path / "m.yaml"
    matrix.write_text(SMALL_MATRIX)
    work = tmp_path / "work"
    done = quantpub("run", str(matrix), "--model", str(tiny_models("llama")), "--work", str(work),
                    "--calibration-file", str(corpus), "--eval-file", str(corpus), "--device", "cpu",
                    "--n-samples", "4", "--seq-len", "64", "--context", "64", "--windows", "2",
                    crash="quantize:gptq-4bit-32g-actorder_True")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r.variant: r for r in ledger_rows(work)}
    assert rows["gptq-4bit-32g-actorder_True"].state == "crashed"
    assert rows["gptq-4bit-32g-actorder_True"].error.startswith(
        "crashed: SIGSEGV during quantize-gpu (quantizing) of gptq-4bit-32g-actorder_True")
    assert {v: r.state for v, r in rows.items() if v != "gptq-4bit-32g-actorder_True"} == {
        "gptq-4bit-128g-actorder_False": "published", "gguf-Q4_K_M": "published", "gguf-Q8_0": "published"}
    from quantpub.ledger import Ledger

    ledger = Ledger(work / "ledger.sqlite3")
    try:
        gpu = [(s.state, s.error) for s in ledger.stages() if s.stage == "quantize-gpu"]
    finally:
        ledger.close()
    assert gpu == [("crashed", "crashed: SIGSEGV")]  # not started again: the driver re-plans what it had left


def test_every_command_takes_paths_relative_to_where_it_starts(tiny_models, corpus, tmp_path):
    """From a directory that is not the work dir, every path option given relative to it."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    (elsewhere / "inputs").mkdir(parents=True)
    import shutil

    shutil.copytree(tiny_models("llama"), elsewhere / "inputs" / "model")
    (elsewhere / "inputs" / "m.yaml").write_text("gguf:\n  types: [Q8_0]\n")
    shutil.copy(corpus, elsewhere / "inputs" / "text.txt")
    (elsewhere / "inputs" / "models.txt").write_text("model\n")  # relative to the models file
    rel = Path("..") / "elsewhere"
    inputs = rel / "inputs"

    def ok(*args: str) -> subprocess.CompletedProcess:
        done = quantpub(*args, cwd=here)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
        return done

    ok("plan", str(inputs / "m.yaml"), "--model", str(inputs / "model"), "--device", "cpu")
    ok("quantize", str(inputs / "m.yaml"), "--model", str(inputs / "model"), "--out", str(rel / "out"),
       "--calibration-file", str(inputs / "text.txt"), "--device", "cpu", "--n-samples", "4", "--seq-len", "64")
    ok("evaluate", str(rel / "out"), "--eval-file", str(inputs / "text.txt"), "--context", "64", "--windows", "2")
    ok("card", str(rel / "out"))
    run = ok("run", str(inputs / "m.yaml"), "--models-file", str(inputs / "models.txt"), "--work", str(rel / "work"),
             "--calibration-file", str(inputs / "text.txt"), "--eval-file", str(inputs / "text.txt"),
             "--device", "cpu", "--n-samples", "4", "--seq-len", "64", "--context", "64", "--windows", "2")
    assert "1 published" in run.stdout
    ok("status", "--work", str(rel / "work"))
    assert [r.state for r in ledger_rows(elsewhere / "work")] == ["published"]
    assert (elsewhere / "out" / "gguf-Q8_0" / "quantpub.json").is_file() and not (here / "out").exists()
    gc = ok("hub", "gc", "--data-dir", str(rel / "work" / "hub"))
    assert "blob" in gc.stdout or "nothing" in gc.stdout or gc.stdout.strip()
    server = subprocess.Popen([sys.executable, "-m", "quantpub", "hub", "serve", "--data-dir", str(rel / "work" / "hub"),
                               "--port", "0", "--users", str(rel / "work" / "hub" / "users.yaml")], cwd=here,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "0"})
    try:
        url = _served_url(server)
        import httpx2

        from quantpub.hub import load_or_create_users

        assert httpx2.get(f"{url}/api/models/quantpub/model-GGUF", timeout=30).status_code == 200
        token = load_or_create_users(elsewhere / "work" / "hub")[0].write_token()
        published = ok("publish", str(rel / "out"), "--endpoint", url, "--token", token, "--namespace", "quantpub",
                       "--repo", "quantpub/out-GGUF")
        assert "gguf-Q8_0: quantpub/out-GGUF@main published" in published.stdout
    finally:
        server.terminate()
        server.wait(30)


def _served_url(server: subprocess.Popen) -> str:
    """The URL a ``quantpub hub serve --port 0`` prints when it listens."""
    import re
    import time

    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            if server.poll() is not None:
                pytest.fail(f"hub serve ended (rc {server.returncode}): {''.join(seen)[-2000:]}")
            continue
        seen.append(line)
        found = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if found:
            return found.group(1)
    pytest.fail(f"hub serve printed no URL: {''.join(seen)[-2000:]}")
