"""The compressed_tensors: and mlx: matrix sections, the runtimes matrix, and their names."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from conftest import CONFIGS, MATRICES
from quantpub import naming
from quantpub.cli import main
from quantpub.matrix import GptqVariant, Matrix
from quantpub.variants import load_matrix, runtime_repo, runtime_specs
from quantpub.matrix_formats import CtScheme

RUNTIME_VARIANTS = [  # (id, method, repo for model "m", calibrated)
    ("ct-w4a16-128g-actorder_GroupAware", "compressed_tensors", "quantpub/m-quantized.w4a16", True),
    ("ct-w8a8-actorder_True", "compressed_tensors", "quantpub/m-quantized.w8a8", True),
    ("ct-fp8-dynamic", "compressed_tensors", "quantpub/m-FP8-dynamic", False),
    ("mlx-4bit-64g", "mlx", "quantpub/m-MLX-4bit", False),
    ("mlx-8bit-64g", "mlx", "quantpub/m-MLX-8bit", False),
]


def test_runtimes_matrix_has_every_format():
    matrix, specs = load_matrix(MATRICES / "runtimes.yaml")
    assert [(s.method, s.branch) for s in specs] == [("gptq", "main"), ("awq", "main"), ("gguf", None), ("gguf", None)] \
        + [(method, "main") for _, method, _, _ in RUNTIME_VARIANTS]  # every format, in publication order
    assert [s.params.label for s in specs if s.method == "gguf"] == ["Q4_K_M", "Q8_0"]
    runtime = runtime_specs(matrix)
    got = [(s.id, s.method, runtime_repo(matrix, s, "m"), s.calibration is not None) for s in runtime]
    assert got == RUNTIME_VARIANTS
    assert all(s.branch == "main" for s in runtime)
    assert all(s.calibration in (None, matrix.calibration) for s in runtime)


def test_w4a16_is_the_gptq_main_branchs_solve():
    """The runtimes matrix's GPTQ main and its W4A16 solve the same problem, so one build serves both."""
    matrix, specs = load_matrix(MATRICES / "runtimes.yaml")
    w4a16 = runtime_specs(matrix)[0].params
    main_branch = next(s.params for s in specs if s.branch == "main" and s.method == "gptq")
    p = main_branch
    assert (p.bits, p.group_size, p.act_order, p.damp, p.sym) == \
        (w4a16.weight_bits, w4a16.resolved_group_size, w4a16.resolved_act_order, w4a16.resolved_damp, True)
    assert GptqVariant(bits=4, group_size=128, act_order="group_aware").name_parts().base == \
        "gptq-4bit-128g-actorder_GroupAware"


@pytest.mark.parametrize("scheme, group, act, damp", [
    ({"scheme": "W4A16"}, 128, "group_aware", 0.01),
    ({"scheme": "W4A16", "group_size": 32, "act_order": False, "damp": 0.1}, 32, False, 0.1),
    ({"scheme": "W8A8"}, None, True, 0.01),
    ({"scheme": "W8A8", "act_order": False}, None, False, 0.01),
    ({"scheme": "FP8_DYNAMIC"}, None, False, 0.01),
])
def test_scheme_defaults_follow_llm_compressor(scheme, group, act, damp):
    s = CtScheme.model_validate(scheme)
    assert (s.resolved_group_size, s.resolved_act_order, s.resolved_damp) == (group, act, damp)
    assert s.needs_calibration == (s.scheme != "FP8_DYNAMIC")


@pytest.mark.parametrize("name", ["runtimes.yaml"])
def test_round_trip_load_dump_load(name, tmp_path):
    matrix, specs = load_matrix(MATRICES / name)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(matrix.model_dump(mode="json")))
    again, again_specs = load_matrix(dumped)
    assert again == matrix and again_specs == specs
    assert runtime_specs(again) == runtime_specs(matrix)


def test_a_matrix_of_runtime_formats_only_is_valid():
    matrix = Matrix.model_validate({"mlx": {"targets": [{"bits": 4}]}})
    assert [s.id for s in runtime_specs(matrix)] == ["mlx-4bit-64g"]


