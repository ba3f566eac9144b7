"""The evaluation statistics on fixed numbers (llama-perplexity's definitions) and the memory probe."""

import math

import numpy as np
import pytest

from quantpub.evaluate import summarize, token_stats
from quantpub.memory import peak_memory


def log_probs(rows):
    p = np.asarray(rows, dtype=np.float64)
    return np.log(p / p.sum(-1, keepdims=True))


def test_token_statistics_follow_llama_perplexity():
    ref = log_probs([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])
    var = log_probs([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.25, 0.25, 0.5]])
    targets = np.array([0, 1, 2])
    stats = token_stats(var, targets, ref)
    expected_kld = [sum(math.exp(r) * (r - v) for r, v in zip(ref[i], var[i])) for i in range(3)]
    assert stats["kld"] == pytest.approx(expected_kld)
    assert stats["kld"][2] == pytest.approx(0, abs=1e-12)
    assert stats["same_top"].tolist() == [1.0, 0.0, 1.0]  # token 1 vs token 2 on top in the second row
    assert stats["delta_p"] == pytest.approx([0.6 - 0.7, 0.3 - 0.6, 0.0])
    assert stats["nll"] == pytest.approx([-math.log(0.6), -math.log(0.3), -math.log(0.5)])


def test_summary_means_errors_and_percentiles():
    rng = np.random.default_rng(0)
    kld = rng.exponential(0.01, 1000)
    nll = rng.normal(2.0, 0.5, 1000)
    same = (rng.random(1000) < 0.9).astype(float)
    dp = rng.normal(-0.01, 0.05, 1000)
    s = summarize({"nll": nll, "kld": kld, "same_top": same, "delta_p": dp})
    assert s["tokens_scored"] == 1000
    assert s["perplexity"] == pytest.approx(math.exp(nll.mean()))
    # llama.cpp: PPL error by the delta method, exp(mean) * stderr(nll)
    assert s["perplexity_stderr"] == pytest.approx(math.exp(nll.mean()) * nll.std(ddof=1) / math.sqrt(1000))
    assert s["kld"] == pytest.approx(kld.mean()) and s["kld_stderr"] == pytest.approx(kld.std(ddof=1) / math.sqrt(1000))
    ordered = np.sort(kld)
    assert s["kld_median"] == pytest.approx((ordered[499] + ordered[500]) / 2)
    p = 0.99 * 999  # linear interpolation between neighbours, as llama.cpp's percentile()
    assert s["kld_p99"] == pytest.approx(ordered[int(p)] * (1 - p % 1) + ordered[int(p) + 1] * (p % 1))
    assert s["kld_max"] == ordered[-1]
    assert s["top1_agreement"] == pytest.approx(same.mean()) and s["delta_p"] == pytest.approx(dp.mean())


def test_float16_reference_never_gives_negative_kld():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (64, 5000))
    exact = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    cached = exact.astype(np.float16).astype(np.float64)  # how the reference is stored
    stats = token_stats(exact, np.zeros(64, dtype=int), cached)
    assert (stats["kld"] >= 0).all() and stats["kld"].max() < 1e-5  # the same model: ~0, not below


def test_peak_memory_sees_an_allocation_that_is_freed_again():
    with peak_memory("cpu") as measured:
        block = np.ones(200_000_000 // 8)
        del block
    if not measured:
        pytest.skip("this platform cannot reset the resident-memory peak (no /proc/self/clear_refs)")
    assert measured["kind"] == "RAM" and 190e6 < measured["bytes"] < 260e6
    with peak_memory("cpu") as nothing:
        pass
    assert nothing["bytes"] < 20e6
