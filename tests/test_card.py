"""Cards for tiny models mirroring the five seed models, against reviewed golden files.

The source cards are the seed cards' own text. Manifests are made by the real plan for each
tiny model (sizes are the plan's exact layout estimates, so the golden files do not depend on
a quantization run); the slow end-to-end tests render cards from real builds.

Regenerate after a reviewed change with ``QUANTPUB_UPDATE_GOLDEN=1 pytest tests/test_card.py``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from conftest import typed, FIXTURES, MATRICES
from quantpub.card import quality, render
from quantpub.source.card import read_source
from quantpub.source.prompt import detect
from quantpub.formatting import column_unit, gb, size as format_size
from quantpub.plan import make_plan
from quantpub.backends import backend

SEEDS = FIXTURES / "seeds"
GOLDEN = FIXTURES / "cards"
TOOLS = {"quantpub": "0.1.0", "transformers": "5.23.0", "torch": "2.13.0+cpu"}
TOOLS_BY_METHOD = {"gptq": {**TOOLS, "gptqmodel": "7.6.0", "optimum": "2.3.0"},
                   "awq": {**TOOLS, "gptqmodel": "7.6.0", "optimum": "2.3.0"},
                   "gguf": {**TOOLS, "llama-cpp-python": "0.3.36", "llama.cpp": "0c1e570-dirty"}}
CALIBRATION_SHA = "5" * 64
CONFIGS = {  # tiny configs mirroring the seeds (dimensions as tiny.py builds them)
    "llama": {"model_type": "llama", "max_position_embeddings": 2048},
    "llama-16k": {"model_type": "llama", "max_position_embeddings": 16384,
                  "rope_scaling": {"type": "linear", "factor": 4.0}},
    "mistral": {"model_type": "mistral", "max_position_embeddings": 32768, "num_key_value_heads": 2,
                "sliding_window": 4096},
    "mixtral": {"model_type": "mixtral", "max_position_embeddings": 32768, "num_key_value_heads": 2,
                "num_local_experts": 4, "num_experts_per_tok": 2},
}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def seed_text(name: str) -> str:
    return (SEEDS / name).read_text()


def tulu_source_card() -> str:
    """The original Tulu card, as TheBloke's GPTQ card appends it."""
    return seed_text("003_86645f53f1b80d4e.clean.md").split("# Original model card: Allen AI's Tulu 7B", 1)[1]


# name -> (tiny shape, source card, chat template, base_model, card settings)
CASES = {
    "tulu-7b": ("llama", tulu_source_card, None, "allenai/tulu-7b",
                {"model_name": "Tulu 7B", "model_creator": "Allen Institute for AI"}),
    "jackalope-7b": ("mistral", lambda: seed_text("000_2c7f97e0a6efad9e.txt"), CHATML, "openaccess-ai-collective/jackalope-7b", {}),
    "orca_mini_13b": ("llama", lambda: seed_text("001_0eacc3eca7260dce.txt"), None, "psmathur/orca_mini_13b", {}),
    "LlongOrca-7B-16k": ("llama-16k", lambda: seed_text("002_021eb4a6198ad36c.txt"), None, "Open-Orca/LlongOrca-7B-16k", {}),
    "bagel-dpo-8x7b-v0.2": ("mixtral", lambda: seed_text("004_07ac46167ab3f586.txt"), None, "jondurbin/bagel-dpo-8x7b-v0.2", {}),
}


