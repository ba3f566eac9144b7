"""Measured quality of every variant: perplexity and KL divergence from the unquantised model.

All formats are scored on the same token ids (the source tokenizer's), cut into the same
windows (``context`` tokens, every ``stride`` tokens), of held-out text that calibration never
saw (wikitext-2 *test* by default; calibration is refused on that split). The unquantised model
runs once; its log-probabilities are cached in ``OUT/.eval/`` and every variant is compared
with them. GPTQ and AWQ run through transformers, GGUF through llama.cpp: each in the runtime
its users use. Results go into each variant's ``quantpub.json`` (``evaluation``), and from
there into the cards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantpub.artifacts import MANIFEST, RUN_RECORD, write_text_atomic
from quantpub.errors import CalibrationError, QuantpubError
from quantpub.matrix import EvaluationSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOut:
    windows: list[list[int]]
    dataset: str        # "wikitext" or the file name
    dataset_name: str   # "wikitext-2-raw-v1" or the file name
    split: str | None
    context: int
    stride: int

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.windows).encode()).hexdigest()[:16]


def held_out(tokenizer, *, eval_file: str | Path | None, context: int, stride: int, windows: int,
             spec: EvaluationSpec | None = None) -> HeldOut:
    """Token windows of held-out text: a local file, else the matrix's evaluation dataset (wikitext-2 test)."""
    from quantpub.calibration import load_text
    from quantpub.matrix import CalibrationSpec

    spec = spec or EvaluationSpec()
    try:
        if eval_file is not None:
            text, _ = load_text(CalibrationSpec(text_column=spec.text_column), eval_file)
            dataset = name = Path(eval_file).name
            split = None
        else:
            text, _ = load_text(spec.as_text_source(), None)
            dataset, name, split = spec.dataset, spec.config or spec.dataset, spec.split
    except CalibrationError as exc:  # the same loader, but this is evaluation text
        raise CalibrationError(exc.source, exc.reason, role="evaluation") from None
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = context - len(bos)
    cut = [bos + ids[i:i + body] for i in range(0, len(ids) - body + 1, stride)][:windows]
    if len(cut) < windows:
        raise QuantpubError(f"evaluation text {name}: {len(ids)} tokens give {len(cut)} windows of {context}; "
                            f"need {windows} (use --windows or a longer --eval-file)")
    return HeldOut(cut, dataset, name, split, context, stride)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def score(logprobs_per_window, data: HeldOut, reference: np.ndarray | None) -> dict[str, float]:
    """Perplexity over the next-token predictions, and mean KL(reference || variant) over the same positions."""
    nll, kl, n = 0.0, 0.0, 0
    for w, (window, logp) in enumerate(zip(data.windows, logprobs_per_window)):
        targets = np.asarray(window[1:])
        lp = logp[:-1]
        nll -= float(lp[np.arange(len(targets)), targets].sum())
        if reference is not None:
            ref = reference[w][:-1].astype(np.float64)
            kl += float((np.exp(ref) * (ref - lp)).sum())
        n += len(targets)
    out = {"perplexity": float(np.exp(nll / n))}
    if reference is not None:
        out["kld"] = kl / n
    return out


def hf_logprobs(model_dir: Path, data: HeldOut, device: str, manifest: dict | None = None):
    """Log-probabilities of every window through transformers (the source, GPTQ and AWQ)."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantpub.validate import cpu_loader_kwargs

    gptq = manifest is not None and manifest["method"] == "gptq"
    kwargs: dict[str, Any] = cpu_loader_kwargs(model_dir, manifest["parameters"], device) if gptq else {}
    dtype = torch.float32 if device == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device, **kwargs)
    model.eval()
    with torch.no_grad():
        for window in data.windows:
            logits = model(torch.tensor([window], device=model.device)).logits[0].float().cpu().numpy()
            yield _log_softmax(logits.astype(np.float64))


def gguf_logprobs(first_file: Path, data: HeldOut, threads: int):
    """Log-probabilities of every window through llama.cpp (``logits_all=True``)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(first_file), n_ctx=data.context, n_batch=data.context, logits_all=True,
                n_threads=threads, verbose=False)
    try:
        for window in data.windows:
            llm.reset()
            llm.eval(window)
            yield _log_softmax(np.asarray(llm.scores[: len(window)], dtype=np.float64))
    finally:
        llm.close()


def evaluate(out: str | Path, *, model: str | None = None, eval_file: str | Path | None = None,
             context: int = 512, stride: int | None = None, windows: int = 8, device: str = "cpu",
             only: list[str] | None = None, force: bool = False,
             spec: EvaluationSpec | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate every finished variant under ``out`` that has no evaluation yet (all with ``force``)."""
    from transformers import AutoTokenizer

    from quantpub.backends.gguf import cpu_count
    from quantpub.worker import _local_model

    out = Path(out)
    record = json.loads((out / RUN_RECORD).read_text()) if (out / RUN_RECORD).is_file() else {}
    model = model or record.get("model")
    if not model:
        raise QuantpubError(f"{out}: no {RUN_RECORD}; pass --model")
    model_dir = _local_model(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = held_out(tokenizer, eval_file=eval_file, context=context, stride=stride or context, windows=windows,
                    spec=spec)
    cache = out / ".eval" / f"reference-{data.key()}.npy"
    if cache.is_file():
        reference = np.load(cache)
    else:
        started = time.monotonic()
        reference = np.stack([lp.astype(np.float16) for lp in hf_logprobs(model_dir, data, device)])
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.with_suffix(".partial.npy"), reference)
        os.replace(cache.with_suffix(".partial.npy"), cache)
        log.info("evaluate: unquantised model scored in %.1fs", time.monotonic() - started)
    ref_ppl = score(reference.astype(np.float64), data, None)["perplexity"]
    info = {"dataset": data.dataset, "dataset_name": data.dataset_name, "split": data.split, "tokens": data.tokens,
            "context": data.context, "stride": data.stride, "reference_perplexity": ref_ppl}
    results = {}
    for manifest_path in sorted(out.glob(f"*/{MANIFEST}")):
        if manifest_path.parent.name.startswith("."):
            continue
        manifest = json.loads(manifest_path.read_text())
        variant = manifest["variant"]
        if (only and variant not in only) or (manifest.get("evaluation") and not force):
            continue
        started = time.monotonic()
        if manifest["method"] == "gguf":
            first = sorted(n for n in manifest["files"] if n.endswith(".gguf"))[0]
            logprobs = gguf_logprobs(manifest_path.parent / first, data, cpu_count())
            runtime = "llama.cpp"
        else:
            logprobs = hf_logprobs(manifest_path.parent, data, device, manifest)
            runtime = "transformers"
        result = {**score(logprobs, data, reference), **info, "runtime": runtime,
                  "seconds": round(time.monotonic() - started, 2)}
        manifest["evaluation"] = result
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
        results[variant] = result
        log.info("evaluate: %s perplexity %.4f (unquantised %.4f), KLD %.5f", variant, result["perplexity"],
                 ref_ppl, result["kld"])
    return results
