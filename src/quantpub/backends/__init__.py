"""What each quantization backend needs, declared once; the plan and the worker read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackendInfo:
    method: str
    needs_calibration: bool  # GGUF only with an importance matrix; see VariantSpec.calibration
    wants_accelerator: bool  # runs on a GPU in production; GGUF quantizes on CPU cores
    model_types: frozenset[str]  # config.json model_type values it is tested on


_DECODERS = frozenset({"llama", "mistral", "mixtral"})

BACKENDS: dict[str, BackendInfo] = {
    "gptq": BackendInfo("gptq", needs_calibration=True, wants_accelerator=True, model_types=_DECODERS),
    "awq": BackendInfo("awq", needs_calibration=True, wants_accelerator=True, model_types=_DECODERS),
    "gguf": BackendInfo("gguf", needs_calibration=False, wants_accelerator=False, model_types=_DECODERS),
}
