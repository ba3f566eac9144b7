"""What crash containment costs: the SmolLM2 set's GGUF group and GPTQ/AWQ group, before and after.

Each group runs as a real ``quantpub quantize`` child on CPU, once with the code of ``--before``
(a git ref from before native calls ran in isolated worker processes) and once with the code of
``--after`` (default: this checkout's HEAD), each checked out into a worktree under the results
and put first on ``PYTHONPATH``, one after the other (after, before, after, before ... with
``--repeats``), on the same model, matrix and calibration windows (16 x 256 tokens):

* ``gguf``: TheBloke's twelve GGUF types with an importance matrix (``matrices/thebloke.yaml``'s
  GGUF section): conversion, imatrix, the 16-bit reference, every type quantized and validated;
* ``gptq-awq``: the ``main`` GPTQ branch (4-bit, group 128) and an AWQ target (4-bit, group 64:
  AWQ's group must divide SmolLM2's 576 columns), each validated and probed in transformers 5 (the
  runtimes in other venvs are switched off in both).

Reported per run: wall seconds, CPU seconds of the whole process tree (user + system of the
child and everything it waited for: less sensitive to other load on the machine than wall
time), and the peaks of the tree's summed RSS and PSS (``measure``).

    .venv/bin/python benchmarks/containment.py [--model smollm2|tiny] [--groups gguf,gptq-awq]
                                               [--before 89e05b6] [--repeats 1]

Writes benchmarks/results/containment.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CALIBRATION = "calibration: {n_samples: 16, seq_len: 256}\n"
GROUPS = {
    "gguf": CALIBRATION + "gguf:\n  types: [Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_0, Q4_K_S, Q4_K_M, Q5_0, Q5_K_S, "
                          "Q5_K_M, Q6_K, Q8_0]\n  imatrix: true\n",
    "gptq-awq": CALIBRATION + "gptq:\n  variants:\n    - {bits: 4, group_size: 128}\n"
                              "awq:\n  targets: [{bits: 4, group_size: 64}]\n",  # SmolLM2's 576 columns: 9 groups of 64
}


def checkout(ref: str) -> Path:
    """The code at ``ref`` in a worktree under the results (made once)."""
    where = RESULTS / f"containment-code-{ref}"
    if not (where / "src" / "quantpub").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref], check=True)
    return where


def measure(cmd: list[str], cwd: Path, log) -> dict:
    """Wall seconds and the peaks of the process tree's summed resident memory (RSS: shared library pages counted
    once per process) and proportional set size (PSS: shared pages divided among the processes sharing them, what
    the tree really adds to the machine), sampled every 0.2 s."""
    import time

    import psutil

    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
            except psutil.Error:
                pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)} (see {log.name})")
    return {"seconds": round(time.monotonic() - started, 1), "peak_tree_rss": peak_rss, "peak_tree_pss": peak_pss}


def run(group: str, code: Path, model: Path, text: Path, work: Path, tag: str) -> dict:

    out = work / f"{group}-{tag}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    matrix = work / f"{group}.yaml"
    matrix.write_text(GROUPS[group])
    env = {**os.environ, "PYTHONPATH": str(code / "src"), "QUANTPUB_VENVS": str(work / "no-venvs"),
           "GPTQMODEL_CPU_WORKERS": str(os.cpu_count())}
    cmd = [sys.executable, "-m", "quantpub", "quantize", str(matrix), "--model", str(model), "--out", str(out),
           "--calibration-file", str(text), "--device", "cpu"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    old_env = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # measure() starts the child with this process's environment
    try:
        with (work / f"{group}-{tag}.log").open("w") as log:
            result = measure(cmd, work, log)
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    manifests = sorted(out.glob("*/quantpub.json"))
    return {"group": group, "code": tag, "seconds": result["seconds"], "cpu_seconds": round(cpu, 1),
            "peak_tree_rss": result["peak_tree_rss"], "peak_tree_pss": result["peak_tree_pss"],
            "variants": len(manifests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--groups", default="gguf,gptq-awq")
    parser.add_argument("--before", default="89e05b6", help="git ref of the code before containment")
    parser.add_argument("--after", default="HEAD", help="git ref of the code with containment")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", default=str(RESULTS / "containment-work"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import smollm2_checkpoint

    from quantpub.tiny import build_tiny_model, corpus_text

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calibration.txt"
    if not text.is_file():
        text.write_text(corpus_text(1_000_000))
    model = smollm2_checkpoint(RESULTS / "quality-work") if args.model == "smollm2" else \
        build_tiny_model(work / "tiny-llama", "llama", text=text.read_text()[:200_000])
    before = checkout(args.before)
    after = checkout(subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.after], check=True,
                                    capture_output=True, text=True).stdout.strip())
    rows = []
    for _ in range(args.repeats):
        for group in args.groups.split(","):
            for tag, code in (("after", after), ("before", before)):
                rows.append(run(group, code, model, text, work, tag))
                print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "containment.json").write_text(json.dumps({"model": args.model, "before": args.before,
                                                          "after": after.name, "rows": rows},
                                                         indent=2) + "\n")
    lines = ["| group | code | variants | wall s | CPU s | peak tree RSS | peak tree PSS |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['group']} | {r['code']} | {r['variants']} | {r['seconds']} | {r['cpu_seconds']} | "
              f"{r['peak_tree_rss'] / 1e9:.2f} GB | {r['peak_tree_pss'] / 1e9:.2f} GB |" for r in rows]
    (RESULTS / "containment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'containment.json'} and .md")


if __name__ == "__main__":
    main()
