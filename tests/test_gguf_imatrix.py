"""GGUF as publishers make it in 2026: an importance matrix published beside the files, i-quants,
bartowski's _L variants and llama-quantize's per-tensor overrides, ranked by measured KLD."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from quantpub.artifacts import sha256_file
from quantpub.backends import gguf_files as gguf, llamacpp
from quantpub.evaluate import evaluate
from quantpub.gguf_types import DOCUMENTED_ORDER, GgufVariant
from quantpub.artifacts import MANIFEST
from quantpub.build import build_from_matrix

pytestmark = pytest.mark.slow
# Every type the documentation ranks that llama.cpp makes from a 256-aligned tiny llama, i-quants
# among them, plus an _L variant and a --tensor-type override.
RANKED = ["IQ2_M", "Q2_K", "IQ3_XXS", "Q3_K_S", "IQ3_M", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_0", "Q4_K_S",
          "IQ4_NL", "Q4_K_M", "Q5_0", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]
MATRIX = """\
gguf:
  imatrix: true
  types:
    - {types}
    - {{name: Q4_K_L, type: Q4_K_M, token_embedding_type: Q8_0, output_tensor_type: Q8_0}}
    - {{name: Q4_K_M-attnv8, type: Q4_K_M, tensor_types: ["attn_v=Q8_0", "blk\\\\.0\\\\.ffn_down=q6_k"]}}
"""


@pytest.fixture(scope="module")
def ranked(tiny_models, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranked")
    (root / "m.yaml").write_text(MATRIX.format(types="\n    - ".join(RANKED)))
    text = corpus.read_text()
    (root / "calib.txt").write_text(text[: len(text) * 4 // 5])
    (root / "held-out.txt").write_text(text[len(text) * 4 // 5:])
    model = tiny_models("llama")
    outcomes = build_from_matrix(root / "m.yaml", str(model), root / "out", calibration_file=root / "calib.txt", device="cpu",
                        n_samples=16, seq_len=256)
    results = evaluate(root / "out", model=str(model), eval_file=root / "held-out.txt", context=256, windows=6)
    return root / "out", outcomes, results


def test_every_type_is_built_with_the_imatrix_file_beside_it(ranked):
    out, outcomes, _ = ranked
    assert [o.error for o in outcomes] == [None] * (len(RANKED) + 2)
    inodes = set()
    for o in outcomes:
        manifest = json.loads((o.path / MANIFEST).read_text())
        assert manifest["imatrix"]["file"] == "tiny-llama.imatrix" and manifest["parameters"]["imatrix"]
        assert "tiny-llama.imatrix" in manifest["files"]
        assert manifest["size"] == sum(f["size"] for n, f in manifest["files"].items() if n.endswith(".gguf"))
        assert manifest["tools"]["llama.cpp"] == llamacpp.commit() and manifest["tools"]["llama.cpp"] != "unknown"
        inodes.add(os.stat(o.path / "tiny-llama.imatrix").st_ino)
    assert len(inodes) == 1  # one file on disk, linked into every variant


def test_the_imatrix_file_reproduces_the_published_quantization(ranked, tmp_path):
    """What llama-quantize --imatrix reads from the file gives byte-identical files."""
    out, _, _ = ranked
    meta, values = gguf.read_imatrix(out / "gguf-Q4_K_M" / "tiny-llama.imatrix")
    assert meta["general.type"] == "imatrix" and meta["imatrix.chunk_count"] == 16
    assert meta["imatrix.chunk_size"] == 256 and "calib.txt (local file): 16 samples of 256 tokens" in \
        meta["imatrix.datasets"][0]
    assert len(values) == 2 * 7 and all(np.isfinite(v).all() and (v > 0).all() for v in values.values())
    f16 = tmp_path / "tiny-llama.F16.gguf"
    manifest = json.loads((out / "gguf-Q4_K_M" / MANIFEST).read_text())
    published_meta, _ = gguf.read([out / "gguf-Q4_K_M" / "tiny-llama.Q4_K_M.gguf"])
    general = {k: published_meta[k] for k in ("general.name", "general.quantized_by", "general.repo_url",
                                               "general.url")}
    llamacpp.convert(Path(manifest["model"]), f16, "f16", general)  # the run's converter call, metadata included
    # the quantize.imatrix.* keys llama-quantize --imatrix tiny-llama.imatrix writes from that file
    kv = {"quantize.imatrix.file": "tiny-llama.imatrix", "quantize.imatrix.dataset": meta["imatrix.datasets"][0][:127],
          "quantize.imatrix.entries_count": len(values), "quantize.imatrix.chunks_count": meta["imatrix.chunk_count"]}
    for label in ("Q4_K_M", "IQ3_XXS"):
        again = tmp_path / f"{label}.gguf"
        llamacpp.quantize_file(f16, again, GgufVariant(type=label), imatrix=values, threads=2, kv=kv)
        published = json.loads((out / f"gguf-{label}" / MANIFEST).read_text())["files"][f"tiny-llama.{label}.gguf"]
        assert sha256_file(again) == published["sha256"], label


def test_overrides_set_the_tensor_types_llama_quantize_would(ranked):
    out, _, _ = ranked
    types = {}
    for label in ("Q4_K_M", "Q4_K_L", "Q4_K_M-attnv8"):
        _, tensors = gguf.read(sorted((out / f"gguf-{label}").glob("*.gguf")))
        types[label] = {name: kind for name, kind, _ in tensors}
        assert gguf.check_mix(_variant(out, label), tensors) == []
    assert types["Q4_K_M"]["token_embd.weight"] != "Q8_0" and types["Q4_K_M"]["output.weight"] == "Q6_K"
    assert types["Q4_K_L"]["token_embd.weight"] == types["Q4_K_L"]["output.weight"] == "Q8_0"
    assert {k: v for k, v in types["Q4_K_L"].items() if k.startswith("blk.")} == \
        {k: v for k, v in types["Q4_K_M"].items() if k.startswith("blk.")}  # only embeddings and output change
    assert types["Q4_K_M-attnv8"]["blk.0.attn_v.weight"] == types["Q4_K_M-attnv8"]["blk.1.attn_v.weight"] == "Q8_0"
    assert types["Q4_K_M-attnv8"]["blk.0.ffn_down.weight"] == "Q6_K"


def _variant(out, label) -> GgufVariant:
    """The matrix entry back from the manifest's parameters."""
    p = json.loads((out / f"gguf-{label}" / MANIFEST).read_text())["parameters"]
    return GgufVariant(**{k: v for k, v in p.items() if k != "imatrix"})


