"""Publishing real quantized tiny models to the real local hub, then loading them back by revision."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from conftest import typed, HUB_TOKEN
from quantpub.card.render import gb
from quantpub.cli import main
from quantpub.errors import PublishError
from quantpub.publish import MANIFEST, publish, retry, sha256_file

GPTQ_REPO = "alice/tiny-llama-GPTQ"


@pytest.fixture
def published(tulu_build, hub):
    from quantpub.card import render_run

    out, outcomes = tulu_build
    assert all(o.error is None for o in outcomes)
    render_run(out, hub=hub.url, namespace="alice")
    results = publish(out, endpoint=hub.url, token=HUB_TOKEN, namespace="alice")
    return out, results


LOAD_BACK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig
for repo, branch, manifest in json.loads(sys.argv[1]):
    p = manifest["parameters"]
    kwargs = {}
    if manifest["method"] == "gptq" and p["bits"] == 4 and p["group_size"] == -1:
        kwargs["quantization_config"] = GPTQConfig(bits=4, backend="gptq_torch")
    model = AutoModelForCausalLM.from_pretrained(repo, revision=branch, device_map="cpu", **kwargs)
    tok = AutoTokenizer.from_pretrained(repo, revision=branch)
    ids = tok("def main():", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.isfinite(model(ids).logits).all()
    print("loaded", repo, branch, out.shape[1] - ids.shape[1])
"""


def test_a_gguf_variant_owns_only_its_own_files():
    from quantpub.publish import _owned_by

    entry = {"size": 1, "sha256": "0" * 64}
    manifest = typed({"variant": "gguf-Q4_K_M", "method": "gguf", "branch": None, "repo": "ns/Qwen2.5-0.5B-GGUF",
                      "model": "Qwen/Qwen2.5-0.5B", "parameters": {"name": "Q4_K_M", "type": "Q4_K_M"}, "size": 1,
                      "tools": {}, "files": {"Qwen2.5-0.5B.Q4_K_M.gguf": entry, "Qwen2.5-0.5B.imatrix": entry}})
    owned = [p for p in ("Qwen2.5-0.5B.Q4_K_M.gguf", "Qwen2.5-0.5B.Q4_K_M-00001-of-00002.gguf",
                         "Qwen2.5-0.5B.Q8_0.gguf", "Qwen2.5-0.5B.imatrix", "README.md", "quantpub/gguf-Q4_K_M.json",
                         "quantpub/gguf-Q8_0.json") if _owned_by(p, manifest)]
    # a model name with "-0" once made every file of the repo look like this variant's (and deleted them)
    assert owned == ["Qwen2.5-0.5B.Q4_K_M.gguf", "Qwen2.5-0.5B.Q4_K_M-00001-of-00002.gguf",
                     "quantpub/gguf-Q4_K_M.json"]


