"""Hostile names, revisions and paths in every route and body: each request gets one proper answer
(a status under 500, headers h11 could send), the server logs no error and keeps serving."""

from __future__ import annotations

import json
import logging
from urllib.parse import quote

import pytest
from huggingface_hub import HfApi

from conftest import HUB_TOKEN
from test_hub_hostile import exchange, statuses
from test_hub_trees import api_and_git_agree  # noqa: F401 - autouse: the API and git serve the same trees

AUTH = f"Authorization: Bearer {HUB_TOKEN}\r\n"
# percent-encoded into the URL (and sent as they are in JSON bodies)
VALUES = [" ", "x ", " x", "\t", "x\t", "\r\n", "\r\nX-Evil: 1", "\n\n<html>", "\x00", "x\x00y", "\x7f", "\x1b[31m",
          "\u00e9", "\u202e", "\u200b", "\ufeff", "\U0001f600", "..", ".", "../..", "a/../../b", "/", "//", "./x",
          ".git", "x.git", "HEAD", "0" * 40, "a" * 64, "@{-1}", "-", "~1", "?", "#", ";", "\\", "%", "\"'<>",
          "x" * 300, "x" * 5000, "main ", " main", "main\r\n"]
# inserted as they are: percent-encoding tricks
RAW = ["%", "%zz", "%ff%fe", "%ED%A0%80", "%2e%2e", "%2e%2e%2f%2e%2e", "%252e%252e", "%00", "%0d%0a", "%20",
       "..%2f..%2fhub.sqlite3", "%C0%AE%C0%AE", "%u002e", "%2F", "a%2Fb%2F"]
ROUTES = [
    ("GET", "/api/models/alice/{}", None), ("GET", "/api/models/{}/pub", None),
    ("GET", "/api/{}/alice/pub", None), ("GET", "/api/models/alice/pub/revision/{}", None),
    ("GET", "/api/models/alice/pub/tree/{}", None), ("GET", "/api/models/alice/pub/tree/main/{}", None),
    ("GET", "/api/models/alice/pub/commits/{}", None), ("GET", "/api/models/alice/pub/refs?include_prs={}", None),
    ("GET", "/api/models?search={}&author={}", None), ("GET", "/api/models?limit={}", None),
    ("POST", "/api/models/alice/pub/paths-info/{}", b"paths=a.txt"),
    ("POST", "/api/models/alice/pub/preupload/{}", b'{"files": []}'),
    ("POST", "/api/models/alice/pub/commit/{}", b'{"key":"header","value":{"summary":"s"}}'),
    ("POST", "/api/models/alice/pub/branch/{}", b"{}"), ("DELETE", "/api/models/alice/pub/branch/{}", None),
    ("POST", "/api/models/alice/pub/tag/{}", b'{"tag": "t1"}'), ("DELETE", "/api/models/alice/pub/tag/{}", None),
    ("PUT", "/api/models/alice/{}/settings", b'{"private": false}'),
    ("GET", "/alice/pub/resolve/{}/a.txt", None), ("GET", "/alice/pub/resolve/main/{}", None),
    ("HEAD", "/alice/pub/resolve/main/{}", None), ("GET", "/datasets/alice/{}/resolve/main/a.txt", None),
    ("GET", "/{}", None), ("GET", "/alice/{}", None), ("GET", "/alice/pub/tree/{}", None),
    ("GET", "/alice/pub/tree/main/{}", None), ("GET", "/alice/pub/blob/main/{}", None),
    ("GET", "/alice/pub/commits/{}", None), ("GET", "/alice/pub/commit/{}", None),
    ("GET", "/alice/{}.git/info/refs?service=git-upload-pack", None),
    ("GET", "/alice/pub/info/refs?service={}", None),
    ("POST", "/alice/{}.git/info/lfs/objects/batch", b'{"operation": "download", "objects": []}'),
    ("GET", "/lfs/download/{}?size=1&expires=1&sig=x", None), ("PUT", "/lfs/upload/{}?size={}&sig=x", b"x"),
    ("GET", "/static/{}", None),
]
BODIES = [
    ("POST", "/api/repos/create", lambda v: {"name": v}),
    ("POST", "/api/repos/create", lambda v: {"name": "ok", "organization": v}),
    ("DELETE", "/api/repos/delete", lambda v: {"name": v}),
    ("POST", "/api/models/alice/pub/tag/main", lambda v: {"tag": v}),
    ("POST", "/api/models/alice/pub/branch/b-new", lambda v: {"startingPoint": v}),
    ("POST", "/api/models/alice/pub/preupload/main", lambda v: {"files": [{"path": v, "sample": "", "size": 1}]}),
    ("POST", "/api/models/alice/pub/paths-info/main", lambda v: {"paths": [v]}),
    ("POST", "/alice/pub.git/info/lfs/objects/batch",
     lambda v: {"operation": "upload", "objects": [{"oid": v, "size": 1}]}),
]


@pytest.fixture
def pub(hub):
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    api.create_repo("alice/pub")
    api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id="alice/pub")
    return hub


def _ask(hub, method: str, target: str, body: bytes | None, content_type: str = "application/json") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{AUTH}Connection: close\r\n"
    if body is not None:
        kind = "application/x-www-form-urlencoded" if body.startswith(b"paths=") else content_type
        head += f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
    return exchange(hub, head.encode("latin-1") + b"\r\n" + (body or b""))


def _answered(out: bytes) -> int:
    got = statuses(out)
    assert len(got) == 1, out[:300]
    return got[0]


def test_every_hostile_name_revision_and_path_is_answered(pub, caplog):
    caplog.set_level(logging.WARNING)
    unanswered = []
    for method, route, body in ROUTES:
        for value in [quote(v, safe="") for v in VALUES] + RAW:
            target = route.replace("{}", value)
            out = _ask(pub, method, target, body)
            got = statuses(out)
            if len(got) != 1 or got[0] >= 500:
                unanswered.append((method, target[:80], got, out[:200]))
    assert unanswered == []
    for method, path, make in BODIES:
        for value in VALUES:
            out = _ask(pub, method, path, json.dumps(make(value)).encode())
            assert _answered(out) < 500, (method, path, value, out[:300])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    still_serving_pub(pub)


def still_serving_pub(hub):
    out = _ask(hub, "GET", "/alice/pub/resolve/main/a.txt", None)
    assert _answered(out) == 200 and out.endswith(b"\r\n\r\na")


def test_the_issue_s_three_requests_get_their_404s_with_an_escaped_message(pub):
    for target, message in [("/api/models/alice/x%20", b"Repository Not Found: alice/x"),
                            ("/api/models/alice/pub/revision/%20", b"Invalid rev id:"),
                            ("/alice/pub/resolve//a.txt", b"Invalid rev id:"),
                            ("/api/models/alice/x%0d%0a%C3%A9", b"Repository Not Found: alice/x\\x0d\\x0a\\xe9")]:
        out = _ask(pub, "GET", target, None)
        head = out.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        assert _answered(out) == 404, (target, out[:300])
        assert f"x-error-message: {message.decode()}".encode().lower() in [h.lower() for h in head], (target, head)
    still_serving_pub(pub)
