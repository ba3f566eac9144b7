"""Matrix cost: quantpub's one-load worker vs. one GPTQModel process per variant.

Same machine, model, and calibration windows. The baseline is what a plain script does:
a fresh Python process per variant that imports GPTQModel, loads the checkpoint, quantizes
with the same samples and saves. quantpub's side also validates every variant (load back with
transformers, forward, generate), so the comparison is conservative for quantpub.

    .venv/bin/python benchmarks/matrix_cost.py [--layers 4] [--hidden 256] [--n-samples 16] [--seq-len 256] [--no-awq]

Writes benchmarks/results/matrix_cost[_gptq].json, .md and .log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

PLAIN_SCRIPT = r"""
import json, os, sys
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count()))
import torch
from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
from gptqmodel.quantization.config import AWQConfig
model_dir, samples_file, out, spec = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
samples = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in json.load(open(samples_file))]
if spec["method"] == "awq":
    qc = AWQConfig(bits=4, group_size=128, sym=False, offload_to_disk=False)
    model = GPTQModel.load(model_dir, qc, device="cpu", dtype=torch.float16)
    model.quantize(samples, batch_size=1, backend=BACKEND.AWQ_TORCH)
else:
    qc = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], desc_act=spec["act_order"],
                        damp_percent=spec["damp"], act_group_aware=False, offload_to_disk=False)
    model = GPTQModel.load(model_dir, qc, device="cpu", dtype=torch.float32)
    model.quantize(samples, batch_size=1)
model.save(out)
"""


def timed(cmd: list[str], log, cwd: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one child process, run in ``cwd`` (GPTQModel writes logs/ there)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)} (see the log)")
    return time.monotonic() - started, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--no-awq", action="store_true", help="GPTQ variants only")
    args = parser.parse_args()

    from quantpub.calibration import build, load_text
    from quantpub.matrix import GptqVariant, load_matrix
    from quantpub.tiny import build_tiny_model, corpus_text
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="quantpub-bench-"))
    stem = "matrix_cost_gptq" if args.no_awq else "matrix_cost"
    RESULTS.mkdir(parents=True, exist_ok=True)
    text_file = work / "calib.txt"
    text_file.write_text(corpus_text())
    model = build_tiny_model(work / "model", "llama", hidden_size=args.hidden, layers=args.layers,
                             intermediate_size=2 * args.hidden, text=text_file.read_text())
    matrix = ROOT / "matrices" / ("thebloke-gptq.yaml" if args.no_awq else "thebloke.yaml")
    _, specs = load_matrix(matrix)
    specs = [s for s in specs if s.method in ("gptq", "awq")]

    # The exact windows quantpub will cut, written once for the baseline processes.
    text, source = load_text(specs[0].calibration, text_file)
    calib = build(text, source, AutoTokenizer.from_pretrained(model), n_samples=args.n_samples,
                  seq_len=args.seq_len, seed=specs[0].calibration.seed)
    samples_file = work / "samples.json"
    samples_file.write_text(json.dumps([list(s) for s in calib.samples]))

    log = (RESULTS / f"{stem}.log").open("w")
    quantpub_cmd = [sys.executable, "-m", "quantpub", "quantize", str(matrix), "--model", str(model),
                    "--out", str(work / "quantpub"), "--calibration-file", str(text_file), "--device", "cpu",
                    "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
    # Warm-up: GPTQModel compiles a packing extension on first use; neither side should pay it.
    timed([sys.executable, "-c", PLAIN_SCRIPT, str(model), str(samples_file), str(work / "warm"),
           json.dumps({"method": "gptq", "bits": 4, "group_size": 128, "act_order": False, "damp": 0.01})], log, work)
    q_wall, q_rss = timed(quantpub_cmd, log, work)

    per_variant = []
    for spec in specs:
        p = spec.params
        payload = ({"method": "gptq", "bits": p.bits, "group_size": -1 if p.group_size is None else p.group_size,
                    "act_order": p.act_order, "damp": p.damp} if isinstance(p, GptqVariant) else {"method": "awq"})
        wall, rss = timed([sys.executable, "-c", PLAIN_SCRIPT, str(model), str(samples_file),
                           str(work / "plain" / spec.id), json.dumps(payload)], log, work)
        per_variant.append({"variant": spec.id, "seconds": round(wall, 1), "peak_rss_bytes": rss})
    b_wall = sum(v["seconds"] for v in per_variant)
    b_rss = max(v["peak_rss_bytes"] for v in per_variant)

    result = {
        "benchmark": "matrix_cost", "matrix": matrix.name, "variants": [s.id for s in specs],
        "model": {"hidden": args.hidden, "layers": args.layers},
        "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len, "sha256": calib.sha256},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "quantpub": {"seconds": round(q_wall, 1), "peak_rss_bytes": q_rss, "includes_validation": True},
        "separate_processes": {"seconds": round(b_wall, 1), "peak_rss_bytes": b_rss, "per_variant": per_variant},
        "time_ratio": round(q_wall / b_wall, 3),
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Matrix cost ({matrix.name}, {len(specs)} variants, tiny llama h{args.hidden} x{args.layers}, "
          f"{args.n_samples}x{args.seq_len} calibration, {os.cpu_count()} CPUs)", "",
          "| run | wall time | peak RSS |", "| --- | --- | --- |",
          f"| quantpub quantize (one process, validates every variant) | {q_wall:.1f} s | {q_rss / 2**20:.0f} MiB |",
          f"| GPTQModel, one process per variant (no validation) | {b_wall:.1f} s | {b_rss / 2**20:.0f} MiB |",
          "", f"time ratio quantpub / separate: **{q_wall / b_wall:.2f}**", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"results in {RESULTS / (stem + '.json')}")


if __name__ == "__main__":
    main()
