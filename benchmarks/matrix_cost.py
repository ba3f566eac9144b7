"""Matrix cost: the six TheBloke GPTQ branches in one quantpub process vs one GPTQModel process per branch.

Same machine, model and calibration windows. The baseline is what a plain script does: a
fresh Python process per variant that imports GPTQModel, loads the checkpoint, quantizes with
the same samples and saves (no validation). "One variant" is that baseline's process for the
``main`` branch (4-bit, group 128, no act order): what publishing a single GPTQ file costs.
quantpub's side runs ``quantpub quantize`` on ``matrices/thebloke-gptq.yaml`` in the shared
mode (one calibration pass for all six) and also validates every variant (load back with
transformers, forward, generate), so the comparison is conservative for quantpub; the probes in
other runtimes' venvs (``quantpub.compat``) are switched off for this timing.

    .venv/bin/python benchmarks/matrix_cost.py [--model tiny|smollm2] [--n-samples 16] [--seq-len 256] [--exact]

``--model tiny`` is a random-weight llama (``--hidden 256 --layers 4``); ``smollm2`` is
SmolLM2-135M-Instruct as ``benchmarks/quality.py`` builds it. ``--exact`` also times quantpub
in the exact mode (one calibration per variant). Targets (issue 17): quantpub / separate
<= 0.35 and quantpub <= 2 x one variant. The machine is shared: the load average is recorded.

Writes benchmarks/results/matrix_cost_<model>.json, .md and .log.
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
MATRIX = ROOT / "matrices" / "thebloke-gptq.yaml"

PLAIN_SCRIPT = r"""
import json, os, sys
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count()))
import torch
from gptqmodel import GPTQModel, QuantizeConfig
model_dir, samples_file, out, spec = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
samples = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in json.load(open(samples_file))]
qc = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], desc_act=spec["act_order"],
                    damp_percent=spec["damp"], act_group_aware=False, offload_to_disk=False)
