"""Make a saved GPTQ/AWQ directory ship the source's own files and the reference tools' conventions.

GPTQModel saves through transformers 5, which rewrites what it did not change: ``config.json``
loses ``rope_scaling`` / ``rope_theta`` / ``torch_dtype`` (moved to ``rope_parameters`` /
``dtype``, unreadable for transformers 4 and every loader built on it), the tokenizer files are
re-serialised (transformers 4.36-4.45 cannot read them) and the chat template moves to
``chat_template.jinja``. AutoGPTQ also wrote a zero fp16 ``.bias`` for every quantized linear
(older transformers + optimum build QuantLinear with a bias and leave it uninitialised when the
file has none) and kept unquantized tensors in 16 bits.

:func:`conform_to_source` puts all of that back; every GPTQ/AWQ pass calls it on its saved
directory before validation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Tokenizer and chat-template files, shipped exactly as the source has them (and only those).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
TOKENIZER_GLOBS = ("*.tiktoken",)
GENERATION_CONFIG = "generation_config.json"
QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx")
INDEX = "model.safetensors.index.json"


def tokenizer_files(directory: Path) -> list[str]:
    """Names of the tokenizer / chat-template files present in ``directory``."""
    directory = Path(directory)
    names = [n for n in TOKENIZER_FILES if (directory / n).is_file()]
    names += sorted(p.name for g in TOKENIZER_GLOBS for p in directory.glob(g) if p.is_file())
    return names


def source_dtype(config: dict[str, Any]) -> str:
    """The 16-bit dtype unquantized tensors are kept in: the source's bf16, else fp16."""
    declared = config.get("torch_dtype") or config.get("dtype")
    return "bfloat16" if declared == "bfloat16" else "float16"


def with_legacy_rope(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` plus ``rope_theta`` (and ``rope_scaling`` for a scaled rope) when it has only transformers 5's
    ``rope_parameters``: transformers 4, the loaders built on it and mlx-lm read only the old keys and
    otherwise run with a base of 10000 without a word (SmolLM2's 100000: MLX 8-bit KLD 0.167 instead of
    about Q8_0's). A config that has the old keys, or no ``rope_parameters``, is returned as it is."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config or "rope_theta" not in rope:
        return config
    legacy = {"rope_theta": rope["rope_theta"]}
    kind = rope.get("rope_type", "default")
    if kind != "default" and "rope_scaling" not in config:
        legacy["rope_scaling"] = {"type": kind, **{k: v for k, v in rope.items() if k != "rope_theta"}}
    return {**config, **legacy}


def conform_to_source(saved_dir: str | Path, source_dir: str | Path) -> dict[str, Any]:
    """Rewrite ``saved_dir`` (a GPTQ or AWQ checkpoint) to match ``source_dir`` and AutoGPTQ/AutoAWQ.

    * ``config.json``: the source's, key for key, plus the saved ``quantization_config`` (and the old
      rope keys when the source has only ``rope_parameters``: ``with_legacy_rope``).
    * tokenizer and chat-template files: copied byte for byte from the source; ones the
      source lacks are removed. ``generation_config.json``: the source's (removed if it has none).
    * tensors: unquantized floating tensors in the source's 16-bit dtype (fp16 for AWQ, as
      AutoAWQ wrote); ``.scales`` in fp16 and ``qweight`` / ``qzeros`` int32, as AutoGPTQ and AutoAWQ
      wrote them whatever dtype the library quantized in (GPTQModel's AWQ on CPU leaves bf16 scales,
      which ``config.json``'s float16 contradicts and ``safetensors.numpy`` cannot read); for GPTQ a
      zero fp16 ``.bias`` for every quantized linear without one.

    Returns a record of what was changed. Raises ``ValueError`` naming the file when the saved
    directory has no ``quantization_config`` or the source has no ``config.json``.
    """
    saved, source = Path(saved_dir), Path(source_dir)
    source_config_path = source / "config.json"
    if not source_config_path.is_file():
        raise ValueError(f"{source_config_path}: the source model has no config.json")
    saved_config = json.loads((saved / "config.json").read_text())
    quantization = saved_config.get("quantization_config")
    if not isinstance(quantization, dict) or "quant_method" not in quantization:
        raise ValueError(f"{saved / 'config.json'}: no quantization_config with a quant_method; "
                         "save the quantized model before conforming it")
    source_config = json.loads(source_config_path.read_text())
    if "quantization_config" in source_config:
        raise ValueError(f"{source_config_path}: the source is already quantized "
                         f"({source_config['quantization_config'].get('quant_method')})")
    config = {**with_legacy_rope(source_config), "quantization_config": quantization}
    (saved / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    removed = [n for n in tokenizer_files(saved) if not (source / n).is_file()]
    for name in removed:
        (saved / name).unlink()
    copied = tokenizer_files(source)
    for name in copied:
        shutil.copyfile(source / name, saved / name)
    if (source / GENERATION_CONFIG).is_file():
        shutil.copyfile(source / GENERATION_CONFIG, saved / GENERATION_CONFIG)
    else:
        (saved / GENERATION_CONFIG).unlink(missing_ok=True)

    method = quantization["quant_method"]
    dtype = source_dtype(source_config) if method == "gptq" else "float16"
    tensors = _conform_tensors(saved, dtype, add_bias=method == "gptq")
    return {"config": "source + quantization_config", "tokenizer_files": copied, "removed": removed,
            "dtype": dtype, **tensors}


def _conform_tensors(saved: Path, dtype_name: str, *, add_bias: bool) -> dict[str, int]:
    import torch
    from safetensors.torch import load_file, save_file

    dtype = getattr(torch, dtype_name)
    files = sorted(saved.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{saved}: no .safetensors file to conform")
    added = cast = scales_cast = 0
    weight_map: dict[str, str] = {}
    for path in files:
        tensors = load_file(path)
        out: dict[str, Any] = {}
        for name, tensor in tensors.items():
            part = name.rsplit(".", 1)[-1]
            if part == "scales" and tensor.dtype != torch.float16:
                out[name] = tensor.to(torch.float16)
                scales_cast += 1
            elif part in ("qweight", "qzeros") and tensor.dtype != torch.int32:
                raise ValueError(f"{path.name}: {name} is {tensor.dtype}; AutoGPTQ and AutoAWQ store it as int32")
            elif part in QUANT_PARTS:
                out[name] = tensor
            elif tensor.is_floating_point() and tensor.dtype != dtype:
                out[name] = tensor.to(dtype)
                cast += 1
            else:
                out[name] = tensor
            if add_bias and part == "qweight":
                bias = name[: -len("qweight")] + "bias"
                if bias not in tensors:  # AutoGPTQ: bias=True for every QuantLinear, zeros when the layer had none
                    out[bias] = torch.zeros(tensor.shape[1], dtype=torch.float16)
                    added += 1
        save_file(out, str(path), metadata={"format": "pt"})
        weight_map.update({name: path.name for name in out})
    index = saved / INDEX
    if index.is_file():
        data = json.loads(index.read_text())
        size = sum(t.numel() * t.element_size() for p in files for t in load_file(p).values())
        data["weight_map"] = dict(sorted(weight_map.items()))
        data.setdefault("metadata", {})["total_size"] = size
        index.write_text(json.dumps(data, indent=2) + "\n")
    return {"zero_biases_added": added, "tensors_cast": cast, "scales_cast": scales_cast}
