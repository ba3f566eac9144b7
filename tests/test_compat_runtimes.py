"""Compatibility suite: every GPTQ and AWQ variant of a tiny llama written the way 2023 checkpoints
are (transformers 4.34 files, rope_scaling linear x4), loaded in today's stack and in the previous
generation (transformers 4.47 + optimum 1.23 + auto-gptq 0.7.1), tokenizers under transformers 4.38
and 4.47, and the GPTQ card's own Python snippet run against the published repo.

Makes the runtime venvs it needs on first use (``scripts/compat-venvs.sh`` makes them ahead); about 8 minutes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import HUB_TOKEN, MATRICES
from quantpub.artifacts import MANIFEST
from quantpub.backends.conform import tokenizer_files
from quantpub.compat import TOLERANCE, venvs

CACHE = Path(os.environ.get("QUANTPUB_VENVS_CACHE") or Path.home() / ".cache" / "quantpub" / "venvs")
from quantpub.tiny import CHATML, build_tiny_model
from quantpub.build import build_from_matrix

pytestmark = pytest.mark.slow
GPTQ = ["gptq-4bit-128g-actorder_False", "gptq-4bit-32g-actorder_True", "gptq-4bit-64g-actorder_True",
        "gptq-4bit-128g-actorder_True", "gptq-8bit--1g-actorder_True", "gptq-8bit-128g-actorder_False",
        "gptq-4bit-32g-actorder_GroupAware"]
AWQ = ["awq-4bit-128g-GEMM"]
QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@pytest.fixture(scope="module", autouse=True)
def runtime_venvs():
    """The real venv cache (conftest hides it from other tests), with both venvs made if missing (once:
    about 4 minutes and 1.7 GB, then cached under ~/.cache/quantpub/venvs)."""
    saved = os.environ.get("QUANTPUB_VENVS")
    os.environ["QUANTPUB_VENVS"] = str(CACHE)
    try:
        for name in ("transformers4", "tokenizers438"):
            venvs.ensure(name)
        yield
    finally:
        os.environ["QUANTPUB_VENVS"] = saved or ""


@pytest.fixture(autouse=True)
def real_venv_cache(monkeypatch):
    monkeypatch.setenv("QUANTPUB_VENVS", str(CACHE))  # over the hermetic fixture's empty one


@pytest.fixture(scope="module")
def legacy(runtime_venvs, tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("legacy")
    source = build_tiny_model(root / "tiny-llama-16k", "llama-16k", text=corpus.read_text(), chat_template=CHATML,
                              transformers4=True)
    out = root / "out"
    outcomes = build_from_matrix(MATRICES / "thebloke-vllm.yaml", str(source), out, calibration_file=corpus, device="cpu",
                        n_samples=8, seq_len=128)
    assert {o.variant: o.error for o in outcomes} == {v: None for v in GPTQ + AWQ}
    manifests = {v: json.loads((out / v / MANIFEST).read_text()) for v in GPTQ + AWQ}
    return source, out, manifests


def test_source_is_written_the_transformers4_way(legacy):
    source, _, _ = legacy
    config = json.loads((source / "config.json").read_text())
    assert config["rope_scaling"] == {"type": "linear", "factor": 4.0} and config["rope_theta"] == 10000.0
    assert (config["torch_dtype"], config["transformers_version"]) == ("float16", "4.34.0")
    assert "rope_parameters" not in config and "dtype" not in config and "pad_token_id" not in config
    assert tokenizer_files(source) == ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]


def test_every_variant_ships_the_source_files(legacy):
    source, out, _ = legacy
    source_config = json.loads((source / "config.json").read_text())
    for variant in GPTQ + AWQ:
        config = json.loads((out / variant / "config.json").read_text())
        quantization = config.pop("quantization_config")
        assert config == source_config, variant  # every key, every value, nothing added but quantization_config
        assert list(config) == list(source_config)
        assert quantization["quant_method"] == ("awq" if variant in AWQ else "gptq")
        assert tokenizer_files(out / variant) == tokenizer_files(source), variant
        for name in tokenizer_files(source) + ["generation_config.json"]:
            assert (out / variant / name).read_bytes() == (source / name).read_bytes(), f"{variant}/{name}"


def test_gptq_tensors_are_as_autogptq_wrote_them(legacy):
    _, out, _ = legacy
    for variant in GPTQ:
        with safe_open(out / variant / "model.safetensors", "pt") as f:
            names = set(f.keys())
            linears = [n.removesuffix(".qweight") for n in names if n.endswith(".qweight")]
            assert len(linears) == 2 * 7
            for linear in linears:
                bias = f.get_tensor(f"{linear}.bias")
                assert bias.dtype == torch.float16 and not bias.any(), f"{variant}: {linear}.bias"
                assert bias.shape == (f.get_tensor(f"{linear}.qweight").shape[1],)
            for name in names:
                if name.rsplit(".", 1)[-1] not in QUANT_PARTS + ("bias",):
                    assert f.get_tensor(name).dtype == torch.float16, f"{variant}: {name}"


def test_group_aware_act_order_is_saved_as_desc_act_false(legacy):
    _, out, manifests = legacy
    variant = "gptq-4bit-32g-actorder_GroupAware"
    qc = json.loads((out / variant / "quantize_config.json").read_text())
    assert (qc["desc_act"], qc["group_size"], qc["meta"]["act_group_aware"]) == (False, 32, True)
    with safe_open(out / variant / "model.safetensors", "pt") as f:
        g_idx = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
    assert torch.equal(g_idx, torch.arange(512, dtype=g_idx.dtype) // 32)  # plain groups: what vLLM requires
    assert manifests[variant]["parameters"]["act_order"] == "group_aware"


def test_old_stack_loads_every_gptq_branch_with_todays_logits(legacy):
    _, _, manifests = legacy
    for variant in GPTQ:
        runtimes = manifests[variant]["compat"]["runtimes"]
        assert runtimes["transformers5"]["status"] == "loads", variant
        old = runtimes["transformers4"]
        assert old["status"] == "loads", f"{variant}: {old.get('error')}"
        assert old["versions"]["transformers"] == "4.47.1" and old["versions"]["auto-gptq"] == "0.7.1"
        assert old["kernel"].startswith("auto_gptq.") and old["finite"]
        assert 0 <= old["max_abs_diff"] <= TOLERANCE, variant


def test_awq_in_the_old_stack_is_recorded_as_what_it_did(legacy):
    _, _, manifests = legacy
    runtimes = manifests["awq-4bit-128g-GEMM"]["compat"]["runtimes"]
    assert runtimes["transformers5"]["status"] == "loads"
    old = runtimes["transformers4"]
    if torch.cuda.is_available():
        assert old["status"] == "loads" and old["max_abs_diff"] <= TOLERANCE
    else:  # transformers 4.47 runs AWQ only on CUDA or through IPEX, which has no build for this torch
        assert old["status"] == "fails" and "GPU is required to run AWQ quantized model" in old["error"]


def test_every_branch_tokenizer_loads_under_transformers_438_and_447(legacy):
    _, _, manifests = legacy
    seen = set()
    for variant in GPTQ + AWQ:
        runtimes = manifests[variant]["compat"]["runtimes"]
        for name, version in (("tokenizer-4.38", "4.38.2"), ("tokenizer-4.47", "4.47.1")):
            result = runtimes[name]
            assert result["status"] == "loads", f"{variant} {name}: {result.get('error')}"
            assert result["versions"]["transformers"] == version
            assert "<|im_start|>user" in result["chat_prompt"]  # the chat template survived
            seen.add(tuple(result["ids"]))
    assert len(seen) == 1  # same files, same ids, in both versions and every branch


def test_card_table_and_compatibility_section_say_what_was_tested(legacy):
    from quantpub.card import render_run

    _, out, _ = legacy
    paths = {p.parent.name: p.read_text() for p in render_run(out, hub="")}
    card = paths["tiny-llama-16k-GPTQ"]
    rows = [r for r in card.splitlines() if r.startswith("| [")]
    assert len(rows) == len(GPTQ)
    for row in rows:
        tested = row.strip("|").split("|")[10]
        assert "transformers 5.23.0" in tested and "transformers 4.47.1 + optimum 1.23.3 + auto-gptq 0.7.1" in tested
    section = card.split("## Compatibility", 1)[1]
    assert "| transformers 4.47.1 + optimum 1.23.3 + auto-gptq 0.7.1 | main, " in section
    assert "tokenizer: transformers 4.38.2" in section
    assert "Not tested: ExLlama, ExLlamaV2 and Hugging Face Text Generation Inference (TGI)" in section
    awq = paths["tiny-llama-16k-AWQ"].split("## Compatibility", 1)[1]
    if not torch.cuda.is_available():
        assert "main: `RuntimeError: GPU is required to run AWQ quantized model" in awq


def test_card_python_snippet_runs_in_the_old_stack_against_the_hub(legacy, hub, tmp_path):
    from quantpub.card import render_run
    from quantpub.publish import publish

    _, out, _ = legacy
    render_run(out, hub=hub.url, namespace="alice")
    publish(out, endpoint=hub.url, token=HUB_TOKEN, namespace="alice")
    card = (out / "cards" / "tiny-llama-16k-GPTQ" / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card.split("## How to use this GPTQ model from Python code")[1],
                        re.S).group(1)
    assert 'model_name_or_path = "alice/tiny-llama-16k-GPTQ"' in snippet
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": ""}
    env.pop("PYTHONPATH", None)
    for branch in ("main", "gptq-4bit-32g-actorder_True"):
        code = snippet.replace("max_new_tokens=512", "max_new_tokens=8").replace('revision="main"',
                                                                                   f'revision="{branch}"')
        done = subprocess.run([str(venvs.python("transformers4")), "-c", code], capture_output=True, text=True,
                              env=env, timeout=600)
        assert done.returncode == 0, f"{branch}: {done.stderr[-2000:]}"
        assert "*** Generate:" in done.stdout and "*** Pipeline:" in done.stdout
