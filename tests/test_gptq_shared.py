"""The shared GPTQ pass checked against GPTQModel's own per-variant path (the exact mode)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantpub.artifacts import MANIFEST
from quantpub.build import build_from_matrix

SMALL = {"n_samples": 8, "seq_len": 128}
TWO = "  variants:\n    - {bits: 4, group_size: 32, act_order: true}\n    - {bits: 8, group_size: 128}\n"
IDS = ["gptq-4bit-32g-actorder_True", "gptq-8bit-128g-actorder_False"]
BESIDE = ["config.json", "generation_config.json", "quantize_config.json", "tokenizer.json", "tokenizer_config.json"]


def _tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_spooled_tensors_and_base_tensors_make_one_safetensors_file(tmp_path):
    from gptqmodel.utils.model import TensorSource

    from quantpub.backends.gptq_writer import SPOOL, Spool, write_weights

    base = {"embed.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "norm.weight": torch.ones(3)}
    spool = Spool(tmp_path / SPOOL)
    packed = {"qweight": torch.arange(8, dtype=torch.int32).reshape(2, 4), "scales": torch.rand(1, 4).half()}
    spool.add("layers.0.proj", packed)
    order = ["embed.weight", "layers.0.proj.weight", "norm.weight"]
    sources = {n: TensorSource(n, t.dtype, tuple(t.shape), t) for n, t in base.items()}
    write_weights(tmp_path, order, sources, spool)
    got = _tensors(tmp_path / "model.safetensors")
    assert list(got) == ["embed.weight", "layers.0.proj.qweight", "layers.0.proj.scales", "norm.weight"]
    for name, tensor in {**base, **{f"layers.0.proj.{k}": v for k, v in packed.items()}}.items():
        assert torch.equal(got[name], tensor), name
    assert not (tmp_path / SPOOL).exists()
    reference = tmp_path / "reference.safetensors"  # what safetensors itself writes reads back the same
    save_file(got, reference)
    assert {k: v.dtype for k, v in _tensors(reference).items()} == {k: v.dtype for k, v in got.items()}


def test_stacked_solve_is_gptqmodels_solve_bit_for_bit():
    """Six variants solved as one stacked matrix give exactly what GPTQModel's GPTQ.quantize gives each."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.looper.named_module import NamedModule
    from gptqmodel.quantization.gptq import GPTQ

    from quantpub.backends.gptq_solve import solve_stacked, stackable

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    linear = torch.nn.Linear(320, 96, bias=False)
    inputs = torch.randn(1, 512, 320) * torch.rand(320) * 3
    variants = [{"bits": 4, "group_size": 32}, {"bits": 4, "group_size": 64}, {"bits": 8, "group_size": -1},
                {"bits": 4, "group_size": 128, "sym": False}, {"bits": 2, "group_size": 32}]

    def task(act_order, params):
        qc = QuantizeConfig(desc_act=act_order, act_group_aware=False, offload_to_disk=False, **params)
        g = GPTQ(NamedModule(linear, "proj", "layers.0.proj", 0), qcfg=qc)
        g.fallback, g.expected_nsamples = qc.fallback, 512
        g.quantizer.configure(perchannel=True)
        return g

    try:
        for act_order in (True, False):
            leader = task(act_order, variants[0])
            leader.add_batch(inputs, None)
            alone = []
            for params in variants:
                g = task(act_order, params)
                g.adopt_hessian_from(leader)
                alone.append(g.quantize())
            tasks = [task(act_order, params) for params in variants]
            for g in tasks:
                g.adopt_hessian_from(leader)
            assert all(stackable(g) for g in tasks)
            for params, one, stacked in zip(variants, alone, solve_stacked(tasks)):
                for name, a, b in zip(("weights", "scales", "zeros", "g_idx"), one[:4], stacked[:4]):
                    assert torch.equal(a, b), (act_order, params, name)
                assert (one[5], one[6], one[7]) == (stacked[5], stacked[6], stacked[7])  # loss, damp, samples
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def both_modes(tiny_models, corpus, tmp_path_factory):
    """Two variants of a tiny llama built in shared mode and in exact mode from the same calibration windows.

    Each mode is built by ``quantpub quantize`` in a fresh process on one thread: float sums
    depend on the thread count and on what earlier tests left in this process's torch state.
    """
    root = tmp_path_factory.mktemp("modes")
    built = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode in ("shared", "exact"):
        matrix = root / f"{mode}.yaml"
        matrix.write_text(f"gptq:\n  mode: {mode}\n{TWO}")
        subprocess.run([sys.executable, "-m", "quantpub", "quantize", str(matrix), "--model",
                        str(tiny_models("llama")), "--out", str(root / mode), "--calibration-file", str(corpus),
                        "--device", "cpu", "--n-samples", str(SMALL["n_samples"]), "--seq-len", str(SMALL["seq_len"])],
                       check=True, env=env, cwd=root, capture_output=True)
        assert sorted(p.name for p in (root / mode).iterdir() if (p / MANIFEST).is_file()) == sorted(IDS)
        built[mode] = root / mode
    return built


