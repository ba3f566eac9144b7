"""File paths follow the Hub's and git's rules: nothing named .git (in any case, or as Windows or
macOS read it), no .gitmodules, no file that is also a folder; what the API accepts, a git clone
shows with the same names."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

from conftest import HUB_TOKEN
from test_hub import raw
from test_hub_trees import api_and_git_agree  # noqa: F401 - autouse: the API and git serve the same trees

AUTH = {"Authorization": f"Bearer {HUB_TOKEN}"}
REFUSED = [".git/config", "sub/.git/config", ".GIT/config", ".Git/HEAD", "a/.gIT/hooks/x", ".git./x", ".git /x",
           ".git. . /x", "git~1/x", "GIT~1. /x", ".g\u200cit/x", ".git\ufeff/x", "\u200e.git/x", ".git:stream/x",
           ".gitmodules", "a/.gitmodules", ".GITMODULES", ".gitmodules. ", "gitmod~1", "GI7EBA~3", "...", ". .",
           "a/./b", "a/../b", "/a", "a/", "a//b", "a\\b", "a\tb", "a\nb", "a\x00b", "c:x", "sub/D:", "x" * 256 + "/a",
           "x" * 247, "\u00e9" * 124, "/".join(["x" * 200] * 5), ""]
ACCEPTED = ['"q"', "a b", "a ", " a", "caf\u00e9/\u65e5\u672c.txt", ".gitattributes", ".gitignore", ".github/x.yml",
            ".git-blame-ignore-revs", "x.git/y", "git", "git~2", "ab:c", "con", "-x", "#x", "a%2Fb",
            "/".join(["x" * 250] * 3 + ["x" * 246]), "\u00e9" * 123]
# the hub's own rules, stricter than git on Linux; everything else it refuses, git refuses too
HUB_ONLY = ("gitmodules", "dots and spaces", "contains", "longer than", "Windows drive")


def _git_keeps(repo: Path, path: str) -> bool:
    """Whether git (protectNTFS and protectHFS on, as on Windows and macOS) stores the path in a tree
    that `git fsck --strict` accepts."""
    blob = subprocess.run(["git", "-C", str(repo), "hash-object", "-w", "--stdin"], input=b"x\n",
                          capture_output=True).stdout.decode().strip()
    index = repo / "scratch-index"
    index.unlink(missing_ok=True)
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    subprocess.run(["git", "-C", str(repo), "-c", "core.protectNTFS=true", "-c", "core.protectHFS=true",
                    "update-index", "--add", "-z", "--index-info"], input=f"100644 {blob}\t{path}\0".encode(),
                   env=env, capture_output=True)
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], env=env, capture_output=True).stdout
    if listed.decode(errors="replace").split("\0")[:-1] != [path]:
        return False
    tree = subprocess.run(["git", "-C", str(repo), "write-tree"], env=env, capture_output=True).stdout.strip()
    fsck = subprocess.run(["git", "-C", str(repo), "fsck", "--strict", "--no-dangling"], capture_output=True)
    subprocess.run(["git", "-C", str(repo), "prune", "--expire=now"], capture_output=True)
    return bool(tree) and fsck.returncode == 0


def test_path_rules_are_gits_on_every_system(tmp_path):
    from quantpub.hub.names import path_problem

    repo = tmp_path / "scratch"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    assert not _git_keeps(repo, "sub/.Git/x") and not _git_keeps(repo, ".g\u200dit") and _git_keeps(repo, '"q"')
    for path in REFUSED + ACCEPTED:
        ours = path_problem(path)
        assert (ours is None) == (path in ACCEPTED), (path, ours)
        if "\x00" in path or not path:
            continue
        if not _git_keeps(repo, path):
            assert ours is not None, f"git refuses {path!r} but the hub accepts it"
        elif ours is not None:
            assert any(reason in ours for reason in HUB_ONLY), (path, ours)


def _commit(hub, ops: list[dict], summary: str = "s"):
    body = b"\n".join([json.dumps({"key": "header", "value": {"summary": summary}}).encode()]
                      + [json.dumps(op).encode() for op in ops])
    resp, data = raw(hub, "POST", "/api/models/alice/r/commit/main", body, AUTH)
    return resp.status, json.loads(data)


def _file(path: str, data: bytes = b"x") -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}


def test_refused_paths_are_a_400_naming_the_path_regular_or_lfs(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    api.create_repo("alice/r")
    payload = os.urandom(3000)
    oid = hashlib.sha256(payload).hexdigest()
    api.upload_file(path_or_fileobj=payload, path_in_repo="w.safetensors", repo_id="alice/r")  # the blob is stored
    for path in REFUSED:
        lfs = {"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": oid, "size": len(payload)}}
        for op in (_file(path), lfs):
            status, body = _commit(hub, [op])
            assert status == 400 and "invalid file path" in body["error"] and repr(path)[:40] in body["error"], \
                (path, status, body)
    status, body = _commit(hub, [_file(p, p.encode()) for p in ACCEPTED])
    assert status == 200, body
    assert sorted(api.list_repo_files("alice/r")) == sorted(ACCEPTED + ["w.safetensors"])
    # a git clone has the same names and bytes (and the autouse check compares every commit's tree)
    clone = tmp_path / "clone"
    out = subprocess.run(["git", "clone", "-q", f"{hub.url}/alice/r", str(clone)], capture_output=True,
                         env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    cloned = {str(p.relative_to(clone)) for p in clone.rglob("*")
              if p.is_file() and p.relative_to(clone).parts[0] != ".git"}
    assert cloned == set(ACCEPTED) | {"w.safetensors"}
    for path in ACCEPTED:
        assert (clone / path).read_bytes() == path.encode(), path
    snap = Path(snapshot_download("alice/r", endpoint=hub.url, local_dir=tmp_path / "snap"))
    assert not list(snap.rglob(".git")) and (snap / '"q"').read_bytes() == b'"q"'


def test_a_file_is_never_also_a_folder(hub):
    HfApi(endpoint=hub.url, token=HUB_TOKEN).create_repo("alice/r")
    assert _commit(hub, [_file("a")])[0] == 200
    status, body = _commit(hub, [_file("a/b")])
    assert status == 400 and "a would be both a file and the folder of a/b" in body["error"], body
    status, body = _commit(hub, [_file("c"), _file("c/d/e")])
    assert status == 400 and "c/d/e" in body["error"], body
    moved = [{"key": "deletedFile", "value": {"path": "a"}}, _file("a/b")]
    assert _commit(hub, moved)[0] == 200  # replacing the file by a folder in one commit is fine
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    assert api.list_repo_files("alice/r") == [".gitattributes", "a/b"]


def test_gitattributes_that_git_fsck_refuses_are_refused(hub, tmp_path):
    HfApi(endpoint=hub.url, token=HUB_TOKEN).create_repo("alice/r")
    long_line = b"*.bin filter=lfs " + b"x" * 2100 + b"\n"
    status, body = _commit(hub, [_file("sub/.gitattributes", long_line)])
    assert status == 400 and "2048 bytes" in body["error"] and "sub/.gitattributes" in body["error"], body
    lfs = {"key": "lfsFile", "value": {"path": ".GitAttributes", "algo": "sha256", "oid": "a" * 64, "size": 1}}
    status, body = _commit(hub, [lfs])
    assert status == 400 and "not LFS" in body["error"], body
    assert _commit(hub, [_file(".gitattributes", b"*.bin filter=lfs diff=lfs merge=lfs -text\n")])[0] == 200


@pytest.mark.parametrize("path", [".git/config", "sub/.GIT/HEAD"])
def test_a_stored_path_the_rules_now_refuse_can_still_be_deleted(hub, path):
    """A data dir written before these rules may hold such a path: it can be deleted through the API."""
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    api.create_repo("alice/r")
    api.upload_file(path_or_fileobj=b"ok", path_in_repo="ok.txt", repo_id="alice/r")
    store = hub.store
    db = store.db()
    head = api.repo_info("alice/r").sha
    db.execute("INSERT INTO files SELECT commit_oid, ?, sha256, size, git_oid, lfs FROM files "
               "WHERE commit_oid=? AND path='ok.txt'", (path, head))
    assert path in api.list_repo_files("alice/r")
    assert _commit(hub, [{"key": "deletedFile", "value": {"path": path}}])[0] == 200  # the client refuses to send it
    assert api.list_repo_files("alice/r") == [".gitattributes", "ok.txt"]
    db.execute("DELETE FROM files WHERE path=?", (path,))  # the planted row of the older commit, for the tree check
