"""Peak host memory of the GPTQ/AWQ group: 2 GPTQ variants + AWQ of a 168M-parameter fp16 llama.

The model is random-weight (hidden 1024, 10 layers, MLP 4096: 169.9M parameters, 340 MB in
fp16, 680 MB in fp32, the dtype GPTQ runs in on CPU). ``quantpub quantize`` runs in a child
process; its peak RSS (``ru_maxrss``) is compared with the issue's target: at most twice the
fp32 model plus the libraries' own footprint, measured by a child that imports them and loads
nothing.

    .venv/bin/python benchmarks/group_memory.py [--n-samples 4] [--seq-len 128] [--gptq-mode shared|exact]
                                                [--methods gptq+awq|gptq|awq] [--legacy]

``--legacy`` writes the matrix without ``gptq.mode`` (for code that predates it). Writes
benchmarks/results/group_memory[_<methods>].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GPTQ = """\
gptq:
  mode: {mode}
  variants:
    - {{bits: 4, group_size: 128}}
    - {{bits: 8, group_size: 128}}
"""
AWQ = """\
awq:
  targets: [{bits: 4, group_size: 128}]
"""
LIBRARIES = ("import os; os.environ.setdefault('GPTQMODEL_CPU_WORKERS', str(os.cpu_count()));"
             "import torch, transformers, gptqmodel, quantpub.worker")


def child(cmd: list[str], cwd: Path, log) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)} (see {log.name})")
    return time.monotonic() - started, usage.ru_maxrss * 1024


def build_model(path: Path) -> int:
    """The 168M fp16 llama; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantpub.tiny import build_tiny_model

    if not (path / "config.json").is_file():
        build_tiny_model(path, "llama", hidden_size=1024, layers=10, intermediate_size=4096, heads=16)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
        model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    h, i, n, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    return n * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gptq-mode", choices=("shared", "exact"), default="shared",
                        help="the matrix's gptq.mode (omitted from the matrix for code that predates it: --legacy)")
    parser.add_argument("--legacy", action="store_true", help="write the matrix without gptq.mode (old code)")
    parser.add_argument("--methods", choices=("gptq+awq", "gptq", "awq"), default="gptq+awq",
                        help="the group's phases to run (one phase alone shows its own peak)")
    parser.add_argument("--work", default=None, help="keep the model here between runs")
    args = parser.parse_args()
    from quantpub.tiny import corpus_text

    work = Path(args.work or tempfile.mkdtemp(prefix="quantpub-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    model = work / "llama-168m-fp16"
    params = build_model(model)
    (work / "calib.txt").write_text(corpus_text())
    matrix = (GPTQ.format(mode=args.gptq_mode) if "gptq" in args.methods else "") + (AWQ if "awq" in args.methods else "")
    if args.legacy:
        matrix = matrix.replace(f"  mode: {args.gptq_mode}\n", "")
    (work / "matrix.yaml").write_text(matrix)
    out = work / f"out-{time.time_ns()}"
    log = (RESULTS / f"group_memory_{args.methods}.log").open("w")
    _, libraries = child([sys.executable, "-c", LIBRARIES], work, log)
    wall, peak = child([sys.executable, "-m", "quantpub", "quantize", str(work / "matrix.yaml"), "--model", str(model),
                        "--out", str(out), "--calibration-file", str(work / "calib.txt"), "--device", "cpu",
                        "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)], work, log)
    fp32 = params * 4
    target = 2 * fp32 + libraries
    result = {"benchmark": "group_memory", "parameters": params, "fp16_bytes": params * 2, "fp32_bytes": fp32,
              "methods": args.methods, "gptq_mode": "legacy" if args.legacy else args.gptq_mode,
              "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
              "libraries_peak_rss_bytes": libraries, "peak_rss_bytes": peak, "target_bytes": target,
              "within_target": peak <= target, "seconds": round(wall, 1), "load_average": os.getloadavg()}
    stem = "group_memory" if args.methods == "gptq+awq" else f"group_memory_{args.methods}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    gb = 1e9
    md = [f"# GPTQ/AWQ group memory ({args.methods}: 2 GPTQ variants, 1 AWQ target; {params / 1e6:.1f}M params fp16, "
          f"GPTQ mode {result['gptq_mode']})", "",
          f"peak RSS {peak / gb:.2f} GB; target 2 x fp32 ({2 * fp32 / gb:.2f} GB) + libraries ({libraries / gb:.2f} GB)"
          f" = {target / gb:.2f} GB: {'within' if peak <= target else 'OVER'}; wall {wall:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f}", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
