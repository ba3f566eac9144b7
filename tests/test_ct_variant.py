"""compressed-tensors variants of a tiny llama: built by quantpub's GPTQ + the library's converter, loaded back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from quantpub import calibration
from quantpub.backends import ct_variant
from quantpub.backends.conform import with_legacy_rope
from quantpub.backends.ct_convert import GptqToCompressed
from quantpub.matrix_formats import CtScheme
from quantpub.source import model_facts


@pytest.fixture(scope="module")
def tiny(tiny_models, corpus):
    from transformers import AutoTokenizer

    source = tiny_models("llama")
    tokenizer = AutoTokenizer.from_pretrained(source)
    calib = calibration.build(corpus.read_text(), "calib.txt", tokenizer, n_samples=4, seq_len=64)
    return source, calib


def _tensors(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _weights_size(directory) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(directory).values())


def test_fp8_dynamic_is_data_free_and_loads_in_transformers(tiny, tmp_path):
    source, calib = tiny
    params = CtScheme(scheme="FP8_DYNAMIC")
    record = ct_variant.build(source, tmp_path / "fp8", params, None, "cpu")
    out = tmp_path / "fp8"
    assert record["format"] == "float-quantized" and "calibration" not in record
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["format"], q["ignore"]) == ("compressed-tensors", "float-quantized", ["lm_head"])
    group = q["config_groups"]["group_0"]
    assert (group["weights"]["type"], group["weights"]["strategy"], group["weights"]["num_bits"]) == ("float", "channel", 8)
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    source_config = json.loads((source / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == with_legacy_rope(source_config)
    assert config["rope_theta"] == source_config["rope_parameters"]["rope_theta"]  # a transformers 5 source
    tensors = _tensors(out)
    weight = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert weight.dtype == torch.float8_e4m3fn and tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (256, 1)
    assert tensors["lm_head.weight"].dtype == torch.float16  # unquantized tensors in 16 bits
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "model.safetensors.index.json", "tokenizer.json",
                                                     "tokenizer.model", "tokenizer_config.json"]
    result = ct_variant.validate(out, params, list(calib.samples[0]))
    assert result["validated"] and len(result["generated_tokens"]) == 4
    estimate = ct_variant.estimated_size(model_facts(str(source)), params)
    assert estimate == _weights_size(out)


@pytest.mark.parametrize("scheme, fmt", [("W4A16", "pack-quantized"), ("W8A8", "int-quantized")])
def test_gptq_schemes_are_the_gptq_solve_bit_for_bit(tiny, tmp_path, scheme, fmt):
    """The compressed-tensors weights, as transformers decompresses them, are GPTQModel's own
    dequantization of the GPTQ build they were converted from."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    source, calib = tiny
    params = CtScheme(scheme=scheme)
    gptq_dir = tmp_path / "gptq"
    ct_variant.solve_gptq(source, gptq_dir, ct_variant.gptq_variant(params), calib, "cpu")
    record = ct_variant.build(source, tmp_path / "ct", params, calib, "cpu", from_gptq=gptq_dir)
    assert record["route"] == "converted from the GPTQ build gptq" and record["format"] == fmt
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"], weights["actorder"]) == \
        ({"W4A16": 4, "W8A8": 8}[scheme], {"W4A16": 128, "W8A8": None}[scheme], True, "static")
    tensors = _tensors(tmp_path / "ct")
    assert not any(k.endswith((".qweight", ".qzeros", ".g_idx", "q_proj.bias")) for k in tensors)  # AutoGPTQ's zero biases gone
    assert ct_variant.estimated_size(model_facts(str(source)), params) == _weights_size(tmp_path / "ct")

    bits = params.weight_bits
    reference = AutoModelForCausalLM.from_pretrained(gptq_dir, device_map="cpu", quantization_config=GPTQConfig(
        bits=bits, group_size=params.resolved_group_size or -1, backend="gptq_torch"))
    converted = ct_variant._load(tmp_path / "ct")
    with torch.no_grad():
        converted(torch.tensor([list(calib.samples[0][:4])]))  # transformers decompresses on the first forward
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        ref = reference.model.layers[1].get_submodule(name).dequantize_weight().t().float()
        got = converted.model.layers[1].get_submodule(name).weight
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-6), name
    assert ct_variant.validate(tmp_path / "ct", params, list(calib.samples[0]))["validated"]


