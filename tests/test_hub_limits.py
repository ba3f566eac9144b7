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
from test_hub_hostile import alice_r_hub, exchange, serving_alice_r, statuses, still_serving
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
    with alice_r_hub(tmp_path / "small", max_head_bytes=4096, max_headers=10, max_target_bytes=100) as server:
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


def _slow(server, source: str = "127.0.0.1") -> socket.socket:
    """A connection from ``source`` that sends half a request head and waits."""
    sock = socket.create_connection(server.server_address, timeout=5, source_address=(source, 0))
    sock.sendall(b"GET /api/models HTTP/1.1\r\nHost: x\r\n")
    return sock


def _status_from(server, source: str, extra: bytes = b"") -> int:
    out = exchange(server, _get(extra, b"/api/models"), source=source)
    got = statuses(out)
    assert len(got) == 1, out[:300]
    return got[0]


def test_one_clients_slow_connections_do_not_keep_everyone_else_at_503(tmp_path, local_hub_online):
    """100 slow connections from 127.0.0.1 (loopback: 127.0.0.2 is another client on this machine)."""
    for per_client, others_get in ((0, 503), (5, 200)):  # without the per-client cap, then with it
        with alice_r_hub(tmp_path / f"cap{per_client}", max_connections=30,
                                      max_client_connections=per_client) as server:
            held, refused = [], 0
            try:
                for _ in range(100):
                    sock = _slow(server)
                    held.append(sock)
                    sock.settimeout(0.3 if per_client else 0.01)
                    try:
                        answer = sock.recv(1000)
                    except socket.timeout:
                        continue
                    refused += b" 429 " in answer and b"more than 5 connections at once from 127.0.0.1" in answer
                # at most 5 held (the setup's client may keep one of them alive), the rest refused at once
                assert (refused >= 95) if per_client else refused == 0, refused
                assert _status_from(server, "127.0.0.2") == others_get
            finally:
                for sock in held:
                    sock.close()
            _until_served(server)


def _until_served(server, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while _status_from(server, "127.0.0.3") != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_behind_a_trusted_proxy_the_forwarded_client_is_capped(tmp_path, local_hub_online):
    proxy, client = "127.0.0.9", b"X-Forwarded-For: 198.51.100.7\r\n"
    with alice_r_hub(tmp_path / "proxied", max_client_connections=3, trusted_proxies=[proxy]) as server:
        # the proxy's own connections are not capped: it opens 6 for 6 clients
        held = [socket.create_connection(server.server_address, timeout=5, source_address=(proxy, 0))
                for _ in range(6)]
        try:
            for sock in held[:3]:  # three requests of one client in flight: bodies not sent yet
                sock.sendall(b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\n" + client
                             + b"Content-Length: 100\r\n\r\n{")
            time.sleep(0.3)
            held[3].sendall(_get(client, b"/api/models"))
            answer = held[3].recv(1000)
            assert b" 429 " in answer and b"more than 3 requests at once from 198.51.100.7" in answer, answer
            assert _status_from(server, proxy, b"X-Forwarded-For: 203.0.113.5\r\n") == 200  # another client
        finally:
            for sock in held:
                sock.close()
        # X-Forwarded-Proto from the proxy is believed (hrefs say https), from anyone else not
        for source, scheme in ((proxy, b'"url":"https://x/'), ("127.0.0.1", b'"url":"http://x/')):
            body = json.dumps({"name": f"r-{source[-1]}"}).encode()
            out = exchange(server, b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\n"
                           + f"Authorization: Bearer {HUB_TOKEN}\r\nContent-Length: {len(body)}\r\n".encode()
                           + b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n" + body, source=source)
            assert scheme in out.replace(b" ", b""), (source, out)


def test_without_trusted_proxies_forwarded_headers_are_not_believed(hub):
    """uvicorn would believe X-Forwarded-* from 127.0.0.1 by default; the hub only from configured proxies."""
    body = json.dumps({"name": "fwd"}).encode()
    resp, data = raw(hub, "POST", "/api/repos/create", body, {**AUTH, "X-Forwarded-Proto": "https",
                                                              "X-Forwarded-For": "198.51.100.7"})
    assert resp.status == 200 and json.loads(data)["url"].startswith("http://"), data


def test_a_trusted_proxy_must_be_an_address(tmp_path):
    from quantpub.hub import HubConfig

    with pytest.raises(ValueError, match="'proxy.example' is not an IP address or network"):
        HubConfig(tmp_path, trusted_proxies=["proxy.example"])
