"""GPTQ through GPTQModel, saved in the AutoGPTQ v1 layout TheBloke's branches hold."""

from __future__ import annotations

import json
from pathlib import Path

from quantpub import __version__
from quantpub.backends.gptqmodel_session import ModelSession, _import_gptqmodel
from quantpub.calibration import CalibrationSet
from quantpub.matrix import GROUP_AWARE, GptqVariant


def autogptq_config(v: GptqVariant, quantizer: str) -> dict:
    """``quantize_config.json`` as AutoGPTQ 0.7 wrote it (also ``config.json``'s quantization_config)."""
    return {
        "bits": v.bits,
        "group_size": -1 if v.group_size is None else v.group_size,
        "damp_percent": v.damp,
        "desc_act": v.act_order is True,
        "static_groups": False,
        "sym": v.sym,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "meta": {"quantizer": [quantizer, f"quantpub:{__version__}"],
                 **({"act_group_aware": True} if v.act_order == GROUP_AWARE else {})},
    }


def quantize_config(v: GptqVariant):
    """GPTQModel's config for a variant; the exact and the shared mode solve with the same one."""
    gptqmodel = _import_gptqmodel()
    return gptqmodel.QuantizeConfig(
        bits=v.bits, group_size=-1 if v.group_size is None else v.group_size, desc_act=v.act_order is True,
        sym=v.sym, damp_percent=v.damp, true_sequential=True,
        # AutoGPTQ semantics unless asked: without act order, g_idx is the plain i // group_size.
        # Group-aware reordering also keeps g_idx plain (desc_act false), so vLLM accepts it.
        act_group_aware=v.act_order == GROUP_AWARE,
        # Loaded whole; a streamed session (models larger than memory) turns disk offload on in
        # ModelSession.load, and the temp path it writes into the config is replaced afterwards.
        offload_to_disk=False,
    )


def build(session: ModelSession, v: GptqVariant, calibration: CalibrationSet, out: Path) -> object:
    """Exact mode: quantize a freshly loaded copy of the model into ``out``; returns GPTQModel's quantize log.

    GPTQModel's looper feeds each layer's *quantized* outputs to the next layer, so every
    variant pays its own calibration pass.
    """
    model = session.load(quantize_config(v))
    log = model.quantize(calibration.as_gptqmodel(), batch_size=1)
    model.save(str(out))
    session.release(model)
    del model
    write_gptq_configs(out, v)
    return log


def write_gptq_configs(out: Path, v: GptqVariant) -> None:
    """``config.json``'s quantization_config and ``quantize_config.json`` as AutoGPTQ wrote them."""
    gptqmodel = _import_gptqmodel()
    rewrite_configs(out, autogptq_config(v, f"gptqmodel:{gptqmodel.__version__}"))


def rewrite_configs(out: Path, quantization: dict, extra_file: tuple[str, dict] | None = None) -> None:
    """Put the reference format's quantization config into both config files."""
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    name, payload = extra_file or ("quantize_config.json", quantization)
    (out / name).write_text(json.dumps(payload, indent=2) + "\n")
