"""git clone over smart HTTP and git lfs pull against the hub: the files come back byte-identical."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from conftest import HUB_TOKEN
from test_hub_trees import api_and_git_agree  # noqa: F401 - autouse: the API and git serve the same trees

BRANCH = "gptq-4bit-32g-actorder_True"


def git(*args: str, cwd: Path | None = None, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def git_env(tmp_path):
    if shutil.which("git-lfs") is None:
        pytest.fail("git-lfs is missing: run scripts/install-test-tools.sh")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
    assert git("lfs", "install", "--skip-repo", env=env).returncode == 0
    return env


def test_clone_single_branch_then_lfs_pull_gives_identical_files(hub, git_env, tmp_path):
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    api.create_repo("alice/tiny-GPTQ")
    api.create_branch("alice/tiny-GPTQ", branch=BRANCH)
    src = tmp_path / "variant"
    (src / "sub").mkdir(parents=True)
    files = {"model.safetensors": os.urandom(400_000), "config.json": b'{"bits": 4}', "sub/notes.txt": b"hello\n",
             "tokenizer.model": os.urandom(20_000)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    api.upload_folder(repo_id="alice/tiny-GPTQ", folder_path=src, revision=BRANCH, commit_message="variant")
    api.upload_file(path_or_fileobj=b"main only", path_in_repo="main.txt", repo_id="alice/tiny-GPTQ")

    clone = tmp_path / "clone"
    out = git("clone", "--single-branch", "--branch", BRANCH, f"{hub.url}/alice/tiny-GPTQ", str(clone),
              env={**git_env, "GIT_LFS_SKIP_SMUDGE": "1"})
    assert out.returncode == 0, out.stderr
    assert (clone / "model.safetensors").read_bytes().startswith(b"version https://git-lfs.github.com/spec/v1")
    assert not (clone / "main.txt").exists()
    out = git("lfs", "pull", cwd=clone, env=git_env)
    assert out.returncode == 0, out.stderr
    for name, data in files.items():
        assert (clone / name).read_bytes() == data, name
    head = git("rev-parse", "HEAD", cwd=clone, env=git_env).stdout.strip()
    assert api.repo_info("alice/tiny-GPTQ", revision=head).sha == api.repo_info("alice/tiny-GPTQ", revision=BRANCH).sha
    assert git("branch", "-r", cwd=clone, env=git_env).stdout.split() == [f"origin/{BRANCH}"]

    # a clone with git-lfs's smudge filter on (no separate pull), through the .git URL, gets the files too
    smudged = tmp_path / "smudged"
    out = git("clone", "--branch", BRANCH, f"{hub.url}/alice/tiny-GPTQ.git", str(smudged), env=git_env)
    assert out.returncode == 0, out.stderr
    assert (smudged / "model.safetensors").read_bytes() == files["model.safetensors"]

    # a later commit reaches the mirror; fetching picks it up
    api.upload_file(path_or_fileobj=b'{"bits": 8}', path_in_repo="config.json", repo_id="alice/tiny-GPTQ",
                    revision=BRANCH)
    assert git("pull", "--ff-only", cwd=clone, env=git_env).returncode == 0
    assert (clone / "config.json").read_bytes() == b'{"bits": 8}'

    # the hub serves fetches only
    (clone / "x.txt").write_text("x")
    git("add", "x.txt", cwd=clone, env=git_env)
    git("-c", "user.name=a", "-c", "user.email=a@b", "commit", "-qm", "x", cwd=clone, env=git_env)
    out = git("push", "origin", BRANCH, cwd=clone, env=git_env)
    assert out.returncode != 0 and "403" in out.stderr
    assert "x.txt" not in api.list_repo_files("alice/tiny-GPTQ", revision=BRANCH)


def test_private_repo_clones_only_with_a_token(hub, git_env, tmp_path):
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    api.create_repo("alice/private", private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="a.txt", repo_id="alice/private")
    host = hub.url.split("://", 1)[1]
    out = git("clone", f"{hub.url}/alice/private", str(tmp_path / "anon"), env=git_env)
    assert out.returncode != 0 and not (tmp_path / "anon" / "a.txt").exists()
    out = git("clone", f"http://alice:{HUB_TOKEN}@{host}/alice/private", str(tmp_path / "mine"), env=git_env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mine" / "a.txt").read_bytes() == b"secret"
