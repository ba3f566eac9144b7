import json

import pytest

from conftest import CONFIGS, MATRICES
from quantpub.cli import main
from quantpub.errors import ModelError
from quantpub.plan import EXAMPLE_MODEL, make_plan

# Sizes on TheBloke's Tulu 7B GPTQ card, in GB.
TULU_CARD_SIZES = {
    "main": 3.90,
    "gptq-4bit-32g-actorder_True": 4.28,
    "gptq-4bit-64g-actorder_True": 4.02,
    "gptq-4bit-128g-actorder_True": 3.90,
    "gptq-8bit--1g-actorder_True": 7.01,
    "gptq-8bit-128g-actorder_False": 7.16,
}


@pytest.fixture
def llama7b(tmp_path):
    """A directory holding only a llama-7B config.json, as the issue's check describes."""
    model = tmp_path / "tulu-7b"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS.parent.parent.parent / "src/quantpub/examples/tulu-7b/config.json")
                                       .read_text())
    (model / "README.md").write_text("# Tulu 7B\n\nPrompt:\n\n```\n<|user|>\nprompt goes here\n<|assistant|>\n```\n")
    return model


def test_tulu_sizes_within_ten_percent_of_the_card(llama7b):
    plan = make_plan(MATRICES / "thebloke-gptq.yaml", str(llama7b))
    sizes = {j.target: j.size / 1e9 for j in plan.jobs}
    assert sizes.keys() == TULU_CARD_SIZES.keys()
    for branch, card in TULU_CARD_SIZES.items():
        assert sizes[branch] == pytest.approx(card, rel=0.10), branch
    assert plan.problems == () and plan.notes == ()
    assert plan.repos == ["quantpub/tulu-7b-GPTQ"]


def test_plan_command_prints_the_six_tulu_branches(llama7b, capsys):
    assert main(["plan", str(MATRICES / "thebloke-gptq.yaml"), "--model", str(llama7b)]) == 0
    out = capsys.readouterr().out
    for branch in TULU_CARD_SIZES:
        assert f" {branch} " in out
    for size in ("3.89 GB", "4.27 GB", "4.02 GB", "7.01 GB", "7.16 GB"):
        assert size in out
    assert "6 variants" in out


