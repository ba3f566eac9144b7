"""GGUF through the real llama.cpp: one conversion, twelve types, imatrix, splits, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import HUB_TOKEN
from quantpub.backends import gguf_files as gguf, llamacpp
from quantpub.artifacts import MANIFEST
from quantpub.build import build_from_matrix

pytestmark = pytest.mark.slow
THEBLOKE_TYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_K_S", "Q5_K_M",
                  "Q6_K", "Q8_0"]
# Reviewed: what llama.cpp 0.3.36's mixes give the 14 block weights of the tiny llama (2 layers x 7),
# dimensions 256/512 so no K-quant falls back.
TINY_LLAMA_MIX = {
    "Q2_K": {"Q2_K": 8, "Q3_K": 6}, "Q3_K_S": {"Q3_K": 14}, "Q3_K_M": {"Q3_K": 8, "Q4_K": 4, "Q5_K": 2},
    "Q3_K_L": {"Q3_K": 8, "Q5_K": 6}, "Q4_0": {"Q4_0": 14}, "Q4_K_S": {"Q4_K": 12, "Q5_K": 2},
    "Q4_K_M": {"Q4_K": 12, "Q6_K": 2}, "Q5_0": {"Q5_0": 14}, "Q5_K_S": {"Q5_K": 14},
    "Q5_K_M": {"Q5_K": 12, "Q6_K": 2}, "Q6_K": {"Q6_K": 14}, "Q8_0": {"Q8_0": 14},
}


def matrix(tmp_path: Path, types: list[str], imatrix: bool = False) -> Path:
    path = tmp_path / "gguf.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"gguf:\n  types: [{', '.join(types)}]\n  imatrix: {str(imatrix).lower()}\n")
    return path


@pytest.fixture(scope="module")
def twelve(tiny_models, corpus, tmp_path_factory):
    """All twelve TheBloke types of the tiny llama, counting conversions."""
    tmp = tmp_path_factory.mktemp("gguf12")
    conversions = []
    real = llamacpp.convert

    def counting(*args, **kwargs):
        conversions.append(args)
        return real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(llamacpp, "convert", counting)
    try:
        outcomes = build_from_matrix(matrix(tmp, THEBLOKE_TYPES), str(tiny_models("llama")), tmp / "out",
                            calibration_file=corpus, device="cpu")
    finally:
        mp.undo()
    return tmp / "out", outcomes, conversions


def test_twelve_types_from_one_conversion(twelve):
    out, outcomes, conversions = twelve
    assert [o.error for o in outcomes] == [None] * 12
    assert len(conversions) == 1
    assert not (out / ".work").exists()  # the 16-bit file is removed once every type is built
    for t in THEBLOKE_TYPES:
        files = sorted((out / f"gguf-{t}").glob("*.gguf"))
        assert [f.name for f in files] == [f"tiny-llama.{t}.gguf"]
        manifest = json.loads((out / f"gguf-{t}" / MANIFEST).read_text())
        assert manifest["sixteen_bit"] == "f16" and manifest["imatrix"] is None
        assert manifest["validation"]["loaded_with"] == "llama_cpp.Llama"
        assert manifest["validation"]["tokens"] == 256 and manifest["validation"]["finite"]
        assert manifest["files"][files[0].name]["size"] == files[0].stat().st_size


def test_each_file_has_the_reviewed_tensor_type_mix(twelve):
    out, _, _ = twelve
    for t in THEBLOKE_TYPES:
        meta, tensors = gguf.read([out / f"gguf-{t}" / f"tiny-llama.{t}.gguf"])
        assert gguf.type_mix(tensors) == TINY_LLAMA_MIX[t], t
        assert gguf.check_mix(t, tensors) == []
        assert meta["general.file_type"] == llamacpp.ftype(t)
        assert {kind for _, kind, shape in tensors if len(shape) == 1} == {"F32"}
        assert json.loads((out / f"gguf-{t}" / MANIFEST).read_text())["validation"]["type_mix"] == TINY_LLAMA_MIX[t]


def test_rerun_skips_built_types(twelve, tiny_models, corpus, tmp_path):
    out, _, _ = twelve
    again = build_from_matrix(matrix(tmp_path, THEBLOKE_TYPES), str(tiny_models("llama")), out, calibration_file=corpus,
                     device="cpu")
    assert all(o.skipped for o in again)


def test_mixtral_imatrix_q4_k_m_loads_in_llama_cpp(tiny_models, corpus, tmp_path):
    (outcome,) = build_from_matrix(matrix(tmp_path, ["Q4_K_M"], imatrix=True), str(tiny_models("mixtral")), tmp_path / "o",
                          calibration_file=corpus, device="cpu", n_samples=8, seq_len=128)
    assert outcome.error is None
    manifest = json.loads((outcome.path / MANIFEST).read_text())
    assert manifest["parameters"] == {"name": "Q4_K_M", "type": "Q4_K_M", "imatrix": True}
    assert manifest["imatrix"]["samples"] == 8 and manifest["imatrix"]["tokens"] == 8 * 128
    assert manifest["imatrix"]["file"] == "tiny-mixtral.imatrix" and "tiny-mixtral.imatrix" in manifest["files"]
    meta, values = gguf.read_imatrix(outcome.path / "tiny-mixtral.imatrix")  # one slice per expert
    assert meta["general.type"] == "imatrix" and values["blk.0.ffn_down_exps.weight"].size == 4 * 512
    # every expert tensor of both layers got importance data: 3 per layer + 4 attention
    assert manifest["imatrix"]["tensors"] == 2 * (3 + 4)
    assert manifest["calibration"]["n_samples"] == 8
    assert manifest["validation"]["loaded_with"] == "llama_cpp.Llama" and manifest["validation"]["finite"]
    meta, tensors = gguf.read([outcome.path / "tiny-mixtral.Q4_K_M.gguf"])
    # the keys llama-quantize writes with --imatrix (tools/quantize/quantize.cpp), read back
    assert meta["quantize.imatrix.entries_count"] == 2 * (3 + 4)
    assert meta["quantize.imatrix.chunks_count"] == 8
    # llama-quantize writes the first dataset its imatrix file names, cut to 127 bytes
    assert meta["quantize.imatrix.dataset"] == manifest["imatrix"]["datasets"][0][:127]
    assert meta["quantize.imatrix.file"].startswith("tiny-mixtral.imatrix")
    assert "quantize.imatrix.entries_count" in manifest["validation"]["metadata_checked"]
    names = {n for n, _, _ in tensors}
    assert {"blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"} <= names
    assert gguf.type_mix(tensors) == {"Q4_K": 12, "Q6_K": 2}


def test_imatrix_changes_the_quantized_weights(tiny_models, corpus, tmp_path):
    model = str(tiny_models("llama"))
    plain = build_from_matrix(matrix(tmp_path / "a", ["Q4_K_M"]), model, tmp_path / "a" / "o", calibration_file=corpus,
                     device="cpu")[0]
    weighted = build_from_matrix(matrix(tmp_path / "b", ["Q4_K_M"], imatrix=True), model, tmp_path / "b" / "o",
                        calibration_file=corpus, device="cpu", n_samples=8, seq_len=128)[0]
    a = json.loads((plain.path / MANIFEST).read_text())["files"]["tiny-llama.Q4_K_M.gguf"]["sha256"]
    b = json.loads((weighted.path / MANIFEST).read_text())["files"]["tiny-llama.Q4_K_M.gguf"]["sha256"]
    assert a != b


@pytest.mark.parametrize("shape", ["llama-16k", "mistral"])
def test_metadata_survives(shape, tiny_models, corpus, tmp_path):
    (outcome,) = build_from_matrix(matrix(tmp_path, ["Q4_K_M"]), str(tiny_models(shape)), tmp_path / "o",
                          calibration_file=corpus, device="cpu")
    assert outcome.error is None
    meta, _ = gguf.read(sorted(outcome.path.glob("*.gguf")))
    checked = json.loads((outcome.path / MANIFEST).read_text())["validation"]["metadata_checked"]
    if shape == "llama-16k":
        assert meta["llama.context_length"] == 16384
        assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 4.0
        assert "rope_scaling" in checked
    else:
        assert meta["llama.context_length"] == 32768 and meta["llama.attention.head_count_kv"] == 2
        assert "<|im_start|>" in meta["tokenizer.chat_template"] and "chat_template" in checked
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    # the model's name (not the work directory's), who quantized it and the repo it is published in
    assert meta["general.name"] == f"tiny-{shape}" and meta["general.quantized_by"] == "quantpub"
    assert meta["general.repo_url"] == meta["general.url"] == f"https://huggingface.co/quantpub/tiny-{shape}-GGUF"
    assert "quantize.imatrix.file" not in meta  # no importance matrix, no imatrix keys
    assert {"general.name", "general.repo_url"} <= set(checked)


def test_split_files_load_in_llama_cpp(twelve, corpus, tmp_path):
    out, _, _ = twelve
    source = out / "gguf-Q8_0" / "tiny-llama.Q8_0.gguf"
    copy = tmp_path / "tiny-llama.Q8_0.gguf"
    copy.write_bytes(source.read_bytes())
    shards = gguf.split(copy, 500_000)
    assert [s.name for s in shards] == [f"tiny-llama.Q8_0-{i:05d}-of-{len(shards):05d}.gguf"
                                        for i in range(1, len(shards) + 1)]
    assert len(shards) >= 3 and not copy.exists()
    meta, tensors = gguf.read(shards)
    assert meta["split.count"] == len(shards) and len(tensors) == 21
    assert gguf.check_mix("Q8_0", tensors) == []
    text = corpus.read_text()[200_000:]
    whole = gguf.validate_file(source, text, 64, 1)
    split = gguf.validate_file(shards[0], text, 64, 1)
    assert split["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)


def test_one_failing_type_does_not_stop_the_others(tiny_models, corpus, tmp_path, monkeypatch):
    real = gguf.check_mix  # runs in this process (quantization and validation run in isolated workers)

    def broken(variant, tensors):
        return ["blk.0.attn_q.weight is F32"] if variant.type == "Q5_0" else real(variant, tensors)

    monkeypatch.setattr(gguf, "check_mix", broken)
    outcomes = build_from_matrix(matrix(tmp_path, ["Q5_0", "Q4_0"]), str(tiny_models("llama")), tmp_path / "o",
                        calibration_file=corpus, device="cpu")
    assert [(o.variant, o.error is None) for o in outcomes] == [("gguf-Q5_0", False), ("gguf-Q4_0", True)]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".records", ".work", "gguf-Q4_0", "inputs", "logs", "plan.json"]  # 16-bit kept


@pytest.mark.parametrize("point", ["quantize:gguf-Q5_0", "validate:gguf-Q5_0:SIGABRT"])
def test_a_native_crash_costs_one_type(tiny_models, corpus, tmp_path, monkeypatch, point):
    """A type whose llama.cpp call kills its process fails alone, as crashed, with the signal and its log."""
    monkeypatch.setenv("QUANTPUB_TEST_CRASH", point)
    outcomes = build_from_matrix(matrix(tmp_path, ["Q5_0", "Q4_0"]), str(tiny_models("llama")), tmp_path / "o",
                        calibration_file=corpus, device="cpu")
    crashed, built = outcomes
    assert built.error is None and (tmp_path / "o" / "gguf-Q4_0" / MANIFEST).is_file()
    signal = point.split(":")[2] if point.count(":") == 2 else "SIGSEGV"
    phase = point.split(":")[0]
    assert crashed.ending == "crashed" and crashed.path is None
    assert crashed.error.startswith(f"crashed: {signal} during {phase} of gguf-Q5_0 (log: ")
    log = tmp_path / "o" / "logs" / "quantize-gguf" / "gguf-Q5_0.log"
    assert str(log) in crashed.error and "Fatal Python error" in log.read_text()
    assert not (tmp_path / "o" / "gguf-Q5_0").exists() and not list((tmp_path / "o").glob(".partial-*"))


def test_gguf_files_publish_to_main(twelve, hub):
    from huggingface_hub import HfApi, hf_hub_download

    from quantpub.publish import publish, sha256_file

    out, _, _ = twelve
    results = publish(out, endpoint=hub.url, token=HUB_TOKEN, namespace="alice")
    assert {r.repo for r in results} == {"alice/tiny-llama-GGUF"} and {r.branch for r in results} == {"main"}
    files = HfApi(endpoint=hub.url).list_repo_files("alice/tiny-llama-GGUF")
    assert sorted(f for f in files if f.endswith(".gguf")) == sorted(f"tiny-llama.{t}.gguf" for t in THEBLOKE_TYPES)
    got = hf_hub_download("alice/tiny-llama-GGUF", "tiny-llama.Q4_K_M.gguf", endpoint=hub.url)
    assert sha256_file(Path(got)) == sha256_file(out / "gguf-Q4_K_M" / "tiny-llama.Q4_K_M.gguf")
    assert "quantpub/gguf-Q4_K_M.json" in files  # one manifest per file set, side by side on main
    assert not any(r.changed for r in publish(out, endpoint=hub.url, token=HUB_TOKEN, namespace="alice"))
