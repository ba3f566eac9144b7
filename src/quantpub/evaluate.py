"""Measured quality of every variant: perplexity and KL divergence from the unquantised model.

All formats are scored on the same token ids (the source tokenizer's), cut into the same
windows (``context`` tokens, every ``stride`` tokens), of held-out text that calibration never
saw (wikitext-2 *test* by default; calibration is refused on that split). The unquantised model
runs once; its log-probabilities are cached in ``OUT/.eval/`` and every variant is compared
with them: perplexity with its standard error, KL divergence (mean, median, 99th percentile,
maximum), top-token agreement and delta-p, as ``llama-perplexity --kl-divergence`` reports
them, over every predicted position. The peak memory of loading the variant and running one
window is measured on the way (``memory.py``). GPTQ and AWQ run through transformers, GGUF through llama.cpp: each in the runtime
its users use. Results go into each variant's ``quantpub.json`` (``evaluation``), and from
there into the cards.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantpub import isolate, progress
from quantpub.backends import backend
from quantpub.manifest import Evaluation, Manifest, finished, write as write_manifest
from quantpub.plan import load_plan
from quantpub.errors import CalibrationError, QuantpubError
from quantpub.matrix import EvaluationSpec
from quantpub.memory import peak_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failed:
    """A variant whose evaluation ended without statistics: its load crashed or was killed (``ending``)."""

    error: str
    ending: str


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

    def digest(self) -> str:
        """sha256 of the token windows: the exact text every variant was scored on."""
        return hashlib.sha256(json.dumps(self.windows).encode()).hexdigest()

    def key(self) -> str:
        return self.digest()[:16]


def load_eval_text(spec: EvaluationSpec, eval_file: str | Path | None) -> tuple[str, dict[str, str | None]]:
    """(held-out text, its origin record): a local file, else the spec's dataset (wikitext-2 test)."""
    from quantpub import calibration

    try:
        text, _ = calibration.load_text(spec.as_text_source(), eval_file)
    except CalibrationError as exc:  # the same loader, but this is evaluation text
        raise CalibrationError(exc.source, exc.reason, role="evaluation") from None
    return text, calibration.origin(spec.as_text_source(), eval_file)


def held_out(tokenizer, text: str, origin: dict[str, str | None], *, context: int, stride: int,
             windows: int) -> HeldOut:
    """Token windows of held-out ``text``, named as its ``origin`` says (a file's name, or dataset/config/split)."""
    if origin.get("file"):
        dataset = name = origin["file"]
        split = None
    else:
        dataset, name, split = origin["dataset"], origin.get("config") or origin["dataset"], origin.get("split")
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


