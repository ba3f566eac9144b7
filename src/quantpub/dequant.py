"""Exact dequantization of GPTQ and AWQ files: the weights their integers and scales stand for, by the
formats' definitions, in plain numpy, with no runtime's kernel.

This is the reference the other-runtime probes (``compat``) are compared with: a kernel that unpacks
a file wrongly in every runtime, GPTQModel's included, would agree with itself but not with this.

GPTQ (AutoGPTQ's layout, ``checkpoint_format: gptq``): ``qweight`` int32 ``[in * bits / 32, out]``
packs the input rows and ``qzeros`` int32 ``[groups, out * bits / 32]`` the output columns, each a
little-endian bit stream (3-bit values straddle words); ``scales`` ``[groups, out]``; ``g_idx``
``[in]`` gives each input row's group (act order); v1 stores each zero minus one (``gptq_v2``
does not; so v1 cannot hold a zero of 0, which only asymmetric files need, and its readers disagree
there). ``W[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with ``g = g_idx[i]``.

AWQ GEMM (AutoAWQ's layout): ``qweight`` int32 ``[in, out * bits / 32]`` and ``qzeros``
``[groups, out * bits / 32]`` pack the output columns in the order 0 2 4 6 1 3 5 7 within each
word; the zeros are stored as they are; input row ``i`` is in group ``i // group_size``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's 4-bit GEMM packing: slot k of a word holds column AWQ_ORDER[k]


class DequantError(ValueError):
    """A file this module does not know how to read exactly (another format or packing)."""


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``bits``-bit values per column from int32 words along axis 0 (a bit stream)."""
    words = packed.astype(np.int64) & 0xFFFFFFFF
    words = np.concatenate([words, np.zeros((1, *words.shape[1:]), dtype=np.int64)])  # the last value's next word
    start = np.arange(count) * bits
    word, offset = start // 32, (start % 32)[:, None]
    low = words[word] >> offset
    high = words[word + 1] << (32 - offset)
    return ((low | high) & ((1 << bits) - 1)).astype(np.int64)


def gptq_weight(qweight, qzeros, scales, g_idx, bits: int, *, zeros_minus_one: bool) -> np.ndarray:
    """The ``[out, in]`` float32 weight of one GPTQ linear."""
    n_in, n_out = len(g_idx), scales.shape[1]
    q = unpack(qweight, bits, n_in)  # [in, out]
    zeros = unpack(qzeros.T, bits, n_out).T  # [groups, out]
    if zeros_minus_one:
        zeros = zeros + 1
    g = np.asarray(g_idx, dtype=np.int64)
    return (scales.astype(np.float32)[g] * (q - zeros[g]).astype(np.float32)).T  # one rounding, as in float64


