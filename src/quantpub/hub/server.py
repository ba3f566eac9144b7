"""Serving the hub: uvicorn (h11) with timeouts and a connection cap, one server per data dir.

Why uvicorn + Starlette: both are maintained by the same people, widely deployed, and give
HTTP/1.1 framing (h11: one Content-Length, chunked bodies, no header injection), a
keep-alive timeout, a header size limit and a connection cap (``limit_concurrency``: past it
new requests get 503). uvicorn has no deadline for a request's head (encode/uvicorn#157), so
``_Protocol`` adds one: a client that has not sent a complete request head within
``header_timeout`` seconds of connecting (or of its first byte on a kept-alive connection) is
disconnected. Stalled request bodies are cut by the application (``bodies.body_chunks``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from quantpub.hub.app import create_app
from quantpub.hub.auth import Users, load_or_create_users

log = logging.getLogger(__name__)
MAX_FILE_SIZE = 50 * 1000 ** 3  # the Hub's per-file limit


@dataclass
class HubConfig:
    """How a hub serves ``data_dir``.

    ``users`` (see ``quantpub.hub.auth``), or ``tokens`` ({token: user}, write tokens) for
    short setups such as tests. ``secret`` signs LFS URLs. Timeouts are in seconds.
    """
    data_dir: Path
    users: Users | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    max_file_size: int = MAX_FILE_SIZE
    log_requests: bool = False  # one INFO line per request (``hub serve``); DEBUG otherwise
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    git: bool | None = None     # keep and serve git mirrors; default: when the git executable is there
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive: int = 5
    max_connections: int = 100

    def __post_init__(self):
        self.data_dir = Path(self.data_dir)
        if self.users is None:
            self.users = Users.from_tokens(self.tokens)
        if self.git is None:
            self.git = shutil.which("git") is not None
            if not self.git:
                log.warning("git is not installed: the hub will not serve git clone")


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head."""

    header_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm()  # still waiting for (the rest of) a request head
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle until the next request: uvicorn's keep-alive timeout applies

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request head in %.0f s", self.header_timeout)
            self.transport.close()


class HubServer:
    """A running hub: ``url``, ``config``, ``store``; ``shutdown()`` then ``server_close()``."""

    def __init__(self, config: HubConfig, host: str = "127.0.0.1", port: int = 0):
        self.config = config
        self.app = create_app(config)  # takes the data dir's lock, brings git mirrors in step
        self.store = self.app.state.hub.store
        self.socket = socket.create_server((host, port), reuse_port=False)
        self.server_address = self.socket.getsockname()[:2]
        self._stopped = threading.Event()
        self._stopped.set()
        protocol = type("HubProtocol", (_Protocol,), {"header_timeout": config.header_timeout})
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, http=protocol, lifespan="off", access_log=False, log_config=None, server_header=False,
            timeout_keep_alive=config.keep_alive, limit_concurrency=config.max_connections,
            h11_max_incomplete_event_size=64 * 1024, timeout_graceful_shutdown=5))

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving and wait until the server has stopped."""
        self._server.should_exit = True
        self._stopped.wait(30)

    def server_close(self) -> None:
        self.socket.close()
        self.store.close()


def start_in_thread(config: HubConfig, host: str = "127.0.0.1", port: int = 0) -> tuple[HubServer, threading.Thread]:
    """A hub serving from a background thread, started when this returns."""
    server = HubServer(config, host, port)
    thread = threading.Thread(target=server.serve_forever, name="quantpub-hub", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server._server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server._server.started:
        server.server_close()
        raise RuntimeError(f"the hub at {server.url} did not start")
    return server, thread


def serve(config: HubConfig, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until interrupted (the ``quantpub hub serve`` command)."""
    server = HubServer(config, host, port)
    log.info("quantpub hub serving %s from %s", server.url, config.data_dir)
    try:
        server.serve_forever()
    finally:
        server.server_close()


__all__ = ["HubConfig", "HubServer", "load_or_create_users", "serve", "start_in_thread"]
