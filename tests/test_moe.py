from quantpub.moe import expert_coverage

LOG = {"gptq": [
    {"process": "gptq", "layer": 0, "module": "self_attn.q_proj", "samples": "1024"},
    {"process": "gptq", "layer": 0, "module": "mlp.experts.0.gate_proj", "samples": "600"},
    {"process": "gptq", "layer": 0, "module": "mlp.experts.0.down_proj", "samples": "600"},
    {"process": "gptq", "layer": 0, "module": "mlp.experts.1.gate_proj", "samples": "100"},
    {"process": "gptq", "layer": 1, "module": "mlp.experts.10.up_proj", "samples": "0"},
]}


def test_starved_experts_are_reported_in_order():
    cov = expert_coverage(LOG, min_tokens=256)
    assert cov["tokens"] == {"layer 0 expert 0": 600, "layer 0 expert 1": 100, "layer 1 expert 10": 0}
    assert cov["starved"] == ["layer 0 expert 1", "layer 1 expert 10"]


def test_dense_models_have_no_expert_report():
    assert expert_coverage({"gptq": [{"layer": 0, "module": "mlp.down_proj", "samples": "9"}]}, 256) is None
    assert expert_coverage(None, 256) is None
