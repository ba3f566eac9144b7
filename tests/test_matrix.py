import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import CONFIGS, MATRICES
from quantpub.cli import main
from quantpub.errors import MatrixError
from quantpub.matrix import GptqVariant, Matrix
from quantpub.variants import expand, load_matrix

TULU_BRANCHES = [  # (branch, bits, group size, act order) as on TheBloke's card, in its order
    ("main", 4, 128, False),
    ("gptq-4bit-32g-actorder_True", 4, 32, True),
    ("gptq-4bit-64g-actorder_True", 4, 64, True),
    ("gptq-4bit-128g-actorder_True", 4, 128, True),
    ("gptq-8bit--1g-actorder_True", 8, None, True),
    ("gptq-8bit-128g-actorder_False", 8, 128, False),
]
TWELVE_GGUF = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_K_S",
               "Q5_K_M", "Q6_K", "Q8_0"]


def test_thebloke_gptq_matrix_reproduces_the_tulu_card():
    _, specs = load_matrix(MATRICES / "thebloke-gptq.yaml")
    got = [(s.branch, s.params.bits, s.params.group_size, s.params.act_order) for s in specs]
    assert sorted(got, key=str) == sorted(TULU_BRANCHES, key=str)
    assert specs[0].branch == "main"
    for s in specs:
        assert s.method == "gptq"
        assert s.params.damp == 0.01
        assert s.calibration.dataset == "wikitext" and s.calibration.config == "wikitext-2-raw-v1"
        assert s.calibration.split == "train"
        assert s.calibration.seq_len == 2048


def test_thebloke_matrix_adds_awq_and_twelve_gguf_types():
    matrix, specs = load_matrix(MATRICES / "thebloke.yaml")
    gptq = [s for s in specs if s.method == "gptq"]
    awq = [s for s in specs if s.method == "awq"]
    gguf = [s for s in specs if s.method == "gguf"]
    assert sorted(s.branch for s in gptq) == sorted(b for b, *_ in TULU_BRANCHES)
    assert [(a.branch, a.params.bits, a.params.group_size, a.params.zero_point, a.params.version)
            for a in awq] == [("main", 4, 128, True, "GEMM")]
    assert [g.params.label for g in gguf] == [g.params.type for g in gguf] == TWELVE_GGUF
    assert all(g.branch is None and g.calibration == matrix.calibration for g in gguf)  # imatrix on


BARTOWSKI = ["BF16", "Q8_0", "Q6_K_L", "Q6_K", "Q5_K_L", "Q5_K_M", "Q5_K_S", "Q4_1", "Q4_K_L", "Q4_K_M", "Q4_K_S",
             "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_XL", "Q3_K_L", "Q3_K_M", "IQ3_M", "Q3_K_S", "IQ3_XS", "IQ3_XXS",
             "Q2_K_L", "Q2_K", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS"]


def test_bartowski_matrix_lists_his_files_with_l_variants():
    matrix, specs = load_matrix(MATRICES / "bartowski.yaml")
    assert [s.params.label for s in specs] == BARTOWSKI and matrix.gguf.imatrix
    large = {"Q6_K_L": "Q6_K", "Q5_K_L": "Q5_K_M", "Q4_K_L": "Q4_K_M", "Q3_K_XL": "Q3_K_L", "Q2_K_L": "Q2_K"}
    for s in specs:
        p = s.params
        if p.label in large:  # "Uses Q8_0 for embed and output weights"
            assert (p.token_embedding_type, p.output_tensor_type) == ("Q8_0", "Q8_0") and not p.tensor_types
            assert p.type == large[p.label]
        else:
            assert p.type == p.label and not p.overridden
    assert matrix.gguf.file_name == "{model_name}-{type}.gguf"


def test_gguf_overrides_take_llama_quantize_syntax():
    matrix = Matrix.model_validate({"gguf": {"imatrix": True, "types": [
        "Q4_K_M", {"name": "Q4_K_M-v8", "type": "Q4_K_M", "token_embedding_type": "q8_0",
                   "tensor_types": [r"blk\.(0|1)\.attn_v=q8_0", "ffn_down=Q6_K"]}]}})
    plain, custom = (s.params for s in expand(matrix))
    assert plain.label == "Q4_K_M" and not plain.overridden
    assert custom.token_embedding_type == "Q8_0" and custom.overrides() == [(r"blk\.(0|1)\.attn_v", "Q8_0"),
                                                                           ("ffn_down", "Q6_K")]
    assert matrix.model_dump(mode="json")["gguf"]["types"][0] == "Q4_K_M"  # a plain type dumps as itself


@pytest.mark.parametrize("name", ["thebloke-gptq.yaml", "thebloke.yaml", "bartowski.yaml", "thebloke-vllm.yaml"])
def test_round_trip_load_dump_load(name, tmp_path):
    matrix, specs = load_matrix(MATRICES / name)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(matrix.model_dump(mode="json")))
    again, again_specs = load_matrix(dumped)
    assert again == matrix
    assert again_specs == specs


