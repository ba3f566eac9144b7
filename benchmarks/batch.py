"""Batch engine: N tiny models x a matrix, one model at a time vs pipelined on a local Ray with 2 GPU slots.

    .venv/bin/python benchmarks/batch.py [--models 4] [--matrix thebloke] [--quick]

Both runs are real ``quantpub run`` commands (quantize, validate, evaluate, card, publish to the
built-in hub). "One at a time" is today's behaviour before the scheduler: ``--models-in-flight 1
--slots 1`` on the local executor (a model's GPTQ/AWQ group and GGUF group still run side by side).
"Pipelined" is ``--executor ray --slots 2`` on a local Ray cluster that declares two GPUs (on a
CPU machine ``num_gpus`` only schedules). From each run's ledger: wall time, and per GPU slot the
share of the wall time a stage held it. Results: benchmarks/results/batch.json and batch.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
QUICK = """\
gptq:
  variants:
    - {bits: 4, group_size: 128}
    - {bits: 4, group_size: 32, act_order: true}
awq:
  targets: [{}]
gguf:
  types: [Q4_K_M, Q8_0]
"""


def prepare(root: Path, n: int) -> tuple[list[Path], Path, Path]:
    from quantpub.tiny import build_tiny_model, corpus_text

    text = corpus_text()
    cut = int(len(text) * 0.8)
    calib, held = root / "calibration.txt", root / "held-out.txt"
    calib.write_text(text[:cut])
    held.write_text(text[cut:])
    first = build_tiny_model(root / "models" / "tiny-m0", "llama", text=text[:cut])
    models = [first]
    for i in range(1, n):
        models.append(Path(shutil.copytree(first, root / "models" / f"tiny-m{i}")))
    return models, calib, held


def run(mode: str, matrix: str, models: list[Path], calib: Path, held: Path, work: Path) -> dict:
    extra = {"sequential": ["--models-in-flight", "1", "--slots", "1"],
             "pipelined": ["--executor", "ray", "--slots", "2"]}[mode]
    cmd = [sys.executable, "-m", "quantpub", "run", matrix, "--model", *map(str, models), "--work", str(work),
           "--calibration-file", str(calib), "--eval-file", str(held), "--device", "cpu", "--n-samples", "16",
           "--seq-len", "256", "--context", "256", "--windows", "4", "-q", *extra]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    wall = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"{mode} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    from quantpub.ledger import Ledger, busy_fraction

    ledger = Ledger(work / "ledger.sqlite3")
    try:
        run_id = ledger.last_run()
        start, end = ledger.run_span(run_id)
        stages = ledger.stages(run_id)
        busy = busy_fraction(stages, start, end)
        published = sum(r.state == "published" for r in ledger.rows())
        per_stage: dict[str, float] = {}
        for s in stages:
            if s.ended:
                per_stage[s.stage] = per_stage.get(s.stage, 0.0) + s.ended - s.started
    finally:
        ledger.close()
    return {"mode": mode, "command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1),
            "ledger_seconds": round(end - start, 1), "slot_busy": {k: round(v, 3) for k, v in busy.items()},
            "stage_seconds": {k: round(v, 1) for k, v in per_stage.items()}, "published": published}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--matrix", default="thebloke", help="matrix name or path (default thebloke: 19 variants)")
    parser.add_argument("--quick", action="store_true", help="a 5-variant matrix instead, for a fast look")
    parser.add_argument("--keep", action="store_true", help="keep the work dirs")
    args = parser.parse_args()
    root = Path(os.environ.get("QUANTPUB_BENCH_DIR") or RESULTS / "batch-work")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    matrix = args.matrix
    if args.quick:
        matrix = str(root / "quick.yaml")
        Path(matrix).write_text(QUICK)
    models, calib, held = prepare(root, args.models)
    load = os.getloadavg()
    results = [run(mode, matrix, models, calib, held, root / mode) for mode in ("sequential", "pipelined")]
    seq, pipe = results
    summary = {"models": args.models, "matrix": args.matrix if not args.quick else "quick (5 variants)",
               "cores": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load], "runs": results,
               "wall_ratio_pipelined_to_sequential": round(pipe["wall_seconds"] / seq["wall_seconds"], 3)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# batch: {args.models} tiny models x {summary['matrix']} on {os.cpu_count()} cores", "",
             "| mode | wall | slot busy (share of wall time) | published |", "| --- | --- | --- | --- |"]
    for r in results:
        busy = ", ".join(f"{k} {v:.0%}" for k, v in sorted(r["slot_busy"].items()))
        lines.append(f"| {r['mode']} | {r['wall_seconds']:.0f} s | {busy} | {r['published']} |")
    lines += ["", f"pipelined / sequential wall time: {summary['wall_ratio_pipelined_to_sequential']}",
              f"load average at start: {summary['load_average_at_start']}"]
    (RESULTS / "batch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'batch.json'} and {RESULTS / 'batch.md'}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