MALFORMED = {
    "scheme misspelt": ("compressed_tensors:\n  schemes:\n    - {scheme: W4A8}\n",
                        "m.yaml:3: compressed_tensors.schemes.0.scheme: Input should be 'W4A16', 'W8A8' or 'FP8_DYNAMIC'"),
    "unknown key in a scheme": ("compressed_tensors:\n  schemes:\n    - {scheme: W4A16, groupsize: 64}\n",
                                "compressed_tensors.schemes.0.groupsize: unknown key; allowed here: scheme, group_size, "
                                "act_order, damp"),
    "unknown section key": ("compressed_tensors:\n  schemes: [{scheme: W8A8}]\n  scheme: [W4A16]\n",
                            "m.yaml:3: compressed_tensors.scheme: unknown key; allowed here: schemes"),
    "FP8 with calibration parameters": ("compressed_tensors:\n  schemes:\n    - {scheme: FP8_DYNAMIC, damp: 0.1}\n",
                                        "FP8_DYNAMIC is data-free (no GPTQ, one scale per channel); remove damp"),
    "W8A8 with groups": ("compressed_tensors:\n  schemes:\n    - {scheme: W8A8, group_size: 128}\n",
                         "W8A8 has one scale per output channel; remove group_size"),
    "W4A16 with desc_act": ("compressed_tensors:\n  schemes:\n    - {scheme: W4A16, act_order: true}\n",
                            "use act_order: group_aware"),
    "scheme twice": ("compressed_tensors:\n  schemes:\n    - {scheme: W8A8}\n    - {scheme: W8A8, act_order: false}\n",
                     "compressed_tensors: scheme W8A8 is listed twice"),
    "MLX bits 7": ("mlx:\n  targets:\n    - {bits: 7}\n", "m.yaml:3: mlx.targets.0.bits: Input should be 2, 3, 4, 5, 6 or 8"),
    "MLX group 96": ("mlx:\n  targets:\n    - {bits: 4, group_size: 96}\n", "mlx.targets.0.group_size: Input should be"),
    "MLX unknown key": ("mlx:\n  targets:\n    - {bits: 4, q_group_size: 32}\n",
                        "mlx.targets.0.q_group_size: unknown key; allowed here: bits, group_size"),
    "MLX target twice": ("mlx:\n  targets: [{bits: 4}, {bits: 4, group_size: 64}]\n", "mlx-4bit-64g listed twice"),
    "MLX widths in one repo": ("mlx:\n  targets: [{bits: 4}, {bits: 4, group_size: 32}]\n",
                               "mlx.targets: mlx.targets[0] and mlx.targets[1] would share one repo"),
    "MLX repo without bits": ("mlx:\n  targets: [{bits: 4}]\nrepos:\n  mlx: '{model_name}-MLX'\n",
                              "repos.mlx: '{model_name}-MLX' must contain {bits}"),
    "CT repo placeholder": ("compressed_tensors:\n  schemes: [{scheme: W8A8}]\nrepos:\n  compressed_tensors:\n"
                            "    W8A8: '{model}-w8a8'\n",
                            "repos.compressed_tensors.W8A8: '{model}-w8a8': the placeholders are {model_name}"),
    "CT repo for an unknown scheme": ("compressed_tensors:\n  schemes: [{scheme: W8A8}]\nrepos:\n  compressed_tensors:\n"
                                      "    W4A8: 'x'\n",
                                      "repos.compressed_tensors.W4A8: unknown key; allowed here: W4A16, W8A8, FP8_DYNAMIC"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_section_is_one_clear_line(case, tmp_path, capsys):
    text, expected = MALFORMED[case]
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(text))
    code = main(["plan", str(path), "--model", str(CONFIGS / "openllama-13b")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}"), lines[0]
    assert expected.replace("m.yaml", str(path)) in lines[0]


@pytest.mark.parametrize("scheme, group, act, expected", [
    ("W4A16", 128, "group_aware", "ct-w4a16-128g-actorder_GroupAware"),
    ("W4A16", 32, False, "ct-w4a16-32g-actorder_False"),
    ("W8A8", None, True, "ct-w8a8-actorder_True"),
    ("FP8_DYNAMIC", None, False, "ct-fp8-dynamic"),
])
def test_ct_variant_id(scheme, group, act, expected):
    assert naming.ct_variant_id(scheme, group, act) == expected


@pytest.mark.parametrize("template, bits, group, expected", [
    ("{model_name}-MLX-{bits}bit", 4, 64, "Llama-3.2-1B-Instruct-MLX-4bit"),  # lmstudio-community's names
    ("{model_name}-{bits}bit", 8, 64, "Llama-3.2-1B-Instruct-8bit"),  # mlx-community's, inside its org
    ("{model_name}-{bits}bit-g{group_size}", 4, 32, "Llama-3.2-1B-Instruct-4bit-g32"),
])
def test_mlx_repo_name(template, bits, group, expected):
    assert naming.mlx_repo_name(template, "Llama-3.2-1B-Instruct", bits, group) == expected
    assert naming.mlx_variant_id(bits, group) == f"mlx-{bits}bit-{group}g"


def test_ct_repo_names_are_redhatais():
    names = {s: t.format(model_name="Llama-3.1-8B-Instruct") for s, t in naming.CT_REPO_TEMPLATES.items()}
    assert names == {"W4A16": "Llama-3.1-8B-Instruct-quantized.w4a16", "W8A8": "Llama-3.1-8B-Instruct-quantized.w8a8",
                     "FP8_DYNAMIC": "Llama-3.1-8B-Instruct-FP8-dynamic"}