def test_exclude_rules_and_explicit_branch():
    matrix = Matrix.model_validate({"gptq": {
        "product": {"bits": [3, 4], "group_size": [32, 128], "act_order": [True, False]},
        "exclude": [{"bits": 3, "act_order": False}, {"group_size": 32, "act_order": False}],
        "variants": [{"bits": 8, "group_size": "none", "branch": "my-8bit"}],
        "main": {"bits": 4, "group_size": 128, "act_order": False},
    }})
    ids = [s.id for s in expand(matrix)]
    assert ids == ["gptq-4bit-128g-actorder_False", "gptq-3bit-32g-actorder_True",
                   "gptq-3bit-128g-actorder_True", "gptq-4bit-32g-actorder_True",
                   "gptq-4bit-128g-actorder_True", "my-8bit"]


def test_damp_collision_gets_a_documented_suffix():
    matrix = Matrix.model_validate({"gptq": {"product": {"bits": [4], "group_size": [32], "act_order": [True],
                                                         "damp": [0.01, 0.1]}}})
    assert [s.branch for s in expand(matrix)] == ["main", "gptq-4bit-32g-actorder_True-damp0.1"]


def test_gptq_overrides_apply_to_calibration():
    matrix = Matrix.model_validate({
        "calibration": {"n_samples": 64},
        "gptq": {"seq_len": 1024, "variants": [{"bits": 4}, {"bits": 4, "act_order": True, "dataset": "c4"}]},
    })
    first, second = expand(matrix)
    assert (first.calibration.seq_len, first.calibration.n_samples, first.calibration.dataset) == (1024, 64, "wikitext")
    assert second.calibration.dataset == "c4"


def _write(tmp_path, text):
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(text))
    return path