def test_a_gptq_build_of_other_parameters_is_refused(tiny, tmp_path):
    source, calib = tiny
    gptq_dir = tmp_path / "gptq"
    ct_variant.solve_gptq(source, gptq_dir, ct_variant.gptq_variant(CtScheme(scheme="W4A16", group_size=64)), calib, "cpu")
    with pytest.raises(ValueError, match="quantize_config.json: .* is not the GPTQ solve this scheme needs"):
        ct_variant.build(source, tmp_path / "ct", CtScheme(scheme="W4A16"), calib, "cpu", from_gptq=gptq_dir)
    with pytest.raises(ValueError, match="needs calibration"):
        ct_variant.build(source, tmp_path / "ct2", CtScheme(scheme="W8A8"), None, "cpu")


def _pack_gptq(values: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's layout: ``32 // bits`` consecutive rows per int32, the first in the lowest bits."""
    per = 32 // bits
    rows = values.reshape(values.shape[0] // per, per, -1).to(torch.int64)
    packed = sum(rows[:, i] << (bits * i) for i in range(per))
    return (packed & 0xFFFFFFFF).to(torch.uint32).view(torch.int32)


def test_converter_unpacks_autogptq_and_repacks_as_compressed_tensors_unpacks():
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    torch.manual_seed(0)
    q = torch.randint(0, 16, (256, 64))  # [in, out] unsigned codes
    scales = torch.rand(2, 64, dtype=torch.float16)
    qzeros = torch.full((2, 64 // 8), 0x77777777 - (1 << 32), dtype=torch.int64).to(torch.int32)  # v1: zero - 1 = 7
    tensors = {"m.qweight": _pack_gptq(q, 4), "m.qzeros": qzeros, "m.scales": scales,
               "m.g_idx": torch.arange(256, dtype=torch.int32) // 128, "m.bias": torch.zeros(64, dtype=torch.float16),
               "norm.weight": torch.ones(8)}
    out = GptqToCompressed("W4A16", 4, 128, "group_aware", drop=["m.bias"]).process(dict(tensors))
    assert set(out) == {"m.weight_packed", "m.weight_scale", "m.weight_shape", "norm.weight"}
    signed = unpack_from_int32(out["m.weight_packed"], 4, torch.Size([64, 256]))
    assert torch.equal(signed.to(torch.int64), (q - 8).t())
    assert torch.equal(out["m.weight_scale"], scales.t())

    asym = dict(tensors, **{"m.qzeros": torch.zeros(2, 8, dtype=torch.int32)})
    with pytest.raises(ValueError, match="m.qzeros: asymmetric GPTQ weights"):
        GptqToCompressed("W4A16", 4, 128, False).process(asym)
    shuffled = dict(tensors, **{"m.g_idx": torch.arange(256, dtype=torch.int32) % 2})
    with pytest.raises(ValueError, match="m.g_idx: columns are not in contiguous groups of 128"):
        GptqToCompressed("W4A16", 4, 128, False).process(shuffled)


def test_logprobs_are_normalised_per_window(tiny, tmp_path):
    source, calib = tiny
    ct_variant.build(source, tmp_path / "fp8", CtScheme(scheme="FP8_DYNAMIC"), None, "cpu")
    windows = [list(calib.samples[0][:32]), list(calib.samples[1][:32])]
    got = list(ct_variant.logprobs(tmp_path / "fp8", windows))
    assert [g.shape for g in got] == [(32, 1024), (32, 1024)]
    assert np.allclose(np.exp(got[0]).sum(-1), 1.0)
