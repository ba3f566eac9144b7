"""The API and git serve the same tree. ``api_and_git_agree`` (autouse in every hub test module)
checks, after each test, every commit that the test's hubs made: the files the API lists against
the git mirror's tree (names and blob ids, every object present), and each branch and tag."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import HUB_TOKEN


def _git(git_dir: Path, *args: str, input: bytes | None = None) -> str:
    out = subprocess.run(["git", "--git-dir", str(git_dir), *args], input=input, capture_output=True, timeout=60)
    assert out.returncode == 0, (git_dir, args, out.stderr)
    return out.stdout.decode()


def mirror_differences(data_dir: Path) -> list[str]:
    """Where the git mirrors of a hub's data dir differ from what its API serves ([] when nowhere)."""
    db = sqlite3.connect(f"file:{data_dir / 'hub.sqlite3'}?mode=ro", uri=True)
    problems = []
    try:
        for repo_id, type_, ns, name in db.execute("SELECT id, type, namespace, name FROM repos").fetchall():
            git_dir = data_dir / "git" / type_ / ns / f"{name}.git"
            git_of = dict(db.execute("SELECT oid, git_oid FROM commits WHERE repo_id=?", (repo_id,)))
            want = {f"refs/{'heads' if kind == 'branch' else 'tags'}/{ref}": git_of[oid] for kind, ref, oid in
                    db.execute("SELECT kind, name, commit_oid FROM refs WHERE repo_id=?", (repo_id,))}
            have = dict(line.split(" ", 1)[::-1] for line in
                        _git(git_dir, "for-each-ref", "--format=%(objectname) %(refname)").splitlines())
            if have != want:
                problems.append(f"{ns}/{name}: git refs {have} differ from the API's {want}")
            for oid, git_oid in git_of.items():
                if git_oid is None:
                    continue  # never on a branch or tag while the mirror was brought in step
                api = dict(db.execute("SELECT path, git_oid FROM files WHERE commit_oid=?", (oid,)))
                tree = {}
                for entry in _git(git_dir, "ls-tree", "-r", "-z", git_oid).split("\0")[:-1]:
                    meta, path = entry.split("\t", 1)
                    tree[path] = meta.split()[2]
                if tree != api:
                    problems.append(f"{ns}/{name} commit {oid}: git has {sorted(tree)}, the API {sorted(api)}")
                listed = _git(git_dir, "cat-file", "--batch-check", input="".join(f"{b}\n" for b in api.values())
                              .encode())
                if " missing" in listed:
                    problems.append(f"{ns}/{name} commit {oid}: git lacks objects: {listed}")
    finally:
        db.close()
    return problems


@pytest.fixture(autouse=True)
def api_and_git_agree(tmp_path):
    """After the test (its servers stopped), every hub data dir under its tmp_path: API == git."""
    yield
    for db in sorted(tmp_path.rglob("hub.sqlite3")):
        if (db.parent / "git").is_dir():
            assert mirror_differences(db.parent) == [], db.parent


def test_the_check_sees_a_mirror_that_differs(hub, tmp_path):
    from test_hub import raw

    auth = {"Authorization": f"Bearer {HUB_TOKEN}"}
    raw(hub, "POST", "/api/repos/create", json.dumps({"name": "r"}).encode(), auth)
    body = b'{"key":"header","value":{"summary":"s"}}\n' + json.dumps(
        {"key": "file", "value": {"path": '"quoted"', "content": base64.b64encode(b"q").decode()}}).encode()
    assert raw(hub, "POST", "/api/models/alice/r/commit/main", body, auth)[0].status == 200
    data_dir = Path(hub.config.data_dir)
    assert mirror_differences(data_dir) == []  # '"quoted"' is stored verbatim, not unquoted to 'quoted'
    db = sqlite3.connect(data_dir / "hub.sqlite3")
    db.execute("UPDATE files SET path='renamed' WHERE path='\"quoted\"'")  # the API now lists another name
    db.commit()
    db.close()
    found = mirror_differences(data_dir)
    assert len(found) == 1 and "renamed" in found[0] and '"quoted"' in found[0]
    db = sqlite3.connect(data_dir / "hub.sqlite3")
    db.execute("UPDATE files SET path='\"quoted\"' WHERE path='renamed'")
    db.commit()
    db.close()
