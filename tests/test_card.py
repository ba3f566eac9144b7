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

from conftest import FIXTURES, MATRICES
from quantpub.card import read_source, render
from quantpub.card.prompt import detect
from quantpub.plan import make_plan
from quantpub.worker import _parameters

SEEDS = FIXTURES / "seeds"
GOLDEN = FIXTURES / "cards"
TOOLS = {"quantpub": "0.1.0", "transformers": "5.23.0", "torch": "2.13.0+cpu", "gptqmodel": "7.6.0",
         "optimum": "2.3.0", "llama-cpp-python": "0.3.36"}
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
    plan = make_plan(MATRICES / "thebloke.yaml", str(model), device="cpu")
    out = []
    for job in plan.jobs:
        calib = None
        if job.variant.calibration is not None:
            calib = {"source": "wikitext/wikitext-2-raw-v1:train", "n_samples": job.n_samples, "seq_len": job.seq_len}
        files = {job.target: {"size": job.size, "sha256": "0" * 64}} if job.method == "gguf" else \
            {"model.safetensors": {"size": job.size, "sha256": "0" * 64}}
        out.append({"variant": job.id, "method": job.method, "branch": job.variant.branch, "repo": job.repo,
                    "parameters": _parameters(job), "calibration": calib, "files": files, "size": job.size,
                    "tools": TOOLS, "model": str(model)})
    return out


def render_all(tmp: Path, name: str) -> dict[str, str]:
    model = source_dir(tmp, name)
    _, _, _, base_model, settings = CASES[name]
    source = read_source(str(model), {"base_model": base_model, **settings})
    manifests = manifests_for(model)
    by_repo: dict[str, list[dict]] = {}
    for m in manifests:
        by_repo.setdefault(m["repo"], []).append(m)
    return {m[0]["method"].upper(): render(m[0]["method"], repo, m, source, repos=sorted(by_repo))
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
    assert re.findall(r"<!-- (\S+) start -->", ours) == wanted
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
    card = render("gptq", "quantpub/m-GPTQ", manifests_for(d)[:1], source, repos=["quantpub/m-GPTQ"])
    assert "## Prompt template: Unknown" in card and "prompt_template" not in card.split("---")[1]


def test_measured_quality_appears_in_table_and_model_index(tmp_path):
    model = source_dir(tmp_path, "tulu-7b")
    manifests = [m for m in manifests_for(model) if m["method"] == "gptq"]
    manifests[0]["evaluation"] = {"perplexity": 7.1234, "kld": 0.0123, "reference_perplexity": 7.0001,
                                  "dataset": "wikitext", "dataset_name": "wikitext-2-raw-v1", "split": "test",
                                  "tokens": 4096, "context": 512, "stride": 512}
    source = read_source(str(model), {"base_model": "allenai/tulu-7b"})
    text = render("gptq", manifests[0]["repo"], manifests, source, repos=[manifests[0]["repo"]])
    assert "| PPL | KLD |" in text and "| 7.1234 | 0.0123 |" in text and "7.0001" in text
    data = ModelCard(text).data
    assert [r.metric_value for r in data.eval_results] == [7.1234, 0.0123]
