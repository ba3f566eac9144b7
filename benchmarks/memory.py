"""Host memory: the plan's estimate vs the measured peak of each quantize group, on two model sizes.

For each size a random-weight fp16 llama is built (hidden 1024, MLP 4096): 10 layers with a
1024-token vocabulary (170M parameters), and 6 layers with Llama 3's 128256-token vocabulary
(363M, a third of them in the embeddings and the output layer, as in small modern models; the
extra rows have no tokenizer entries, which quantization does not mind). Two groups run as
real ``quantpub quantize`` children on CPU, as the scheduler runs them:

* the GPTQ/AWQ group: two GPTQ variants (4 and 8 bits, group 128, exact mode, the default) and
  one AWQ target;
* the GGUF group: the importance matrix, the 16-bit conversion and Q4_K_M + Q8_0;
* ``gptq-stream`` (not in the default set): the two GPTQ variants with ``--stream``, each layer
  read from the checkpoint (models larger than host memory), against the plan's streamed estimate.

The peak is the largest sum of resident memory over the child and its descendants (the GGUF
converter is a subprocess), sampled every 50 ms, beside the kernel's own ``ru_maxrss`` (the
largest single process). The estimate is what ``quantpub plan`` shows and the scheduler reserves
(``Stage.host_memory`` of the stage: ``estimate.session_group_memory``, ``gguf_group_memory``). Also checked: the 170M model's GPTQ + AWQ peak against 2 x its
fp32 size plus the libraries' own footprint (a child that imports them and does nothing).

    .venv/bin/python benchmarks/memory.py [--sizes 10:1024,6:128256] [--groups gptq-awq,gguf,gptq-stream] [--work DIR]
    .venv/bin/python benchmarks/memory.py --estimates-only   # recompute estimates for the saved peaks

Writes benchmarks/results/memory.json and memory.md.
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
CALIBRATION = "calibration: {n_samples: 4, seq_len: 128}\n"
GROUPS = {
    "gptq-awq": CALIBRATION + """\
gptq:
  variants:
    - {bits: 4, group_size: 128}
    - {bits: 8, group_size: 128}
awq:
  targets: [{bits: 4, group_size: 128}]
""",
    "gguf": CALIBRATION + "gguf:\n  types: [Q4_K_M, Q8_0]\n  imatrix: true\n",
    "gptq-stream": CALIBRATION + """\
gptq:
  variants:
    - {bits: 4, group_size: 128}
    - {bits: 8, group_size: 128}
""",
}
STREAMED = {"gptq-stream"}  # run with --stream: layers read from the checkpoint, the model never loaded whole
LIBRARIES = ("import os; os.environ.setdefault('GPTQMODEL_CPU_WORKERS', str(os.cpu_count()));"
             "import torch, transformers, gptqmodel, quantpub.build")
TOLERANCE = 0.25


def measure(cmd: list[str], cwd: Path, log) -> dict:
    """Wall seconds, peak summed RSS of the process tree, and the kernel's largest single ``ru_maxrss``."""
    import psutil

    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak, timeline, last = 0, [], 0.0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
        now = time.monotonic() - started
        if now - last >= 2:  # a coarse timeline: which phase holds the peak
            timeline.append((round(now, 1), total))
            last = now
        time.sleep(0.05)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)} (see {log.name})")
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    return {"seconds": round(wall, 1), "peak_tree_rss": peak, "largest_maxrss_so_far": maxrss, "timeline": timeline}