def source_dir(tmp: Path, name: str) -> Path:
    shape, card, chat_template, _, _ = CASES[name]
    d = tmp / name
    d.mkdir(parents=True)
    config = {"architectures": ["X"], "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 1024, "tie_word_embeddings": False, **CONFIGS[shape]}
    (d / "config.json").write_text(json.dumps(config))
    (d / "README.md").write_text(card())
    if chat_template:
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return d


def manifests_for(model: Path) -> list[dict]:
    """What the worker records, with the plan's sizes: calibration, files, tools, the GGUF imatrix file."""
    plan = make_plan(MATRICES / "thebloke.yaml", str(model), device="cpu")
    out = []
    for job in plan.jobs:
        calib = None
        if job.variant.calibration is not None:
            calib = {"source": "wikitext/wikitext-2-raw-v1:train", "dataset": "wikitext", "config": "wikitext-2-raw-v1",
                     "split": "train", "file": None, "n_samples": job.n_samples, "seq_len": job.seq_len,
                     "source_tokens": 2_000_000, "seed": 0, "sha256": CALIBRATION_SHA}
        files = {job.target: {"size": job.size, "sha256": "0" * 64}} if job.method == "gguf" else \
            {"model.safetensors": {"size": job.size, "sha256": "0" * 64}}
        manifest = {"variant": job.id, "method": job.method, "branch": job.variant.branch, "repo": job.repo,
                    "parameters": backend(job.method).parameters(job), "calibration": calib, "files": files, "size": job.size,
                    "tools": TOOLS_BY_METHOD[job.method], "model": str(model)}
        if job.method == "gguf" and calib:
            name = f"{model.name}.imatrix"
            files[name] = {"size": 12345, "sha256": "1" * 64}
            manifest["imatrix"] = {"file": name, "tensors": 14, "samples": job.n_samples, "datasets": [
                f"wikitext/wikitext-2-raw-v1:train: {job.n_samples} samples of {job.seq_len} tokens "
                f"(seed 0, sha256 {CALIBRATION_SHA})"]}
        out.append(manifest)
    return out


def render_all(tmp: Path, name: str) -> dict[str, str]:
    model = source_dir(tmp, name)
    _, _, _, base_model, settings = CASES[name]
    source = read_source(str(model), {"base_model": base_model, **settings})
    manifests = manifests_for(model)
    by_repo: dict[str, list[dict]] = {}
    for m in manifests:
        by_repo.setdefault(m["repo"], []).append(m)
    return {m[0]["method"].upper(): render(m[0]["method"], repo, typed(m), source, repos=sorted(by_repo))
            for repo, m in by_repo.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_cards_match_reviewed_golden_files(name, tmp_path):
    cards = render_all(tmp_path, name)
    assert set(cards) == {"GPTQ", "AWQ", "GGUF"}
    for kind, text in cards.items():
        golden = GOLDEN / name / f"{kind}.md"
        if os.environ.get("QUANTPUB_UPDATE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(text)
        assert text == golden.read_text(), f"{name} {kind} card differs from {golden}"


@pytest.mark.parametrize("name", list(CASES))
def test_front_matter_parses_and_validates_with_huggingface_hub(name, tmp_path):
    for kind, text in render_all(tmp_path, name).items():
        card = ModelCard(text)  # parses the YAML and builds ModelCardData; raises on invalid metadata
        data = card.data.to_dict()
        assert data["base_model"] == CASES[name][3] and data["base_model_relation"] == "quantized"
        assert data["inference"] is False and data["pipeline_tag"] == "text-generation"
        assert kind.lower() in data["tags"] and data["quantized_by"] == "quantpub"
        assert data["model_type"] == CONFIGS[CASES[name][0]]["model_type"]
        assert "# Original model card:" in card.text and not card.text.lstrip().startswith("---")
        original_meta = yaml.safe_load(re.match(r"---\n(.*?)\n---", CASES[name][1](), re.S).group(1)) \
            if CASES[name][1]().startswith("---") else {}
        for key in ("license", "datasets", "language"):
            if original_meta.get(key):
                assert data[key] == original_meta[key], (kind, key)


def test_gptq_card_has_every_section_of_the_tulu_card_in_order(tmp_path):
    seed = seed_text("003_86645f53f1b80d4e.clean.md")
    seed = seed.split("# Original model card:")[0]
    wanted = [s for s in re.findall(r"<!-- (\S+) start -->", seed) if s not in ("header", "footer")]
    assert len(wanted) == 8
    text = render_all(tmp_path, "tulu-7b")["GPTQ"]
    ours = text.split("# Original model card:")[0]  # the appended original card has TheBloke's own markers
    markers = re.findall(r"<!-- (\S+) start -->", ours)
    assert [m for m in markers if not m.startswith("quantpub-")] == wanted  # quantpub's own sections added
    assert [m for m in markers if m.startswith("quantpub-")] == ["quantpub-provenance"]  # nothing measured
    assert text.index("<!-- README_GPTQ.md-compatibility end -->") < text.index(
        "# Original model card: Allen Institute for AI's Tulu 7B")


def test_gptq_table_rows_follow_the_tulu_card(tmp_path):
    text = render_all(tmp_path, "tulu-7b")["GPTQ"]
    rows = [r for r in text.splitlines() if r.startswith("| [")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[0].split("]")[0][1:] for c in cells] == [  # the card's order (the matrix's)
        "main", "gptq-4bit-32g-actorder_True", "gptq-4bit-64g-actorder_True", "gptq-4bit-128g-actorder_True",
        "gptq-8bit--1g-actorder_True", "gptq-8bit-128g-actorder_False"]
    by_branch = {c[0].split("]")[0][1:]: c for c in cells}
    assert by_branch["gptq-4bit-32g-actorder_True"][1:5] == ["4", "32", "Yes", "0.01"]
    assert by_branch["gptq-4bit-32g-actorder_True"][9].endswith("Gives highest possible inference quality, "
                                                                 "with maximum VRAM usage.")
    assert by_branch["gptq-8bit--1g-actorder_True"][2] == "None" and by_branch["gptq-8bit--1g-actorder_True"][8] == "No"
    assert by_branch["main"][8] == "Yes, untested"  # 4-bit llama: ExLlama's format, but no GPU ran it
    assert {c[10] for c in cells} == {"not tested"}  # no compatibility results in these manifests
    assert "PPL" not in text  # no evaluation recorded: the column is absent, not zero


def test_mixtral_gptq_is_not_exllama(tmp_path):
    rows = [r for r in render_all(tmp_path, "bagel-dpo-8x7b-v0.2")["GPTQ"].splitlines() if r.startswith("| [")]
    assert all(r.split("|")[9].strip() == "No" for r in rows)


def test_prompt_templates_are_detected_per_seed(tmp_path):
    found = {}
    for name in CASES:
        _, _, _, base_model, settings = CASES[name]
        found[name] = read_source(str(source_dir(tmp_path, name)), {"base_model": base_model, **settings}).prompt
    assert (found["tulu-7b"].name, found["tulu-7b"].source) == ("Tulu", "model card")
    assert (found["jackalope-7b"].name, found["jackalope-7b"].source) == ("ChatML", "chat_template")
    assert found["jackalope-7b"].template == ("<|im_start|>system\n{system_message}<|im_end|>\n<|im_start|>user\n"
                                              "{prompt}<|im_end|>\n<|im_start|>assistant\n")
    assert (found["orca_mini_13b"].name, found["orca_mini_13b"].source) == ("Orca-Hashes", "model card")
    assert "### User:\n{prompt}" in found["orca_mini_13b"].template
    assert found["bagel-dpo-8x7b-v0.2"].alternatives  # documents several formats: the card says so


def test_unknown_prompt_is_said_and_the_override_wins(tmp_path):
    assert detect(override=None, chat_template=None, card_text="A model. No format here.").name == "Unknown"
    override = detect(override="Q: {prompt}\nA:", chat_template=CHATML, card_text=None)
    assert (override.template, override.source) == ("Q: {prompt}\nA:", "matrix")
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["X"], "hidden_size": 256,
                                               "intermediate_size": 512, "num_hidden_layers": 2,
                                               "num_attention_heads": 4, "vocab_size": 1024,
                                               **CONFIGS["llama"]}))
    (d / "README.md").write_text("# A model\nNo format documented.\n")
    plan = make_plan(MATRICES / "thebloke-gptq.yaml", str(d), device="cpu")
    assert any("prompt template" in n for n in plan.notes)
    source = read_source(str(d), {})
    card = render("gptq", "quantpub/m-GPTQ", typed(manifests_for(d)[:1]), source, repos=["quantpub/m-GPTQ"])
    assert "## Prompt template: Unknown" in card and "prompt_template" not in card.split("---")[1]


