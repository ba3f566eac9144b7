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


def quantize(session: ModelSession, t: AwqTarget, calibration: CalibrationSet, out: Path) -> object:
    """Quantize a freshly loaded copy of the session's model into ``out``; returns GPTQModel's quantize log.

    The scale search runs in fp16 on a GPU, as AutoAWQ did, and in bf16 on CPU: there fp16 matrix
    products have no kernel (a 512 x 1024 x 4096 product takes 6.8 s in fp16, 0.012 s in bf16
    and 0.025 s in fp32 on the 2-core test machine), and GPTQModel's AWQ layers refuse fp32.
    The saved tensors are fp16 either way (``conform_to_source``).
    """
    import torch

    gptqmodel = _import_gptqmodel()
    from gptqmodel.quantization.config import AWQConfig

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
    (out / "quantize_config.json").unlink(missing_ok=True)  # AutoAWQ writes quant_config.json instead
    in_config, quant_config = autoawq_configs(t)
    rewrite_configs(out, in_config, ("quant_config.json", quant_config))
    return log
