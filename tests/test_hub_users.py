"""The users file of a running hub is read again when it changes: a removed token is refused within
two seconds, a broken edit keeps the previous users and says so once. A real `quantpub hub serve`
process on 127.0.0.1."""

from __future__ import annotations

import json
import time

import yaml

from test_hub import _start_server, raw
from test_hub_trees import api_and_git_agree  # noqa: F401 - autouse: the API and git serve the same trees

ALICE, BOB, CAROL = "hf_alice_write_token_01", "hf_bob_write_token_0002", "hf_carol_write_token_03"


def _users(**tokens: str) -> str:
    return yaml.safe_dump({"users": {name: {"tokens": [{"token": t, "role": "write"}]} for name, t in tokens.items()}})


def _whoami(url: str, token: str) -> int:
    return raw(url, "GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})[0].status


def _until(check, limit: float = 5.0) -> float:
    """Seconds until ``check()`` holds (polled every 20 ms); fails after ``limit``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < limit, "not within the limit"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_removed_token_is_refused_within_two_seconds_and_a_broken_edit_keeps_the_users(tmp_path, local_hub_online):
    users = tmp_path / "users.yaml"
    users.write_text(_users(alice=ALICE, bob=BOB))
    proc, url = _start_server(tmp_path / "data", users)
    try:
        assert _whoami(url, BOB) == 200 and _whoami(url, ALICE) == 200
        users.write_text(_users(alice=ALICE))  # bob's token revoked, in place (as an editor may write)
        took = _until(lambda: _whoami(url, BOB) == 401)
        assert took < 2.0, f"the revoked token still worked after {took:.2f} s"
        create = json.dumps({"name": "bobs"}).encode()
        assert raw(url, "POST", "/api/repos/create", create, {"Authorization": f"Bearer {BOB}"})[0].status == 401
        assert _whoami(url, ALICE) == 200

        users.write_text("users:\n  alice: {tokens: [{token: " + ALICE + "\n  carol: [\n")  # broken YAML
        time.sleep(1.5)
        assert _whoami(url, ALICE) == 200 and _whoami(url, BOB) == 401 and _whoami(url, CAROL) == 401
        users.write_text("")  # a truncated file: no token left
        time.sleep(1.5)
        assert _whoami(url, ALICE) == 200

        tmp = tmp_path / "users.new"
        tmp.write_text(_users(alice=ALICE, carol=CAROL))
        tmp.replace(users)  # an atomic replace is seen too
        assert _until(lambda: _whoami(url, CAROL) == 200) < 2.0
    finally:
        proc.terminate()
        proc.wait(30)
    log = proc.stderr.read()
    refused = [line for line in log.splitlines() if "not reloaded" in line]
    assert len(refused) == 2, log  # one line per broken edit, not one per look
    assert "not valid YAML" in refused[0] and str(users) in refused[0] and "the previous users stay" in refused[0]
    assert "no user has a token" in refused[1]
    assert log.count("reloaded: 2 users") == 1 and log.count("reloaded: 1 users") == 1, log
