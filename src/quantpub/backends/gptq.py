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


def quantize(session: ModelSession, v: GptqVariant, calibration: CalibrationSet, out: Path) -> object:
    """Quantize a fresh copy of the session's model into ``out``; returns GPTQModel's quantize log."""
    gptqmodel = _import_gptqmodel()
    qc = gptqmodel.QuantizeConfig(
        bits=v.bits, group_size=-1 if v.group_size is None else v.group_size, desc_act=v.act_order is True,
        sym=v.sym, damp_percent=v.damp, true_sequential=True,
        # AutoGPTQ semantics unless asked: without act order, g_idx is the plain i // group_size.
        # Group-aware reordering also keeps g_idx plain (desc_act false), so vLLM accepts it.
        act_group_aware=v.act_order == GROUP_AWARE,
        # Disk offload doubles the time and writes its temp path into the config.
        offload_to_disk=False,
    )
    model = session.fresh(qc)
    log = model.quantize(calibration.as_gptqmodel(), batch_size=1)
    model.save(str(out))
    rewrite_configs(out, autogptq_config(v, f"gptqmodel:{gptqmodel.__version__}"))
    return log


def rewrite_configs(out: Path, quantization: dict, extra_file: tuple[str, dict] | None = None) -> None:
    """Put the reference format's quantization config into both config files."""
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    name, payload = extra_file or ("quantize_config.json", quantization)
    (out / name).write_text(json.dumps(payload, indent=2) + "\n")
