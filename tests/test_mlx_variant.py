"""MLX variants of a tiny llama: mlx_lm.convert on MLX's CPU build, loaded back by mlx-lm."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from quantpub.backends import mlx_variant
from quantpub.backends.conform import tokenizer_files
from quantpub.matrix_formats import MlxTarget
from quantpub.source import model_facts


@pytest.mark.parametrize("bits", [4, 8])
def test_convert_load_and_generate(tiny_models, tmp_path, bits):
    source = tiny_models("llama")
    params = MlxTarget(bits=bits, group_size=64)
    out = tmp_path / f"mlx-{bits}"
    record = mlx_variant.build(source, out, params)
    assert record["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    assert record["dtype"] == "float16" and record["versions"]["mlx"] == "0.32.4"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["model_type"] == "llama"
    assert not (out / "README.md").exists()  # the card is quantpub's
    for name in tokenizer_files(source):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    with safe_open(out / "model.safetensors", "np") as f:
        names = set(f.keys())
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        scales = f.get_tensor("model.layers.0.self_attn.q_proj.scales")
    assert {"model.embed_tokens.scales", "lm_head.scales"} <= names  # embeddings and output layer quantized too
    assert packed.dtype == np.uint32 and packed.shape == (256, 256 * bits // 32)
    assert scales.dtype == np.float16 and scales.shape == (256, 256 // 64)

    result = mlx_variant.validate(out, params, list(range(5, 40)))
    assert result["validated"] and len(result["generated_tokens"]) == 4 and "cpu" in result["device"]
    size = (out / "model.safetensors").stat().st_size
    estimate = mlx_variant.estimated_size(model_facts(str(source)), params)
    assert 0 <= size - estimate < 8000  # the safetensors header

    windows = [list(range(5, 37)), list(range(40, 72))]
    got = list(mlx_variant.logprobs(out, windows))
    assert [g.shape for g in got] == [(32, 1024), (32, 1024)] and np.allclose(np.exp(got[1]).sum(-1), 1.0)


def test_a_config_claiming_other_bits_fails_validation(tiny_models, tmp_path):
    source = tiny_models("llama")
    out = tmp_path / "mlx"
    mlx_variant.build(source, out, MlxTarget(bits=4))
    with pytest.raises(ValueError, match="config.json says 4-bit, the matrix asked for 8"):
        mlx_variant.validate(out, MlxTarget(bits=8), list(range(5, 30)))


def test_a_transformers5_config_keeps_its_rope_base_in_mlx(tiny_models, tmp_path):
    """A source saved by transformers 5 has only ``rope_parameters``; mlx-lm reads ``rope_theta`` and would
    run with 10000 instead of the model's base. The MLX file's logits match the source's in transformers."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    source = tmp_path / "source"
    shutil.copytree(tiny_models("llama"), source)
    config = json.loads((source / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key, None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "mlx-8"
    mlx_variant.build(source, out, MlxTarget(bits=8, group_size=64))
    assert json.loads((out / "config.json").read_text()).get("rope_theta") == 500.0
    assert mlx_variant._load(out).model.layers[0].self_attn.rope.base == 500.0  # what mlx-lm runs with

    window = list(range(5, 101))
    got = next(mlx_variant.logprobs(out, [window]))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), -1).numpy()
    kld = float((np.exp(want) * (want - got)).sum(-1).mean())
    assert kld < 1e-3, kld
