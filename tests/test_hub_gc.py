"""Garbage collection while the hub serves, automatic sweeps and storage quotas, against real hubs
on 127.0.0.1. Every loop is bounded."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from conftest import HUB_TOKEN
from test_hub import _start_server, raw
from test_hub_hostile import alice_r_hub
from test_hub_trees import api_and_git_agree  # noqa: F401 - autouse: the API and git serve the same trees

AUTH = {"Authorization": f"Bearer {HUB_TOKEN}"}


def _commit_body(ops: list[dict], summary: str = "s", parent: str | None = None) -> bytes:
    header = {"summary": summary} | ({"parentCommit": parent} if parent else {})
    return b"\n".join(json.dumps(line).encode() for line in [{"key": "header", "value": header}] + ops)


def _file(path: str, data: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode()}}


def _lfs(path: str, data: bytes) -> dict:
    return {"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": hashlib.sha256(data).hexdigest(),
                                        "size": len(data)}}


def upload_lfs(server, repo: str, data: bytes, auth: dict = AUTH) -> int:
    """Upload bytes through the LFS batch API (not committed): the batch call's status."""
    oid = hashlib.sha256(data).hexdigest()
    resp, body = raw(server, "POST", f"/{repo}.git/info/lfs/objects/batch", json.dumps(
        {"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}).encode(), auth)
    if resp.status != 200:
        return resp.status
    actions = json.loads(body)["objects"][0].get("actions")
    if actions:
        href = actions["upload"]["href"]
        url = href.split("/lfs/", 1)[1]
        put, _ = raw(server, "PUT", "/lfs/" + url, data, {"Content-Length": str(len(data))})
        assert put.status == 200
    return 200


def _blobs(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "blobs").glob("*/*")}


def _referenced(server) -> set[str]:
    return {row[0] for row in server.store.db().execute("SELECT DISTINCT sha256 FROM files")}


def test_gc_through_a_running_hub_from_the_command_line(tmp_path, local_hub_online):
    data = tmp_path / "data"
    users = {"users": {"quantpub": {"admin": True, "tokens": [{"token": HUB_TOKEN, "role": "write"}]},
                       "bob": {"tokens": [{"token": "hf_bob_write_token_0002", "role": "write"}]}}}
    (tmp_path / "users.yaml").write_text(yaml.safe_dump(users))
    proc, url = _start_server(data, tmp_path / "users.yaml")
    try:
        api = HfApi(endpoint=url, token=HUB_TOKEN)
        api.create_repo("quantpub/r")
        kept = os.urandom(5000)
        api.upload_file(path_or_fileobj=kept, path_in_repo="w.safetensors", repo_id="quantpub/r")
        assert upload_lfs(url, "quantpub/r", b"never committed" * 100) == 200
        stale = _commit_body([_file("refused.txt", b"r" * 1000)], parent="0" * 40)
        assert raw(url, "POST", "/api/models/quantpub/r/commit/main", stale, AUTH)[0].status == 412

        def gc(*args: str, token: str = HUB_TOKEN) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "quantpub", "hub", "gc", "--data-dir", str(data),
                                   "--min-age-hours", "0", *args], capture_output=True, text=True,
                                  env={**os.environ, "HF_TOKEN": token}, timeout=120)

        out = gc()
        assert out.returncode == 0 and "would remove 2 unreferenced blobs, 2.5 kB" in out.stdout, out
        out = gc("--delete", token="hf_bob_write_token_0002")
        assert out.returncode == 3 and "403" in out.stderr and "bob is not an admin" in out.stderr, out
        out = gc("--delete")
        assert out.returncode == 0 and "removed 2 unreferenced blobs" in out.stdout, out
        assert gc().stdout.startswith("would remove 0 unreferenced blobs")
        resp, body = raw(url, "GET", "/quantpub/r/resolve/main/w.safetensors")
        assert resp.status == 200 and body == kept
    finally:
        proc.terminate()
        proc.wait(30)


