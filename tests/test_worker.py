"""Real GPTQ/AWQ quantization of tiny random models on CPU (slow: about 2 minutes)."""

import json

import pytest
from safetensors import safe_open

from conftest import MATRICES
from quantpub.cli import main
from quantpub.errors import QuantpubError
from quantpub.artifacts import MANIFEST
from quantpub.build import build_from_matrix

pytestmark = pytest.mark.slow
SMALL = {"n_samples": 8, "seq_len": 128}
AUTOGPTQ_KEYS = ["bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential",
                 "model_name_or_path", "model_file_base_name", "quant_method", "checkpoint_format", "meta"]
GGUF = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]
TULU = {  # variant id -> (bits, group_size as written, desc_act)
    "gptq-4bit-128g-actorder_False": (4, 128, False),
    "gptq-4bit-32g-actorder_True": (4, 32, True),
    "gptq-4bit-64g-actorder_True": (4, 64, True),
    "gptq-4bit-128g-actorder_True": (4, 128, True),
    "gptq-8bit--1g-actorder_True": (8, -1, True),
    "gptq-8bit-128g-actorder_False": (8, 128, False),
}


@pytest.fixture
def built(tulu_build):
    return tulu_build


def test_six_gptq_variants_and_awq_are_built_and_validated(built):
    out, outcomes = built
    assert [o.error for o in outcomes] == [None] * 19
    assert {o.variant for o in outcomes} == set(TULU) | {"awq-4bit-128g-GEMM"} | {f"gguf-{t}" for t in GGUF}
    for o in outcomes:
        if o.variant.startswith("gguf-"):
            continue
        manifest = json.loads((o.path / MANIFEST).read_text())
        assert manifest["validation"]["loaded_with"] == "transformers.AutoModelForCausalLM"
        assert len(manifest["validation"]["generated_tokens"]) == 4
        assert manifest["calibration"]["n_samples"] == 8 and manifest["calibration"]["seq_len"] == 128
        assert manifest["files"]["model.safetensors"]["size"] == (o.path / "model.safetensors").stat().st_size
    assert not list(out.glob(".partial-*"))