def test_kld_ranks_the_types_as_llama_cpp_documents_them(ranked):
    """Measured KLD (imatrix on, 256-aligned tiny llama) against llama.cpp's documented order.

    Neighbours in the documentation are a few hundredths of a bit apart and a 2-layer model
    gives llama.cpp's per-layer rules (first layers, every other layer) a weight no real model
    does, so neighbours may swap; types three or more places apart never do, and the whole
    order agrees (Kendall's tau).
    """
    _, _, results = ranked
    kld = {t: results[f"gguf-{t}"].kld for t in RANKED}
    documented = [t for t in DOCUMENTED_ORDER if t in kld]
    assert documented == RANKED
    pairs = [(a, b) for i, a in enumerate(documented) for b in documented[i + 1:]]
    discordant = [(a, b) for a, b in pairs if kld[a] < kld[b]]  # a is documented as lossier than b
    far = [(a, b) for a, b in discordant if documented.index(b) - documented.index(a) >= 3]
    assert far == [], {p: (kld[p[0]], kld[p[1]]) for p in far}
    tau = 1 - 2 * len(discordant) / len(pairs)
    assert tau >= 0.85, (tau, discordant)
    assert results["gguf-Q4_K_L"].kld < kld["Q4_K_M"]  # Q8_0 embeddings and output: closer than Q4_K_M
    for variant, r in results.items():
        assert r.memory.kind == "RAM" and r.memory.bytes > 0 and r.memory.context == 256
        assert 0 < r.top1_agreement <= 1 and r.kld_median <= r.kld_p99 <= r.kld_max