def token_stats(logp: np.ndarray, targets: np.ndarray, ref: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per predicted token (as ``llama-perplexity --kl-divergence`` defines them): the negative
    log-likelihood of the text's next token, and against the reference distribution the KL
    divergence KL(reference || variant), whether both put the same token on top, and the change
    in the probability of the text's next token (delta-p = p_variant - p_reference)."""
    rows = np.arange(len(targets))
    out = {"nll": -logp[rows, targets]}
    if ref is not None:
        ref = _log_softmax(ref)  # the cache is float16: renormalised, every KLD is >= 0
        out["kld"] = (np.exp(ref) * (ref - logp)).sum(-1)
        out["same_top"] = (logp.argmax(-1) == ref.argmax(-1)).astype(np.float64)
        out["delta_p"] = np.exp(logp[rows, targets]) - np.exp(ref[rows, targets])
    return out


def _mean_err(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (llama.cpp's mean_and_uncertainty)."""
    n = len(values)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")


def summarize(stats: dict[str, np.ndarray]) -> dict[str, Any]:
    """The numbers a card shows, from per-token statistics (llama.cpp's definitions: PPL's error
    by the delta method, linear-interpolated percentiles)."""
    log_ppl, log_ppl_err = _mean_err(stats["nll"])
    out: dict[str, Any] = {"perplexity": float(np.exp(log_ppl)), "perplexity_stderr": float(np.exp(log_ppl) * log_ppl_err),
                           "tokens_scored": int(len(stats["nll"]))}
    if "kld" in stats:
        kld = stats["kld"]
        out["kld"], out["kld_stderr"] = _mean_err(kld)
        out.update(kld_median=float(np.median(kld)), kld_p99=float(np.percentile(kld, 99)), kld_max=float(kld.max()))
        out["top1_agreement"], out["top1_agreement_stderr"] = _mean_err(stats["same_top"])
        out["delta_p"], out["delta_p_stderr"] = _mean_err(stats["delta_p"])
    return out


def score(logprobs_per_window, data: HeldOut, reference: np.ndarray | None) -> dict[str, Any]:
    """Every statistic over the next-token predictions of every window, against ``reference``'s."""
    parts: list[dict[str, np.ndarray]] = []
    for w, (window, logp) in enumerate(zip(data.windows, logprobs_per_window)):
        ref = None if reference is None else reference[w][:-1].astype(np.float64)
        parts.append(token_stats(logp[:-1], np.asarray(window[1:]), ref))
    return summarize({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def _load_hf(model_dir: Path, device: str, manifest: Manifest | None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if manifest is not None:
        b = backend(manifest.method)
        kwargs = b.loader_kwargs(model_dir, b.read_parameters(manifest.parameters), device)
    dtype = torch.float32 if device == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device, **kwargs)
    return model.eval()


def hf_logprobs(model, data: HeldOut):
    """Log-probabilities of every window through a transformers model (the source, GPTQ and AWQ)."""
    import torch

    with torch.no_grad():
        for window in data.windows:
            logits = model(torch.tensor([window], device=model.device)).logits[0].float().cpu().numpy()
            yield _log_softmax(logits.astype(np.float64))


def hf_measured(model_dir: Path, data: HeldOut, device: str, manifest: Manifest | None):
    """(model, memory): the model loaded while measuring the peak memory of the load plus one
    forward pass over a whole window (only the last position's logits, as generation asks)."""
    import torch

    with peak_memory(device) as peak:
        model = _load_hf(model_dir, device, manifest)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        with torch.no_grad():
            model(torch.tensor([data.windows[0]], device=model.device), **keep)
    return model, _memory(peak, "transformers", device, data)


def gguf_logprobs(first_file: Path, data: HeldOut, threads: int):
    """Log-probabilities of every window through llama.cpp (``logits_all=True``)."""
    from quantpub.backends.llamacpp import load

    llm = load(first_file, n_ctx=data.context, n_batch=data.context, logits_all=True, n_threads=threads,
               verbose=False)
    try:
        for window in data.windows:
            llm.reset()
            llm.eval(window)
            yield _log_softmax(np.asarray(llm.scores[: len(window)], dtype=np.float64))
    finally:
        llm.close()


def gguf_memory(first_file: Path, data: HeldOut, threads: int) -> dict[str, Any]:
    """Peak RAM of loading the file in llama.cpp (no GPU offload) and evaluating one window, as a
    user's generation would (logits of the last position only)."""
    from quantpub.backends.llamacpp import load

    with peak_memory("cpu") as peak:
        llm = load(first_file, n_ctx=data.context, n_batch=data.context, n_gpu_layers=0, n_threads=threads,
                   verbose=False)
        try:
            llm.eval(data.windows[0])
        finally:
            llm.close()
    return _memory(peak, "llama.cpp", "cpu", data)


def _memory(peak: dict[str, Any], runtime: str, device: str, data: HeldOut) -> dict[str, Any] | None:
    if not peak:
        return None
    return {**peak, "context": data.context, "runtime": runtime, "device": device}


def _reference(model_dir: Path, data: HeldOut, device: str, cache: Path) -> None:
    """Score the unquantised model on ``data`` and cache its log-probabilities (float16) at ``cache``."""
    started = time.monotonic()
    source = _load_hf(model_dir, device, None)
    reference = np.stack([lp.astype(np.float16) for lp in hf_logprobs(source, data)])
    del source
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"{cache.stem}.{os.getpid()}.partial.npy")
    np.save(partial, reference)
    os.replace(partial, cache)
    log.info("evaluate: unquantised model scored in %.1fs", time.monotonic() - started)


def measure(variant_dir: Path, manifest: Manifest, data: HeldOut, cache: Path, device: str) -> tuple[dict, dict]:
    """One variant's statistics against the cached reference in the runtime its users use (``Backend.runtime``)
    and the peak memory of loading it and running one window (runs in an isolated worker: it loads native
    kernels)."""
    from quantpub.machine import cpu_count

    reference = np.load(cache, mmap_mode="r")
    b = backend(manifest.method)
    if b.module is not None:  # the format's own runtime (compressed-tensors through transformers, mlx-lm)
        with peak_memory("cpu") as peak:
            stats = score(b.builder().logprobs(variant_dir, data.windows), data, reference)
        memory = _memory(peak, b.runtime, "cpu", data)
        if memory:
            memory["how"] = "peak resident memory of loading it and scoring every window, less what was resident before"
        return stats, memory
    runtime = b.runtime
    if runtime == "llama.cpp":
        first = variant_dir / sorted(n for n in manifest.files if n.endswith(".gguf"))[0]
        memory = gguf_memory(first, data, cpu_count())
        return score(gguf_logprobs(first, data, cpu_count()), data, reference), memory
    loaded, memory = hf_measured(variant_dir, data, device, manifest)
    return score(hf_logprobs(loaded, data), data, reference), memory


def evaluate(out: str | Path, *, model: str | None = None, eval_file: str | Path | None = None,
             context: int | None = None, stride: int | None = None, windows: int | None = None,
             device: str = "cpu", only: list[str] | None = None, force: bool = False) -> dict[str, Evaluation | Failed]:
    """Evaluate every finished variant under ``out`` that has no evaluation yet (all with ``force``).

    The plan written there (``OUT/plan.json``) gives the model, the matrix's evaluation section
    (``context``, ``windows``: given here, they win) and the held-out text it snapshotted;
    ``eval_file`` scores another text instead.

    Each variant is loaded in an isolated worker process (``isolate``): a variant whose load or
    forward crashes gets ``Failed`` instead of statistics and the others go on; a crash while
    scoring the unquantised model gives every variant that failure.
    Logs: ``OUT/logs/evaluate/<variant>.log``.
    """
    from transformers import AutoTokenizer

    from quantpub.source import local_checkpoint

    out = Path(out)
    plan = load_plan(out)
    spec = plan.matrix.evaluation
    context, windows = context or spec.context, windows or spec.windows
    model_dir = local_checkpoint(model or plan.record.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if eval_file is not None:
        text, origin = load_eval_text(spec, eval_file)
    else:
        text, _, origin = plan.text("evaluation", spec.as_text_source())
    data = held_out(tokenizer, text, origin, context=context, stride=stride or context, windows=windows)
    todo = [(d, m) for d, m in finished(out) if not (only and m.variant not in only) and (force or not m.evaluation)]
    cache = out / ".eval" / f"reference-{data.key()}.npy"
    results: dict[str, Evaluation | Failed] = {}
    with isolate.Isolated(out / "logs" / "evaluate", 1, preload=("transformers",)) as pool:
        if not cache.is_file():
            try:
                pool.call("reference", "reference", _reference, model_dir, data, device, cache)
            except isolate.Ended as exc:
                return {m.variant: Failed(str(exc), exc.kind) for _, m in todo}
        ref = score((_log_softmax(r.astype(np.float64)) for r in np.load(cache)), data, None)
        info = {"dataset": data.dataset, "dataset_name": data.dataset_name, "split": data.split,
                "tokens": data.tokens, "windows": len(data.windows), "windows_sha256": data.digest(),
                "context": data.context, "stride": data.stride, "reference_perplexity": ref["perplexity"],
                "reference_perplexity_stderr": ref["perplexity_stderr"]}
        for variant_dir, manifest in todo:
            variant = manifest.variant
            started = time.monotonic()
            progress.report(variant, "evaluating")
            try:
                stats, memory = pool.call(variant, "evaluate", measure, variant_dir, manifest, data, cache, device)
            except isolate.Ended as exc:
                results[variant] = Failed(str(exc), exc.kind)
                progress.report(variant, exc.kind, error=str(exc))
                continue
            result = Evaluation(**stats, **info, runtime=backend(manifest.method).runtime, memory=memory,
                                seconds=round(time.monotonic() - started, 2))
            write_manifest(variant_dir, manifest.model_copy(update={"evaluation": result}))
            results[variant] = result
            progress.report(variant, "evaluated")
            log.info("evaluate: %s perplexity %.4f (unquantised %.4f), KLD %.6f, same top %.1f%%", variant,
                     result.perplexity, ref["perplexity"], result.kld, 100 * result.top1_agreement)
    return results
