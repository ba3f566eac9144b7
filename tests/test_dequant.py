"""Exact dequantization of GPTQ and AWQ files against packings written here from the formats' definitions
(AutoGPTQ's and AutoAWQ's packing loops), and against real files: the other-runtime checks compare with it."""

import json

import numpy as np
import pytest

from quantpub import dequant


def pack_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's packing along axis 0, written as a bit stream one value at a time (3-bit values straddle words)."""
    n, cols = values.shape
    words = np.zeros(((n * bits + 31) // 32, cols), dtype=np.uint64)
    for k in range(n):
        bit = k * bits
        v = values[k].astype(np.uint64)
        words[bit // 32] |= (v << np.uint64(bit % 32)) & np.uint64(0xFFFFFFFF)
        if bit % 32 + bits > 32:
            words[bit // 32 + 1] |= v >> np.uint64(32 - bit % 32)
    return words.astype(np.uint32).view(np.int32)


def pack_autogptq_3bit(values: np.ndarray) -> np.ndarray:
    """AutoGPTQ's own 3-bit loop (qlinear ``pack``): 32 values in 3 words, two of them split across words."""
    v = values.astype(np.uint64)
    out = np.zeros((values.shape[0] // 32 * 3, values.shape[1]), dtype=np.uint64)
    i = row = 0
    while row < out.shape[0]:
        for j in range(i, i + 10):
            out[row] |= v[j] << np.uint64(3 * (j - i))
        i += 10
        out[row] |= (v[i] << np.uint64(30)) & np.uint64(0xFFFFFFFF)
        row += 1
        out[row] |= (v[i] >> np.uint64(2)) & np.uint64(1)
        i += 1
        for j in range(i, i + 10):
            out[row] |= v[j] << np.uint64(3 * (j - i) + 1)
        i += 10
        out[row] |= (v[i] << np.uint64(31)) & np.uint64(0xFFFFFFFF)
        row += 1
        out[row] |= (v[i] >> np.uint64(1)) & np.uint64(3)
        i += 1
        for j in range(i, i + 10):
            out[row] |= v[j] << np.uint64(3 * (j - i) + 2)
        i += 10
        row += 1
    return out.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_reads_every_width_of_the_bit_stream(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2 ** bits, size=(64, 5))
    assert np.array_equal(dequant.unpack(pack_stream(values, bits), bits, 64), values)


def test_three_bit_stream_is_autogptq_packing():
    values = np.random.default_rng(3).integers(0, 8, size=(64, 4))
    assert np.array_equal(pack_autogptq_3bit(values), pack_stream(values, 3))


@pytest.mark.parametrize("v1", [True, False])
def test_gptq_weight_follows_g_idx_and_the_zero_convention(v1):
    rng = np.random.default_rng(0)
    n_in, n_out, group, bits = 64, 16, 16, 4
    q = rng.integers(0, 16, size=(n_in, n_out))
    zeros = rng.integers(0, 16, size=(n_in // group, n_out))
    scales = rng.random((n_in // group, n_out)).astype(np.float16)
    g_idx = rng.permutation(np.arange(n_in) // group).astype(np.int32)  # act order: groups out of row order
    stored = zeros - 1 if v1 else zeros
    qzeros = pack_stream(stored.T % 16, bits).T  # v1's zero - 1 wraps 0 to 15, as AutoGPTQ's does ...
    w = dequant.gptq_weight(pack_stream(q, bits), qzeros, scales, g_idx, bits, zeros_minus_one=v1)
    expected = (scales.astype(np.float32)[g_idx] * (q - zeros[g_idx])).T
    if v1:  # ... and reads it back as 16: only a zero of 0 (never chosen by GPTQ's symmetric grid) differs
        keep = (zeros[g_idx] != 0).T
        assert np.allclose(w[keep], expected[keep])
    else:
        assert np.allclose(w, expected)


def test_awq_weight_reads_autoawq_column_order():
    rng = np.random.default_rng(1)
    n_in, n_out, group = 64, 32, 32
    q = rng.integers(0, 16, size=(n_in, n_out))
    zeros = rng.integers(0, 16, size=(n_in // group, n_out))
    scales = rng.random((n_in // group, n_out)).astype(np.float16)

    def pack_awq(intweight):  # AutoAWQ's WQLinear_GEMM.from_linear
        packed = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint64)
        for col in range(intweight.shape[1] // 8):
            for i, o in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
                packed[:, col] |= intweight[:, col * 8 + o].astype(np.uint64) << np.uint64(4 * i)
        return packed.astype(np.uint32).view(np.int32)

    w = dequant.awq_weight(pack_awq(q), pack_awq(zeros), scales, 4, group)
    assert np.allclose(w, (scales.astype(np.float32)[np.arange(n_in) // group] * (q - zeros[np.arange(n_in) // group])).T)


def test_a_file_of_another_format_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}}))
    with pytest.raises(dequant.DequantError, match="checkpoint_format 'marlin'"):
        dequant.read_config(tmp_path)


def write_gptq(model_dir, out, *, tied: bool, group: int = 32):
    """A GPTQ v1 file of ``model_dir`` (every decoder linear on a 4-bit act-order grid, zero biases as the
    builders write them), and the unquantized weights it stands for, for a model with those weights."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors, dense = {}, {}
    for name, w in load_file(model_dir / "model.safetensors").items():
        if tied and name == "lm_head.weight":
            continue
        if ".layers." not in name or w.ndim != 2:
            tensors[name] = w
            continue
        n_out, n_in = w.shape
        g_idx = rng.permutation(np.arange(n_in) // group).astype(np.int32)
        scales = np.stack([np.abs(w[:, g_idx == g]).max(axis=1) / 7 for g in range(n_in // group)]).astype(np.float16)
        q = np.clip(np.round(w.T / scales.astype(np.float32)[g_idx]) + 8, 0, 15).astype(np.int64)  # [in, out]
        m = name[: -len(".weight")]
        tensors.update({f"{m}.qweight": pack_stream(q, 4), f"{m}.qzeros": pack_stream(np.full((n_out, n_in // group), 7), 4).T,
                        f"{m}.scales": scales, f"{m}.g_idx": g_idx, f"{m}.bias": np.zeros(n_out, np.float16)})
        dense[name] = dequant.gptq_weight(tensors[f"{m}.qweight"], tensors[f"{m}.qzeros"], scales, g_idx, 4,
                                          zeros_minus_one=True)
    out.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(tie_word_embeddings=tied, quantization_config={
        "quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": True,
        "checkpoint_format": "gptq"})
    (out / "config.json").write_text(json.dumps(config))
    return dense


@pytest.mark.parametrize("tied", [False, True])
def test_logits_stream_the_dequantized_weights_layer_by_layer(tiny_models, tmp_path, tied, caplog):
    """The exact reference holds one module's float32 weights at a time and gives the logits of a model
    holding every dequantized weight (tied embeddings read from the embedding)."""
    import torch
    from transformers import AutoModelForCausalLM

    source = tiny_models("llama")
    dense = write_gptq(source, tmp_path / "gptq", tied=tied)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for name, w in dense.items():
            model.get_parameter(name).copy_(torch.from_numpy(w))
        if tied:
            model.lm_head.weight.copy_(model.get_input_embeddings().weight)
        ids = [1, 17, 300, 42, 999, 5, 64, 128]
        expected = model(torch.tensor([ids])).logits
    with caplog.at_level("INFO", logger="quantpub.dequant"):
        assert torch.allclose(dequant.logits(tmp_path / "gptq", ids), expected, atol=1e-5, rtol=1e-5)
    assert "every weight loaded" not in caplog.text  # streamed, not the fallback


def test_weights_that_do_not_fit_the_architecture_are_named(tiny_models, tmp_path):
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "gptq"
    write_gptq(tiny_models("llama"), out, tied=False)
    tensors = load_file(out / "model.safetensors")
    tensors["model.extra.weight"] = np.ones(3, np.float16)
    del tensors["model.norm.weight"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(dequant.DequantError, match=r"missing \['model.norm.weight'\], unexpected \['model.extra.weight'\]"):
        dequant.logits(out, [1, 2, 3])


@pytest.mark.slow
def test_every_built_gptq_and_awq_file_is_compared_with_its_exact_dequantization(tulu_build):
    """The build's transformers 5 check was made against the exact weights, and agreed within fp16 rounding."""
    from quantpub.compat import EXACT, TOLERANCE
    from quantpub.manifest import read

    out, outcomes = tulu_build
    checked = 0
    for o in outcomes:
        manifest = read(o.path)
        if manifest.method not in ("gptq", "awq"):
            continue
        assert manifest.compat.reference == EXACT, manifest.variant
        t5 = manifest.compat.runtimes["transformers5"]
        assert t5.status == "loads" and 0 <= t5.max_abs_diff < TOLERANCE, (manifest.variant, t5)
        checked += 1
    assert checked == 7
