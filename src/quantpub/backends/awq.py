"""AWQ through GPTQModel, saved in AutoAWQ's on-disk format (GEMM/GEMV, zero point)."""

from __future__ import annotations

from pathlib import Path

from quantpub.backends.gptq import rewrite_configs
from quantpub.backends.gptqmodel_session import ModelSession, _import_gptqmodel
from quantpub.calibration import CalibrationSet
from quantpub.matrix import AwqTarget


def autoawq_configs(t: AwqTarget) -> tuple[dict, dict]:
    """(config.json's quantization_config, quant_config.json) as AutoAWQ 0.2 wrote them."""
    in_config = {"bits": t.bits, "group_size": t.group_size, "modules_to_not_convert": None,
                 "quant_method": "awq", "version": t.version.lower(), "zero_point": t.zero_point}
    quant_config = {"quant_method": "awq", "zero_point": t.zero_point, "q_group_size": t.group_size,
                    "w_bit": t.bits, "version": t.version, "modules_to_not_convert": None}
    return in_config, quant_config


CLIP_SEARCH_BYTES = 256 << 20


def bound_clip_search(budget: int = CLIP_SEARCH_BYTES) -> None:
    """Run GPTQModel's AWQ clipping search on slices of output rows, so its peak stays near ``budget``.

    The search (AutoAWQ's algorithm) multiplies a batch of 256 output rows by up to 512 tokens
    of the layer's input at once: 256 x 512 x in_features values, 1.07 GB in bf16 for an MLP of
    4096 (2.9 GB for a 7B's 11008), more than the rest of the group holds. Each row's clip is
    chosen from that row alone, so calling the original on slices of 64 rows gives the same
    result bit for bit (a test checks it) at a quarter of the memory or less. Patched once, on
    GPTQModel's class, in the worker process that quantizes.
    """
    import torch
    from gptqmodel.looper.awq_processor import AWQProcessor

    original = AWQProcessor._compute_best_clip
    if getattr(original, "quantpub_bounded", False):
        return

    def compute_best_clip(self, w, input_feat, *args, **kwargs):
        n_tokens = input_feat.numel() // input_feat.shape[-1]
        step = max(1, n_tokens // kwargs.get("n_sample_token", 512))  # the original keeps every step-th token
        tokens = -(-n_tokens // step)
        per_row = tokens * w.shape[1] * w.element_size()
        rows = 64 * max(1, budget // (per_row * 64))
        if rows >= w.shape[0] or w.shape[0] % 64:
            return original(self, w, input_feat, *args, **kwargs)
        return torch.cat([original(self, w[i:i + rows], input_feat, *args, **kwargs)
                          for i in range(0, w.shape[0], rows)])

    compute_best_clip.quantpub_bounded = True
    compute_best_clip.__wrapped__ = original
    AWQProcessor._compute_best_clip = compute_best_clip


def build(session: ModelSession, t: AwqTarget, calibration: CalibrationSet, out: Path) -> object:
    """Quantize a freshly loaded copy of the session's model into ``out``; returns GPTQModel's quantize log.

    The scale search runs in fp16 on a GPU, as AutoAWQ did, and in bf16 on CPU: there fp16 matrix
    products have no kernel (a 512 x 1024 x 4096 product takes 6.8 s in fp16, 0.012 s in bf16
    and 0.025 s in fp32 on the 2-core test machine), and GPTQModel's AWQ layers refuse fp32.
    The saved tensors are fp16 either way (``conform_to_source``).
    """
    import torch

    gptqmodel = _import_gptqmodel()
    from gptqmodel.quantization.config import AWQConfig

    bound_clip_search()

    # sym=False is AutoAWQ's zero_point=True; the format is GEMM or GEMV.
    qc = AWQConfig(bits=t.bits, group_size=t.group_size, sym=not t.zero_point,
                   format=t.version.lower(), offload_to_disk=False)
    model = session.load(qc, dtype=torch.bfloat16 if session.device == "cpu" else torch.float16)
    # The kernel only packs the result (GEMM's layout is the same in every GEMM kernel). GPTQModel's
    # automatic choice on CUDA is its compiled GEMM kernel, JIT-built with nvcc on first use (minutes,
    # and it fails without a toolchain): pack with the torch one everywhere. GEMV has only a compiled one.
    gemm = t.version == "GEMM"
    backend = gptqmodel.BACKEND.AWQ_TORCH if gemm or session.device == "cpu" else gptqmodel.BACKEND.AUTO
    log = model.quantize(calibration.as_gptqmodel(), batch_size=1, backend=backend)
    model.save(str(out))
    session.release(model)
    (out / "quantize_config.json").unlink(missing_ok=True)  # AutoAWQ writes quant_config.json instead
    in_config, quant_config = autoawq_configs(t)
    rewrite_configs(out, in_config, ("quant_config.json", quant_config))
    return log