def evaluation(size: int, index: int = 0, *, memory: bool = True) -> dict:
    """A measured record as evaluate() writes it: numbers fixed by the size (and index, so that
    variants of one size differ)."""
    kld = round(2e8 / size ** 1.5 * (1 + index / 997), 9)
    record = {"perplexity": 7.0 + 40 * kld, "perplexity_stderr": 0.0513, "kld": kld, "kld_stderr": kld / 50,
              "kld_median": kld * 0.8, "kld_p99": kld * 6.5, "kld_max": kld * 31.0, "top1_agreement": 1 - kld * 2,
              "top1_agreement_stderr": 0.002, "delta_p": -kld / 3, "delta_p_stderr": 0.0004, "tokens_scored": 4088,
              "dataset": "wikitext", "dataset_name": "wikitext-2-raw-v1", "split": "test", "tokens": 4096,
              "windows": 8, "windows_sha256": "a" * 64, "context": 512, "stride": 512,
              "reference_perplexity": 7.0001, "reference_perplexity_stderr": 0.0511, "runtime": "transformers"}
    record["memory"] = {"bytes": int(size * 1.2 + 3e8), "kind": "RAM", "context": 512, "runtime": "llama.cpp",
                        "device": "cpu", "how": "VmHWM"} if memory else None
    return record


