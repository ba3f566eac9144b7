"""What the portable llama.cpp build costs against one built for this machine's CPU (``-march=native``).

The same GGUF files (a directory of built variants, e.g. the SmolLM2 set from
``benchmarks/containment.py``) are validated and evaluated by each build's library, loaded
through ``LLAMA_CPP_LIB_PATH`` (llama-cpp-python's override of where its libraries are) in a
child process per build, one build after the other, ``--repeats`` times:

* validation: ``backends.gguf.validate_file`` (load, 256 tokens, perplexity), as the GGUF group does;
* evaluation: ``evaluate.gguf_logprobs`` over ``--windows`` windows of ``--context`` tokens
  (logits of every position), as the evaluate stage does.

Builds: ``portable`` is the installed library (``scripts/llama-wheel.sh``, GGML_NATIVE=OFF);
``native`` is a wheel built with ``CMAKE_ARGS=-DGGML_NATIVE=ON bash scripts/llama-wheel.sh``
(pass its path with ``--native-wheel``; its ``llama_cpp/lib`` is unpacked under the results).

    .venv/bin/python benchmarks/llama_build.py --variants DIR --native-wheel WHEEL [--repeats 2]

Writes benchmarks/results/llama_build.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def unpack(wheel: Path) -> Path:
    """The wheel's ``llama_cpp/lib`` directory, unpacked once under the results."""
    where = RESULTS / f"llama-lib-{wheel.parent.name}"
    if not (where / "libllama.so").is_file():
        where.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("llama_cpp/lib/") and not name.endswith("/"):
                    (where / Path(name).name).write_bytes(z.read(name))
    return where


def child(variants: Path, text_file: Path, context: int, windows: int) -> None:
    """In the child: time validation and evaluation of every GGUF variant with the library it loaded."""
    from transformers import AutoTokenizer

    from quantpub.backends import gguf_files, llamacpp
    from quantpub.evaluate import HeldOut, gguf_logprobs
    from quantpub.machine import cpu_count

    from quantpub.plan import load_plan

    text = text_file.read_text()

    tokenizer = AutoTokenizer.from_pretrained(load_plan(variants).record.model)
    ids = tokenizer(text[len(text) // 2:], add_special_tokens=False).input_ids
    data = HeldOut([[tokenizer.bos_token_id] + ids[i * context:(i + 1) * context - 1] for i in range(windows)],
                   "bench", "bench", None, context, context)
    files = sorted(variants.glob("gguf-*/*.gguf"))
    validate = evaluate = 0.0
    for f in files:
        started = time.monotonic()
        gguf_files.validate_file(f, text[len(text) // 2:], 256, cpu_count())
        validate += time.monotonic() - started
        started = time.monotonic()
        for _ in gguf_logprobs(f, data, cpu_count()):
            pass
        evaluate += time.monotonic() - started
    print(json.dumps({"files": len(files), "validate_seconds": round(validate, 2), "evaluate_seconds": round(evaluate, 2),
                      "built_for": llamacpp.build_cpu_features(), "extra_buffer_types": llamacpp.extra_buffer_types()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", required=True, help="a quantize output directory with GGUF variants")
    parser.add_argument("--native-wheel", help="required, but in the child")
    parser.add_argument("--text", default=str(RESULTS / "containment-work" / "calibration.txt"))
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.variants), Path(args.text), args.context, args.windows)
        return
    if not args.native_wheel:
        parser.error("--native-wheel is required")
    builds = {"portable": None, "native": unpack(Path(args.native_wheel))}
    rows = []
    for _ in range(args.repeats):
        for name, lib in builds.items():
            env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
            if lib is not None:
                env["LLAMA_CPP_LIB_PATH"] = str(lib)
            done = subprocess.run([sys.executable, __file__, "--child", "--variants", args.variants, "--text",
                                   args.text, "--context", str(args.context), "--windows", str(args.windows)],
                                  env=env, capture_output=True, text=True, check=True)
            rows.append({"build": name, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llama_build.json").write_text(json.dumps({"cpu": _cpu(), "rows": rows}, indent=2) + "\n")
    lines = ["| build | compiled for | files | validation s | evaluation s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['build']} | {' '.join(r['built_for'])} | {r['files']} | {r['validate_seconds']} | "
              f"{r['evaluate_seconds']} |" for r in rows]
    (RESULTS / "llama_build.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu() -> str:
    from quantpub.machine import cpu_model

    return cpu_model()


if __name__ == "__main__":
    main()
