"""A two-node Ray cluster on this machine (`ray start --head` + `ray start --address`, each with a GPU slot
declared): three models run through it, stages land on both nodes, every variant is published exactly once,
and a Ray worker killed mid-stage is retried and the run still finishes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import commit_counts, ledger_rows, ONE_EACH_MATRIX

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
MATRIX = ONE_EACH_MATRIX
MODELS = ("tiny-a", "tiny-b", "tiny-c")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Head and second node, their processes found (and killed) by this cluster's own temp dir."""
    temp = tempfile.mkdtemp(prefix="qpray", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard=false",
                        "--resources", '{"head_node": 1}', *common], env=env, check=True, capture_output=True,
                       timeout=180)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--resources", '{"second_node": 1}', *common],
                       env=env, check=True, capture_output=True, timeout=180)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run(["pkill", "-9", "-f", temp], check=False)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-models")
    for name in MODELS:
        shutil.copytree(tiny_models("llama"), root / name)
    (root / "m.yaml").write_text(MATRIX)
    return root


def running_worker(work: Path) -> int | None:
    path = work / "ledger.sqlite3"
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT pid FROM stages WHERE stage='quantize-gpu' AND state='running' AND pid IS NOT NULL"
                             " ORDER BY id LIMIT 1").fetchone()
        finally:
            db.close()
    except sqlite3.OperationalError:
        return None
    return row[0] if row else None


def test_three_models_on_two_nodes_with_a_killed_worker(cluster, models, corpus, tmp_path, local_hub_online):
    address, env = cluster
    work = tmp_path / "work"
    held_out = tmp_path / "held-out.txt"
    held_out.write_text(corpus.read_text()[-60_000:])
    cmd = [sys.executable, "-m", "quantpub", "run", str(models / "m.yaml"), "--model",
           *[str(models / m) for m in MODELS], "--work", str(work), "--executor", "ray", "--ray-address", address,
           "--calibration-file", str(corpus), "--eval-file", str(held_out), "--device", "cpu", "--n-samples", "4",
           "--seq-len", "64", "--context", "64", "--windows", "2"]
    proc = subprocess.Popen(cmd, env={**env, "HF_HUB_OFFLINE": "0"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    pid = None
    while pid is None and time.monotonic() < deadline and proc.poll() is None:
        pid = running_worker(work)
        time.sleep(0.1)
    assert pid, "no GPTQ stage was seen running"
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)  # a Ray worker process, mid-stage
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]

    rows = ledger_rows(work)
    assert len(rows) == 6 and {r.state for r in rows} == {"published"}
    assert all(r.attempts == 0 for r in rows)
    db = sqlite3.connect(work / "ledger.sqlite3")
    stages = db.execute("SELECT model, stage, state, node, gpu FROM stages ORDER BY id").fetchall()
    db.close()
    assert len({node for *_, node, _ in stages if node}) == 2, stages  # both nodes did work
    lost = [s for s in stages if s[2] == "lost"]
    assert len(lost) == 1 and lost[0][1] == "quantize-gpu"
    assert [s[2] for s in stages if s[:2] == lost[0][:2]] == ["lost", "done"]  # retried, then finished
    assert all(gpu is not None for _, stage, state, _, gpu in stages if stage == "quantize-gpu" and state == "done")
    for name in MODELS:
        counts = commit_counts(work, repos=(f"quantpub/{name}-GPTQ", f"quantpub/{name}-GGUF"))
        assert counts == {(f"quantpub/{name}-GPTQ", "main"): 2, (f"quantpub/{name}-GGUF", "main"): 2}, counts


def test_stages_need_no_input_file_once_the_plan_is_written(cluster, models, corpus, tmp_path, local_hub_online):
    """The matrix, calibration and evaluation files are deleted as soon as every model's plan.json is written (as
    if they existed only where the driver started): every stage on either node reads the plan and the texts it
    snapshotted, and every variant is built and published."""
    address, env = cluster
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    matrix, calib, held_out = inputs / "m.yaml", inputs / "calibration.txt", inputs / "held-out.txt"
    matrix.write_text(MATRIX)
    calib.write_text(corpus.read_text())
    held_out.write_text(corpus.read_text()[-60_000:])
    work = tmp_path / "work"
    names = MODELS[:2]
    cmd = [sys.executable, "-m", "quantpub", "run", str(matrix), "--model", *[str(models / m) for m in names],
           "--work", str(work), "--executor", "ray", "--ray-address", address, "--calibration-file", str(calib),
           "--eval-file", str(held_out), "--device", "cpu", "--n-samples", "4", "--seq-len", "64", "--context", "64",
           "--windows", "2"]
    proc = subprocess.Popen(cmd, env={**env, "HF_HUB_OFFLINE": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not all(
            (work / name / "plan.json").is_file() for name in names):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its plans were written"
    shutil.rmtree(inputs)
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    rows = ledger_rows(work)
    assert len(rows) == 4 and {r.state for r in rows} == {"published"}
    for name in names:
        snapshots = sorted(p.name.split("-")[0] for p in (work / name / "inputs").iterdir())
        assert snapshots == ["calibration", "evaluation"]
