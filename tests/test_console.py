"""What a person sees: plain lines off a terminal, the live view in a real terminal (tmux), the summary,
quiet libraries, and nothing written outside the work dir."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from conftest import SMALL_MATRIX
from quantpub.console import PlainConsole, summary_lines, summary_table
from quantpub.formatting import metric as fmt_metric
from quantpub.executors import Resources, Task
from quantpub.ledger import Row

MATRIX = SMALL_MATRIX


def row(variant: str, state: str, **kw) -> Row:
    base = dict(model="/m/tiny", variant=variant, method="gptq", repo="ns/tiny-GPTQ", target="main", state=state,
                attempts=0, error=None, size=None, manifest_sha256=None, commit_oid=None, timings={}, tools={})
    return Row(**{**base, **kw})


def render(renderable) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(renderable)
    return out.getvalue()


def test_metrics_keep_enough_digits_to_tell_variants_apart():
    assert fmt_metric(0.0000123, 3) == "1.23e-05"
    assert fmt_metric(0.000456, 3) == "0.000456"
    assert fmt_metric(0.3001, 3) == "0.3"
    assert fmt_metric(None) == "-"


def test_summary_lists_each_variant_and_each_failure_with_its_log():
    rows = [row("gptq-a", "published", size=5_200_000, commit_oid="a" * 40, metrics={"perplexity": 12.3456,
                                                                                       "kld": 0.0000456}),
            row("gptq-b", "failed", error="RuntimeError: out of memory\ntraceback...", log="/w/tiny/logs/q.log"),
            row("gguf-Q8_0", "validated", method="gguf", target="tiny.Q8_0.gguf", interruptions=2)]
    table = render(summary_table(rows))
    assert re.search(r"gptq-a\s+main\s+5\.2 MB\s+-\s+12\.35\s+4\.56e-05\s+published\s+aaaaaaaaaa", table), table
    assert re.search(r"gguf-Q8_0\s+tiny\.Q8_0\.gguf\s+-\s+-\s+-\s+-\s+validated \(2 interrupted\)", table), table
    lines = summary_lines(rows, "http://hub", None, ["tiny: publish failed: HTTP 500 (log: /w/p.log)"])
    assert "open http://hub/ns/tiny-GPTQ" in lines
    assert "FAILED tiny gptq-b: RuntimeError: out of memory (log: /w/tiny/logs/q.log)" in lines
    assert "FAILED tiny: publish failed: HTTP 500 (log: /w/p.log)" in lines
    assert lines[-1] == "1 published, 1 failed, 1 validated"


def test_plain_lines_one_per_state_change():
    out = io.StringIO()
    console = PlainConsole(out)
    task = Task(1, "/m/tiny", "quantize-gpu", print, (), Resources(gpu=1), "/w/tiny/logs/quantize-gpu.log")
    console.event(task, {"variant": None, "phase": "placed", "node": "n1", "gpu": "0"})
    for step in range(1, 30):
        console.event(task, {"variant": "gptq-a", "phase": "quantizing", "step": step, "steps": 30})
    console.event(task, {"variant": "gptq-a", "phase": "validating"})
    console.failed("/m/tiny", "gptq-b", "RuntimeError: boom", "/w/tiny/logs/quantize-gpu.log", final=False)
    console.failed("/m/tiny", "gptq-b", "RuntimeError: boom", "/w/tiny/logs/quantize-gpu.log", final=True)
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["tiny: quantize-gpu started on n1 GPU 0",
                     "tiny gptq-b: FAILED: RuntimeError: boom (log: /w/tiny/logs/quantize-gpu.log)"]


def _inputs(tmp_path: Path, tiny_models, corpus) -> list[str]:
    (tmp_path / "m.yaml").write_text(MATRIX)
    (tmp_path / "held-out.txt").write_text(corpus.read_text()[-60_000:])
    return [str(tmp_path / "m.yaml"), "--model", str(tiny_models("llama")), "--calibration-file", str(corpus),
            "--eval-file", str(tmp_path / "held-out.txt"), "--device", "cpu", "--n-samples", "4", "--seq-len", "64",
            "--context", "64", "--windows", "2"]


@pytest.mark.slow
def test_the_readme_example_is_short_quiet_and_stays_in_its_work_dir(tmp_path):
    """README's main command from an empty directory, output to a pipe: at most 60 lines, nothing else created."""
    cwd = tmp_path / "fresh"
    cwd.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    done = subprocess.run([str(Path(sys.executable).with_name("quantpub")), "run"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)
    output = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, "\n".join(output[-60:])
    assert len(output) <= 60, "\n".join(output)
    assert sorted(p.name for p in cwd.iterdir()) == ["quantpub-work"]
    text = "\n".join(output)
    assert "19 published" in text and "gptq-4bit-32g-actorder_True" in text
    for noise in ("GPTQModel", "Warning", "HTTP Request", "_pytree", "torchao", "Traceback"):
        assert noise not in text, noise
    assert not list((cwd / "quantpub-work").rglob("gptq_log_*")) or all(
        "/logs/" in str(p) for p in (cwd / "quantpub-work").rglob("gptq_log_*"))  # GPTQModel's logs: in the stage's


@pytest.mark.slow
def test_a_failing_variant_is_one_line_naming_it_its_reason_and_log(tmp_path, tiny_models, corpus):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('QUANTPUB_TEST_FAIL'):\n"
        "    import quantpub.build_session as w\n"
        "    real = w.build_variant\n"
        "    def build_variant(session, job, *a, **k):\n"
        "        if job.id == os.environ['QUANTPUB_TEST_FAIL']:\n"
        "            raise RuntimeError('injected failure for the test')\n"
        "        return real(session, job, *a, **k)\n"
        "    w.build_variant = build_variant\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "QUANTPUB_TEST_FAIL": "gptq-4bit-32g-actorder_True",
           "PYTHONPATH": os.pathsep.join([str(inject), *filter(None, [os.environ.get("PYTHONPATH")])])}
    work = tmp_path / "work"
    done = subprocess.run([sys.executable, "-m", "quantpub", "run", *_inputs(tmp_path, tiny_models, corpus), "--work",
                           str(work)], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    log = work / "tiny-llama" / "logs" / "quantize-gpu.log"
    failed = [line for line in done.stdout.splitlines() if "FAILED" in line and "gptq-4bit-32g" in line]
    assert len(failed) == 2, done.stdout  # the progress line, and the summary's
    assert failed[0].endswith(f"tiny-llama gptq-4bit-32g-actorder_True: FAILED: RuntimeError: injected failure for "
                              f"the test (log: {log})")
    assert failed[1] == (f"FAILED tiny-llama gptq-4bit-32g-actorder_True: RuntimeError: injected failure for the test "
                         f"(log: {log})")
    assert "injected failure for the test" in log.read_text()
    assert "3 published, 1 failed" in done.stdout


@pytest.mark.slow
def test_live_view_in_a_real_terminal(tmp_path, tiny_models, corpus):
    """tmux (installed by scripts/install-test-tools.sh) runs the command on a terminal; capture-pane shows
    the live rows, then the summary."""
    session = f"qp{os.getpid()}"
    work = tmp_path / "work"
    args = " ".join(_inputs(tmp_path, tiny_models, corpus))
    # GPTQModel's logbar, imported by other tests in this process, exports COLUMNS=80: not the terminal's
    command = (f"unset COLUMNS LINES; HF_HUB_OFFLINE=0 {sys.executable} -m quantpub run {args} --work {work}; "
               "echo EXIT=$?; sleep 600")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", command], check=True)
    frames = []
    try:
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline:
            pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
            frames.append(pane)
            if "EXIT=" in pane:
                break
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    (tmp_path / "frames.txt").write_text("\n=====\n".join(frames))
    final = frames[-1]
    assert "EXIT=0" in final, final
    live = [f for f in frames if "quantpub run  models" in f and "EXIT=" not in f]
    assert live, frames[-3:]
    assert any(re.search(r"variant\s+branch / file\s+stage\s+size\s+elapsed\s+ETA", f) for f in live)
    assert any(re.search(r"gptq-4bit-32g-actorder_True\s+gptq-4bit-32g-actorder_True\s+(quantizing layer \d/2|"
                         r"validating|queued)", f) for f in live), live[-1]
    assert any(re.search(r"gguf-Q8_0\s+tiny-llama\.Q8_0\.gguf\s+\S", f) for f in live)
    assert re.search(r"variants 4/4 built, 4 published", final), final
    assert re.search(r"variant\s+branch / file\s+size\s+bits/w\s+PPL\s+KLD\s+state", final), final
    assert re.search(r"gptq-4bit-128g-actorder_False\s+main\s+[\d.]+ MB\s+[\d.]+\s+[\d.]+\s+[\d.e-]+\s+published", final)


def test_rows_of_a_stage_that_ended_show_how_it_ended_not_its_last_progress(tmp_path):
    """A stage lost or crashed mid-work: every variant row it carried leaves 'quantizing' / 'validating'."""
    from rich.console import Console

    from quantpub.console import LiveConsole
    from quantpub.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    for variant in ("gguf-Q4_K_M", "gguf-Q8_0", "gguf-Q2_K"):
        ledger.plan("/m/tiny", variant, "gguf", "ns/tiny-GGUF", f"tiny.{variant[5:]}.gguf")
    view = LiveConsole(Console(file=io.StringIO(), width=200, color_system=None))
    view.plans, view.ledger = {"/m/tiny": types.SimpleNamespace(jobs=[])}, ledger
    task = Task(3, "/m/tiny", "quantize-gguf", print, (), Resources(), "/w/logs/quantize-gguf.log")
    view.event(task, {"phase": "placed", "variant": None})
    view.event(task, {"variant": "gguf-Q4_K_M", "phase": "validating"})
    view.event(task, {"variant": "gguf-Q8_0", "phase": "quantizing", "step": 3, "steps": 8})
    view.event(task, {"variant": "gguf-Q2_K", "phase": "converting"})
    ledger.fail("/m/tiny", "gguf-Q4_K_M", "crashed: SIGSEGV during quantize-gguf (validating)", state="crashed")
    view.stage(task, "crashed", "crashed: SIGSEGV")
    cells = {r.variant: str(view._cells(r)[2]) for r in ledger.rows()}
    assert cells == {"gguf-Q4_K_M": "crashed", "gguf-Q8_0": "interrupted", "gguf-Q2_K": "interrupted"}
    assert not any(phase in render(view.render()) for phase in ("validating", "quantizing", "converting"))
    ledger.close()
