"""compressed-tensors variants (vLLM's and SGLang's native format): build, validate, score, size.

The route (measured in ``benchmarks/formats_cost.py``, see README "compressed-tensors"): the
weights of W4A16 and W8A8 are solved by quantpub's GPTQ (GPTQModel, exact mode, symmetric,
the scheme's group size and act order), and the ``compressed-tensors`` library's own
``convert_checkpoint`` rewrites that AutoGPTQ checkpoint in its format (``ct_convert``): the
integers and scales move over unchanged. A matching GPTQ branch built for the same model and
calibration (``gptq_variant(params)`` says which) is converted instead of solving again, so
the W4A16 repo costs a conversion, not a calibration pass. FP8_DYNAMIC is data-free: the same
``convert_checkpoint`` quantizes the source's linear weights (``DenseToFp8``).

Every function takes plain arguments, for the backend table to register:
``build``, ``validate``, ``logprobs``, ``estimated_size``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quantpub.backends.conform import GENERATION_CONFIG, source_dtype, tokenizer_files, with_legacy_rope
from quantpub.calibration import CalibrationSet
from quantpub.matrix import GptqVariant
from quantpub.matrix_formats import CtScheme
from quantpub.source import ModelFacts, groups

log = logging.getLogger(__name__)
PROMPT_TOKENS = 16
NEW_TOKENS = 4
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")
# What transformers' compressed-tensors integration does on a CPU (measured with transformers 5.23 +
# compressed-tensors 0.20): no quantized kernel runs; the weights are decompressed to the load dtype at
# the first forward and the activations of W8A8 / FP8_DYNAMIC are quantized and dequantized per token.
CPU_EXECUTION = {
    "W4A16": "weights decompressed to fp32 on load (no int4 kernel on CPU)",
    "W8A8": "weights decompressed to fp32 on load, activations quantized to int8 per token and back (emulated)",
    "FP8_DYNAMIC": "weights decompressed to fp32 on load, activations quantized to FP8 per token and back "
                   "(emulated: no FP8 kernel on CPU)",
}


def gptq_variant(params: CtScheme) -> GptqVariant | None:
    """The GPTQ variant whose solve a W4A16 / W8A8 variant is (None for FP8_DYNAMIC).

    A built GPTQ branch with these parameters and the same calibration can be passed to
    ``build`` as ``from_gptq``.
    """
    if not params.needs_calibration:
        return None
    return GptqVariant(bits=params.weight_bits, group_size=params.resolved_group_size,
                       act_order=params.resolved_act_order, damp=params.resolved_damp, sym=True)


def manifest_parameters(params: CtScheme) -> dict[str, Any]:
    """The parameters a manifest records (and the card shows): the scheme's, defaults resolved."""
    gptq = params.needs_calibration
    return {"scheme": params.scheme, "group_size": params.resolved_group_size,
            "act_order": params.resolved_act_order if gptq else None, "damp": params.resolved_damp if gptq else None}


