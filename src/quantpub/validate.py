"""Load a saved GPTQ/AWQ variant back with transformers, run it, and fail on NaN or errors."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from quantpub.matrix import GptqVariant

PROMPT_TOKENS = 16
NEW_TOKENS = 4


def cpu_loader_kwargs(model_dir: Path, params: dict[str, Any], device: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for 4-bit GPTQ on CPU.

    The automatic CPU int4 kernel needs a group size of 32..256 that divides every input size
    (SmolLM2's 576 is not a multiple of 128); the torch kernel has neither limit.
    """
    import json

    from transformers import GPTQConfig

    if device != "cpu" or params.get("bits") != 4:
        return {}
    config = json.loads((Path(model_dir) / "config.json").read_text())
    inputs = {config.get("hidden_size", 0), config.get("intermediate_size", 0)}
    group = params.get("group_size")
    if group is not None and all(n % group == 0 for n in inputs):
        return {}
    return {"quantization_config": GPTQConfig(bits=4, group_size=group or -1, desc_act=params.get("act_order") is True,
                                              sym=params.get("sym", True), backend="gptq_torch")}


# GPU kernels that need nothing compiled: GPTQModel's PyPI wheel ships its CUDA kernels as sources and
# its automatic choice JIT-compiles them with nvcc on first use (Machete also downloads CUTLASS), which
# takes minutes, needs a toolchain and fails offline. Triton kernels compile in seconds from Python.
PORTABLE_GPTQ = {2: "gptq_triton", 4: "gptq_triton", 8: "gptq_triton"}  # other bits: gptq_torch
PORTABLE_AWQ_GROUPS = (-1, 32, 64, 128)  # the AWQ GEMM Triton kernel's; others: torch_awq


def loader_kwargs(model_dir: Path, method: str, params: dict[str, Any], device: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments that choose the kernel a GPTQ or AWQ variant is loaded with.

    On CPU: ``cpu_loader_kwargs``. On CUDA: a Triton (or plain torch) kernel, unless
    ``QUANTPUB_CUDA_KERNELS=auto`` leaves the choice to GPTQModel (its compiled kernels, built on first use).
    """
    from transformers import AwqConfig, GPTQConfig

    if device == "cpu":
        return cpu_loader_kwargs(model_dir, params, device) if method == "gptq" else {}
    if os.environ.get("QUANTPUB_CUDA_KERNELS", "portable") == "auto":
        return {}
    group = params.get("group_size") or -1
    if method == "gptq":
        return {"quantization_config": GPTQConfig(
            bits=params["bits"], group_size=group, desc_act=params.get("act_order", False),
            sym=params.get("sym", True), backend=PORTABLE_GPTQ.get(params["bits"], "gptq_torch"))}
    if method == "awq" and str(params.get("version", "GEMM")).lower() == "gemm":
        return {"quantization_config": AwqConfig(
            bits=params["bits"], group_size=group, zero_point=params.get("zero_point", True),
            backend="gemm_triton" if group in PORTABLE_AWQ_GROUPS else "torch_awq")}
    return {}  # AWQ GEMV has only a compiled kernel


def validate(out: Path, params: Any, device: str, prompt_ids: list[int]) -> dict[str, Any]:
    """Load ``out`` with ``from_pretrained``, forward ``prompt_ids`` and greedily generate.

    Returns a record of what was checked. Raises ``ValueError`` with the reason on failure.
    """
    import torch
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    kwargs: dict[str, Any] = {"device_map": device}
    method = "gptq" if isinstance(params, GptqVariant) else "awq"
    kwargs.update(loader_kwargs(out, method, params.model_dump(mode="json"), device))
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
