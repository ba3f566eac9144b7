"""Serving the hub: uvicorn (h11) with timeouts and connection caps, one server per data dir.

Why uvicorn + Starlette: both are maintained by the same people, widely deployed, and give
HTTP/1.1 framing (h11: one Content-Length, chunked bodies, no header injection), a
keep-alive timeout, a buffer limit for incomplete heads and a connection cap
(``limit_concurrency``: past it new requests get 503). ``protocol.HubProtocol`` adds a deadline
for request heads; ``guard.Guard`` bounds complete heads. Stalled request bodies are cut by the
application (``bodies.body_chunks``).
"""

from __future__ import annotations

import logging
import ipaddress
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from quantpub.hub.app import create_app
from quantpub.hub.auth import Users, UsersReloader, load_or_create_users
from quantpub.hub.gc import Sweeper
from quantpub.hub.protocol import ClientConnections, HubProtocol

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
    max_connections: int = 100       # in all: past it, 503
    max_client_connections: int = 16  # from one client at once (0: no limit): past it, 429
    trusted_proxies: tuple[str, ...] = ()  # addresses or networks whose X-Forwarded-For/-Proto are believed
    max_head_bytes: int = 64 * 1024  # request line and headers: 431 (414 for the request line) past it
    max_headers: int = 100           # header fields: 431 past it
    max_target_bytes: int = 16 * 1024  # the request target (path and query): 414 past it
    users_poll: float = 0.5          # seconds between looks at the users file (when read from one)
    quota: int | None = None         # bytes each namespace may store (history included); None: no quota
    gc_every: float = 3600.0         # seconds between automatic garbage collections; 0: none
    gc_min_age: float = 24 * 3600.0  # unreferenced blobs younger than this are kept (uploads awaiting a commit)

    def __post_init__(self):
        self.data_dir = Path(self.data_dir)
        if self.users is None:
            self.users = Users.from_tokens(self.tokens)
        self.trusted_proxies = tuple(self.trusted_proxies)
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"trusted proxy {proxy!r} is not an IP address or network (e.g. 10.0.0.5, "
                                 "10.0.0.0/8)") from None
        if self.git is None:
            self.git = shutil.which("git") is not None
            if not self.git:
                log.warning("git is not installed: the hub will not serve git clone")


class HubServer:
    """A running hub: ``url``, ``config``, ``store``; ``shutdown()`` then ``server_close()``."""

    def __init__(self, config: HubConfig, host: str = "127.0.0.1", port: int = 0):
        self.config = config
        self.app = create_app(config)  # takes the data dir's lock, brings git mirrors in step
        self.store = self.app.state.hub.store
        self.socket = socket.create_server((host, port), reuse_port=False)
        self.server_address = self.socket.getsockname()[:2]
        self.store.announce(self.url)
        self._stopped = threading.Event()
        self._stopped.set()
        clients = ClientConnections(config.max_client_connections, config.trusted_proxies)
        protocol = type("ServerProtocol", (HubProtocol,), {"header_timeout": config.header_timeout,
                                                           "max_head_bytes": config.max_head_bytes,
                                                           "clients": clients})
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, http=protocol, lifespan="off", access_log=False, log_config=None, server_header=False,
            timeout_keep_alive=config.keep_alive, limit_concurrency=config.max_connections,
            h11_max_incomplete_event_size=config.max_head_bytes, timeout_graceful_shutdown=5,
            # X-Forwarded-For and -Proto only from the configured proxies (uvicorn would believe 127.0.0.1)
            proxy_headers=bool(config.trusted_proxies), forwarded_allow_ips=list(config.trusted_proxies)))

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._stopped.clear()
        stop = threading.Event()
        jobs = [threading.Thread(target=job, args=(stop,), name="quantpub-hub-job", daemon=True)
                for job in self._jobs()]
        for job in jobs:
            job.start()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            stop.set()
            for job in jobs:
                job.join(30)
            self._stopped.set()

    def _jobs(self) -> list:
        """What runs beside serving, each a ``run(stop_event)``: the users file's reloads, garbage collection."""
        jobs = []
        if self.config.users.path:
            jobs.append(UsersReloader(self.config, self.config.users.path, self.config.users_poll).run)
        if self.config.gc_every > 0:
            jobs.append(Sweeper(self.store, self.config.gc_every, self.config.gc_min_age).run)
        return jobs

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
