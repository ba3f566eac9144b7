"""Scaling: wall time and peak memory of one GPTQ, one AWQ and one GGUF variant against model size.

Three (or more) tiny-to-small llama shapes, the same matrix and calibration for each, so the
cost per parameter is visible.

    .venv/bin/python benchmarks/scaling.py [--sizes 256x2,512x4,1024x8] [--no-awq]

Writes benchmarks/results/scaling.json and .md.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256x2,512x4,1024x8", help="HIDDENxLAYERS,...")
    parser.add_argument("--no-awq", action="store_true")
    args = parser.parse_args()
    from quantpub.tiny import build_tiny_model, corpus_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    matrix = "gptq:\n  variants: [{bits: 4, group_size: 128}]\ngguf:\n  types: [Q4_K_M]\n"
    if not args.no_awq:
        matrix += "awq:\n  targets: [{}]\n"
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantpub-scaling-") as tmp, open(RESULTS / "scaling.log", "w") as log:
        tmp = Path(tmp)
        text = corpus_text()
        (tmp / "calib.txt").write_text(text)
        (tmp / "m.yaml").write_text(matrix)
        for size in args.sizes.split(","):
            hidden, layers = (int(x) for x in size.split("x"))
            model = build_tiny_model(tmp / f"m{size}", "llama", hidden_size=hidden, layers=layers,
                                     intermediate_size=hidden * 2, heads=max(1, hidden // 64), text=text)
            params = _params(model)
            started = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-m", "quantpub", "quantize", str(tmp / "m.yaml"), "--model",
                                     str(model), "--out", str(tmp / f"out{size}"), "--calibration-file",
                                     str(tmp / "calib.txt"), "--device", "cpu", "--n-samples", "16", "--seq-len",
                                     "256"], stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.monotonic() - started
            if os.waitstatus_to_exitcode(status):
                raise SystemExit(f"quantize failed for {size}; see {RESULTS / 'scaling.log'}")
            rows.append({"shape": size, "parameters": params, "seconds": round(seconds, 1),
                         "peak_rss_mib": usage.ru_maxrss >> 10,
                         "us_per_parameter": round(seconds / params * 1e6, 3)})
            print(rows[-1], flush=True)
    (RESULTS / "scaling.json").write_text(json.dumps({"matrix": matrix, "rows": rows}, indent=2) + "\n")
    md = ["| shape (hidden x layers) | parameters | wall | peak RSS | us per parameter |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {r['shape']} | {r['parameters'] / 1e6:.1f} M | {r['seconds']} s | {r['peak_rss_mib']} MiB | "
           f"{r['us_per_parameter']} |" for r in rows]
    (RESULTS / "scaling.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _params(model: Path) -> int:
    from safetensors import safe_open

    with safe_open(model / "model.safetensors", "np") as f:
        return sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1:] or [1])[0] for k in f.keys())


if __name__ == "__main__":
    main()
