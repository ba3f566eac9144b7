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
from collections.abc import Iterator
from pathlib import Path

import numpy as np

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
    return (scales.astype(np.float32)[g] * (q - zeros[g])).T


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
    return (scales.astype(np.float32)[g] * (q - zeros[g])).T


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


def weights(variant_dir: str | Path, q: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the variant as float32, one at a time (quantized linears dequantized to
    ``<name>.weight``, their all-zero biases dropped): only one layer's float32 copy is held here."""
    from safetensors import safe_open

    files = {}
    where: dict[str, Path] = {}
    for f in sorted(Path(variant_dir).glob("*.safetensors")):
        files[f] = safe_open(f, framework="numpy")
        where.update({k: f for k in files[f].keys()})

    def get(key: str) -> np.ndarray:
        return files[where.pop(key)].get_tensor(key)

    bits = int(q.get("bits", 0))
    for name in sorted(k[: -len(".qweight")] for k in list(where) if k.endswith(".qweight")):
        qweight, qzeros, scales = (get(f"{name}.{p}") for p in ("qweight", "qzeros", "scales"))
        if q.get("quant_method") == "gptq":
            yield f"{name}.weight", gptq_weight(qweight, qzeros, scales, get(f"{name}.g_idx"), bits,
                                                zeros_minus_one=q.get("checkpoint_format", "gptq") == "gptq")
        else:
            yield f"{name}.weight", awq_weight(qweight, qzeros, scales, bits, int(q.get("group_size", -1)))
        bias = get(f"{name}.bias") if f"{name}.bias" in where else None
        if bias is not None and np.any(bias):
            yield f"{name}.bias", bias.astype(np.float32)
    for key in list(where):
        yield key, get(key).astype(np.float32)


def model(variant_dir: str | Path):
    """The variant as an unquantized float32 transformers model of the same architecture, filled tensor by
    tensor (the float32 model plus one tensor at a time, not a second copy of it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config, q = read_config(variant_dir)
    cfg = AutoConfig.for_model(**config)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    params = dict(m.named_parameters(remove_duplicate=False))
    filled, unexpected = set(), []
    with torch.no_grad():
        for name, array in weights(variant_dir, q):
            if name in params and tuple(params[name].shape) == array.shape:
                params[name].copy_(torch.from_numpy(array))
                filled.add(name)
            else:
                unexpected.append(name)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    missing = set(params) - filled - tied
    if missing or unexpected:
        raise DequantError(f"{variant_dir}: dequantized weights do not fit {cfg.model_type}: missing "
                           f"{sorted(missing)[:3]}, unexpected or of another shape {sorted(unexpected)[:3]}")
    if tied:
        m.tie_weights()
    return m.eval()


def logits(variant_dir: str | Path, prompt_ids: list[int]):
    """Float32 logits ``[1, T, vocab]`` of the exactly dequantized variant on ``prompt_ids``."""
    import torch

    with torch.no_grad():
        return model(variant_dir)(torch.tensor([prompt_ids])).logits.float()