def build(source_dir: Path, out_dir: Path, params: CtScheme, calib: CalibrationSet | None, device: str, *,
          from_gptq: Path | None = None) -> dict[str, Any]:
    """Write the variant into ``out_dir`` (created; must not exist): weights, ``config.json`` (the
    source's plus compressed-tensors' ``quantization_config``, and the old rope keys when the source
    has only ``rope_parameters``), tokenizer and generation config.

    ``from_gptq``: a built GPTQ directory of ``gptq_variant(params)`` to convert instead of solving.
    Returns a record: scheme, format, route, seconds, library versions.

    Raises:
        ValueError: calibration missing for a GPTQ scheme, or ``from_gptq`` not convertible.
    """
    from compressed_tensors.entrypoints.convert import convert_checkpoint

    from quantpub.backends.ct_convert import SCHEME_FORMAT, DenseToFp8, GptqToCompressed

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir}: already exists; build into a fresh directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    linears, routers = _linear_layers(source_dir)
    record: dict[str, Any] = {"scheme": params.scheme, "format": SCHEME_FORMAT[params.scheme]}
    if params.scheme == "FP8_DYNAMIC":
        dtype = _torch_dtype(source_dtype(_config(source_dir)))
        convert_checkpoint(source_dir, out_dir, DenseToFp8(linears, dtype, ignore=["lm_head", *routers]),
                           max_workers=1, device="cpu")
        record["route"] = "data-free: compressed-tensors convert_checkpoint, absmax scale per output channel"
    else:
        variant = gptq_variant(params)
        with tempfile.TemporaryDirectory(prefix=".gptq-", dir=out_dir.parent) as scratch:
            if from_gptq is None:
                if calib is None:
                    raise ValueError(f"{params.variant_id()}: {params.scheme} is solved by GPTQ and needs calibration")
                from_gptq = Path(scratch) / "gptq"
                record["gptq_seconds"] = solve_gptq(source_dir, from_gptq, variant, calib, device)
                record["route"] = "GPTQModel (exact mode) + compressed-tensors convert_checkpoint"
            else:
                record["route"] = f"converted from the GPTQ build {Path(from_gptq).name}"
            from_gptq = Path(from_gptq)
            _check_gptq(from_gptq, variant)
            converted = {n.rsplit(".", 1)[0] for n in _tensor_names(from_gptq) if n.endswith(".qweight")}
            drop = sorted(n for n in _tensor_names(from_gptq) if n.endswith(".bias")
                          and n.rsplit(".", 1)[0] in converted and n not in _tensor_names(source_dir))
            ignore = sorted({"lm_head", *routers} | (set(linears) - converted))
            convert_checkpoint(from_gptq, out_dir, GptqToCompressed(
                params.scheme, variant.bits, variant.group_size, variant.act_order, ignore=ignore, drop=drop),
                max_workers=1, device="cpu")
        record["gptq"] = variant.model_dump(mode="json")  # the calibration windows are the manifest's own record
    _ship_only_variant_files(out_dir, source_dir)
    config = out_dir / "config.json"  # the rope keys transformers 4 and older vLLM read (``with_legacy_rope``)
    config.write_text(json.dumps(with_legacy_rope(json.loads(config.read_text())), indent=2) + "\n")
    record["seconds"] = round(time.monotonic() - started, 2)
    record["versions"] = versions()
    return record


def solve_gptq(source_dir: Path, out: Path, variant: GptqVariant, calib: CalibrationSet, device: str) -> float:
    """quantpub's exact-mode GPTQ build of ``variant`` into ``out`` (AutoGPTQ layout, the source's files)."""
    import torch

    from quantpub.backends import gptq
    from quantpub.backends.conform import conform_to_source
    from quantpub.backends.gptqmodel_session import ModelSession

    started = time.monotonic()
    session = ModelSession(source_dir, device, torch.float32 if device == "cpu" else torch.float16)
    gptq.build(session, variant, calib, out)
    (out / "quant_log.csv").unlink(missing_ok=True)
    conform_to_source(out, source_dir)
    return round(time.monotonic() - started, 2)


def _check_gptq(gptq_dir: Path, variant: GptqVariant) -> None:
    """The GPTQ directory must hold exactly ``variant``'s solve (its ``quantize_config.json`` says so)."""
    path = gptq_dir / "quantize_config.json"
    if not path.is_file():
        raise ValueError(f"{path}: not a GPTQ build (no quantize_config.json)")
    qc = json.loads(path.read_text())
    want = {"bits": variant.bits, "group_size": variant.group_size or -1, "sym": True,
            "desc_act": variant.act_order is True, "damp_percent": variant.damp}
    got = {k: qc.get(k) for k in want}
    if got != want:
        raise ValueError(f"{path}: {got} is not the GPTQ solve this scheme needs ({want})")


