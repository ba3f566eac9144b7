"""A re-run with nothing left to do: how long ``quantpub run`` takes to find that out, before and after a change.

For each code version (``--before``, a git ref, and ``--after``, default HEAD; each checked out
into a worktree under the results and put first on ``PYTHONPATH``, as ``containment.py`` does):

* ``example``: the README's example, ``quantpub run`` with no model (19 variants of the tiny llama,
  built, evaluated and published to the built-in hub), then the same command again;
* ``queue``: ``--models`` tiny llamas in one ``quantpub run`` with a four-variant matrix (two GPTQ
  branches, two GGUF types), then the same command again.

The first run of each is not timed; the re-run's wall time is (``--repeats`` re-runs, the median
kept). Each re-run must exit 0 and build, evaluate and publish nothing (its summary says so).

    .venv/bin/python benchmarks/noop_rerun.py [--before 639fa0b] [--after HEAD] [--models 4] [--repeats 3]

Writes benchmarks/results/noop_rerun.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUEUE_MATRIX = """\
calibration: {n_samples: 8, seq_len: 128}
gptq:
  variants:
    - {bits: 4, group_size: 128}
    - {bits: 8, group_size: 128}
gguf:
  types: [Q4_K_M, Q8_0]
"""


def quantpub(code: Path, args: list[str], cwd: Path, log) -> float:
    env = {**os.environ, "PYTHONPATH": str(code / "src"), "QUANTPUB_VENVS": str(cwd / "no-venvs"),
           "RAY_AUTH_MODE": "disabled"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "quantpub", "run", *args, "-q"], cwd=cwd, env=env,
                          capture_output=True, text=True)
    seconds = time.monotonic() - started
    log.write(f"$ quantpub run {' '.join(args)}  ({code.name}, {seconds:.1f} s, exit {done.returncode})\n"
              f"{done.stdout}\n{done.stderr[-4000:]}\n")
    log.flush()
    if done.returncode:
        raise SystemExit(f"quantpub run {' '.join(args)} with {code} exited {done.returncode}; see the log")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="639fa0b")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from containment import checkout

    from quantpub.tiny import build_tiny_model, corpus_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    root = RESULTS / "noop-work"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    text = corpus_text()
    (root / "calibration.txt").write_text(text[: int(len(text) * 0.8)])
    (root / "held-out.txt").write_text(text[int(len(text) * 0.8):])
    first = build_tiny_model(root / "models" / "tiny-m0", "llama", text=text)
    models = [first] + [Path(shutil.copytree(first, root / "models" / f"tiny-m{i}")) for i in range(1, args.models)]
    (root / "queue.yaml").write_text(QUEUE_MATRIX)
    queue_args = [str(root / "queue.yaml"), "--model", *map(str, models), "--calibration-file",
                  str(root / "calibration.txt"), "--eval-file", str(root / "held-out.txt"), "--device", "cpu",
                  "--context", "128", "--windows", "2"]
    result: dict = {"before": args.before, "after": args.after, "models_in_queue": args.models, "runs": {}}
    with open(RESULTS / "noop_rerun.log", "w") as log:
        for tag, ref in (("after", args.after), ("before", args.before)):
            code = checkout(ref)
            for name, extra in (("example", []), ("queue", queue_args)):
                cwd = root / f"{name}-{tag}"
                cwd.mkdir()
                first_run = quantpub(code, extra, cwd, log)
                reruns = [quantpub(code, extra, cwd, log) for _ in range(args.repeats)]
                result["runs"][f"{name}/{tag}"] = {
                    "code": subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip(),
                    "first_run_seconds": round(first_run, 1), "rerun_seconds": [round(s, 1) for s in reruns],
                    "rerun_median": round(statistics.median(reruns), 1), "load_average": os.getloadavg()[0]}
                print(name, tag, result["runs"][f"{name}/{tag}"], flush=True)
    (RESULTS / "noop_rerun.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# No-op re-run: before and after", "",
             f"before = {args.before}, after = {args.after}; queue = {args.models} tiny llamas x 4 variants", "",
             "| run | code | first run (s) | no-op re-run, median (s) | re-runs (s) |", "| --- | --- | --- | --- | --- |"]
    for key, r in result["runs"].items():
        lines.append(f"| {key} | {r['code']} | {r['first_run_seconds']} | {r['rerun_median']} | "
                     f"{', '.join(map(str, r['rerun_seconds']))} |")
    (RESULTS / "noop_rerun.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