def _backdate(server, data: bytes, seconds: float = 3600) -> None:
    """Make an upload look ``seconds`` old (as if its commit came that much later)."""
    sha = hashlib.sha256(data).hexdigest()
    path = Path(server.config.data_dir) / "blobs" / sha[:2] / sha
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_a_blob_that_a_commit_takes_while_gc_runs_is_kept(tmp_path, local_hub_online):
    """The interleaving itself: GC has listed an old upload as garbage and waits for the store's lock
    (held here, as a commit holds it), a commit naming the upload lands, then GC goes on."""
    from quantpub.hub.gc import collect
    from quantpub.hub.store import FileEntry, git_blob_oid, lfs_pointer

    with alice_r_hub(tmp_path / "hub", gc_every=0) as server:
        late, junk = os.urandom(3000), os.urandom(1000)
        for data in (late, junk):
            assert upload_lfs(server, "alice/r", data) == 200
            _backdate(server, data)
        store, sha = server.store, hashlib.sha256(late).hexdigest()
        reports = []
        with store.gc_lock:
            gc = threading.Thread(target=lambda: reports.append(collect(store, delete=True, min_age=60)))
            gc.start()
            time.sleep(1.0)  # GC lists both (it needs the lock only to remove) and waits
            repo = store.get_repo("model", "alice", "r")
            store.commit(repo, "main", summary="late", description="", author="alice", parent=None, delete=[],
                         delete_folders=[], add=[FileEntry("late.bin", sha, len(late),
                                                           git_blob_oid(lfs_pointer(sha, len(late))), True)])
        gc.join(30)
        server.app.state.hub.changed(repo)
        assert reports[0].kept_committed == 1 and reports[0].unreferenced == [hashlib.sha256(junk).hexdigest()]
        resp, body = raw(server, "GET", "/alice/r/resolve/main/late.bin")
        assert resp.status == 200 and body == late


@pytest.mark.slow
def test_gc_racing_uploads_and_commits_loses_no_committed_file(tmp_path, local_hub_online):
    """GC runs again and again (through the admin API) while three writers commit: files sent in the
    commit, LFS files uploaded just before their commit, and LFS files uploaded "an hour ago" (older
    than GC's minimum age: candidates until their commit lands). Every commit that lands keeps its
    files; one whose old upload GC took first is refused (422), never left naming a missing blob."""
    from quantpub.hub import Users

    with alice_r_hub(tmp_path / "hub", users=Users.from_tokens({HUB_TOKEN: "alice"}, admin=True), gc_every=0) as server:
        api = HfApi(endpoint=server.url, token=HUB_TOKEN)
        body = _commit_body([_file(f"many/{n}.txt", os.urandom(64)) for n in range(300)])  # GC's scans take a while
        assert raw(server, "POST", "/api/models/alice/r/commit/main", body, AUTH)[0].status == 200
        orphans = [os.urandom(500 + i) for i in range(300)]  # uploads never committed: GC's work
        for data in orphans:
            assert upload_lfs(server, "alice/r", data) == 200
            _backdate(server, data)
        for i in range(3):
            api.create_branch("alice/r", branch=f"w{i}")
        committed: dict[tuple[str, str], bytes] = {}
        refused, errors, runs, done = [], [], [], threading.Event()

        def writer(i: int) -> None:
            try:
                for n in range(20):
                    fresh, late = os.urandom(1000 + n), os.urandom(2000 + n)
                    assert upload_lfs(server, "alice/r", fresh) == 200 and upload_lfs(server, "alice/r", late) == 200
                    _backdate(server, late)  # its commit comes "an hour" after the upload: GC may take it first
                    for path, op, data in ((f"w{i}/{n}.old", _lfs, late), (f"w{i}/{n}.txt", _file, os.urandom(300 + n)),
                                           (f"w{i}/{n}.bin", _lfs, fresh)):
                        resp, body = raw(server, "POST", f"/api/models/alice/r/commit/w{i}",
                                         _commit_body([op(path, data)]), AUTH)
                        if resp.status == 200:
                            committed[(f"w{i}", path)] = data
                        else:  # GC removed the old upload before the commit checked it: refused
                            assert resp.status == 422 and path.endswith(".old") and b"upload it again" in body, \
                                (path, resp.status, body)
                            refused.append(path)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def collector() -> None:
            while not done.is_set() and len(runs) < 2000:
                resp, body = raw(server, "POST", "/api/admin/gc", json.dumps({"delete": True, "min_age": 60}).encode(),
                                 AUTH)
                assert resp.status == 200, body
                runs.append(json.loads(body))

        gc_thread = threading.Thread(target=collector)
        gc_thread.start()
        writers = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
        for t in writers:
            t.start()
        for t in writers:
            t.join(300)
        done.set()
        gc_thread.join(120)
        removed = sum(len(r["unreferenced"]) for r in runs)
        taken = sum(r["kept_committed"] for r in runs)
        old_landed = sum(path.endswith(".old") for _, path in committed)
        print(f"{len(runs)} GC runs removed {removed} blobs and saw {taken} taken by a commit while they ran; "
              f"{len(committed)} files committed ({old_landed} of 60 old uploads), {len(refused)} commits refused")
        assert errors == [] and len(runs) >= 10, (errors, len(runs))
        assert len(committed) - old_landed == 120, "every commit of files sent in it or just uploaded lands"
        for (branch, path), data in committed.items():
            resp, body = raw(server, "GET", f"/alice/r/resolve/{branch}/{path}")
            assert resp.status == 200 and body == data, (branch, path, resp.status)
        final = json.loads(raw(server, "POST", "/api/admin/gc", b'{"delete": true, "min_age": 0}', AUTH)[1])
        assert removed + len(final["unreferenced"]) == len(orphans) + len(refused)
        assert _blobs(Path(server.config.data_dir)) == _referenced(server)  # nothing orphaned, nothing missing