def _config(source_dir: Path) -> dict[str, Any]:
    return json.loads((Path(source_dir) / "config.json").read_text())


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _linear_layers(source_dir: Path) -> tuple[list[str], list[str]]:
    """(the decoder blocks' linear layers to quantize, the MoE routers left alone), from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    routers = [n for n in names if n.endswith(".gate")]  # llm-compressor's MoE examples ignore re:.*mlp.gate$
    return [n for n in names if n not in routers], routers


def _tensor_names(directory: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            names.update(f.keys())
    return names


def _ship_only_variant_files(out_dir: Path, source_dir: Path) -> None:
    """Leave the weights, ``config.json``, the source's tokenizer files and generation config, nothing else
    (``convert_checkpoint`` copies every other file it finds: a README, a GPTQ build's manifest)."""
    keep = {"config.json", GENERATION_CONFIG, *tokenizer_files(source_dir)}
    keep |= {p.name for g in WEIGHT_FILES for p in out_dir.glob(g)}
    for path in out_dir.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in tokenizer_files(source_dir) + ([GENERATION_CONFIG] if (source_dir / GENERATION_CONFIG).is_file() else []):
        shutil.copyfile(source_dir / name, out_dir / name)


def versions() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("compressed-tensors", "gptqmodel", "transformers", "torch")}


def _load(out_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, device_map="cpu").eval()


def validate(out_dir: Path, params: CtScheme, prompt_ids: list[int]) -> dict[str, Any]:
    """Load ``out_dir`` with transformers' compressed-tensors integration on CPU, forward, 4 greedy tokens.

    Returns a record, which says how the CPU ran the scheme (``execution``: an emulation, not the
    scheme's kernels; vLLM's CPU build is checked by ``quantpub.compat``). Raises ``ValueError``
    with the reason on failure.
    """
    import torch

    started = time.monotonic()
    ids = torch.tensor([prompt_ids[:PROMPT_TOKENS]])
    try:
        model = _load(out_dir)
        with torch.no_grad():
            logits = model(ids).logits
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False)
    except Exception as exc:
        raise ValueError(f"{out_dir.name}: transformers could not run it: {type(exc).__name__}: {exc}") from exc
    if not torch.isfinite(logits).all():
        raise ValueError(f"{out_dir.name}: the forward pass produced NaN or infinite logits")
    new = generated[0, ids.shape[1]:].tolist()
    layer = model.model.layers[0].self_attn.q_proj
    return {"validated": True, "loaded_with": "transformers (compressed-tensors)", "device": "cpu",
            "execution": CPU_EXECUTION[params.scheme],
            "kernel": f"{type(layer).__module__}.{type(layer).__name__}", "prompt_tokens": ids.shape[1],
            "generated_tokens": new, "seconds": round(time.monotonic() - started, 2)}


def logprobs(out_dir: Path, windows: list[list[int]]) -> Iterator[np.ndarray]:
    """Log-probabilities of every window through transformers on CPU (fp32 activations), for ``evaluate.score``."""
    import torch

    from quantpub.evaluate import _log_softmax

    model = _load(out_dir)
    with torch.no_grad():
        for window in windows:
            logits = model(torch.tensor([window])).logits[0].float().numpy()
            yield _log_softmax(logits.astype(np.float64))


def estimated_size(facts: ModelFacts, params: CtScheme) -> int:
    """Bytes of the weights, from the exact tensor layout; the safetensors header (a few KB) is not
    counted (tested on the tiny llama).

    W4A16: ``weight_packed`` (8 values per int32 along the input), 16-bit ``weight_scale`` per
    group and output, ``weight_shape``; W8A8 / FP8: one byte per weight, a 16-bit scale per
    output. Embeddings, output layer, norms (and MoE routers) stay in 16 bits.
    """
    total = 0
    for lin in facts.block_linears():
        if params.scheme == "W4A16":
            per = lin.out_features * (-(-lin.in_features // 8) * 4 + groups(lin.in_features, params.resolved_group_size) * 2) + 16
        else:
            per = lin.out_features * (lin.in_features + 2)
        total += per * lin.count
    return total * facts.num_layers + facts.unquantized_params * 2
