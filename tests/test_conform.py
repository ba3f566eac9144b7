"""conform_to_source on hand-made directories: what a library rewrote on save is put back."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantpub.backends.conform import conform_to_source

SOURCE_CONFIG = {  # transformers 4.34 style: the keys transformers 5 renames or drops on save
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "max_position_embeddings": 16384,
    "rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 10000.0, "torch_dtype": "float16",
    "transformers_version": "4.34.0", "vocab_size": 16,
}


def _source(tmp_path, dtype="float16", generation=True):
    src = tmp_path / "source"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**SOURCE_CONFIG, "torch_dtype": dtype}, indent=2))
    (src / "tokenizer.model").write_bytes(b"\x00sentencepiece bytes\xff")
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "chat_template": "{{ x }}"}')
    (src / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
    if generation:
        (src / "generation_config.json").write_text('{"bos_token_id": 1, "transformers_version": "4.34.0"}')
    return src


def _saved(tmp_path, quantization):
    out = tmp_path / "saved"
    out.mkdir()
    rewritten = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float32", "pad_token_id": 0,
                 "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
                 "quantization_config": quantization}
    (out / "config.json").write_text(json.dumps(rewritten))
    (out / "tokenizer.json").write_text("{}")
    (out / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend"}')
    (out / "chat_template.jinja").write_text("{{ x }}")
    (out / "generation_config.json").write_text('{"do_sample": true}')
    save_file({
        "model.embed_tokens.weight": torch.randn(16, 8),
        "model.norm.weight": torch.ones(8),
        "model.layers.0.self_attn.q_proj.qweight": torch.zeros(1, 8, dtype=torch.int32),
        "model.layers.0.self_attn.q_proj.scales": torch.ones(1, 8, dtype=torch.float16),
        "model.layers.0.self_attn.q_proj.qzeros": torch.zeros(1, 1, dtype=torch.int32),
        "model.layers.0.self_attn.q_proj.g_idx": torch.zeros(8, dtype=torch.int32),
    }, str(out / "model.safetensors"))
    return out


def _tensors(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_gptq_dir_gets_source_files_zero_biases_and_fp16(tmp_path):
    src = _source(tmp_path)
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    out = _saved(tmp_path, quant)
    record = conform_to_source(out, src)
    assert json.loads((out / "config.json").read_text()) == {**SOURCE_CONFIG, "quantization_config": quant}
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "tokenizer.json").exists() and not (out / "chat_template.jinja").exists()
    assert sorted(record["removed"]) == ["chat_template.jinja", "tokenizer.json"]
    t = _tensors(out)
    bias = t["model.layers.0.self_attn.q_proj.bias"]
    assert bias.dtype == torch.float16 and bias.shape == (8,) and not bias.any()
    assert t["model.embed_tokens.weight"].dtype == torch.float16 and t["model.norm.weight"].dtype == torch.float16
    assert t["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert record["zero_biases_added"] == 1 and record["tensors_cast"] == 2


def test_bf16_source_keeps_bf16_and_awq_gets_no_bias(tmp_path):
    src = _source(tmp_path, dtype="bfloat16", generation=False)
    out = _saved(tmp_path, {"quant_method": "gptq", "bits": 4})
    conform_to_source(out, src)
    assert _tensors(out)["model.norm.weight"].dtype == torch.bfloat16
    assert not (out / "generation_config.json").exists()  # the source has none

    awq = tmp_path / "awq"
    awq.mkdir()
    (tmp_path / "saved").rename(awq / "saved")
    out = _saved(tmp_path, {"quant_method": "awq", "bits": 4})
    conform_to_source(out, src)
    t = _tensors(out)
    assert "model.layers.0.self_attn.q_proj.bias" not in t  # AutoAWQ kept the layer's own (absent) bias
    assert t["model.norm.weight"].dtype == torch.float16  # AutoAWQ wrote fp16


def test_refuses_unquantized_saved_dir_and_missing_source_config(tmp_path):
    src = _source(tmp_path)
    out = _saved(tmp_path, None)
    with pytest.raises(ValueError, match="no quantization_config"):
        conform_to_source(out, src)
    (src / "config.json").unlink()
    with pytest.raises(ValueError, match="source model has no config.json"):
        conform_to_source(out, src)


def test_awq_scales_are_stored_in_fp16_whatever_the_quantization_dtype(tmp_path):
    """GPTQModel's AWQ on CPU searches in bf16 and left bf16 scales; AutoAWQ's files (and config.json) say fp16."""
    from safetensors.numpy import load_file as load_numpy

    src = _source(tmp_path)
    out = _saved(tmp_path, {"quant_method": "awq", "bits": 4})
    tensors = _tensors(out)
    tensors["model.layers.0.self_attn.q_proj.scales"] = torch.full((1, 8), 0.0123, dtype=torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"))
    record = conform_to_source(out, src)
    t = _tensors(out)
    scales = t["model.layers.0.self_attn.q_proj.scales"]
    assert scales.dtype == torch.float16 and record["scales_cast"] == 1
    assert torch.equal(scales.float(), torch.full((1, 8), 0.0123, dtype=torch.bfloat16).float())  # bf16 -> fp16 is exact here
    assert t["model.layers.0.self_attn.q_proj.qweight"].dtype == t["model.layers.0.self_attn.q_proj.qzeros"].dtype == torch.int32
    assert load_numpy(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.scales"].dtype.name == "float16"


def test_packed_integers_in_another_dtype_are_refused(tmp_path):
    src = _source(tmp_path)
    out = _saved(tmp_path, {"quant_method": "awq", "bits": 4})
    tensors = _tensors(out)
    tensors["model.layers.0.self_attn.q_proj.qzeros"] = torch.zeros(1, 1, dtype=torch.int64)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors: model.layers.0.self_attn.q_proj.qzeros is torch.int64"):
        conform_to_source(out, src)


def test_a_transformers5_config_gets_the_rope_keys_older_readers_use():
    from quantpub.backends.conform import with_legacy_rope

    scaled = {"model_type": "llama", "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}
    assert with_legacy_rope(scaled) == {**scaled, "rope_theta": 1e6,
                                        "rope_scaling": {"type": "linear", "rope_type": "linear", "factor": 4.0}}
    plain = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}
    assert with_legacy_rope(plain) == {**plain, "rope_theta": 1e5}
    old = {"rope_theta": 1e4, "rope_scaling": None}
    assert with_legacy_rope(old) is old and with_legacy_rope({"model_type": "gpt2"}) == {"model_type": "gpt2"}