def build_model(path: Path, layers: int, vocab: int) -> int:
    """The fp16 llama with ``layers`` blocks and ``vocab`` embedding rows; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantpub.tiny import build_tiny_model

    if not (path / "config.json").is_file():
        build_tiny_model(path, "llama", hidden_size=1024, layers=layers, intermediate_size=4096, heads=16)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
        if vocab > model.config.vocab_size:
            model.resize_token_embeddings(vocab, mean_resizing=False)
        model.save_pretrained(path)
        del model
    return sum(p.numel() for p in _meta_model(path).parameters())


def _meta_model(path: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def estimate(matrix: Path, model: Path, stream: bool = False) -> int:
    """The host memory the plan gives the group (what the scheduler reserves for it)."""
    from quantpub.backends import STAGES, backend
    from quantpub.plan import make_plan

    plan = make_plan(matrix, str(model), device="cpu")
    stage = STAGES[backend(plan.jobs[0].method).stage]
    return stage.host_memory(plan, list(plan.jobs), "cpu", stream=stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10:1024,6:128256",
                        help="LAYERS:VOCAB of each model (hidden 1024, MLP 4096)")
    parser.add_argument("--groups", default="gptq-awq,gguf")
    parser.add_argument("--work", default=None, help="keep the models here between runs")
    parser.add_argument("--name", default="memory", help="results file stem (memory.json, .md)")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="other results files whose rows join these (sizes measured in parallel runs)")
    parser.add_argument("--estimates-only", action="store_true",
                        help="recompute the estimates for the peaks saved in memory.json (after changing the plan)")
    args = parser.parse_args()
    from quantpub.tiny import corpus_text

    work = Path(args.work or Path(tempfile.gettempdir()) / "quantpub-memory")
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.txt"
    calib.write_text(corpus_text())
    saved = json.loads((RESULTS / f"{args.name}.json").read_text()) if args.estimates_only else None
    rows = saved["rows"] if saved else []
    libraries = saved["libraries_rss"] if saved else None
    for other in args.merge:
        rows += json.loads((RESULTS / f"{other}.json").read_text())["rows"]
    with (RESULTS / f"{args.name}.log").open("a") as log:
        if libraries is None:
            libraries = measure([sys.executable, "-c", LIBRARIES], work, log)["peak_tree_rss"]
        for size in ([] if args.estimates_only else args.sizes.split(",")):
            layers, vocab = map(int, size.split(":"))
            model = work / f"llama-{layers}l-{vocab}v-fp16"
            params = build_model(model, layers, vocab)
            for group in args.groups.split(","):
                matrix = work / f"{group}.yaml"
                matrix.write_text(GROUPS[group])
                row = next((r for r in rows if r["model"] == model.name and r["group"] == group), None)
                if row is None:
                    out = work / f"out-{group}-{layers}-{time.time_ns()}"
                    print(f"{group}, {params / 1e6:.0f}M parameters ...", flush=True)
                    row = {"model": model.name, "layers": layers, "vocab": vocab, "parameters": params,
                           "group": group, "load_average": os.getloadavg()[0],
                           **measure([sys.executable, "-m", "quantpub", "quantize", str(matrix), "--model", str(model),
                                      "--out", str(out), "--calibration-file", str(calib), "--device", "cpu",
                                      *(["--stream", "always"] if group in STREAMED else [])],
                                     work, log)}
                    rows.append(row)
    for row in rows:  # the plan's estimate now, for every measured row
        matrix = work / f"{row['group']}.yaml"
        matrix.write_text(GROUPS[row["group"]])
        row["estimate"] = estimate(matrix, work / row["model"], stream=row["group"] in STREAMED)
        row["whole_model_estimate"] = estimate(matrix, work / row["model"]) if row["group"] in STREAMED else None
        row["error"] = row["estimate"] / row["peak_tree_rss"] - 1
    rows.sort(key=lambda r: (r["parameters"], r["group"]))
    worst = max(abs(r["error"]) for r in rows)
    small = min((r for r in rows if r["group"] == "gptq-awq"), key=lambda r: r["parameters"], default=None)
    target = None
    if small:
        target = {"parameters": small["parameters"], "peak": small["peak_tree_rss"],
                  "limit": 2 * 4 * small["parameters"] + libraries}
        target["within"] = target["peak"] <= target["limit"]
    result = {"benchmark": "memory", "cpus": os.cpu_count(), "libraries_rss": libraries, "rows": rows,
              "worst_estimate_error": worst, "tolerance": TOLERANCE, "within_tolerance": worst <= TOLERANCE,
              "gptq_awq_target": target}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    gb = 1e9
    lines = ["# Host memory: plan estimate vs measured peak (CPU, fp16 llama, hidden 1024, MLP 4096)", "",
             "Peak: summed RSS of the group's process tree. GPTQ/AWQ group: 2 GPTQ (exact mode) + 1 AWQ; "
             "GGUF group: importance matrix, conversion, Q4_K_M and Q8_0; gptq-stream: the 2 GPTQ variants with "
             "`--stream` (each layer read from the checkpoint, quantized layers offloaded to disk; the plan's "
             "whole-model estimate for the same group in brackets).", "",
             "| model | group | estimate | measured peak (process tree) | estimate error | wall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        whole = f" ({r['whole_model_estimate'] / gb:.2f} GB whole)" if r.get("whole_model_estimate") else ""
        lines.append(f"| {r['parameters'] / 1e6:.0f}M ({r['layers']} layers, vocab {r['vocab']}) | {r['group']} | "
                     f"{r['estimate'] / gb:.2f} GB{whole} | {r['peak_tree_rss'] / gb:.2f} GB | {100 * r['error']:+.0f}% | "
                     f"{r['seconds']:.0f} s |")
    lines += ["", f"worst estimate error {100 * worst:.0f}% (tolerance {100 * TOLERANCE:.0f}%); libraries alone "
              f"{libraries / gb:.2f} GB"]
    if target:
        lines.append(f"GPTQ + AWQ of the {target['parameters'] / 1e6:.0f}M fp16 model: peak {target['peak'] / gb:.2f} GB;"
                     f" limit 2 x fp32 + libraries = {target['limit'] / gb:.2f} GB: "
                     f"{'within' if target['within'] else 'OVER'}")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
