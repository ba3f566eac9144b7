"""Request heads within bounds (431, 414), Range units the hub does not know ignored (RFC 9110),
against a real hub on 127.0.0.1; every loop bounded."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time

import pytest
from huggingface_hub import HfApi

from conftest import HUB_TOKEN
from test_hub import raw
from test_hub_hostile import exchange, serving_alice_r, statuses, still_serving
from test_hub_trees import api_and_git_agree  # noqa: F401 - autouse: the API and git serve the same trees

AUTH = {"Authorization": f"Bearer {HUB_TOKEN}"}


@pytest.fixture
def hub(tmp_path, local_hub_online):
    yield from serving_alice_r(tmp_path / "hub")


def _get(extra: bytes = b"", target: bytes = b"/api/models/alice/r") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"Connection: close\r\n\r\n"


def _answer(server, data: bytes) -> tuple[int, bytes]:
    out = exchange(server, data)
    got = statuses(out)
    assert len(got) == 1, out[:300]
    return got[0], out


def test_request_heads_are_bounded_431_and_414(hub):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(97))  # with Host and Connection: 99, with one more 100
    assert _answer(hub, _get(fields + b"X-Last: v\r\n"))[0] == 200
    status, out = _answer(hub, _get(fields + b"X-A: v\r\nX-B: v\r\n"))
    assert status == 431 and b"101 header fields are over the limit of 100" in out, out[:400]
    assert _answer(hub, _get(b"".join(b"X-%d: 1\r\n" % i for i in range(10_000))))[0] == 431  # the issue's ~120 KB
    assert _answer(hub, _get(b"X-A: " + b"a" * 70_000 + b"\r\n"))[0] == 431
    filler = 64 * 1024 - len(_get(b"X-A: \r\n"))  # a head of exactly 64 KiB is served, one byte more is not
    assert _answer(hub, _get(b"X-A: " + b"a" * filler + b"\r\n"))[0] == 200
    status, out = _answer(hub, _get(b"X-A: " + b"a" * (filler + 1) + b"\r\n"))
    assert status == 431 and b"request head of 65537 bytes is over the limit of 65536" in out, out[:400]
    # a target over 16 KiB: 414, whether h11 saw the whole head or stopped reading an unfinished line
    assert _answer(hub, _get(target=b"/api/models/alice/" + b"r" * (16 * 1024 - 18)))[0] == 404
    assert _answer(hub, _get(target=b"/api/models/alice/" + b"r" * (16 * 1024 - 17)))[0] == 414
    assert _answer(hub, _get(target=b"/api/models?search=" + b"q" * 20_000))[0] == 414
    status, out = _answer(hub, b"GET /" + b"a" * 300_000)  # no end of line yet
    assert status == 414 and b"request line over 65536 bytes" in out, out[:400]
    status, out = _answer(hub, b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 300_000)  # no end of head yet
    assert status == 431, out[:400]
    still_serving(hub)


def test_a_head_sent_in_small_pieces_is_bounded_too(hub):
    sock = socket.create_connection(hub.server_address, timeout=5)
    sent, answer = 0, b""
    try:
        sock.sendall(b"GET /api/models HTTP/1.1\r\nHost: x\r\n")
        while sent < 200_000:  # 200 KB at most, 4 KB a time: h11 stops buffering past 64 KiB
            sock.sendall(b"X-Slow-%06d: " % sent + b"s" * 4000 + b"\r\n")
            sent += 4016
            time.sleep(0.002)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    assert statuses(answer) == [431] and sent < 200_000, (sent, answer[:300])
    still_serving(hub)


def test_limits_are_configurable(tmp_path, local_hub_online):
    for server in serving_alice_r(tmp_path / "small", max_head_bytes=4096, max_headers=10, max_target_bytes=100):
        assert _answer(server, _get(b"".join(b"X-%d: 1\r\n" % i for i in range(8))))[0] == 200
        assert _answer(server, _get(b"".join(b"X-%d: 1\r\n" % i for i in range(9))))[0] == 431
        assert _answer(server, _get(b"X-A: " + b"a" * 4096 + b"\r\n"))[0] == 431
        assert _answer(server, _get(target=b"/" + b"a" * 100))[0] == 414
        assert _answer(server, b"GET /" + b"a" * 10_000)[0] == 414  # unfinished, over the head limit
        still_serving(server)


def test_unknown_range_units_are_ignored(hub):
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    blob = os.urandom(3000)
    api.upload_file(path_or_fileobj=blob, path_in_repo="w.safetensors", repo_id="alice/r")
    oid = hashlib.sha256(blob).hexdigest()
    batch = json.dumps({"operation": "download", "objects": [{"oid": oid, "size": len(blob)}]}).encode()
    href = json.loads(raw(hub, "POST", "/alice/r.git/info/lfs/objects/batch", batch, AUTH)[1])["objects"][0][
        "actions"]["download"]["href"].split(hub.url, 1)[1]
    for path in ("/alice/r/resolve/main/w.safetensors", href):
        for header in ("items=0-1", "Items=0-1", "garbage", "=0-1", "bytes0-1"):
            resp, data = raw(hub, "GET", path, headers={"Range": header})
            assert resp.status == 200 and data == blob, (path, header, resp.status)
        resp, data = raw(hub, "GET", path, headers={"Range": "bytes=10-19"})
        assert resp.status == 206 and data == blob[10:20]
        resp, data = raw(hub, "GET", path, headers={"Range": " BYTES =10-19"})
        assert resp.status == 206 and data == blob[10:20]
        assert raw(hub, "GET", path, headers={"Range": "bytes=9000-"})[0].status == 416
        assert raw(hub, "GET", path, headers={"Range": "bytes=abc"})[0].status == 400  # a bytes range that is not one