def test_plan_json_has_every_job(llama7b, capsys):
    assert main(["plan", str(MATRICES / "thebloke.yaml"), "--model", str(llama7b), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["model_type"] == "llama" and data["model"]["context_length"] == 2048
    jobs = {j["variant"]: j for j in data["jobs"]}
    assert len(jobs) == 6 + 1 + 12
    assert jobs["gguf-Q4_K_M"]["file"] == "tulu-7b.Q4_K_M.gguf"
    assert jobs["gguf-Q4_K_M"]["repo"] == "quantpub/tulu-7b-GGUF"
    assert jobs["gguf-Q4_K_M"]["estimated_device_memory"] is None
    assert jobs["awq-4bit-128g-GEMM"]["branch"] == "main"
    assert jobs["gptq-4bit-128g-actorder_False"]["branch"] == "main"
    assert jobs["gptq-4bit-32g-actorder_True"]["seq_len"] == 2048  # auto on a 2048 model
    assert all(j["estimated_host_memory"] > 0 for j in data["jobs"])


def test_default_model_is_the_builtin_example(capsys, monkeypatch):
    monkeypatch.chdir(MATRICES.parent)
    assert main(["plan"]) == 0
    assert "plan for tulu-7b" in capsys.readouterr().out


def test_long_context_model_is_calibrated_at_4096_with_a_note():
    plan = make_plan(MATRICES / "thebloke.yaml", str(CONFIGS / "llama2-7b-16k"))
    assert {j.seq_len for j in plan.jobs if j.seq_len} == {4096}
    assert any("4096 tokens of its 16384-token context (rope scaling linear x4.0)" in n for n in plan.notes)
    assert plan.problems == ()


def test_calibration_longer_than_context_is_a_problem(tmp_path, capsys):
    matrix = tmp_path / "m.yaml"
    matrix.write_text("calibration: {seq_len: 8192}\ngptq: {variants: [{bits: 4}]}\n")
    code = main(["plan", str(matrix), "--model", str(CONFIGS / "openllama-13b")])
    captured = capsys.readouterr()
    assert code == 2
    assert "calibration seq_len 8192 is longer than the model's context (2048)" in captured.err
    assert "problem:" in captured.out  # the table is still shown


def test_unsupported_architecture_is_reported_before_work(capsys):
    code = main(["plan", str(MATRICES / "thebloke.yaml"), "--model", str(CONFIGS / "gpt-neox-1b")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    lines = [line for line in err.splitlines() if "is not supported" in line]
    assert len(lines) == 1 and "model_type 'gpt_neox'" in lines[0] and "(they support llama, mistral, mixtral)" in lines[0]
    assert "remove those sections from the matrix" in lines[0]
    assert "gptq, awq, gguf" in lines[0] or "awq, gguf, gptq" in lines[0]


def test_mixtral_counts_every_expert():
    plan = make_plan(MATRICES / "thebloke.yaml", str(CONFIGS / "mixtral-8x7b"))
    assert plan.facts.total_params / 1e9 == pytest.approx(46.7, rel=0.01)
    assert any("8 experts, 2 per token" in n for n in plan.notes)
    gptq_main = next(j for j in plan.jobs if j.target == "main" and j.method == "gptq")
    assert gptq_main.size / 1e9 == pytest.approx(24.7, rel=0.05)


def test_mistral_sliding_window_model_plans_at_4096():
    plan = make_plan(MATRICES / "thebloke.yaml", str(CONFIGS / "mistral-7b"))
    assert plan.facts.sliding_window == 4096 and plan.facts.context_length == 32768
    assert {j.seq_len for j in plan.jobs if j.seq_len} == {4096}
    assert plan.facts.total_params / 1e9 == pytest.approx(7.24, rel=0.01)


def test_openllama_13b():
    plan = make_plan(MATRICES / "thebloke-gptq.yaml", str(CONFIGS / "openllama-13b"))
    assert plan.facts.total_params / 1e9 == pytest.approx(13.0, rel=0.02)
    assert plan.repos == ["quantpub/openllama-13b-GPTQ"]


def test_cpu_device_puts_everything_on_the_host():
    cuda = make_plan(MATRICES / "thebloke-gptq.yaml", EXAMPLE_MODEL)
    cpu = make_plan(MATRICES / "thebloke-gptq.yaml", EXAMPLE_MODEL, device="cpu")
    assert all(j.device_memory is None for j in cpu.jobs)
    assert cpu.jobs[0].host_memory > cuda.jobs[0].host_memory + cuda.jobs[0].device_memory


@pytest.mark.parametrize("model, message", [
    ("does/not/exist", "not a checkpoint directory and not a hub repo id"),
    ("someone/some-model", "the hub is not reachable and config.json is not in the local cache"),
])
def test_unreadable_models_are_clear_errors(model, message, capsys):
    assert main(["plan", str(MATRICES / "thebloke.yaml"), "--model", model]) == 2
    assert message in capsys.readouterr().err


def test_checkpoint_without_config(tmp_path):
    with pytest.raises(ModelError, match="config.json does not exist"):
        make_plan(MATRICES / "thebloke.yaml", str(tmp_path))


def test_config_missing_a_field(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ModelError, match="config.json has no 'num_attention_heads'"):
        make_plan(MATRICES / "thebloke.yaml", str(tmp_path))


def test_a_model_larger_than_memory_is_streamed_layer_by_layer(llama7b, tmp_path):
    """The 7B model's GPTQ/AWQ group needs ~15 GB of host memory whole; streamed from the checkpoint, a
    few blocks and the embeddings. ``--stream auto`` picks streaming only where the machine needs it."""
    from types import SimpleNamespace

    from quantpub import estimate
    from quantpub.backends import STAGES
    from quantpub.driver import Driver
    from quantpub.stages import RunOptions

    plan = make_plan(MATRICES / "thebloke.yaml", str(llama7b))
    jobs = [j for j in plan.jobs if j.method in ("gptq", "awq")]
    whole = estimate.session_group_memory(plan, jobs, "cuda")
    streamed = estimate.session_group_memory(plan, jobs, "cuda", stream=True)
    assert whole > 13e9 and streamed < 4e9
    assert all(j.stream_host_memory for j in jobs) and not any(j.stream_host_memory for j in plan.jobs
                                                               if j.method == "gguf")

    def decide(stream: str, machine: int | None) -> tuple[int, bool]:
        driver = Driver(tmp_path, None, 1, {}, "", None, RunOptions(stream=stream), None)
        driver.scheduler = SimpleNamespace(capacity=SimpleNamespace(memory=machine), executor=None)
        return driver._stage_memory(plan, STAGES["quantize-gpu"], jobs, "cuda")

    assert decide("auto", int(64e9)) == (whole, False)  # fits: loaded whole, as before
    assert decide("auto", int(8e9)) == (streamed, True)  # does not fit, streamed does
    assert decide("auto", int(1e9)) == (whole, False)  # neither fits: the scheduler refuses it with the numbers
    assert decide("always", int(64e9)) == (streamed, True)
    assert decide("never", int(8e9)) == (whole, False)


def test_streamed_estimate_is_in_the_plan(llama7b, capsys):
    assert main(["plan", str(MATRICES / "thebloke-gptq.yaml"), "--model", str(llama7b), "--json"]) == 0
    jobs = json.loads(capsys.readouterr().out)["jobs"]
    assert all(0 < j["estimated_streamed_host_memory"] < j["estimated_host_memory"] for j in jobs)
    assert main(["plan", str(MATRICES / "thebloke-gptq.yaml"), "--model", str(llama7b)]) == 0
    assert "streamed layer by layer from the checkpoint" in capsys.readouterr().out
