"""The hub's HTTP/1.1 connection: uvicorn's h11 protocol with a cap on connections per client, a
deadline for each request head and the right status for a head that h11 stops reading.

A client (an address; trusted proxies excepted) may hold ``max_client_connections`` open at once:
one more is answered 429 at once, without a request, and closed, and is not counted in uvicorn's
total cap; so one client's slow connections cannot keep everyone else at 503.

uvicorn has no deadline for a request's head (encode/uvicorn#157): a client that has not sent a
complete head within ``header_timeout`` seconds of connecting (or of its first byte on a
kept-alive connection) is disconnected. h11 stops buffering an incomplete head past
``max_incomplete_event_size`` and hints 431; uvicorn answers every such error 400, so this
answers 414 when not even the request line has ended, 431 otherwise. Heads that arrive whole
in one read are complete for h11 whatever their size: ``guard.head_problem`` checks those.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections import Counter

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

log = logging.getLogger(__name__)


def error_bytes(conn: h11.Connection, status: int, message: str, *extra: tuple[bytes, bytes]) -> bytes:
    """A complete JSON error response (the hub's form) written through ``conn``; the connection closes."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-error-message", message.encode()), (b"connection", b"close"), *extra]
    return (conn.send(h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]))
            + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))


class ClientConnections:
    """Open connections per client address, at most ``limit`` each (0: no limit); addresses in
    ``exempt`` (trusted proxies: IPs or networks) are not counted. Used on the event loop only."""

    def __init__(self, limit: int, exempt: tuple[str, ...] = ()):
        self.limit, self.open = limit, Counter()
        self.exempt = [ipaddress.ip_network(e, strict=False) for e in exempt]

    def admit(self, host: str | None) -> bool:
        if not self.limit or host is None or self._exempt(host):
            return True
        if self.open[host] >= self.limit:
            return False
        self.open[host] += 1
        return True

    def release(self, host: str) -> None:
        if host in self.open:
            self.open[host] -= 1
            if not self.open[host]:
                del self.open[host]

    def _exempt(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self.exempt)


class HubProtocol(H11Protocol):
    """One connection. Subclassed per server with its settings (``HubServer`` does)."""

    header_timeout = 10.0
    max_head_bytes = 64 * 1024
    clients = ClientConnections(0)
    linger = 1.0  # seconds a refused connection is still read (so the client gets the 429, not a reset)
    _head_timer: asyncio.TimerHandle | None = None
    _host: str | None = None
    _refused = False

    def connection_made(self, transport):
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else None
        if not self.clients.admit(host):
            self._refuse(transport, host)
            return
        self._host = host
        super().connection_made(transport)
        self._arm()

    def _refuse(self, transport, host: str) -> None:
        self._refused = True
        message = (f"more than {self.clients.limit} connections at once from {host}: close some, or retry "
                   "when one has finished")
        log.info("refused a connection: %s", message)
        transport.write(error_bytes(self.conn, 429, message, (b"retry-after", b"1")))
        if transport.can_write_eof():
            transport.write_eof()  # the client reads the answer; what it still sends is read and dropped
        asyncio.get_running_loop().call_later(self.linger, transport.close)

    def eof_received(self):
        if self._refused:
            return False  # the client is done: close
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm()  # still waiting for (the rest of) a request head
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle until the next request: uvicorn's keep-alive timeout applies

    def connection_lost(self, exc):
        if self._refused:
            return
        self.clients.release(self._host)
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        pending, _ = self.conn.trailing_data
        if len(pending) <= self.max_head_bytes:
            return super().send_400_response(msg)
        if b"\n" not in pending:
            status, message = 414, f"request line over {self.max_head_bytes} bytes: use a shorter URL"
        else:
            status, message = 431, f"request head over {self.max_head_bytes} bytes: send fewer or shorter headers"
        log.info("refused a request: %s", message)
        self.transport.write(error_bytes(self.conn, status, message))
        self.transport.close()

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