@pytest.mark.slow
def test_six_branches_load_by_revision_and_download_byte_identical(published, hub, tmp_path):
    out, results = published
    gptq = [r for r in results if r.repo == GPTQ_REPO]
    assert len(gptq) == 6 and all(r.changed for r in results)
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    branches = {b.name: b.target_commit for b in api.list_repo_refs(GPTQ_REPO).branches}
    assert set(branches) == {r.branch for r in gptq} and "main" in branches
    loads = []
    for r in results:
        manifest = json.loads((out / r.variant / MANIFEST).read_text())
        assert r.branch == (manifest["branch"] or "main")
        if r.repo == GPTQ_REPO:
            assert branches[r.branch] == r.commit
        snap = Path(snapshot_download(r.repo, revision=r.branch, endpoint=hub.url))
        local = {p.name: p.name for p in (out / r.variant).iterdir()}
        card = (snap / "README.md").read_text()  # the rendered card travels with every commit
        assert card == (out / "cards" / r.repo.split("/")[1] / "README.md").read_text()
        assert f"| {gb(manifest['size'])} |" in card  # sizes in the card are the files' sizes
        remote = {str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()} - {".gitattributes", "README.md"}
        if manifest["method"] == "gguf":  # files of all types share main; the manifest sits under quantpub/
            local[MANIFEST] = f"quantpub/{r.variant}.json"
            assert set(local.values()) <= remote, r.variant
        else:
            assert remote == set(local.values()), r.variant
            loads.append((r.repo, r.branch, manifest))
        for name, in_repo in local.items():
            assert (snap / in_repo).read_bytes() == (out / r.variant / name).read_bytes(), (r.variant, name)
    # what a user runs: a fresh process with HF_ENDPOINT pointing at the hub
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "user-cache")}
    done = subprocess.run([sys.executable, "-c", LOAD_BACK, json.dumps(loads)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("loaded") == len(loads) == 7
    assert all(line.endswith(" 3") for line in done.stdout.splitlines() if line.startswith("loaded"))


@pytest.mark.slow
def test_republish_is_idempotent_and_a_change_makes_one_commit(published, hub, tmp_path, capsys):
    out, first = published
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    before = {(r.repo, r.branch): len(api.list_repo_commits(r.repo, revision=r.branch)) for r in first}
    again = publish(out, endpoint=hub.url, token=HUB_TOKEN, namespace="alice")
    assert not any(r.changed for r in again)
    own_branch = [r for r in first if not r.repo.endswith("-GGUF")]
    assert [r.commit for r in again if not r.repo.endswith("-GGUF")] == [r.commit for r in own_branch]
    gguf_head = api.repo_info("alice/tiny-llama-GGUF").sha  # GGUF types share main: its head after the last one
    assert {r.commit for r in again if r.repo.endswith("-GGUF")} == {gguf_head} == \
        {[r for r in first if r.repo.endswith("-GGUF")][-1].commit}
    assert {(r.repo, r.branch): len(api.list_repo_commits(r.repo, revision=r.branch)) for r in first} == before

    # a rebuilt variant (new files, new manifest) -> exactly one new commit on its branch only
    variant = next(r for r in first if r.branch != "main" and r.repo == GPTQ_REPO)
    rebuilt = tmp_path / "rebuilt" / variant.variant
    shutil.copytree(out / variant.variant, rebuilt)
    config = json.loads((rebuilt / "config.json").read_text())
    config["rebuilt"] = True
    (rebuilt / "config.json").write_text(json.dumps(config))
    manifest = json.loads((rebuilt / MANIFEST).read_text())
    manifest["files"]["config.json"] = {"size": (rebuilt / "config.json").stat().st_size,
                                        "sha256": sha256_file(rebuilt / "config.json")}
    (rebuilt / MANIFEST).write_text(json.dumps(manifest))
    code = main(["publish", str(rebuilt.parent), "--endpoint", hub.url, "--token", HUB_TOKEN, "--namespace", "alice"])
    assert code == 0
    assert "published" in capsys.readouterr().out
    after = {(r.repo, r.branch): len(api.list_repo_commits(r.repo, revision=r.branch)) for r in first}
    key = (variant.repo, variant.branch)
    assert after[key] == before[key] + 1
    assert {k: n for k, n in after.items() if k != key} == {k: n for k, n in before.items() if k != key}


@pytest.mark.slow
def test_a_file_changed_after_validation_is_not_published(tulu_build, hub, tmp_path):
    out, _ = tulu_build
    copy = tmp_path / "v" / "awq-4bit-128g-GEMM"
    shutil.copytree(out / "awq-4bit-128g-GEMM", copy)
    config = copy / "config.json"
    original = config.read_bytes()
    config.write_bytes(original.replace(b"{", b" ", 1))  # same size, other bytes: only the sha256 tells
    with pytest.raises(PublishError, match="changed after it was validated"):
        publish(copy.parent, endpoint=hub.url, token=HUB_TOKEN, namespace="alice")
    config.write_text("{}")
    with pytest.raises(PublishError, match="missing or of another size"):
        publish(copy.parent, endpoint=hub.url, token=HUB_TOKEN, namespace="alice")
    assert not HfApi(endpoint=hub.url).repo_exists("alice/tiny-llama-AWQ")


def test_nothing_to_publish_is_a_clear_error(tmp_path):
    with pytest.raises(PublishError, match="no finished variant"):
        publish(tmp_path)


def _http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "http://127.0.0.1/api/x")
    return HfHubHTTPError(f"{status}", response=httpx2.Response(status, request=request))


def test_retry_backs_off_on_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _http_error(503)
        return "ok"

    assert retry(flaky, "flaky", base_wait=0) == "ok" and len(calls) == 3
    calls.clear()

    def forbidden():
        calls.append(1)
        raise _http_error(403)

    with pytest.raises(HfHubHTTPError):
        retry(forbidden, "forbidden", base_wait=0)
    assert len(calls) == 1

    def refused():
        calls.append(1)
        raise httpx2.ConnectError("refused")

    calls.clear()
    with pytest.raises(httpx2.ConnectError):
        retry(refused, "refused", attempts=3, base_wait=0)
    assert len(calls) == 3


def test_an_unfinished_build_is_never_a_result(tmp_path):
    import json

    from quantpub.errors import PublishError
    from quantpub.publish import find_variants

    partial = tmp_path / ".partial-gptq-4bit-128g-actorder_False-123"
    partial.mkdir()
    (partial / "quantpub.json").write_text(json.dumps({"variant": "x", "repo": "ns/r", "files": {}}))
    with pytest.raises(PublishError, match="no finished variant"):
        find_variants(tmp_path)
    with pytest.raises(PublishError, match="an unfinished build"):
        find_variants(partial)
