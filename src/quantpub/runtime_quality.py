"""How close each runtime's answer is to the unquantized model's, for one variant and one prompt.

``quantpub.compat`` loads a variant in every runtime available here and keeps each probe's
output (a model probe's logits, vLLM's prompt log-probabilities over the whole vocabulary, an
MLX probe's logits); this module turns those into the mean KL divergence from the unquantized
model's next-token distribution over the prompt's positions, per runtime. The runtimes' own
record (loads, or fails with the error text) is kept beside the number.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from quantpub.evaluate import _log_softmax


def reference_logprobs(source_dir: Path, prompt_ids: list[int]) -> np.ndarray:
    """The unquantized model's next-token log-probabilities at every prompt position (fp32, transformers)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32, device_map="cpu").eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].double().numpy()
    return _log_softmax(logits)


def kld(reference: np.ndarray, logprobs: np.ndarray) -> float:
    """Mean KL(reference || runtime) over the positions both give (rows aligned from the first)."""
    n = min(len(reference), len(logprobs))
    ref, got = reference[:n], logprobs[:n]
    finite = np.isfinite(got)
    if not finite.all():  # a runtime that returned no probability for a token the reference gives mass to
        got = np.where(finite, got, -1e30)
    return float((np.exp(ref) * (ref - got)).sum(-1).mean())


def _probe_logprobs(path: Path, mode: str) -> np.ndarray | None:
    """A probe's output as log-probabilities per position, or None when it wrote none."""
    import torch

    if mode == "mlx":
        path = path.with_name(path.name + ".npy")
        return _log_softmax(np.load(path).astype(np.float64)) if path.is_file() else None
    if not path.is_file():
        return None
    data = torch.load(path).double().numpy()
    if mode == "vllm":  # already log-probabilities, for positions 0..T-2
        return data
    return _log_softmax(data[0])


def runtime_klds(variant_dir: Path, method: str, prompt_ids: list[int], reference: np.ndarray,
                 runtimes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per runtime: its compatibility record plus ``kld`` (None where it did not load)."""
    from quantpub.compat import LOADS, PROMPT_TOKENS, check_variant

    ids = list(prompt_ids[:PROMPT_TOKENS])
    with tempfile.TemporaryDirectory(prefix="quantpub-kld-") as tmp:
        record = check_variant(variant_dir, method, ids, runtimes=runtimes, logits_dir=Path(tmp))
        out = {}
        for name, result in record["runtimes"].items():
            logprobs = _probe_logprobs(Path(tmp) / f"{name}.pt", result["mode"]) if result["status"] == LOADS else None
            # the last position predicts a token past the prompt, which vLLM's prompt log-probabilities do not hold
            out[name] = {**result, "kld": None if logprobs is None else kld(reference[: len(ids) - 1], logprobs)}
    return out