def awq_weight(qweight, qzeros, scales, bits: int, group_size: int) -> np.ndarray:
    """The ``[out, in]`` float32 weight of one AWQ GEMM linear."""
    if bits != 4:
        raise DequantError(f"AWQ GEMM with {bits} bits: only the 4-bit packing is defined")
    n_in, n_out = qweight.shape[0], scales.shape[1]
    order = (np.arange(n_out) // 8) * 8 + np.array(AWQ_ORDER)[np.arange(n_out) % 8]  # column of each packed slot
    q = np.empty((n_in, n_out), dtype=np.int64)
    q[:, order] = unpack(qweight.T, bits, n_out).T
    zeros = np.empty((qzeros.shape[0], n_out), dtype=np.int64)
    zeros[:, order] = unpack(qzeros.T, bits, n_out).T
    g = np.arange(n_in) // (group_size if group_size > 0 else n_in)
    return (scales.astype(np.float32)[g] * (q - zeros[g]).astype(np.float32)).T  # one rounding, as in float64


def read_config(variant_dir: str | Path) -> tuple[dict, dict]:
    """The variant's config without its ``quantization_config``, and that quantization config.

    Raises:
        DequantError: not a GPTQ or AWQ file this module reads (quant method, checkpoint format, packing).
    """
    variant_dir = Path(variant_dir)
    config = json.loads((variant_dir / "config.json").read_text())
    q = config.pop("quantization_config", None) or {}
    method = q.get("quant_method")
    if method == "gptq" and q.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        raise DequantError(f"{variant_dir}: GPTQ checkpoint_format {q.get('checkpoint_format')!r} is not read here")
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise DequantError(f"{variant_dir}: AWQ version {q.get('version')!r} is not read here (only GEMM)")
    if method not in ("gptq", "awq"):
        raise DequantError(f"{variant_dir}: quant_method {method!r} is neither gptq nor awq")
    return config, q


class _Tensors:
    """The variant's tensors by the name of the unquantized parameter they stand for, read on demand in
    float32 (a quantized linear's ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` as ``<name>.weight``)."""

    def __init__(self, variant_dir: Path, q: dict) -> None:
        from safetensors import safe_open

        self.q, self.bits = q, int(q.get("bits", 0))
        self.where: dict[str, Any] = {}
        for f in sorted(variant_dir.glob("*.safetensors")):
            handle = safe_open(f, framework="numpy")
            self.where.update({k: handle for k in handle.keys()})
        self.quantized = {k[: -len(".qweight")] for k in self.where if k.endswith(".qweight")}
        parts = {f"{m}.{p}" for m in self.quantized for p in ("qweight", "qzeros", "scales", "g_idx")}
        self.names = {f"{m}.weight" for m in self.quantized} | {k for k in self.where if k not in parts}

    def optional(self, name: str) -> bool:
        """A quantized linear's bias that is all zeros: the builders write one where the model has none."""
        return name.endswith(".bias") and name[: -len(".bias")] in self.quantized and not np.any(self.get(name))

    def get(self, name: str) -> np.ndarray:
        if name.endswith(".weight") and name[: -len(".weight")] in self.quantized:
            m = name[: -len(".weight")]
            qweight, qzeros, scales = (self._raw(f"{m}.{p}") for p in ("qweight", "qzeros", "scales"))
            if self.q.get("quant_method") == "gptq":
                return gptq_weight(qweight, qzeros, scales, self._raw(f"{m}.g_idx"), self.bits,
                                   zeros_minus_one=self.q.get("checkpoint_format", "gptq") == "gptq")
            return awq_weight(qweight, qzeros, scales, self.bits, int(self.q.get("group_size", -1)))
        return self._raw(name).astype(np.float32)

    def _raw(self, key: str) -> np.ndarray:
        return self.where[key].get_tensor(key)


def peak_bytes(variant_dir: str | Path) -> int:
    """About the most memory ``logits`` holds: twice the float32 of the larger of the embedding and one
    decoder layer (llama-shaped: four attention and three MLP matrices), or, for a config without
    those sizes, a float32 copy of every weight of the file (8 bytes per byte of <= 4-bit weights)."""
    config, _ = read_config(variant_dir)
    try:
        h, inter, vocab = (int(config[k]) for k in ("hidden_size", "intermediate_size", "vocab_size"))
    except (KeyError, TypeError, ValueError):
        return 8 * sum(f.stat().st_size for f in Path(variant_dir).glob("*.safetensors"))
    return 2 * 4 * max(vocab * h, 4 * h * h + 3 * h * inter)


def logits(variant_dir: str | Path, prompt_ids: list[int]):
    """Float32 logits ``[1, T, vocab]`` of the exactly dequantized variant on ``prompt_ids``.

    The model is built empty (``accelerate.init_empty_weights``) and each module's weights are
    dequantized just before its forward and dropped after it, so only one layer's float32 weights are
    held at a time, not a float32 copy of the model. A model whose forward reads another module's
    weights directly (not through that module's forward) is run again with every weight loaded.

    Raises:
        DequantError: the file is not one this module reads, or its tensors do not fit the architecture.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    variant_dir = Path(variant_dir)
    config, q = read_config(variant_dir)
    cfg = AutoConfig.for_model(**config)
    with init_empty_weights(include_buffers=False):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tensors = _Tensors(variant_dir, q)
    params = {n for n, _ in m.named_parameters(remove_duplicate=False)}
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    missing = params - tensors.names - tied
    unexpected = {n for n in tensors.names - params if not tensors.optional(n)}
    if missing or unexpected:
        raise DequantError(f"{variant_dir}: dequantized weights do not fit {cfg.model_type}: missing "
                           f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    embeddings = m.get_input_embeddings()
    embed_name = next(n for n, mod in m.named_modules() if mod is embeddings) + ".weight"
    owners = [(prefix, mod) for prefix, mod in m.named_modules() if any(True for _ in mod.parameters(recurse=False))]

    def load(prefix: str, module) -> None:
        for n, p in list(module.named_parameters(recurse=False)):
            full = f"{prefix}.{n}" if prefix else n
            array = tensors.get(embed_name if full in tied and full not in tensors.names else full)
            if array.shape != tuple(p.shape):
                raise DequantError(f"{variant_dir}: {full} is {array.shape} in the file, {tuple(p.shape)} in "
                                   f"{cfg.model_type}")
            module._parameters[n] = torch.nn.Parameter(torch.from_numpy(array), requires_grad=False)

    def drop(module) -> None:
        for n, p in list(module.named_parameters(recurse=False)):
            module._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, device="meta"), requires_grad=False)

    ids = torch.tensor([prompt_ids])
    hooks = [h for prefix, mod in owners for h in (
        mod.register_forward_pre_hook(lambda module, _args, prefix=prefix: load(prefix, module)),
        mod.register_forward_hook(lambda module, _args, _out: drop(module)))]
    try:
        with torch.no_grad():
            return m(ids).logits.float()
    except (RuntimeError, NotImplementedError) as exc:  # a weight read outside its module's forward (still on meta)
        from quantpub import machine

        full = 8 * sum(f.stat().st_size for f in variant_dir.glob("*.safetensors"))  # float32 of <= 4-bit weights
        if full > machine.available_memory() // 2:
            raise DequantError(f"{variant_dir}: {cfg.model_type} reads weights outside their modules' forward "
                               f"({exc}), and a float32 copy of the model needs about {full / 1e9:.1f} GB") from exc
        log.info("%s: %s; running again with every weight loaded", variant_dir, exc)
        for h in hooks:
            h.remove()
        for prefix, mod in owners:
            load(prefix, mod)
        with torch.no_grad():
            return m(ids).logits.float()
