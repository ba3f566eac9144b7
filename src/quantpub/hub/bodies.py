"""Request bodies read with bounds: a size limit (413), and a per-read timeout (408)."""

from __future__ import annotations

from typing import AsyncIterator, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from quantpub.hub.errors import HubError

BODY_READ_TIMEOUT = 30.0  # seconds a client may stay silent in the middle of a request body
MAX_JSON_BODY = 1 << 20
M = TypeVar("M", bound=BaseModel)


async def body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives; 413 past ``limit`` bytes, 408 when the client stalls."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HubError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    timeout = request.app.state.config.body_timeout if hasattr(request.app.state, "config") else BODY_READ_TIMEOUT
    stream, total = request.stream(), 0
    while True:
        try:
            with anyio.fail_after(timeout):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise HubError(408, f"request body stalled for {timeout:g} s; send it faster") from None
        except ClientDisconnect:
            raise HubError(400, "client disconnected in the middle of the request body") from None
        total += len(chunk)
        if total > limit:
            raise HubError(413, f"request body exceeds the limit of {limit} bytes")
        if chunk:
            yield chunk


async def drain_unread(request: Request, limit: int = MAX_JSON_BODY, seconds: float = 2.0) -> None:
    """Read and drop a small body a handler refused before reading (a 401/403/404 on a write).

    Answering with the body unread makes uvicorn close the connection after the answer (measured:
    ``connection: close`` then EOF; with the body read, the connection stays open); body bytes
    still unread in the socket then make the kernel send a reset instead of a close, and a client
    that has not read the whole answer yet loses it: "connection reset by peer" (huggingface_hub's
    refused ``update_repo_settings`` / ``delete_repo``, about one run in three of the auth test).
    Bodies over ``limit`` bytes or not declared (a large upload refused)
    are left: that connection closes.
    """
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit() or not 0 < int(declared) <= limit:
        return
    try:
        with anyio.fail_after(seconds):
            async for _ in request.stream():
                pass
    except (RuntimeError, TimeoutError, ClientDisconnect):  # already read, or the client stalls / left
        pass


async def read_body(request: Request, limit: int = MAX_JSON_BODY) -> bytes:
    return b"".join([c async for c in body_chunks(request, limit)])


def parse(model: type[M], data: bytes | str | dict, what: str = "request body") -> M:
    """JSON (or an already parsed object) into a pydantic model: 400 naming the first problem."""
    try:
        if isinstance(data, dict):
            return model.model_validate(data)
        return model.model_validate_json(data or b"{}")
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        raise HubError(400, f"malformed {what}: {where}: {err.get('msg')}") from None


async def read_model(request: Request, model: type[M]) -> M:
    return parse(model, await read_body(request))