def test_the_automatic_sweep_removes_old_orphans_only(tmp_path, local_hub_online):
    with alice_r_hub(tmp_path / "hub", gc_every=0.2, gc_min_age=2.0) as server:
        api = HfApi(endpoint=server.url, token=HUB_TOKEN)
        kept = os.urandom(4000)
        api.upload_file(path_or_fileobj=kept, path_in_repo="w.safetensors", repo_id="alice/r")
        orphan = os.urandom(3000)
        assert upload_lfs(server, "alice/r", orphan) == 200
        sha = hashlib.sha256(orphan).hexdigest()
        path = Path(server.config.data_dir) / "blobs" / sha[:2] / sha
        born = path.stat().st_mtime
        deadline = time.monotonic() + 10
        while path.exists():
            assert time.time() - born < 1.5 or time.monotonic() < deadline, "the old orphan was not collected"
            time.sleep(0.05)
        assert time.time() - born >= 2.0, "collected before it was old enough"
        assert raw(server, "GET", "/alice/r/resolve/main/w.safetensors")[1] == kept


def test_storage_quota_per_namespace(tmp_path, local_hub_online):
    bob = "hf_bob_write_token_0002"
    with alice_r_hub(tmp_path / "hub", tokens={HUB_TOKEN: "alice", bob: "bob"}, quota=20_000) as server:
        api = HfApi(endpoint=server.url, token=HUB_TOKEN)
        first = os.urandom(9000)
        api.upload_file(path_or_fileobj=first, path_in_repo="a.safetensors", repo_id="alice/r")
        api.upload_file(path_or_fileobj=first, path_in_repo="copy.safetensors", repo_id="alice/r")  # stored once
        api.create_repo("alice/other")
        api.upload_file(path_or_fileobj=first, path_in_repo="a.safetensors", repo_id="alice/other")  # same blob
        with pytest.raises(HfHubHTTPError, match="storage quota of alice exceeded") as err:
            api.upload_file(path_or_fileobj=os.urandom(12_000), path_in_repo="b.safetensors", repo_id="alice/r")
        assert err.value.response.status_code == 413
        # regular files in a commit count too, refused whole (413) with nothing committed
        body = _commit_body([_file("c.txt", os.urandom(6000)), _file("d.txt", os.urandom(6000))])
        resp, data = raw(server, "POST", "/api/models/alice/r/commit/main", body, AUTH)
        assert resp.status == 413 and json.loads(data)["error"].startswith("storage quota of alice exceeded")
        assert resp.getheader("X-Error-Code") == "StorageQuotaExceeded"
        # uploads not yet committed count as well
        assert upload_lfs(server, "alice/r", os.urandom(8000)) == 200
        assert upload_lfs(server, "alice/r", os.urandom(5000)) == 413
        # another namespace has its own quota
        HfApi(endpoint=server.url, token=bob).create_repo("bob/r")
        HfApi(endpoint=server.url, token=bob).upload_file(path_or_fileobj=os.urandom(15_000),
                                                          path_in_repo="b.safetensors", repo_id="bob/r")
        # deleting repos frees the namespace's storage
        api.delete_repo("alice/other")
        api.delete_repo("alice/r")
        api.create_repo("alice/r2")
        assert raw(server, "POST", "/api/models/alice/r2/commit/main", _commit_body([_file("c.txt", os.urandom(6000))]),
                   AUTH)[0].status == 200
