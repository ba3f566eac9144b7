"""The local hub server, driven by the unmodified huggingface_hub client and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from conftest import HUB_TOKEN
from test_hub_trees import api_and_git_agree  # noqa: F401 - autouse: the API and git serve the same trees


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2] if not isinstance(server, str) else urlsplit(server).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=HUB_TOKEN)


@pytest.fixture
def repo(api, tmp_path):
    """alice/tiny with a regular file and an LFS file on main."""
    api.create_repo("alice/tiny")
    src = tmp_path / "src"
    write(src / "config.json", '{"a": 1}')
    write(src / "model.safetensors", os.urandom(5000))
    write(src / "sub/dir/notes.txt", "hello")
    api.upload_folder(repo_id="alice/tiny", folder_path=src, commit_message="first")
    return "alice/tiny"


def test_branches_commits_and_downloads_by_revision(api, repo, hub, tmp_path):
    main_sha = api.repo_info(repo).sha
    api.create_branch(repo, branch="gptq-4bit-32g-actorder_True", revision="main")
    api.create_branch(repo, branch="feature/x", revision="main")
    api.upload_file(path_or_fileobj=b'{"a": 2}', path_in_repo="config.json", repo_id=repo,
                    revision="gptq-4bit-32g-actorder_True")
    refs = api.list_repo_refs(repo)
    assert sorted(b.name for b in refs.branches) == ["feature/x", "gptq-4bit-32g-actorder_True", "main"]
    branch_sha = api.repo_info(repo, revision="gptq-4bit-32g-actorder_True").sha
    assert len(branch_sha) == 40 and branch_sha != main_sha
    assert api.repo_info(repo, revision="main").sha == main_sha  # main untouched

    def read(rev):
        return Path(hf_hub_download(repo, "config.json", revision=rev, endpoint=hub.url)).read_text()

    assert read("gptq-4bit-32g-actorder_True") == '{"a": 2}'
    assert read("main") == '{"a": 1}'
    assert read(main_sha) == '{"a": 1}'  # a commit id is a revision
    assert read("feature/x") == '{"a": 1}'  # "/" in a branch name arrives as %2F
    snap = Path(snapshot_download(repo, revision="gptq-4bit-32g-actorder_True", endpoint=hub.url))
    assert sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()) == [
        ".gitattributes", "config.json", "model.safetensors", "sub/dir/notes.txt"]
    assert (snap / "model.safetensors").read_bytes() == (tmp_path / "src/model.safetensors").read_bytes()
    files = {f.path: f for f in api.list_repo_tree(repo, recursive=True) if hasattr(f, "size")}
    assert files["model.safetensors"].lfs is not None and files["config.json"].lfs is None
    assert [f.path for f in api.list_repo_tree(repo, path_in_repo="sub")] == ["sub/dir"]
    assert [c.title for c in api.list_repo_commits(repo, revision="gptq-4bit-32g-actorder_True")] == [
        "Upload config.json with huggingface_hub", "first", "initial commit"]


def test_unknown_repo_branch_and_file(api, repo, hub):
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("alice/nope")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="no-such-branch", endpoint=hub.url)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo, "missing.json", endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nope", "config.json", endpoint=hub.url)
    with pytest.raises(HfHubHTTPError, match="409"):
        api.create_repo(repo)
    api.create_repo(repo, exist_ok=True)


def test_private_repo_is_invisible_without_a_token(api, hub):
    api.create_repo("alice/secret", private=True)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="alice/secret")
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.repo_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "a.txt", endpoint=hub.url, token=False)
    assert api.repo_info("alice/secret").private is True
    wrong = HfApi(endpoint=hub.url, token="hf_wrong_token")
    with pytest.raises(HfHubHTTPError, match="401"):
        wrong.repo_info("alice/secret")


def test_writes_need_a_token(repo, hub):
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(HfHubHTTPError, match="401"):
        anonymous.create_repo("alice/other")
    with pytest.raises(HfHubHTTPError, match="401"):
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=repo)
    with pytest.raises(HfHubHTTPError, match="401"):
        anonymous.create_branch(repo, branch="b")
    resp, _ = raw(hub, "GET", f"/api/models/{repo}")
    assert resp.status == 200  # public reads need none


def test_stale_parent_commit_is_refused(api, repo):
    old = api.repo_info(repo).sha
    api.upload_file(path_or_fileobj=b"1", path_in_repo="x.txt", repo_id=repo)
    with pytest.raises(HfHubHTTPError, match="412"):
        api.create_commit(repo, operations=[CommitOperationAdd("y.txt", b"2")], commit_message="stale",
                          parent_commit=old)
    assert "y.txt" not in api.list_repo_files(repo)


def test_concurrent_commits_to_different_branches(api, repo):
    branches = [f"b{i}" for i in range(4)]
    for b in branches:
        api.create_branch(repo, branch=b)
    errors = []

    def push(b):
        try:
            for n in range(3):
                head = api.repo_info(repo, revision=b).sha
                api.create_commit(repo, operations=[CommitOperationAdd(f"{b}-{n}.bin", os.urandom(2000))],
                                  commit_message=f"{b} {n}", revision=b, parent_commit=head)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(b,)) for b in branches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for b in branches:
        files = set(api.list_repo_files(repo, revision=b))
        assert {f"{b}-{n}.bin" for n in range(3)} <= files
        assert not any(f.endswith(".bin") and not f.startswith(b) for f in files)


def test_traversal_and_malformed_requests_get_clean_4xx(api, repo, hub, tmp_path):
    auth = {"Authorization": f"Bearer {HUB_TOKEN}"}
    cases = [
        ("GET", f"/{repo}/resolve/main/..%2F..%2F..%2Fetc%2Fpasswd", None, {}, 404),
        ("GET", f"/{repo}/resolve/main/../../hub.sqlite3", None, {}, 404),
        ("GET", f"/api/models/{repo}/tree/main/..%2F..", None, {}, 400),
        ("POST", "/api/repos/create", b'{"name": "../../evil"}', auth, 400),
        ("POST", "/api/repos/create", b'{"name": "ok", "organization": ".."}', auth, 400),
        ("POST", "/api/repos/create", b"{not json", auth, 400),
        ("POST", "/api/repos/create", b"[1, 2]", auth, 400),
        # announced as 2 MB: refused from the header alone, before any of it is read
        ("POST", "/api/repos/create", b"x", {**auth, "Content-Length": str(2 << 20)}, 413),
        ("POST", f"/api/models/{repo}/commit/main",
         b'{"key":"header","value":{"summary":"s"}}\n{"key":"file","value":{"path":"../x","content":"eA=="}}',
         auth, 400),
        ("POST", f"/api/models/{repo}/commit/main",
         b'{"key":"header","value":{"summary":"s"}}\n{"key":"file","value":{"path":".git/config","content":"eA=="}}',
         auth, 400),
        ("POST", f"/api/models/{repo}/commit/main",
         b'{"key":"header","value":{"summary":"s"}}\n{"key":"lfsFile","value":{"path":"w.bin","algo":"sha256",'
         b'"oid":"' + b"a" * 64 + b'","size":3}}', auth, 422),
        ("PUT", "/lfs/upload/" + "a" * 64 + "?size=3&expires=9999999999&sig=forged", b"abc", {}, 403),
        ("GET", "/api/models/alice", None, {}, 404),
        ("DELETE", f"/api/models/{repo}/branch/main", None, auth, 403),
    ]
    for method, path, body, headers, status in cases:
        resp, data = raw(hub, method, path, body, headers)
        assert resp.status == status, (method, path, resp.status, data[:200])
        assert "error" in json.loads(data)
    resp, _ = raw(hub, "GET", f"/{repo}/resolve/main/config.json")
    assert resp.status == 200  # still serving
    data_dir = Path(hub.config.data_dir)
    assert not (tmp_path / "x").exists() and not (data_dir.parent / "x").exists()
    assert api.list_repo_files(repo) == [".gitattributes", "config.json", "model.safetensors", "sub/dir/notes.txt"]


def test_range_requests(api, repo, hub, tmp_path):
    blob = (tmp_path / "src/model.safetensors").read_bytes()
    resp, data = raw(hub, "GET", f"/{repo}/resolve/main/model.safetensors", headers={"Range": "bytes=100-199"})
    assert resp.status == 206 and data == blob[100:200]
    assert resp.getheader("Content-Range") == f"bytes 100-199/{len(blob)}"
    resp, data = raw(hub, "GET", f"/{repo}/resolve/main/model.safetensors", headers={"Range": "bytes=4990-"})
    assert data == blob[4990:]
    resp, data = raw(hub, "GET", f"/{repo}/resolve/main/model.safetensors", headers={"Range": "bytes=-7"})
    assert data == blob[-7:]
    resp, _ = raw(hub, "GET", f"/{repo}/resolve/main/model.safetensors", headers={"Range": "bytes=9000-"})
    assert resp.status == 416
    resp, _ = raw(hub, "HEAD", f"/{repo}/resolve/main/model.safetensors")
    assert resp.getheader("Content-Length") == str(len(blob)) and len(resp.getheader("X-Repo-Commit")) == 40


def test_validate_yaml_answers_json(hub, api, repo):
    resp, data = raw(hub, "POST", "/api/validate-yaml", json.dumps({"content": "---\na: [\n---\n"}).encode())
    assert resp.status == 400 and json.loads(data)["errors"]
    with pytest.raises(Exception, match="YAML"):
        api.upload_file(path_or_fileobj=b"---\nlicense: [\n---\nbody", path_in_repo="README.md", repo_id=repo)
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\nbody", path_in_repo="README.md", repo_id=repo)


def _start_server(data_dir: Path, token_file: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "quantpub", "hub", "serve", "--port", "0", "--data-dir",
                             str(data_dir), "--token-file", str(token_file)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "serving http://" in line:
            return proc, line.split("serving ", 1)[1].split()[0]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("hub server did not start")


def test_killed_mid_upload_loses_nothing_committed(tmp_path, local_hub_online):
    token_file = write(tmp_path / "tokens", f"alice:{HUB_TOKEN}\n")
    data_dir = tmp_path / "data"
    proc, url = _start_server(data_dir, token_file)
    try:
        api = HfApi(endpoint=url, token=HUB_TOKEN)
        api.create_repo("alice/r")
        committed = os.urandom(300_000)
        api.upload_file(path_or_fileobj=committed, path_in_repo="model.safetensors", repo_id="alice/r")
        # start an LFS upload of a new 4 MB object and cut it off halfway by SIGKILL
        import hashlib
        payload = os.urandom(4 << 20)
        oid = hashlib.sha256(payload).hexdigest()
        resp, data = raw(url, "POST", "/alice/r.git/info/lfs/objects/batch", json.dumps(
            {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(payload)}],
             "hash_algo": "sha256"}).encode(), {"Authorization": f"Bearer {HUB_TOKEN}"})
        href = json.loads(data)["objects"][0]["actions"]["upload"]["href"]
        host, port = urlsplit(url).netloc.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        path = href.split(url, 1)[1]
        conn.putrequest("PUT", path)
        conn.putheader("Content-Length", str(len(payload)))
        conn.endheaders()
        conn.send(payload[: len(payload) // 2])
        time.sleep(0.5)
        assert list((data_dir / "tmp").iterdir()), "the upload should be in progress in tmp/"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        conn.close()
    finally:
        proc.kill()
    proc, url = _start_server(data_dir, token_file)
    try:
        api = HfApi(endpoint=url, token=HUB_TOKEN)
        assert Path(hf_hub_download("alice/r", "model.safetensors", endpoint=url)).read_bytes() == committed
        assert not list((data_dir / "tmp").iterdir())
        assert not (data_dir / "blobs" / oid[:2] / oid).exists()
        resp, data = raw(url, "POST", "/api/models/alice/r/commit/main",
                         b'{"key":"header","value":{"summary":"s"}}\n' + json.dumps(
                             {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid,
                                                          "size": len(payload)}}).encode(),
                         {"Authorization": f"Bearer {HUB_TOKEN}"})
        assert resp.status == 422
        api.upload_file(path_or_fileobj=payload, path_in_repo="w.bin", repo_id="alice/r")  # retry succeeds
        assert Path(hf_hub_download("alice/r", "w.bin", endpoint=url)).read_bytes() == payload
    finally:
        proc.kill()
        proc.wait(30)
