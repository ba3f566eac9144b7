"""Perplexity and KLD of real quantized tiny variants, each in its own runtime."""

import json
import math
import shutil

import pytest

from quantpub.card import render_run
from quantpub.cli import main
from quantpub.evaluate import MANIFEST, evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(tulu_build, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated") / "out"
    shutil.copytree(tulu_build[0], out)
    held_out = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    held_out.write_text(corpus.read_text()[::-1][:60_000][::-1])  # the corpus' end; calibration sampled windows
    results = evaluate(out, eval_file=held_out, context=128, windows=4)
    return out, results, held_out


def test_every_variant_is_scored_in_its_runtime(evaluated):
    out, results, _ = evaluated
    assert len(results) == 19
    for variant, r in results.items():
        assert math.isfinite(r["perplexity"]) and r["kld"] >= 0, variant
        assert r["runtime"] == ("llama.cpp" if variant.startswith("gguf-") else "transformers")
        assert r["tokens"] == 4 * 128 and r["context"] == 128
        assert json.loads((out / variant / MANIFEST).read_text())["evaluation"] == r


def test_orderings_are_sane(evaluated):
    _, r, _ = evaluated
    kld = {v: x["kld"] for v, x in r.items()}
    assert kld["gptq-8bit-128g-actorder_False"] < kld["gptq-4bit-128g-actorder_False"]
    assert kld["gptq-8bit--1g-actorder_True"] < kld["gptq-4bit-32g-actorder_True"]
    assert kld["gguf-Q8_0"] < kld["gguf-Q6_K"] < kld["gguf-Q4_K_M"] < kld["gguf-Q2_K"]


def test_rerun_skips_scored_variants_and_cards_show_them(evaluated, capsys):
    out, _, held_out = evaluated
    assert evaluate(out, eval_file=held_out, context=128, windows=4) == {}
    assert main(["evaluate", str(out), "--eval-file", str(held_out), "--context", "128", "--windows", "4",
                 "--only", "gguf-Q4_0", "--force"]) == 0
    assert "gguf-Q4_0: perplexity" in capsys.readouterr().out
    for card in render_run(out):
        text = card.read_text()
        assert "| PPL | KLD |" in text and "perplexity (" in text.split("---")[1]
