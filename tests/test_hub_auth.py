"""Users, organisations and tokens: a second user can neither read A's private repo nor write A's namespace."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from test_hub import raw
from test_hub_trees import api_and_git_agree  # noqa: F401 - autouse: the API and git serve the same trees

ALICE, BOB, CAROL = "hf_alice_write_token_01", "hf_bob_write_token_0002", "hf_carol_read_token_003"
USERS = {"users": {"alice": {"tokens": [{"token": ALICE, "role": "write"}]},
                   "bob": {"tokens": [{"token": BOB, "role": "write"}]},
                   "carol": {"tokens": [{"token": CAROL, "role": "read"}]}},
         "orgs": {"team": {"members": {"alice": "write", "bob": "read"}}}}


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def hub(tmp_path, local_hub_online):
    from quantpub.hub import HubConfig, start_in_thread
    from quantpub.hub.auth import Users, UsersSpec

    server, thread = start_in_thread(HubConfig(tmp_path / "hub", users=Users(UsersSpec.model_validate(USERS))))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def alice(hub):
    return HfApi(endpoint=hub.url, token=ALICE)


@pytest.fixture
def secret(alice):
    """alice/secret: private, with an LFS file; returns its bytes."""
    payload = os.urandom(50_000)
    alice.create_repo("alice/secret", private=True)
    alice.upload_file(path_or_fileobj=payload, path_in_repo="model.safetensors", repo_id="alice/secret")
    alice.create_branch("alice/secret", branch="dev")
    return payload


def test_private_repo_is_404_to_other_users_on_every_read_route(hub, alice, secret):
    oid = hashlib.sha256(secret).hexdigest()
    sha = alice.repo_info("alice/secret").sha
    lfs = json.dumps({"operation": "download", "objects": [{"oid": oid, "size": len(secret)}]}).encode()
    routes = [("GET", "/api/models/alice/secret", None), ("GET", "/api/models/alice/secret/revision/main", None),
              ("GET", f"/api/models/alice/secret/revision/{sha}", None), ("GET", "/api/models/alice/secret/refs", None),
              ("GET", "/api/models/alice/secret/tree/main", None), ("GET", "/api/models/alice/secret/tree/dev/x", None),
              ("POST", "/api/models/alice/secret/paths-info/main", b"paths=model.safetensors"),
              ("GET", "/api/models/alice/secret/commits/main", None),
              ("GET", "/alice/secret/resolve/main/model.safetensors", None),
              ("HEAD", "/alice/secret/resolve/main/model.safetensors", None),
              ("POST", "/alice/secret.git/info/lfs/objects/batch", lfs),
              ("GET", "/alice/secret", None), ("GET", "/alice/secret/tree/main", None),
              ("GET", "/alice/secret/commits/main", None), ("GET", "/alice/secret/blob/main/model.safetensors", None),
              ("GET", "/alice/secret/info/refs?service=git-upload-pack", None)]
    for token in (BOB, CAROL):
        for method, path, body in routes:
            resp, data = raw(hub, method, path, body, auth(token))
            assert resp.status == 404, (token, method, path, resp.status, data[:200])
            assert b"model.safetensors" not in data and oid.encode() not in data
    for method, path, body in routes[:3]:  # and to anonymous callers
        assert raw(hub, method, path, body)[0].status == 404
    for token in (BOB, CAROL, None):
        listed = HfApi(endpoint=hub.url, token=token or False).list_models(author="alice")
        assert [m.id for m in listed] == []
    assert [m.id for m in alice.list_models(author="alice")] == ["alice/secret"]


def test_a_second_user_cannot_write_a_namespace_not_theirs(hub, alice, secret):
    alice.create_repo("alice/public")
    bob = HfApi(endpoint=hub.url, token=BOB)
    before = {r: alice.list_repo_refs(r) for r in ("alice/public", "alice/secret")}
    attempts = [
        lambda: bob.create_repo("alice/new"),
        lambda: bob.delete_repo("alice/public"),
        lambda: bob.update_repo_settings("alice/public", private=True),
        lambda: bob.create_branch("alice/public", branch="evil"),
        lambda: bob.create_tag("alice/public", tag="evil"),
        lambda: bob.delete_branch("alice/secret", branch="dev"),
        lambda: bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/public"),
        lambda: bob.create_commit("alice/public", operations=[CommitOperationAdd("y.txt", b"y")], commit_message="m"),
        lambda: bob.delete_repo("alice/secret"),
        lambda: bob.update_repo_settings("alice/secret", private=False),
        lambda: bob.create_repo("team/bobs"),  # bob is a read member of team
    ]
    for attempt in attempts:
        with pytest.raises((HfHubHTTPError, RepositoryNotFoundError)) as err:
            attempt()
        assert err.value.response.status_code in (403, 404), err.value
    assert {r: alice.list_repo_refs(r) for r in ("alice/public", "alice/secret")} == before
    assert alice.repo_info("alice/secret").private is True
    assert not HfApi(endpoint=hub.url, token=ALICE).repo_exists("alice/new")
    # a read token writes nowhere, not even its own namespace
    with pytest.raises(HfHubHTTPError, match="403"):
        HfApi(endpoint=hub.url, token=CAROL).create_repo("carol/mine")
    # each user writes their own namespace; a write member writes the organisation's
    bob.create_repo("bob/mine")
    alice.create_repo("team/shared", private=True)
    assert bob.repo_info("team/shared").private is True  # a read member sees the private org repo
    with pytest.raises(HfHubHTTPError, match="403"):
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="team/shared")


def test_an_lfs_sha256_alone_gets_no_one_anothers_private_bytes(hub, alice, secret):
    oid, size = hashlib.sha256(secret).hexdigest(), len(secret)
    bob = HfApi(endpoint=hub.url, token=BOB)
    bob.create_repo("bob/copy")
    upload = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": size}]}).encode()
    resp, data = raw(hub, "POST", "/bob/copy.git/info/lfs/objects/batch", upload, auth(BOB))
    obj = json.loads(data)["objects"][0]
    assert "upload" in obj["actions"], "bob must upload the bytes himself: the object is not 'already stored' for him"
    line = {"key": "lfsFile", "value": {"path": "stolen.safetensors", "algo": "sha256", "oid": oid, "size": size}}
    commit = b'{"key":"header","value":{"summary":"s"}}\n' + json.dumps(line).encode()
    resp, data = raw(hub, "POST", "/api/models/bob/copy/commit/main", commit, auth(BOB))
    assert resp.status == 422, data
    download = json.dumps({"operation": "download", "objects": [{"oid": oid, "size": size}]}).encode()
    resp, data = raw(hub, "POST", "/bob/copy.git/info/lfs/objects/batch", download, auth(BOB))
    assert json.loads(data)["objects"][0]["error"]["code"] == 404
    resp, data = raw(hub, "GET", f"/lfs/download/{oid}?size={size}&user=&expires=9999999999&sig=x", None, auth(BOB))
    assert resp.status == 403 and secret not in data
    assert "stolen.safetensors" not in bob.list_repo_files("bob/copy")
    # alice's own batch says "already stored"; once public, anyone may reference it
    resp, data = raw(hub, "POST", "/alice/secret.git/info/lfs/objects/batch", upload, auth(ALICE))
    assert "actions" not in json.loads(data)["objects"][0]
    alice.update_repo_settings("alice/secret", private=False)
    resp, data = raw(hub, "POST", "/api/models/bob/copy/commit/main", commit, auth(BOB))
    assert resp.status == 200, data


def test_whoami_tells_the_truth(hub):
    me = HfApi(endpoint=hub.url, token=ALICE).whoami()
    assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "write"
    assert [(o["name"], o["roleInOrg"]) for o in me["orgs"]] == [("team", "write")]
    carol = HfApi(endpoint=hub.url, token=CAROL).whoami()
    assert carol["name"] == "carol" and carol["auth"]["accessToken"]["role"] == "read" and carol["orgs"] == []
    assert raw(hub, "GET", "/api/whoami-v2")[0].status == 401
    assert raw(hub, "GET", "/api/whoami-v2", None, auth("hf_not_a_token_at_all"))[0].status == 401


def test_list_models_by_author_search_and_limit(hub, alice):
    for name in ("tulu-7B-GPTQ", "tulu-7B-AWQ", "other"):
        alice.create_repo(f"alice/{name}")
    alice.create_repo("alice/tulu-private", private=True)
    HfApi(endpoint=hub.url, token=BOB).create_repo("bob/tulu-copy")
    anon = HfApi(endpoint=hub.url, token=False)
    assert sorted(m.id for m in anon.list_models(search="tulu")) == ["alice/tulu-7B-AWQ", "alice/tulu-7B-GPTQ",
                                                                       "bob/tulu-copy"]
    assert sorted(m.id for m in alice.list_models(author="alice", search="TULU")) == [
        "alice/tulu-7B-AWQ", "alice/tulu-7B-GPTQ", "alice/tulu-private"]
    assert len(list(anon.list_models(limit=2))) == 2
    assert raw(hub, "GET", "/api/models?limit=abc")[0].status == 400


def test_users_file_is_checked(tmp_path):
    from quantpub.hub import read_users

    bad = tmp_path / "users.yaml"
    bad.write_text("users:\n  alice:\n    tokens: [{token: hf_aaaaaaaaaa, role: admin}]\n")
    with pytest.raises(ValueError, match="role"):
        read_users(bad)
    bad.write_text("users:\n  alice: {tokens: []}\norgs:\n  team: {members: {zed: write}}\n")
    with pytest.raises(ValueError, match="unknown users"):
        read_users(bad)
    bad.write_text("users:\n  alice: {tokens: [{token: hf_aaaaaaaaaa\n")
    with pytest.raises(ValueError, match="not valid YAML"):  # not "expected 'user:token'"
        read_users(bad)
    legacy = tmp_path / "tokens"
    legacy.write_text("alice:hf_legacy_token_1\n")
    assert read_users(legacy).caller("Bearer hf_legacy_token_1").name == "alice"
    assert read_users(legacy).path == legacy  # what a running hub watches


def test_a_new_data_dir_gets_an_admin_and_older_token_files_keep_working(tmp_path):
    from quantpub.hub import load_or_create_users

    data = tmp_path / "hub"
    data.mkdir()
    (data / "tokens").write_text("quantpub:hf_older_token_0001\n")  # what earlier versions generated
    users, path = load_or_create_users(data)
    assert path == data / "users.yaml" and oct(path.stat().st_mode & 0o777) == "0o600"
    old = users.caller("Bearer hf_older_token_0001")
    assert old.name == "quantpub" and old.admin and old.can_write("anyone")
    assert users.caller(f"Bearer {users.write_token()}").admin
    again, _ = load_or_create_users(data)
    assert again.write_token() == users.write_token()  # created once