def render_family(tmp_path: Path, manifests: list[dict], name: str = "tulu-7b") -> dict[str, str]:
    model = tmp_path / name
    source = read_source(str(model), {"base_model": "allenai/tulu-7b"})
    by_repo: dict[str, list[dict]] = {}
    for m in manifests:
        by_repo.setdefault(m["repo"], []).append(m)
    return {ms[0]["method"].upper(): render(ms[0]["method"], repo, typed(ms), source, repos=sorted(by_repo), family=typed(manifests),
                                            chart="quality.png") for repo, ms in by_repo.items()}


def section(text: str, marker: str) -> str:
    return text.split(f"<!-- {marker} start -->")[1].split(f"<!-- {marker} end -->")[0]


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| -") and "---" not in line]


def test_measured_quality_appears_in_tables_chart_and_model_index(tmp_path):
    manifests = manifests_for(source_dir(tmp_path, "tulu-7b"))
    for i, m in enumerate(manifests):
        m["evaluation"] = evaluation(m["size"], i)
    cards = render_family(tmp_path, manifests)
    gptq, gguf = cards["GPTQ"], cards["GGUF"]
    assert "| PPL | KLD | Memory |" in gptq and "![Mean KL divergence against file size" in gptq
    for text in cards.values():  # every card compares all 19 files, across formats
        assert len(table_rows(section(text, "quantpub-quality"))) == 1 + 19
    main = next(m for m in manifests if m.get("branch") == "main" and m["method"] == "gptq")
    data = ModelCard(gptq).data
    assert [r.metric_value for r in data.eval_results][:2] == [float(f"{main['evaluation']['perplexity']:.6g}"),
                                                             float(f"{main['evaluation']['kld']:.6g}")]
    q8 = next(r for r in table_rows(gguf.split("<!-- README_GGUF.md-provided-files end -->")[0]) if "Q8_0" in r[0])
    assert q8[4] != "-" and "(rule)" not in q8[4] and q8[5].startswith("KLD rank ")
    assert "RAM figures were measured" in gguf and "RAM figures marked (rule)" not in gguf


def rounded(cell: str, value: float) -> bool:
    """The cell is ``value`` printed to some number of significant digits."""
    return cell in {quality.fmt(value, n) for n in range(1, 8)}


