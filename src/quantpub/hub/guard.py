"""The ASGI middleware in front of every handler: head limits, framing, response headers, errors,
one log line per request."""

from __future__ import annotations

import logging
from collections import Counter

from quantpub.hub.errors import HubError
from quantpub.hub.routing import error_response, header_value

log = logging.getLogger("quantpub.hub.app")


def head_problem(scope, config) -> HubError | None:
    """414 or 431 when a request's head is over the config's limits (``HubConfig``), else None."""
    target = len(scope["raw_path"]) + (len(scope["query_string"]) + 1 if scope["query_string"] else 0)
    if target > config.max_target_bytes:
        return HubError(414, f"request target of {target} bytes is over the limit of {config.max_target_bytes}: "
                             "use a shorter URL")
    fields = scope["headers"]
    if len(fields) > config.max_headers:
        return HubError(431, f"{len(fields)} header fields are over the limit of {config.max_headers}")
    # the head as h11 parsed it: "METHOD target HTTP/1.1", "name: value" lines, the empty line
    size = len(scope["method"]) + 1 + target + len(" HTTP/1.1\r\n") + sum(len(k) + len(v) + 4 for k, v in fields) + 2
    if size > config.max_head_bytes:
        return HubError(431, f"request head of {size} bytes is over the limit of {config.max_head_bytes}: "
                             "send fewer or shorter headers")
    return None


class Guard:
    """ASGI middleware: heads over the limits are refused (``head_problem``), the connection is
    closed after a response whose request body was not read to its end (so leftover bytes are
    never parsed as a request), response headers carry only what h11 sends (``header_value``),
    unexpected errors answer 500, one log line per request (no query)."""

    def __init__(self, app, config):
        self.app, self.config = app, config
        self.in_flight: Counter[str] = Counter()  # requests per client (behind a proxy: X-Forwarded-For's)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        state = {"body_done": not (headers.get(b"transfer-encoding") or headers.get(b"content-length", b"0") != b"0"),
                 "started": False, "status": 0}

        async def guarded_receive():
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                state["body_done"] = True
            if message["type"] == "http.disconnect":
                state["body_done"] = False
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                clean = [(k, header_value(v.decode("latin-1"), None).encode()) for k, v in message.get("headers", [])]
                clean.append((b"x-content-type-options", b"nosniff"))
                if not state["body_done"]:
                    clean = [(k, v) for k, v in clean if k.lower() != b"connection"] + [(b"connection", b"close")]
                message = {**message, "headers": clean}
                state["started"], state["status"] = True, message["status"]
            await send(message)

        client = (scope.get("client") or ("",))[0]
        self.in_flight[client] += 1
        try:
            refusal = head_problem(scope, self.config) or self._too_many(client)
            if refusal is None and b"transfer-encoding" in headers and b"content-length" in headers:
                # RFC 9112 6.1: a smuggling attempt; answer and close rather than pick one framing
                refusal = HubError(400, "both Transfer-Encoding and Content-Length: send one of them")
            if refusal is not None:
                state["body_done"] = False
                await error_response(refusal)(scope, guarded_receive, guarded_send)
            else:
                await self.app(scope, guarded_receive, guarded_send)
        except Exception:  # noqa: BLE001 - answer 500 and keep serving
            log.exception("internal error on %s %s", scope["method"], header_value(scope["path"], 300))
            if not state["started"]:
                state["body_done"] = False
                await error_response(HubError(500, "internal server error"))(scope, guarded_receive, guarded_send)
        finally:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]
            level = logging.INFO if self.config.log_requests else logging.DEBUG
            log.log(level, "%s %s -> %s", scope["method"], header_value(scope["path"], 300), state["status"])

    def _too_many(self, client: str) -> HubError | None:
        """429 past ``max_client_connections`` requests at once from one client: a direct client never
        gets here (its connections are capped), one behind a trusted proxy is told by X-Forwarded-For."""
        limit = self.config.max_client_connections
        if limit and self.in_flight[client] > limit:
            return HubError(429, f"more than {limit} requests at once from {client}: retry when one has finished",
                            headers={"Retry-After": "1"})
        return None
