"""Bad input is found before anything is created: one line per problem, naming the thing and the fix, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from quantpub.cli import main
from conftest import HUB_TOKEN, MATRICES, ONE_EACH_MATRIX

MATRIX = ONE_EACH_MATRIX


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def inputs(tmp_path, tiny_models, corpus):
    root = tmp_path / "inputs"
    root.mkdir()
    (root / "m.yaml").write_text(MATRIX)
    (root / "held-out.txt").write_text(corpus.read_text()[-60_000:])
    model = root / "tiny-llama"
    shutil.copytree(tiny_models("llama"), model)
    return root, model


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def cli(capfd, *args: str) -> tuple[int, list[str]]:
    rc = main(list(args))
    err = capfd.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def run_args(root: Path, model: Path, corpus: Path, *extra: str) -> list[str]:
    return ["run", str(root / "m.yaml"), "--model", str(model), "--work", "w", "--calibration-file", str(corpus),
            "--eval-file", str(root / "held-out.txt"), "--device", "cpu", "--n-samples", "4", "--seq-len", "64",
            "--context", "64", "--windows", "2", *extra]


def refused(capfd, cwd: Path, args: list[str], *needles: str) -> list[str]:
    """The run exits 2, every stderr line is one 'error:' naming what is wrong, and nothing was created."""
    before = tree(cwd.parent)
    capfd.readouterr()  # what building the inputs printed
    rc, lines = cli(capfd, *args)
    assert rc == 2, lines
    assert lines and all(line.startswith("error: ") for line in lines), lines
    text = "\n".join(lines)
    for needle in needles:
        assert needle in text, text
    assert tree(cwd.parent) == before  # no work dir, no hub, no ledger
    return lines


def test_a_good_run_passes_the_check_and_creates_nothing(capfd, empty_cwd, inputs, corpus):
    root, model = inputs
    before = tree(empty_cwd.parent)
    assert main(run_args(root, model, corpus, "--check")) == 0
    assert "preflight passed: 1 model(s), 2 variants" in capfd.readouterr().out
    assert tree(empty_cwd.parent) == before


def test_truncated_weights(capfd, empty_cwd, inputs, corpus):
    root, model = inputs
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as fh:
        fh.truncate(size - 1000)
    refused(capfd, empty_cwd, run_args(root, model, corpus), str(weights), "truncated", f"of {size} bytes",
            "re-download")


def test_sharded_checkpoint_with_a_missing_shard(capfd, empty_cwd, inputs, corpus):
    from safetensors.torch import load_file, save_file

    root, model = inputs
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, model / shard, metadata={"format": "pt"})
    (model / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(run_args(root, model, corpus, "--check")) == 0  # whole, it passes
    capfd.readouterr()
    (model / "model-00002-of-00002.safetensors").unlink()
    refused(capfd, empty_cwd, run_args(root, model, corpus), "model-00002-of-00002.safetensors", "missing shard")


def test_missing_tokenizer(capfd, empty_cwd, inputs, corpus):
    root, model = inputs
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    refused(capfd, empty_cwd, run_args(root, model, corpus), str(model), "no tokenizer")


@pytest.mark.parametrize("kind", ["missing", "empty", "binary", "too short"])
def test_bad_calibration_file(capfd, empty_cwd, inputs, corpus, kind):
    root, model = inputs
    calib = root / "calib.txt"
    if kind == "empty":
        calib.write_text("")
    elif kind == "binary":
        calib = Path("/bin/ls")
    elif kind == "too short":
        calib.write_text(corpus.read_text()[:500])
    expected = {"missing": "no such file", "empty": "the file is empty", "binary": "a binary file, not text",
                "too short": "fewer than the 256 the plan needs"}[kind]
    refused(capfd, empty_cwd, run_args(root, model, calib), f"calibration data {calib}", expected)


def test_missing_eval_file_is_an_error_not_a_silent_skip(capfd, empty_cwd, inputs, corpus):
    root, model = inputs
    (root / "held-out.txt").unlink()
    refused(capfd, empty_cwd, run_args(root, model, corpus), f"evaluation data {root / 'held-out.txt'}",
            "no such file")


def test_evaluation_dataset_that_cannot_load_offline(capfd, empty_cwd, inputs, corpus):
    root, model = inputs
    args = [a for a in run_args(root, model, corpus)]
    i = args.index("--eval-file")
    del args[i:i + 2]
    refused(capfd, empty_cwd, args, "evaluation data wikitext/wikitext-2-raw-v1:test", "--eval-file",
            "--no-evaluate")


def test_group_size_that_does_not_divide_a_layer(capfd, empty_cwd, inputs, corpus, tmp_path):
    from quantpub.tiny import build_tiny_model

    root, _ = inputs
    model = build_tiny_model(tmp_path / "inputs" / "tiny-320", "llama", hidden_size=320, intermediate_size=640,
                             text=corpus.read_text())
    refused(capfd, empty_cwd, run_args(root, model, corpus), "variant gptq-4bit-128g-actorder_False:",
            "group size 128 does not divide the layer input size 320")


def test_unreachable_hub(capfd, empty_cwd, inputs, corpus):
    root, model = inputs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket closes
    url = f"http://127.0.0.1:{port}"
    refused(capfd, empty_cwd, run_args(root, model, corpus, "--publish-to", url, "--token", "x"),
            f"--publish-to {url}: cannot reach it")


def test_wrong_token_and_foreign_namespace(capfd, empty_cwd, inputs, corpus, hub):
    root, model = inputs
    refused(capfd, empty_cwd, run_args(root, model, corpus, "--publish-to", hub.url, "--token", "hf_wrong"),
            f"--publish-to {hub.url}: the token was refused")
    refused(capfd, empty_cwd, run_args(root, model, corpus, "--publish-to", hub.url, "--token", HUB_TOKEN,
                                       "--namespace", "someone-else"),
            "cannot write namespace 'someone-else'", "--namespace alice")


def test_work_dir_that_is_a_file(capfd, empty_cwd, inputs, corpus):
    root, model = inputs
    (empty_cwd / "w").write_text("not a directory")
    refused(capfd, empty_cwd, run_args(root, model, corpus), f"--work {empty_cwd / 'w'}: is a file")


def test_read_only_work_dir(capfd, empty_cwd, inputs, corpus):
    ro = empty_cwd.parent / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    try:
        root, model = inputs
        args = run_args(root, model, corpus)
        args[args.index("w")] = str(ro / "w")
        refused(capfd, empty_cwd, args, f"--work {ro / 'w'}", "not writable")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_every_problem_is_reported_at_once(capfd, empty_cwd, inputs, corpus):
    root, model = inputs
    (root / "held-out.txt").unlink()
    (model / "model.safetensors").write_bytes(b"\x00" * 4)
    lines = refused(capfd, empty_cwd, run_args(root, model, Path("/bin/ls")), "not a safetensors file",
                    "a binary file", "evaluation data")
    assert len(lines) == 3


def test_two_models_with_one_name(capfd, empty_cwd, inputs, corpus, tmp_path):
    root, model = inputs
    other = tmp_path / "elsewhere" / model.name
    shutil.copytree(model, other)
    args = run_args(root, model, corpus)
    args[args.index(str(model))] = f"{model}"
    args.insert(args.index("--work"), str(other))
    refused(capfd, empty_cwd, args, "same name 'tiny-llama'")


def test_models_file(capfd, empty_cwd, inputs, corpus):
    root, model = inputs
    listing = root / "models.txt"
    listing.write_text(f"# the queue\n\n{model}   # a local copy\n")
    args = run_args(root, model, corpus, "--models-file", str(listing), "--check")
    del args[args.index("--model"):args.index("--model") + 2]
    assert main(args) == 0
    capfd.readouterr()
    refused(capfd, empty_cwd, args[:-1] + ["--models-file", str(root / "missing.txt")], "--models-file",
            "missing.txt")


def test_shipped_matrices_work_from_any_directory(capfd, empty_cwd, inputs, corpus):
    root, model = inputs
    assert main(["matrices"]) == 0
    listed = capfd.readouterr().out
    assert "thebloke " in listed and "thebloke-gptq" in listed
    for ref in ("thebloke", "matrices/thebloke.yaml"):
        args = run_args(root, model, corpus, "--check", "--n-samples", "2", "--seq-len", "32")
        args[1] = ref
        assert main(args) == 0, capfd.readouterr().err
    assert "2 model" not in capfd.readouterr().out
    refused(capfd, empty_cwd, ["run", "nosuch", "--model", str(model), "--work", "w"], "nosuch", "quantpub matrices")


def test_shipped_matrix_is_the_repository_file():
    from quantpub.variants import resolve_matrix, shipped_matrices

    assert resolve_matrix("thebloke").read_bytes() == (MATRICES / "thebloke.yaml").read_bytes()
    assert set(shipped_matrices()) >= {"thebloke", "thebloke-gptq"}
    assert os.path.samefile(resolve_matrix("thebloke-gptq"), MATRICES / "thebloke-gptq.yaml")


def test_runtime_formats_group_sizes_are_checked_too(corpus, tmp_path):
    """compressed-tensors W4A16 at group 128 on 320-wide layers: transformers would refuse the built files."""
    from quantpub.plan import make_plan
    from quantpub.preflight import check_group_sizes
    from quantpub.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny-320", "llama", hidden_size=320, intermediate_size=640,
                             text=corpus.read_text())
    problems = check_group_sizes(str(model), make_plan(MATRICES / "runtimes.yaml", str(model), device="cpu"))
    refused = " ".join(problems)
    assert "ct-w4a16-128g-actorder_GroupAware" in refused and "group size 128 does not divide" in refused
    assert "mlx-4bit-64g" not in refused  # 64 divides 320 and 640