@pytest.mark.parametrize("kind", ["GPTQ", "GGUF"])
def test_evaluated_cards_match_reviewed_golden_files(kind, tmp_path):
    manifests = manifests_for(source_dir(tmp_path, "tulu-7b"))
    for i, m in enumerate(manifests):
        m["evaluation"] = evaluation(m["size"], i)
    text = render_family(tmp_path, manifests)[kind]
    golden = GOLDEN / "tulu-7b" / f"{kind}-evaluated.md"
    if os.environ.get("QUANTPUB_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"evaluated {kind} card differs from {golden}"


def test_every_number_in_the_comparison_table_is_a_manifest_field(tmp_path):
    manifests = manifests_for(source_dir(tmp_path, "tulu-7b"))
    for i, m in enumerate(manifests):
        m["evaluation"] = evaluation(m["size"], i)
    text = render_family(tmp_path, manifests)["AWQ"]
    rows = table_rows(section(text, "quantpub-quality"))[1:]
    klds = []
    units = {row[-1].split()[1] for row in rows}
    assert len(units) == 1, f"the memory column mixes units: {units}"
    unit = column_unit(m["evaluation"]["memory"]["bytes"] for m in manifests)
    for kind, link, size, bpw, ppl, kld, median, p99, kmax, top1, delta_p, memory in rows:
        label = link.split("]")[0][1:]
        m = next(x for x in manifests if x["method"].upper() == kind and
                 (x.get("branch") == label or label in x["files"]
                  or x.get("branch") == "main" and x["repo"].endswith(f"/{label}")))
        ev = m["evaluation"]
        assert size == gb(m["size"]) and memory == f"{format_size(ev['memory']['bytes'], unit)} RAM"
        for cell, field in ((ppl, "perplexity"), (kld, "kld")):
            value, err = cell.split(" ± ")
            assert rounded(value, ev[field]) and rounded(err, ev[f"{field}_stderr"])
        for cell, field in ((median, "kld_median"), (p99, "kld_p99"), (kmax, "kld_max")):
            assert rounded(cell, ev[field])
        assert float(top1.rstrip("%")) == pytest.approx(100 * ev["top1_agreement"], abs=0.006)
        assert float(delta_p.rstrip("%")) == pytest.approx(100 * ev["delta_p"], abs=0.0006)
        klds.append(kld.split(" ± ")[0])
    assert len(set(klds)) == len(klds) == 19  # every variant's KLD prints differently
    assert [float(k) for k in klds] == sorted(float(k) for k in klds)  # lowest KLD first


def test_which_file_picks_follow_the_table(tmp_path):
    manifests = manifests_for(source_dir(tmp_path, "tulu-7b"))
    for i, m in enumerate(manifests):
        m["evaluation"] = evaluation(m["size"], i)
    text = render_family(tmp_path, manifests)["GGUF"]
    pts = quality.points(typed(manifests), "https://huggingface.co")
    picks = table_rows(section(text, "quantpub-which-file"))
    kld_rows = [r for r in picks if r[0] in ("0.01", "0.05", "0.1")]
    for limit, anyformat, own in kld_rows:
        best = min((p for p in pts if p.kld <= float(limit)), key=lambda p: p.size, default=None)
        assert anyformat == "none this close" if best is None else anyformat.startswith(f"[{best.label}]")
        mine = min((p for p in pts if p.kld <= float(limit) and p.kind == "GGUF"), key=lambda p: p.size, default=None)
        assert own == "none this close" if mine is None else own.startswith(f"[{mine.label}]")
    budget_rows = [r for r in picks if r[0].endswith(("GiB", "GiB or more"))]
    assert [r[0] for r in budget_rows] == ["8 GiB or more"]  # every file of a tiny model fits: one row
    best = min(pts, key=lambda p: p.kld)
    assert budget_rows[0][1].startswith(f"[{best.label}]")


def test_no_placeholder_reaches_a_card_with_every_optional_fact_missing(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["X"], "hidden_size": 256, "intermediate_size": 512,
                                               "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1024,
                                               **CONFIGS["llama"]}))
    source = read_source(str(d), {})  # no card, no creator, no hub id, no prompt format
    manifests = manifests_for(d)
    partial = evaluation(10**6)
    for key in ("perplexity_stderr", "kld_stderr", "kld_median", "kld_p99", "kld_max", "top1_agreement",
                "delta_p", "windows", "split", "reference_perplexity", "reference_perplexity_stderr", "memory"):
        partial.pop(key)
    for i, m in enumerate(manifests):
        m["calibration"] = None if m["method"] == "gguf" else {"source": "/data/calib.txt", "n_samples": 8,
                                                                "seq_len": 128}
        m["tools"] = {k: v for k, v in m["tools"].items() if k != "llama.cpp"}
        m.pop("imatrix", None)
        if i % 2:
            m["evaluation"] = dict(partial, kld=partial["kld"] * (1 + i))
    by_repo: dict[str, list[dict]] = {}
    for m in manifests:
        by_repo.setdefault(m["repo"], []).append(m)
    for quantized_by in (None, "quantpub"):
        for repo, ms in by_repo.items():
            for family in (None, manifests):
                text = render(ms[0]["method"], repo, typed(ms), source, repos=sorted(by_repo), family=typed(family),
                              quantized_by=quantized_by)
                allowed = text.replace("| None |", "|").replace('"None" is the lowest possible value', "")
                for placeholder in ("None", "null", "{{", "}}", "nan", "NaN", "undefined"):
                    assert not re.search(rf"(?<![\w]){re.escape(placeholder)}(?![\w])", allowed), \
                        (repo, placeholder, quantized_by)


def test_measurements_missing_are_not_invented(tmp_path):
    manifests = manifests_for(source_dir(tmp_path, "tulu-7b"))
    measured = {"main", "gguf-Q4_K_M"}
    for m in manifests:
        if m.get("branch") in measured and m["method"] == "gptq" or m["variant"] in measured:
            m["evaluation"] = evaluation(m["size"], memory=m["method"] == "gguf")
    cards = render_family(tmp_path, manifests)
    rows = table_rows(section(cards["GGUF"], "quantpub-quality"))[1:]
    assert [(r[0], r[1].split("]")[0][1:]) for r in rows] == [("GPTQ", "tulu-7b-GPTQ"), ("GGUF", "tulu-7b.Q4_K_M.gguf")][
        ::(1 if rows[0][0] == "GPTQ" else -1)]
    assert {r[11] for r in rows if r[0] == "GPTQ"} == {"-"}  # its memory was not measured: not shown
    provided = cards["GGUF"].split("<!-- README_GGUF.md-provided-files end -->")[0]
    gguf_rows = table_rows(provided)[1:]
    assert sum("(rule)" in r[4] for r in gguf_rows) == 11 and "RAM figures marked (rule)" in provided
    assert all(r[6:] == ["-", "-"] for r in gguf_rows if "Q4_K_M" not in r[0])
    memory = section(cards["GGUF"], "quantpub-which-file").split("within a memory budget")[1]
    assert "tulu-7b.Q4_K_M.gguf" in memory and "[tulu-7b-GPTQ]" not in memory  # only measured memory is used
    awq = cards["AWQ"]
    assert "| PPL |" not in awq.split("<!-- README_AWQ.md-provided-files end -->")[0]  # AWQ itself not measured
    assert "quantpub-quality" in awq  # but the family comparison is there


