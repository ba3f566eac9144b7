"""GGUF set: twelve types from one conversion (quantpub) vs. converting and quantizing per type.

The baseline is what a per-type script does: for each type, a fresh process runs llama.cpp's
converter to a 16-bit file and quantizes it. quantpub converts once, quantizes the types in
parallel from that file and also validates every file (read back, load and evaluate 256
tokens in llama.cpp), so the comparison is conservative for quantpub.

    .venv/bin/python benchmarks/gguf_set.py [--hidden 512] [--layers 4]

Writes benchmarks/results/gguf_set.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from matrix_cost import timed  # same child-process timing (wall, peak RSS) as the matrix benchmark

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]
PER_TYPE = r"""
import sys
from pathlib import Path
from quantpub.backends import llamacpp
model, out, t = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
f16 = out / f"model.{t}.F16.gguf"
llamacpp.convert(Path(model), f16, "f16")
llamacpp.quantize_file(f16, out / f"model.{t}.gguf", t, threads=2)
f16.unlink()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    from quantpub.tiny import build_tiny_model, corpus_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantpub-bench-") as tmp, open(RESULTS / "gguf_set.log", "w") as log:
        tmp = Path(tmp)
        text = corpus_text()
        (tmp / "calib.txt").write_text(text)
        model = build_tiny_model(tmp / "tiny-llama", "llama", hidden_size=args.hidden, layers=args.layers,
                                 intermediate_size=args.hidden * 2, heads=args.hidden // 64, text=text)
        (tmp / "m.yaml").write_text(f"gguf:\n  types: [{', '.join(TYPES)}]\n")
        ours = timed([sys.executable, "-m", "quantpub", "quantize", str(tmp / "m.yaml"), "--model", str(model),
                      "--out", str(tmp / "ours"), "--calibration-file", str(tmp / "calib.txt"), "--device", "cpu"], log, tmp)
        (tmp / "plain").mkdir()
        plain_s, plain_peak = 0.0, 0
        for t in TYPES:
            s, peak = timed([sys.executable, "-c", PER_TYPE, str(model), str(tmp / "plain"), t], log, tmp)
            plain_s, plain_peak = plain_s + s, max(plain_peak, peak)
        manifests = [json.loads(p.read_text()) for p in (tmp / "ours").glob("*/quantpub.json")]
    result = {"model": f"tiny llama hidden {args.hidden}, {args.layers} layers",
              "quantpub": {"seconds": round(ours[0], 1), "peak_rss_mib": ours[1] >> 20,
                           "convert_seconds": manifests[0].get("convert_seconds"),
                           "quantize_seconds": {m["parameters"]["type"]: m["quantize_seconds"] for m in manifests}},
              "per_type": {"seconds": round(plain_s, 1), "peak_rss_mib": plain_peak >> 20},
              "ratio": round(ours[0] / plain_s, 2), "cpus": os.cpu_count()}
    (RESULTS / "gguf_set.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["| GGUF set (12 types) | wall | peak RSS |", "| --- | --- | --- |",
          f"| quantpub: one conversion, parallel types, each validated | {result['quantpub']['seconds']} s | "
          f"{result['quantpub']['peak_rss_mib']} MiB |",
          f"| convert + quantize per type, one process each | {result['per_type']['seconds']} s | "
          f"{result['per_type']['peak_rss_mib']} MiB |", "", f"ratio {result['ratio']}; {result['model']}"]
    (RESULTS / "gguf_set.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