model = GPTQModel.load(model_dir, qc, device="cpu", dtype=torch.float32)
model.quantize(samples, batch_size=1)
model.save(out)
"""


def timed(cmd: list[str], log, cwd: Path, env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one child process, run in ``cwd`` (GPTQModel writes logs/ there)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:6])} ... (see {log.name})")
    return time.monotonic() - started, usage.ru_maxrss * 1024


def load() -> float:
    return round(os.getloadavg()[0], 2)


def model_under_test(args, work: Path, text: str) -> tuple[Path, str]:
    if args.model == "smollm2":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from quality import smollm2_checkpoint

        return smollm2_checkpoint(RESULTS / "quality-work"), "SmolLM2-135M-Instruct (fp32)"
    from quantpub.tiny import build_tiny_model

    path = build_tiny_model(work / "model", "llama", hidden_size=args.hidden, layers=args.layers,
                            intermediate_size=2 * args.hidden, text=text)
    return path, f"tiny llama h{args.hidden} x{args.layers}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--exact", action="store_true", help="also time quantpub's exact mode")
    args = parser.parse_args()

    from quantpub.calibration import build, load_text
    from quantpub.variants import load_matrix
    from quantpub.tiny import corpus_text
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="quantpub-bench-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    text_file = work / "calib.txt"
    text_file.write_text(corpus_text())
    model, described = model_under_test(args, work, text_file.read_text())
    _, specs = load_matrix(MATRIX)

    # The exact windows quantpub will cut, written once for the baseline processes.
    text, source = load_text(specs[0].calibration, text_file)
    calib = build(text, source, AutoTokenizer.from_pretrained(model), n_samples=args.n_samples,
                  seq_len=args.seq_len, seed=specs[0].calibration.seed)
    samples_file = work / "samples.json"
    samples_file.write_text(json.dumps([list(s) for s in calib.samples]))
    stem = f"matrix_cost_{args.model}"
    log = (RESULTS / f"{stem}.log").open("w")

    def plain(spec, out: Path) -> tuple[float, int]:
        p = spec.params
        payload = {"bits": p.bits, "group_size": -1 if p.group_size is None else p.group_size,
                   "act_order": p.act_order, "damp": p.damp}
        return timed([sys.executable, "-c", PLAIN_SCRIPT, str(model), str(samples_file), str(out),
                      json.dumps(payload)], log, work)

    # The other-runtime probes (transformers 4 + auto-gptq in their own venvs) are left out: they
    # cost ~10 s per variant and GPTQModel's side does nothing like them. Validation stays.
    quantpub_env = {**os.environ, "QUANTPUB_VENVS": str(work / "no-compat-venvs")}

    def quantpub(mode: str) -> dict:
        matrix = work / f"{mode}.yaml"
        matrix.write_text(MATRIX.read_text().replace("\ngptq:\n", f"\ngptq:\n  mode: {mode}\n", 1))
        before = load()
        wall, rss = timed([sys.executable, "-m", "quantpub", "quantize", str(matrix), "--model", str(model),
                           "--out", str(work / f"quantpub-{mode}"), "--calibration-file", str(text_file),
                           "--device", "cpu", "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)],
                          log, work, env=quantpub_env)
        return {"seconds": round(wall, 1), "peak_rss_bytes": rss, "includes_validation": True,
                "load_average": [before, load()]}

    plain(specs[0], work / "warm")  # GPTQModel compiles a packing extension on first use; neither side pays it
    runs = {"quantpub_shared": quantpub("shared")}
    if args.exact:
        runs["quantpub_exact"] = quantpub("exact")
    per_variant = []
    for spec in specs:
        before = load()
        wall, rss = plain(spec, work / "plain" / spec.id)
        per_variant.append({"variant": spec.id, "branch": spec.branch, "seconds": round(wall, 1),
                            "peak_rss_bytes": rss, "load_average": [before, load()]})
    separate = sum(v["seconds"] for v in per_variant)
    one = next(v for v in per_variant if v["branch"] == "main")
    shared = runs["quantpub_shared"]["seconds"]
    result = {
        "benchmark": "matrix_cost", "matrix": MATRIX.name, "variants": [s.id for s in specs], "model": described,
        "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len, "sha256": calib.sha256},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()},
        **runs,
        "separate_processes": {"seconds": round(separate, 1), "per_variant": per_variant,
                               "peak_rss_bytes": max(v["peak_rss_bytes"] for v in per_variant)},
        "one_variant": {"variant": one["variant"], "seconds": one["seconds"]},
        "ratio_to_separate": round(shared / separate, 3),
        "ratio_to_one_variant": round(shared / one["seconds"], 2),
        "targets_met": shared / separate <= 0.35 and shared <= 2 * one["seconds"],
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Matrix cost: six TheBloke GPTQ branches, {described}, {args.n_samples}x{args.seq_len} calibration, "
          f"{os.cpu_count()} CPUs", "", f"`{result['machine']['uptime']}`", "",
          "| run | wall time | peak RSS | load average (start, end) |", "| --- | --- | --- | --- |"]
    for name, run in runs.items():
        md.append(f"| {name.replace('_', ' ')} (one process, validates every variant) | {run['seconds']:.1f} s | "
                  f"{run['peak_rss_bytes'] / 2**20:.0f} MiB | {run['load_average']} |")
    md += [f"| GPTQModel, one process per variant (no validation) | {separate:.1f} s | "
           f"{result['separate_processes']['peak_rss_bytes'] / 2**20:.0f} MiB | |",
           f"| GPTQModel, one variant ({one['variant']}) | {one['seconds']:.1f} s | | {one['load_average']} |", "",
           f"quantpub shared / separate: **{result['ratio_to_separate']:.2f}** (target <= 0.35); "
           f"quantpub shared / one variant: **{result['ratio_to_one_variant']:.2f}** (target <= 2)", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"results in {RESULTS / (stem + '.json')}")


if __name__ == "__main__":
    main()