def test_gptq_configs_match_autogptq_field_by_field(built):
    out, _ = built
    for vid, (bits, group, desc_act) in TULU.items():
        qc = json.loads((out / vid / "quantize_config.json").read_text())
        assert list(qc) == AUTOGPTQ_KEYS
        assert (qc["bits"], qc["group_size"], qc["desc_act"]) == (bits, group, desc_act)
        assert (qc["damp_percent"], qc["static_groups"], qc["sym"], qc["true_sequential"]) == (0.01, False, True, True)
        assert (qc["model_name_or_path"], qc["model_file_base_name"]) == (None, "model")
        assert (qc["quant_method"], qc["checkpoint_format"]) == ("gptq", "gptq")
        config = json.loads((out / vid / "config.json").read_text())
        assert config["quantization_config"] == qc
        text = (out / vid / "quantize_config.json").read_text() + (out / vid / "config.json").read_text()
        assert "/tmp" not in text and "offload" not in text
        with safe_open(out / vid / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            assert f"model.layers.0.self_attn.q_proj.{part}" in keys


def test_awq_configs_match_autoawq(built):
    out, _ = built
    awq = out / "awq-4bit-128g-GEMM"
    assert json.loads((awq / "config.json").read_text())["quantization_config"] == {
        "bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq",
        "version": "gemm", "zero_point": True}
    assert json.loads((awq / "quant_config.json").read_text()) == {
        "quant_method": "awq", "zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM",
        "modules_to_not_convert": None}
    assert not (awq / "quantize_config.json").exists()
    from safetensors.numpy import load_file  # AutoAWQ's dtypes, readable without torch (bf16 is not)

    tensors = load_file(str(awq / "model.safetensors"))
    parts = {n.rsplit(".", 1)[1]: t.dtype.name for n, t in tensors.items() if ".q_proj." in n}
    assert parts == {"qweight": "int32", "qzeros": "int32", "scales": "float16"}


def test_generation_config_is_the_source_one(built, tiny_models):
    out, _ = built
    source = json.loads((tiny_models("llama") / "generation_config.json").read_text())
    for vid in TULU:
        assert json.loads((out / vid / "generation_config.json").read_text()) == source


def test_each_variant_loads_and_generates_with_transformers(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = built
    for vid in ("gptq-4bit-32g-actorder_True", "awq-4bit-128g-GEMM"):
        model = AutoModelForCausalLM.from_pretrained(out / vid, device_map="cpu")
        tok = AutoTokenizer.from_pretrained(out / vid)
        ids = tok("Return the number of items", return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
        assert gen.shape[1] == ids.shape[1] + 3
        assert torch.isfinite(model(ids).logits).all()


def test_rerun_skips_what_is_built(built, tiny_models, corpus, capsys):
    out, _ = built
    code = main(["quantize", str(MATRICES / "thebloke.yaml"), "--model", str(tiny_models("llama")), "--out",
                 str(out), "--calibration-file", str(corpus), "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out.count("skipped (already built)") == 19


def test_unknown_only_variant_is_an_error(tiny_models, tmp_path):
    with pytest.raises(QuantpubError, match="--only gptq-5bit: no such variant"):
        build_from_matrix(MATRICES / "thebloke.yaml", str(tiny_models("llama")), tmp_path, only=["gptq-5bit"])


def test_missing_calibration_file_fails_before_the_model_loads(tiny_models, tmp_path, capsys):
    code = main(["quantize", str(MATRICES / "thebloke-gptq.yaml"), "--model", str(tiny_models("llama")),
                 "--out", str(tmp_path / "o"), "--calibration-file", str(tmp_path / "none.txt"), "--device", "cpu"])
    assert code == 2
    assert "none.txt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # the text is read before anything is written


def test_a_failing_variant_leaves_no_directory_and_others_finish(tiny_models, corpus, tmp_path, monkeypatch):
    """One variant's failure (here in the step that conforms its files to the source, in this process; the
    load-back runs in an isolated worker, see test_containment) leaves no directory; the others finish."""
    import quantpub.backends.conform

    real = quantpub.backends.conform.conform_to_source

    def broken_for_8bit(saved, source):
        if '"bits": 8' in (saved / "quantize_config.json").read_text():
            raise ValueError("the forward pass produced NaN or infinite logits")
        return real(saved, source)

    monkeypatch.setattr(quantpub.backends.conform, "conform_to_source", broken_for_8bit)
    matrix = tmp_path / "m.yaml"
    matrix.write_text("gptq:\n  variants: [{bits: 8}, {bits: 4}]\n")
    outcomes = build_from_matrix(matrix, str(tiny_models("llama")), tmp_path / "o", calibration_file=corpus,
                                 device="cpu", **SMALL)
    assert [(o.variant, o.error is None) for o in outcomes] == [
        ("gptq-8bit-128g-actorder_False", False), ("gptq-4bit-128g-actorder_False", True)]
    assert "NaN" in outcomes[0].error and outcomes[0].ending == "failed"
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if not p.name.startswith(".")) == [
        "gptq-4bit-128g-actorder_False", "inputs", "logs", "plan.json"]


@pytest.mark.parametrize("shape", ["mistral", "llama-16k", "mixtral"])
def test_architectures(shape, tiny_models, corpus, tmp_path):
    matrix = tmp_path / "m.yaml"
    matrix.write_text("gptq:\n  variants: [{bits: 4, group_size: 128}]\n")
    model = tiny_models(shape)
    (outcome,) = build_from_matrix(matrix, str(model), tmp_path / "o", calibration_file=corpus, device="cpu", **SMALL)
    assert outcome.error is None
    config = json.loads((outcome.path / "config.json").read_text())
    source = json.loads((model / "config.json").read_text())
    for key in ("sliding_window", "rope_parameters", "max_position_embeddings", "num_local_experts"):
        assert config.get(key) == source.get(key), key
    if shape == "llama-16k":
        assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4.0
        assert config["max_position_embeddings"] == 16384
    if shape == "mistral":
        assert "chat_template" in json.loads((outcome.path / "tokenizer_config.json").read_text()) or \
            (outcome.path / "chat_template.jinja").exists()
    if shape == "mixtral":
        with safe_open(outcome.path / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        for layer in range(2):
            for expert in range(4):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    assert f"model.layers.{layer}.mlp.experts.{expert}.{proj}.qweight" in keys
        experts = json.loads((outcome.path / MANIFEST).read_text())["experts"]
        assert experts["min_tokens"] == 256
        assert len(experts["tokens"]) == 2 * 4  # every expert of both layers was calibrated
        assert experts["starved"] == sorted((k for k, n in experts["tokens"].items() if n < 256),
                                            key=lambda k: [int(x) for x in k.split() if x.isdigit()])
    else:
        assert json.loads((outcome.path / MANIFEST).read_text())["experts"] is None


def test_streamed_build_is_byte_identical_to_the_whole_model_build(tiny_models, corpus, tmp_path):
    """``--stream`` (models larger than host memory): GPTQModel reads each layer from the checkpoint and
    offloads quantized layers to disk. Same files as loading the model whole, nothing left behind; the
    shared GPTQ mode needs the whole model, so a streamed run builds its variants in exact mode."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    variants = "  variants: [{bits: 4, group_size: 32}]\nawq:\n  targets: [{bits: 4, group_size: 32}]\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # float sums depend on the thread count: one, in fresh processes
    built = {}
    for name, mode, stream in (("whole", "exact", False), ("streamed", "exact", True), ("shared", "shared", True)):
        matrix = tmp_path / f"{name}.yaml"
        matrix.write_text(f"gptq:\n  mode: {mode}\n{variants}")
        subprocess.run([sys.executable, "-m", "quantpub", "quantize", str(matrix), "--model", str(tiny_models("llama")),
                        "--out", str(tmp_path / name), "--calibration-file", str(corpus), "--device", "cpu",
                        "--n-samples", "4", "--seq-len", "64", *(["--stream", "always"] if stream else [])],
                       check=True, env=env, cwd=tmp_path, capture_output=True)
        built[name] = tmp_path / name
        assert sorted(p.name for p in built[name].iterdir()) == [
            ".records", "awq-4bit-32g-GEMM", "gptq-4bit-32g-actorder_False", "inputs", "logs", "plan.json"]  # no .offload
    for variant in ("gptq-4bit-32g-actorder_False", "awq-4bit-32g-GEMM"):
        whole = load_file(built["whole"] / variant / "model.safetensors")
        for name in ("streamed", "shared"):
            other = load_file(built[name] / variant / "model.safetensors")
            assert other.keys() == whole.keys()
            assert all(torch.equal(whole[k], other[k]) for k in whole), (name, variant)
            assert (built[name] / variant / "config.json").read_bytes() == \
                (built["whole"] / variant / "config.json").read_bytes()
            manifest = json.loads((built[name] / variant / MANIFEST).read_text())
            assert manifest["streamed"] is True
            if variant.startswith("gptq"):
                assert manifest["gptq_mode"] == "exact"
        assert json.loads((built["whole"] / variant / MANIFEST).read_text())["streamed"] is False
