"""Load a saved GPTQ/AWQ variant back with transformers, run it, and fail on NaN or errors."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from quantpub.matrix import AwqTarget, GptqVariant

PROMPT_TOKENS = 16
NEW_TOKENS = 4


def cpu_loader_kwargs(model_dir: Path, params: GptqVariant) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for 4-bit GPTQ on CPU.

    The automatic CPU int4 kernel needs a group size of 32..256 that divides every input size
    (SmolLM2's 576 is not a multiple of 128); the torch kernel has neither limit.
    """
    import json

    from transformers import GPTQConfig

    if params.bits != 4:
        return {}
    config = json.loads((Path(model_dir) / "config.json").read_text())
    inputs = {config.get("hidden_size", 0), config.get("intermediate_size", 0)}
    group = params.group_size
    if group is not None and all(n % group == 0 for n in inputs):
        return {}
    return {"quantization_config": GPTQConfig(bits=4, group_size=group or -1, desc_act=params.act_order is True,
                                              sym=params.sym, backend="gptq_torch")}


# GPU kernels that need nothing compiled: GPTQModel's PyPI wheel ships its CUDA kernels as sources and
# its automatic choice JIT-compiles them with nvcc on first use (Machete also downloads CUTLASS), which
# takes minutes, needs a toolchain and fails offline. Triton kernels compile in seconds from Python.
PORTABLE_GPTQ = {2: "gptq_triton", 4: "gptq_triton", 8: "gptq_triton"}  # other bits: gptq_torch
PORTABLE_AWQ_GROUPS = (-1, 32, 64, 128)  # the AWQ GEMM Triton kernel's; others: torch_awq


def gptq_loader_kwargs(model_dir: Path, params: GptqVariant, device: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments that choose the kernel a GPTQ variant is loaded with.

    On CPU: ``cpu_loader_kwargs``. On CUDA: a Triton (or plain torch) kernel, unless
    ``QUANTPUB_CUDA_KERNELS=auto`` leaves the choice to GPTQModel (its compiled kernels, built on first use).
    """
    from transformers import GPTQConfig

    if device == "cpu":
        return cpu_loader_kwargs(model_dir, params)
    if os.environ.get("QUANTPUB_CUDA_KERNELS", "portable") == "auto":
        return {}
    return {"quantization_config": GPTQConfig(
        bits=params.bits, group_size=params.group_size or -1, desc_act=params.act_order is True, sym=params.sym,
        backend=PORTABLE_GPTQ.get(params.bits, "gptq_torch"))}


def awq_loader_kwargs(model_dir: Path, params: AwqTarget, device: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments that choose the kernel an AWQ variant is loaded with (as for GPTQ)."""
    from transformers import AwqConfig

    if device == "cpu" or os.environ.get("QUANTPUB_CUDA_KERNELS", "portable") == "auto":
        return {}
    if params.version != "GEMM":
        return {}  # AWQ GEMV has only a compiled kernel
    return {"quantization_config": AwqConfig(
        bits=params.bits, group_size=params.group_size, zero_point=params.zero_point,
        backend="gemm_triton" if params.group_size in PORTABLE_AWQ_GROUPS else "torch_awq")}


def validate_transformers(out: Path, method: str, params: Any, device: str, prompt_ids: list[int]) -> dict[str, Any]:
    """Load ``out`` (a ``method`` variant) with ``from_pretrained``, forward ``prompt_ids`` and greedily generate.

    Returns a record of what was checked. Raises ``ValueError`` with the reason on failure.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from quantpub.backends import backend

    started = time.monotonic()
    kwargs: dict[str, Any] = {"device_map": device, **backend(method).loader_kwargs(out, params, device)}
    # GPTQModel's torch kernel (2/3/8-bit) wraps its dequantization in torch.compile; compiling
    # it for 20 tokens cost ~40 s per variant on CPU. The check is the file and its numbers: run eagerly.
    with torch.compiler.set_stance("force_eager"):
        model = AutoModelForCausalLM.from_pretrained(out, **kwargs)
        ids = torch.tensor([prompt_ids[:PROMPT_TOKENS]], device=model.device)
        with torch.no_grad():
            logits = model(ids).logits
        if not torch.isfinite(logits).all():
            raise ValueError("the forward pass produced NaN or infinite logits")
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, min_new_tokens=NEW_TOKENS)
    new = generated[0, ids.shape[1]:].tolist()
    if len(new) != NEW_TOKENS or not all(0 <= t < model.config.vocab_size for t in new):
        raise ValueError(f"generation returned {new}")
    kernel = type(model.model.layers[0].self_attn.q_proj).__name__
    return {"loaded_with": "transformers.AutoModelForCausalLM", "kernel": kernel, "device": device,
            "prompt_tokens": ids.shape[1], "generated_tokens": new, "seconds": round(time.monotonic() - started, 2)}