@pytest.mark.slow
def test_first_layer_sees_the_same_inputs_so_q_k_v_are_byte_identical_to_gptqmodels(both_modes):
    for vid in IDS:
        shared = _tensors(both_modes["shared"] / vid / "model.safetensors")
        exact = _tensors(both_modes["exact"] / vid / "model.safetensors")
        assert {k: (v.dtype, v.shape) for k, v in shared.items()} == {k: (v.dtype, v.shape) for k, v in exact.items()}
        for proj in ("q_proj", "k_proj", "v_proj"):
            for part in ("qweight", "qzeros", "scales", "g_idx"):
                name = f"model.layers.0.self_attn.{proj}.{part}"
                assert torch.equal(shared[name], exact[name]), name
        # From o_proj on, exact mode's inputs come from the quantized q/k/v: the solves differ.
        assert not torch.equal(shared["model.layers.1.mlp.down_proj.qweight"],
                               exact["model.layers.1.mlp.down_proj.qweight"])
        assert torch.equal(shared["model.embed_tokens.weight"], exact["model.embed_tokens.weight"])


@pytest.mark.slow
def test_files_beside_the_weights_are_those_of_the_exact_mode(both_modes):
    for vid in IDS:
        for name in BESIDE:
            shared = (both_modes["shared"] / vid / name).read_bytes()
            assert shared == (both_modes["exact"] / vid / name).read_bytes(), f"{vid}/{name}"


@pytest.mark.slow
def test_manifests_record_the_mode_and_nothing_is_left_behind(both_modes):
    for mode, out in both_modes.items():
        for vid in IDS:
            manifest = json.loads((out / vid / MANIFEST).read_text())
            assert manifest["gptq_mode"] == mode
            assert manifest["validation"]["loaded_with"] == "transformers.AutoModelForCausalLM"
            assert sorted(manifest["files"]) == sorted(p.name for p in (out / vid).iterdir() if p.name != MANIFEST)
        assert sorted(p.name for p in out.iterdir()) == sorted(IDS + [".records", "inputs", "logs", "plan.json"])
    assert json.loads((both_modes["shared"] / IDS[0] / MANIFEST).read_text())["variants_in_pass"] == 2


@pytest.mark.slow
def test_compatibility_is_checked_and_a_rerun_of_the_shared_mode_changes_nothing(both_modes, tiny_models, corpus):
    out = both_modes["shared"]
    for vid in IDS:
        manifest = json.loads((out / vid / MANIFEST).read_text())
        assert manifest["compat"]["runtimes"]["transformers5"]["status"] == "loads", vid
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    outcomes = build_from_matrix(out.parent / "shared.yaml", str(tiny_models("llama")), out, calibration_file=corpus,
                        device="cpu", **SMALL)
    assert [(o.variant, o.skipped, o.error) for o in outcomes] == [(v, True, None) for v in IDS]
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.slow
def test_a_variant_whose_solve_fails_leaves_no_directory_and_the_pass_goes_on(tiny_models, corpus, tmp_path,
                                                                               monkeypatch):
    from gptqmodel.quantization.gptq import GPTQ

    import quantpub.backends.gptq_writer as writer

    real = GPTQ.quantize

    def nan_for_8bit(self, *args, **kwargs):
        if self.qcfg.bits == 8 and "layers.1." in self._named_module.full_name:
            raise ValueError("Quantization: Failed due to `NaN` loss")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GPTQ, "quantize", nan_for_8bit)
    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 1_000_000)  # the tiny model in shards, with an index
    matrix = tmp_path / "m.yaml"
    matrix.write_text(f"gptq:\n  mode: shared\n{TWO}")
    outcomes = build_from_matrix(matrix, str(tiny_models("llama")), tmp_path / "o", calibration_file=corpus, device="cpu",
                        **SMALL)
    assert outcomes[0].error is None
    assert "NaN" in outcomes[1].error and outcomes[1].path is None
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".records", IDS[0], "inputs", "logs", "plan.json"]
    built = tmp_path / "o" / IDS[0]
    index = json.loads((built / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in built.glob("model-*.safetensors")) == shards
    assert "model.layers.1.mlp.down_proj.qweight" in index["weight_map"]
