"""Tiny random-weight models mirroring the seed models, built offline in seconds.

For tests, benchmarks and the offline demo: no weights can be downloaded on these machines,
so a model is built from a config (dimensions multiples of 256, as llama.cpp's K-quants
need) with a SentencePiece tokenizer trained on local text.
"""

from __future__ import annotations

import copy
import pydoc
import sys
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # Tulu 7B / OpenLLaMA 13B: plain llama
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=2048),
    # LlongOrca 7B 16k: Llama-2 with linear rope scaling x4
    "llama-16k": dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=16384,
                      rope_scaling={"type": "linear", "factor": 4.0}),
    # Jackalope 7B: Mistral with grouped KV heads and a sliding window
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", num_key_value_heads=2,
                    max_position_embeddings=32768, sliding_window=4096),
    # bagel 8x7b: Mixtral with 4 small experts, 2 per token
    "mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32768),
}

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def corpus_text(min_chars: int = 400_000) -> str:
    """Deterministic English-ish text from the standard library's docstrings (offline)."""
    parts, total = [], 0
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            module = __import__(name)
        except Exception:  # noqa: BLE001 - some stdlib modules do not import on every platform
            continue
        for obj in [module, *vars(module).values()]:
            doc = pydoc.getdoc(obj) if callable(obj) or obj is module else ""
            if doc and len(doc) > 200:
                parts.append(doc)
                total += len(doc)
        if total >= min_chars:
            break
    return "\n\n".join(dict.fromkeys(parts))


def build_tokenizer(text: str, vocab_size: int, out: Path, chat_template: str | None = None):
    """A Llama-style SentencePiece BPE tokenizer (byte fallback) trained on ``text``.

    Writes ``tokenizer.model`` into ``out`` (llama.cpp's converter reads it, as it does for
    the seed models) and returns the transformers tokenizer built from it.
    """
    import io
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    specials = ["<|im_start|>", "<|im_end|>"] if chat_template else []
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n\n")), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=specials, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", num_threads=1, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(out)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_model(out: str | Path, shape: str = "llama", *, hidden_size: int = 256, layers: int = 2,
                     intermediate_size: int = 512, heads: int = 4, vocab_size: int = 1024,
                     chat_template: str | None = None, seed: int = 0, text: str | None = None,
                     dtype: str = "float32", transformers4: bool = False) -> Path:
    """Write a random-weight checkpoint (safetensors in ``dtype``, config, tokenizer) to ``out``.

    The weights are drawn in fp32 (the same values for a seed whatever ``dtype``) and stored in
    ``dtype`` (``float32``, ``float16`` or ``bfloat16``), which ``config.json`` records.
    ``transformers4=True`` writes the files the way 2023 checkpoints (the seed models) have
    them instead: see :func:`rewrite_as_transformers4`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown tiny shape {shape!r}; choose from {', '.join(SHAPES)}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    out = Path(out)
    tokenizer = build_tokenizer(text or corpus_text(), vocab_size, out, chat_template)
    spec = copy.deepcopy(SHAPES[shape])  # transformers 5 adds keys to rope_scaling in place
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=heads, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, torch_dtype=dtype, **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if transformers4:
        rewrite_as_transformers4(out, model, chat_template, copy.deepcopy(SHAPES[shape].get("rope_scaling")))
    return out


def rewrite_as_transformers4(out: Path, model, chat_template: str | None, rope_scaling: dict | None) -> None:
    """Re-write a tiny checkpoint's files as transformers 4.34 wrote them (the seed models' era).

    ``config.json`` with ``rope_theta`` / ``rope_scaling`` / ``torch_dtype: float16`` and no
    ``pad_token_id``; fp16 weights; ``tokenizer.model`` with a 4.34-style ``tokenizer_config.json``
    (chat template inside) and ``special_tokens_map.json``, no ``tokenizer.json``;
    ``generation_config.json`` from the model config. Loaders of every generation read these.
    """
    import json

    import torch
    from safetensors.torch import save_file

    c = model.config
    config = {
        "architectures": list(c.architectures), "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "hidden_act": c.hidden_act, "hidden_size": c.hidden_size, "initializer_range": c.initializer_range,
        "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
        "model_type": c.model_type, "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "num_key_value_heads": c.num_key_value_heads,
        "pretraining_tp": 1, "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": rope_scaling, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.34.0",
        "use_cache": True, "vocab_size": c.vocab_size,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    generation = {"_from_model_config": True, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                  "transformers_version": "4.34.0"}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in ("tokenizer.json", "chat_template.jinja", "special_tokens_map.json", "tokenizer_config.json"):
        (out / name).unlink(missing_ok=True)
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": False, "model_max_length": 1000000000000000019884624838656,
        "pad_token": None, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        **({"chat_template": chat_template} if chat_template else {}),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