def test_pick_rules_on_fixed_numbers():
    def point(name, size, kld, memory=None):
        from quantpub.manifest import Evaluation

        ev = Evaluation(kld=kld, perplexity=1.0, memory={"bytes": memory, "kind": "RAM"} if memory else None)
        kind = "GGUF" if name.startswith("Q") else "GPTQ"
        return quality.Point(name, kind, f"ns/m-{kind}", name, "u", size, kld, ev)

    gib = quality.GIB
    pts = [point("Q8_0", 8 * gib, 0.001, 9 * gib), point("Q6_K", 6 * gib, 0.004, 7 * gib),
           point("Q4_K_M", 4 * gib, 0.03, 5 * gib), point("Q2_K", 3 * gib, 0.3, 4 * gib),
           point("main", 4 * gib, 0.02), point("Q3_K_M", 3.5 * gib, 0.08, 4.5 * gib)]
    assert quality.smallest_within(pts, 0.01).name if False else quality.smallest_within(pts, 0.01).variant == "Q6_K"
    assert quality.smallest_within(pts, 0.05).variant == "main"  # 4 GiB; ties on size go to the lower KLD
    assert quality.smallest_within(pts, 0.1).variant == "Q3_K_M"
    assert quality.smallest_within(pts, 0.0001) is None
    assert quality.best_within(pts, 8 * gib).variant == "Q6_K"  # Q8_0 needs 9 GiB; main's memory is unknown
    assert quality.best_within(pts, 12 * gib).variant == "Q8_0"
    assert quality.best_within(pts, 4 * gib).variant == "Q2_K"
    assert quality.best_within(pts, 3 * gib) is None
    chosen = quality.picks(pts, "ns/m-GPTQ")
    assert [r["own"] and r["own"].variant for r in chosen["kld"]] == ["", "main", "main"][:0] + [None, "main", "main"]
    assert quality.ranks(sorted(pts, key=lambda p: p.kld))["Q8_0"] == 1


def test_budget_rows_with_the_same_picks_are_merged():
    rows = [{"budget": b, "any": a, "own": o} for b, a, o in ((8, "x", "y"), (12, "x", "y"), (16, "z", "y"),
                                                                 (24, "w", "y"))]
    assert [r["budget"] for r in quality._merge_budgets(rows)] == ["8 to 12 GiB", "16 GiB", "24 GiB"]
    assert [r["budget"] for r in quality._merge_budgets(rows[2:] + rows[3:])] == ["16 GiB", "24 GiB or more"]


def test_significant_digits_tell_values_apart():
    assert quality.significant([0.0123, 0.0456]) == 3
    assert quality.significant([0.012341, 0.012346]) == 4
    assert quality.significant([0.0123441, 0.0123446]) == 5
    assert quality.significant([1.8e-05, 1.8e-05]) == 3  # equal values need not differ
    assert [quality.fmt(v, quality.significant([0.00001797, 0.0000179])) for v in (0.00001797, 0.0000179)] == [
        "1.80e-05", "1.79e-05"]  # not 0.0000 (issue 14)
    assert [quality.fmt(v, quality.significant([0.0700, 0.0701])) for v in (0.0700, 0.0701)] == ["0.0700", "0.0701"]


def test_gptq_card_tells_cpu_only_users_what_transformers_4_needs(tmp_path):
    card = render_all(tmp_path, "tulu-7b")["GPTQ"]
    section = card.split("### On a machine without a GPU", 1)[1].split("<!-- README_GPTQ.md-use-from-python end -->")[0]
    assert "Found modules on cpu/disk" in section
    assert 'quantization_config=GPTQConfig(bits=4, use_exllama=False)' in section and 'revision="main"' in section
