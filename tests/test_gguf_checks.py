"""The GGUF validators on hand-made inputs: each must catch what it is there to catch."""

import math

import pytest

from quantpub import machine
from quantpub.backends import gguf_files as gguf


def tensors(block_type: str, n: int = 14, out_type: str = "Q6_K"):
    rows = [(f"blk.{i // 7}.w{i % 7}.weight", block_type, (256, 512)) for i in range(n)]
    return rows + [("output.weight", out_type, (256, 1024)), ("token_embd.weight", block_type, (256, 1024)),
                   ("output_norm.weight", "F32", (256,)), ("blk.0.ffn_gate_inp.weight", "F32", (256, 4))]


def test_check_mix_accepts_the_expected_types():
    assert gguf.check_mix("Q4_K_M", tensors("Q4_K")) == []
    assert gguf.check_mix("IQ2_XS", tensors("IQ2_XS")) == []


def test_check_mix_catches_the_wrong_type():
    problems = gguf.check_mix("Q4_K_M", tensors("Q8_0"))
    assert any("blk.0.w0.weight is Q8_0" in p for p in problems)
    assert any("most block weights are Q8_0, expected Q4_K" in p for p in problems)


def test_check_mix_catches_unquantized_weights_and_quantized_norms():
    rows = tensors("Q4_K")
    rows[0] = ("blk.0.w0.weight", "F16", (256, 512))
    rows[-2] = ("output_norm.weight", "Q8_0", (256,))
    problems = gguf.check_mix("Q4_K_M", rows)
    assert any("blk.0.w0.weight is F16" in p for p in problems)
    assert any("output_norm.weight is Q8_0, expected F32" in p for p in problems)


def test_k_quant_fallback_is_accepted_only_for_rows_not_divisible_by_256():
    rows = [("blk.0.w.weight", "Q5_0", (576, 1536)), ("blk.0.v.weight", "Q4_K", (1536, 576))]
    assert gguf.check_mix("Q4_K_M", rows) == []
    assert gguf.check_mix("Q4_K_M", [("blk.0.w.weight", "Q4_K", (576, 1536))]) != []


def expect(**kw):
    base = dict(context_length=16384, rope_scaling={"rope_type": "linear", "factor": 4.0},
                chat_template="{{ x }}", bos_token_id=1, eos_token_id=2)
    return gguf.Expectations(**{**base, **kw})


def test_check_metadata():
    meta = {"general.architecture": "llama", "general.file_type": 15, "llama.context_length": 16384,
            "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
            "tokenizer.chat_template": "{{ x }}", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    assert gguf.check_metadata(meta, "Q4_K_M", expect()) == []
    problems = gguf.check_metadata({**meta, "llama.context_length": 4096}, "Q4_K_M", expect())
    assert problems == ["llama.context_length is 4096, expected 16384"]
    assert gguf.check_metadata({k: v for k, v in meta.items() if "rope" not in k}, "Q4_K_M", expect()) == [
        "llama.rope.scaling.type is None, expected 'linear'", "llama.rope.scaling.factor is None, expected 4.0"]
    assert "general.file_type is 15, expected 7" in gguf.check_metadata(meta, "Q8_0", expect())


def test_garbage():
    ok = {"finite": True, "logit_std": 1.0, "perplexity": 20.0}
    assert gguf.garbage(ok, ok) is None
    assert "NaN" in gguf.garbage({**ok, "finite": False, "perplexity": math.nan}, ok)
    assert "constant" in gguf.garbage({**ok, "logit_std": 0.0}, ok)
    assert "10x" in gguf.garbage({**ok, "perplexity": 500.0}, ok)


@pytest.mark.parametrize("dtype,expected", [("bfloat16", "bf16"), ("float16", "f16"), ("float32", "f16")])
def test_sixteen_bit_type(dtype, expected):
    assert gguf.sixteen_bit_type({"torch_dtype": dtype}) == expected
    assert gguf.sixteen_bit_type({"dtype": dtype}) == expected


def test_workers_are_bounded_by_jobs_and_cores():
    assert gguf.workers_for(1, 10**6) == 1
    assert 1 <= gguf.workers_for(100, 10**6) <= machine.cpu_count()
    assert gguf.workers_for(100, 10**15) == 1  # a huge model: memory allows one at a time


def test_majority_rule_skipped_when_few_rows_are_256_aligned():
    # SmolLM2-like: 6 of 7 weights per layer have 576-wide rows (fallback types), ffn_down is upgraded
    rows = [(f"blk.{i}.w{j}.weight", "IQ4_NL", (576, 576)) for i in range(4) for j in range(6)]
    rows += [(f"blk.{i}.ffn_down.weight", "Q3_K", (1536, 576)) for i in range(4)]
    assert gguf.check_mix("Q2_K", rows) == []


@pytest.mark.slow
def test_a_build_with_amx_loads_without_extra_buffer_types(tiny_models, tmp_path, monkeypatch):
    """llama.cpp's AMX buffer type crashes quantized evaluation (issue 20824): a library built with AMX
    gets use_extra_bufts=False on every quantpub load; the portable build keeps them (repack)."""
    from quantpub.backends import llamacpp

    assert llamacpp.system_info().get("AMX_INT8") != "1"  # the installed build is portable
    base = tmp_path / "tiny.F16.gguf"
    llamacpp.convert(tiny_models("llama"), base, "f16")
    kept = llamacpp.load(base, n_ctx=32, verbose=False)
    assert kept.model_params.use_extra_bufts is True
    kept.close()
    monkeypatch.setattr(llamacpp, "system_info", lambda: {"AMX_INT8": "1", "AVX512": "1"})
    off = llamacpp.load(base, n_ctx=32, verbose=False)
    assert off.model_params.use_extra_bufts is False
    off.close()
    import llama_cpp

    assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # the defaults are put back


def test_doctor_names_the_cpu_and_what_llama_cpp_was_built_for():
    from quantpub.backends import llamacpp

    report = llamacpp.doctor()
    assert "avx2" in report["cpu features"] or "asimd" in report["cpu features"]
    assert report["llama.cpp on this CPU"] == "every feature it needs is here"
    assert "AVX512" not in report["llama.cpp CPU backend"] and "AMX" not in report["llama.cpp CPU backend"]
    assert report["extra buffer types"].startswith("on")


def test_logit_stats_in_blocks_match_the_whole_array():
    import numpy as np

    from quantpub.backends.gguf_files import logit_stats

    rng = np.random.default_rng(0)
    logits = rng.normal(2, 3, (100, 500)).astype(np.float32)
    tokens = [int(t) for t in rng.integers(0, 500, 100)]
    whole = logits.astype(np.float64)
    shifted = whole[:-1] - whole[:-1].max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected_ppl = float(np.exp(-logp[np.arange(99), tokens[1:]].mean()))
    for rows in (1, 7, 32, 100, 256):
        stats = logit_stats(logits, tokens, rows=rows)
        assert stats["finite"]
        assert abs(stats["perplexity"] - expected_ppl) < 1e-9 * expected_ppl
        assert abs(stats["logit_std"] - float(whole.std())) < 1e-9
    logits[60, 3] = np.nan
    assert logit_stats(logits, tokens)["finite"] is False
    assert logit_stats(np.full((40, 10), 1.5, np.float32), list(range(10)) * 4)["logit_std"] < 1e-9
