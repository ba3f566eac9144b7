"""Perplexity and KLD of real quantized tiny variants, each in its own runtime."""

import json
import math
import shutil

import pytest

from quantpub.card import render_run
from quantpub.cli import main
from quantpub.artifacts import MANIFEST
from quantpub.evaluate import evaluate

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
        assert math.isfinite(r.perplexity) and r.kld >= 0, variant
        assert r.runtime == ("llama.cpp" if variant.startswith("gguf-") else "transformers")
        assert r.tokens == 4 * 128 and r.context == 128 and r.tokens_scored == 4 * 127
        assert 0 < r.perplexity_stderr < r.perplexity and 0 <= r.kld_median <= r.kld_p99 <= r.kld_max
        assert 0 < r.top1_agreement <= 1 and -1 < r.delta_p < 1 and len(r.windows_sha256) == 64
        assert r.memory.kind == "RAM" and r.memory.context == 128 and r.memory.bytes > 0
        assert json.loads((out / variant / MANIFEST).read_text())["evaluation"] == r.model_dump(mode="json")


def test_orderings_are_sane(evaluated):
    _, r, _ = evaluated
    kld = {v: x.kld for v, x in r.items()}
    assert kld["gptq-8bit-128g-actorder_False"] < kld["gptq-4bit-128g-actorder_False"]
    assert kld["gptq-8bit--1g-actorder_True"] < kld["gptq-4bit-32g-actorder_True"]
    assert kld["gguf-Q8_0"] < kld["gguf-Q6_K"] < kld["gguf-Q4_K_M"] < kld["gguf-Q2_K"]


def test_rerun_skips_scored_variants_and_cards_show_them(evaluated, capsys):
    out, _, held_out = evaluated
    assert evaluate(out, eval_file=held_out, context=128, windows=4) == {}
    assert main(["evaluate", str(out), "--eval-file", str(held_out), "--context", "128", "--windows", "4",
                 "--only", "gguf-Q4_0", "--force"]) == 0
    assert "gguf-Q4_0: perplexity" in capsys.readouterr().out
    cards = render_run(out)
    charts = [(card.parent / "quality.png").read_bytes() for card in cards]
    for card in cards:
        text = card.read_text()
        assert "| PPL | KLD |" in text and "perplexity (" in text.split("---")[1]
        assert "![Mean KL divergence against file size" in text and "## Which file should I choose?" in text
    assert charts[0].startswith(b"\x89PNG") and len(set(charts)) == 1  # one chart, in every repo
    render_run(out)
    assert (cards[0].parent / "quality.png").read_bytes() == charts[0]  # same numbers, same bytes: no new commit
