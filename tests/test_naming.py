import pytest

from quantpub import naming
from quantpub.naming import GptqNameParts


@pytest.mark.parametrize("bits, group, act, expected", [
    # the six branches of TheBloke's Tulu 7B GPTQ card
    (4, 128, False, "gptq-4bit-128g-actorder_False"),
    (4, 32, True, "gptq-4bit-32g-actorder_True"),
    (4, 64, True, "gptq-4bit-64g-actorder_True"),
    (4, 128, True, "gptq-4bit-128g-actorder_True"),
    (8, None, True, "gptq-8bit--1g-actorder_True"),
    (8, 128, False, "gptq-8bit-128g-actorder_False"),
    (3, 32, True, "gptq-3bit-32g-actorder_True"),
    (2, None, False, "gptq-2bit--1g-actorder_False"),
    # GPTQModel's group-aware act order (desc_act false): a name TheBloke never used
    (4, 32, "group_aware", "gptq-4bit-32g-actorder_GroupAware"),
    (4, 128, "group_aware", "gptq-4bit-128g-actorder_GroupAware"),
])
def test_gptq_base_name(bits, group, act, expected):
    assert naming.gptq_base_name(bits, group, act) == expected


def test_main_variant_is_published_on_main():
    assert naming.gptq_branch("gptq-4bit-128g-actorder_False", is_main=True) == "main"
    assert naming.gptq_branch("gptq-4bit-32g-actorder_True", is_main=False) == "gptq-4bit-32g-actorder_True"


@pytest.mark.parametrize("parts, expected", [
    # no collision: plain names, even for non-default damp
    ([GptqNameParts(4, 32, True, damp=0.1)], ["gptq-4bit-32g-actorder_True"]),
    # collision on damp: the default keeps the plain name, the other is suffixed
    ([GptqNameParts(4, 32, True), GptqNameParts(4, 32, True, damp=0.1)],
     ["gptq-4bit-32g-actorder_True", "gptq-4bit-32g-actorder_True-damp0.1"]),
    # collision on dataset and sequence length
    ([GptqNameParts(4, 128, False), GptqNameParts(4, 128, False, dataset="allenai/c4"),
      GptqNameParts(4, 128, False, seq_len=4096)],
     ["gptq-4bit-128g-actorder_False", "gptq-4bit-128g-actorder_False-allenai-c4",
      "gptq-4bit-128g-actorder_False-seq4096"]),
    # several differing parameters: suffixes in the documented order
    ([GptqNameParts(8, None, True), GptqNameParts(8, None, True, damp=0.05, sym=False, dataset="c4")],
     ["gptq-8bit--1g-actorder_True", "gptq-8bit--1g-actorder_True-damp0.05-asym-c4"]),
    # true duplicates stay equal; the matrix rejects them
    ([GptqNameParts(4, 64, True), GptqNameParts(4, 64, True)],
     ["gptq-4bit-64g-actorder_True", "gptq-4bit-64g-actorder_True"]),
])
def test_gptq_variant_ids_disambiguate(parts, expected):
    assert naming.gptq_variant_ids(parts) == expected


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M",
                                   "Q5_0", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"])
def test_gguf_filename(qtype):
    assert naming.gguf_filename("tulu-7b", qtype) == f"tulu-7b.{qtype}.gguf"
    assert naming.gguf_variant_id(qtype) == f"gguf-{qtype}"


def test_gguf_split_filename_uses_llama_cpp_split_suffix():
    assert naming.gguf_split_filename("bagel-dpo-8x7b", "Q8_0", 1, 2) == "bagel-dpo-8x7b.Q8_0-00001-of-00002.gguf"
    assert naming.gguf_split_filename("m", "Q6_K", 12, 12) == "m.Q6_K-00012-of-00012.gguf"
    with pytest.raises(ValueError):
        naming.gguf_split_filename("m", "Q6_K", 0, 2)


@pytest.mark.parametrize("args, expected", [
    ((4, 128, True, "GEMM"), "awq-4bit-128g-GEMM"),
    ((4, 64, True, "gemv"), "awq-4bit-64g-GEMV"),
    ((4, 128, False, "GEMM"), "awq-4bit-128g-GEMM-nozp"),
])
def test_awq_variant_id(args, expected):
    assert naming.awq_variant_id(*args) == expected


@pytest.mark.parametrize("model, expected", [
    ("allenai/tulu-7b", "tulu-7b"),
    ("/models/LlongOrca-7B-16k/", "LlongOrca-7B-16k"),
    ("jondurbin/bagel-dpo-8x7b-v0.2", "bagel-dpo-8x7b-v0.2"),
    ("local-dir", "local-dir"),
])
def test_model_basename(model, expected):
    assert naming.model_basename(model) == expected


def test_repo_id():
    assert naming.repo_id("TheBloke", "{model_name}-GPTQ", "tulu-7B") == "TheBloke/tulu-7B-GPTQ"


@pytest.mark.parametrize("value, text", [(0.01, "0.01"), (0.1, "0.1"), (0.05, "0.05"), (0.5, "0.5")])
def test_format_number(value, text):
    assert naming.format_number(value) == text


@pytest.mark.parametrize("name, ok", [
    ("gptq-8bit--1g-actorder_True", True), ("main", True), ("a..b", False), ("-x", False),
    ("x y", False), ("x/y", False), ("x.lock", False), ("", False),
])
def test_is_valid_branch(name, ok):
    assert naming.is_valid_branch(name) is ok


def test_gguf_file_templates_and_stems():
    assert naming.gguf_filename("Qwen2.5-0.5B", "Q4_K_L", "{model_name}-{type}.gguf") == "Qwen2.5-0.5B-Q4_K_L.gguf"
    assert naming.gguf_stem("Qwen2.5-0.5B.Q4_K_M-00002-of-00003.gguf") == "Qwen2.5-0.5B.Q4_K_M"
    assert naming.gguf_stem("Qwen2.5-0.5B.Q4_K_M.gguf") == "Qwen2.5-0.5B.Q4_K_M"
    assert naming.imatrix_filename("tulu-7b") == "tulu-7b.imatrix"


def test_group_aware_names_never_collide_with_thebloke_names():
    thebloke = {naming.gptq_base_name(b, g, a) for b in (2, 3, 4, 8) for g in (32, 64, 128, None) for a in (True, False)}
    aware = {naming.gptq_base_name(b, g, "group_aware") for b in (2, 3, 4, 8) for g in (32, 64, 128)}
    assert len(aware) == 12 and not aware & thebloke