MALFORMED = {
    "unknown top-level key": ("gptq:\n  variants: [{bits: 4}]\nawk:\n  targets: []\n",
                              "m.yaml:3: awk: unknown key; allowed here: calibration, evaluation, gptq, awq, gguf, repos, card"),
    "unknown nested key": ("gptq:\n  product:\n    bits: [4]\n    groupsize: [128]\n",
                           "m.yaml:4: gptq.product.groupsize: unknown key; allowed here: bits, group_size"),
    "unknown key in a list item": ("gptq:\n  variants:\n    - {bits: 4, act: true}\n",
                                   "gptq.variants.0.act: unknown key; allowed here: bits, group_size, act_order"),
    "bits 5": ("gptq:\n  product:\n    bits: [4, 5]\n", "m.yaml:3: gptq.product.bits.1: Input should be 2, 3, 4 or 8"),
    "negative group size": ("gptq:\n  variants:\n    - {bits: 4, group_size: -32}\n",
                            "gptq.variants.0.group_size: must be one of 32, 64, 128 or none (-1), got -32"),
    "duplicate branch names": (
        "gptq:\n  product: {bits: [4], group_size: [32], act_order: [true]}\n"
        "  variants:\n    - {bits: 4, group_size: 32, act_order: true}\n",
        "gptq: gptq.product and gptq.variants[0] (bits=4, group_size=32, act_order=True, damp=0.01) would share "
        "branch gptq-4bit-32g-actorder_True"),
    "explicit branch colliding with a generated one": (
        "gptq:\n  variants:\n    - {bits: 4}\n    - {bits: 8, branch: gptq-4bit-128g-actorder_False}\n",
        "would share branch gptq-4bit-128g-actorder_False"),
    "empty file": ("", "m.yaml: the file is empty; declare at least one of gptq, awq, gguf"),
    "empty matrix": ("calibration:\n  n_samples: 8\n", "the matrix declares no variants"),
    "gptq with no variants": ("gptq: {}\n", "m.yaml:1: gptq: no GPTQ variant is left"),
    "everything excluded": ("gptq:\n  product: {bits: [4]}\n  exclude: [{bits: 4}]\n", "no GPTQ variant is left"),
    "YAML syntax error": ("gptq:\n  product: {bits: [4]\n  main: x\n", "YAML syntax error"),
    "duplicate YAML key": ("gptq:\n  variants: [{bits: 4}]\ngptq:\n  variants: [{bits: 8}]\n",
                           "m.yaml:3: YAML syntax error: duplicate key 'gptq' (first at line 1)"),
    "not a mapping": ("- gptq\n", "expected a mapping of sections, got list"),
    "calibrating on the perplexity split": (
        "calibration:\n  split: test\ngguf:\n  types: [Q4_0]\n",
        "m.yaml:2: calibration.split: 'test' is the split perplexity is measured on; calibrate on 'train'"),
    "negative n_samples": ("calibration:\n  n_samples: -1\ngguf: {types: [Q4_0]}\n",
                           "calibration.n_samples: Input should be greater than 0"),
    "damp out of range": ("gptq:\n  variants: [{bits: 4, damp: 1.5}]\n", "gptq.variants.0.damp: Input should be less than 1"),
    "main matches nothing": ("gptq:\n  variants: [{bits: 4}]\n  main: {bits: 8}\n",
                             "m.yaml:3: gptq.main: matches no variant; it must select exactly one"),
    "main matches two": ("gptq:\n  product: {bits: [4], act_order: [true, false]}\n  main: {bits: 4}\n",
                         "gptq.main: matches 2 variants"),
    "empty selector": ("gptq:\n  variants: [{bits: 4}]\n  exclude: [{}]\n", "gptq.exclude.0: an empty selector"),
    "unknown GGUF type": ("gguf:\n  types: [Q4_K_M, Q4_K_X]\n", "gguf.types.1.type: Input should be"),
    "GGUF type twice": ("gguf:\n  types: [Q4_0, Q4_0]\n", "gguf: type Q4_0 is listed twice"),
    "IQ type without imatrix": ("gguf:\n  types: [IQ2_XXS]\n", "IQ2_XXS need an importance matrix: set imatrix: true"),
    "override to an IQ type without imatrix": (
        "gguf:\n  types: [{name: X, type: Q4_K_M, tensor_types: [attn_v=IQ2_S]}]\n", "X need an importance matrix"),
    "override without a name": ("gguf:\n  types: [{type: Q4_K_M, output_tensor_type: Q8_0}]\n",
                                "Q4_K_M with overrides needs its own name"),
    "override named as a llama.cpp type": ("gguf:\n  types: [{name: Q5_K_M, type: Q4_K_M, output_tensor_type: Q8_0}]\n",
                                           "name Q5_K_M is llama.cpp's own type"),
    "file type as tensor type": ("gguf:\n  types: [{name: X, type: Q4_K_M, output_tensor_type: Q4_K_M}]\n",
                                 "'Q4_K_M' is not a llama.cpp tensor type"),
    "tensor type without pattern": ("gguf:\n  types: [{name: X, type: Q4_K_M, tensor_types: [Q8_0]}]\n",
                                    "write PATTERN=TYPE"),
    "bad pattern": ("gguf:\n  types: [{name: X, type: Q4_K_M, tensor_types: ['blk.(=Q8_0']}]\n",
                    "is not a regular expression"),
    "file name without type": ("gguf:\n  types: [Q4_0]\n  file_name: '{model_name}.gguf'\n", "must contain {type}"),
    "AWQ bits 8": ("awq:\n  targets: [{bits: 8}]\n", "awq.targets.0.bits: Input should be 4"),
    "repo template placeholder": ("gguf: {types: [Q4_0]}\nrepos:\n  gguf: '{model}-GGUF'\n",
                                  "repos.gguf: '{model}-GGUF': the only placeholder is {model_name}"),
    "branch named main": ("gptq:\n  variants: [{bits: 4, branch: main}]\n", "gptq.variants.0.branch: 'main' is not a usable"),
    "unknown GPTQ mode": ("gptq:\n  mode: fast\n  variants: [{bits: 4}]\n",
                          "m.yaml:2: gptq.mode: Input should be 'shared' or 'exact'"),
    "group-aware act order without groups": (
        "gptq:\n  variants: [{bits: 4, group_size: none, act_order: group_aware}]\n",
        "gptq.variants.0: act_order: group_aware reorders within groups and needs a group size"),
    "group-aware act order without groups in a product": (
        "gptq:\n  product: {bits: [4], group_size: [32, none], act_order: [group_aware]}\n",
        "m.yaml:2: gptq.product: act_order: group_aware reorders within groups and needs a group size"),
    "act order misspelt": ("gptq:\n  variants: [{bits: 4, act_order: groupaware}]\n", "gptq.variants.0.act_order"),
    "bits as text": ("gptq:\n  variants: [{bits: four}]\n", "gptq.variants.0.bits: Input should be 2, 3, 4 or 8"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_matrix_is_one_clear_line(case, tmp_path, capsys):
    text, expected = MALFORMED[case]
    path = _write(tmp_path, text)
    code = main(["plan", str(path), "--model", str(CONFIGS / "openllama-13b")])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}"), lines[0]
    assert expected.replace("m.yaml", str(path)) in lines[0]


def test_missing_matrix_file(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_the_installed_command_prints_no_traceback(tmp_path):
    path = _write(tmp_path, "gptq:\n  product:\n    bits: [5]\n")
    proc = subprocess.run([sys.executable, "-m", "quantpub", "plan", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("(got 5)")


def test_debug_flag_shows_the_traceback(tmp_path):
    path = _write(tmp_path, "gptq:\n  product:\n    bits: [5]\n")
    with pytest.raises(MatrixError):
        main(["--debug", "plan", str(path)])


def test_explicit_variant_defaults_are_thebloke_main():
    v = GptqVariant(bits=4)
    assert (v.group_size, v.act_order, v.damp, v.sym) == (128, False, 0.01, True)


def test_vllm_matrix_adds_group_aware_act_order_to_thebloke_branches():
    _, specs = load_matrix(MATRICES / "thebloke-vllm.yaml")
    gptq = {s.branch: s.params for s in specs if s.method == "gptq"}
    assert set(gptq) == {b for b, *_ in TULU_BRANCHES} | {"gptq-4bit-32g-actorder_GroupAware"}
    assert gptq["gptq-4bit-32g-actorder_GroupAware"].act_order == "group_aware"
    assert [s.branch for s in specs if s.method == "awq"] == ["main"]
