"""The small framework the hub's handlers share: the request context, routes, errors as responses.

Routes match the *raw* path split on '/', each segment then percent-decoded, because
huggingface_hub sends a branch such as ``feature/x`` as one segment ``feature%2Fx``.
Handlers are ``async def handler(ctx) -> Response``; blocking store work runs in threads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from quantpub.hub.auth import Caller, open_repo
from quantpub.hub.errors import HubError
from quantpub.hub.store import Repo, Store

if TYPE_CHECKING:
    from quantpub.hub.git import GitMirror

PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
Handler = Callable[["Ctx"], Awaitable[Response]]


async def blocking(fn, *args, **kwargs):
    """Run store, git or file work in a worker thread."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


@dataclass
class Hub:
    """What every handler shares: config, store, git mirror."""
    config: object
    store: Store
    mirror: GitMirror | None

    def repo(self, caller: Caller, type_: str, namespace: str, name: str, *, write: bool = False) -> Repo:
        """The repo if ``caller`` may see it (else 404, as the Hub), and write to it when ``write``."""
        return open_repo(self.store, caller, type_, namespace, name, write=write)

    def changed(self, repo: Repo) -> None:
        """Bring the git mirror in step after a commit or a ref change."""
        if self.mirror is not None:
            self.mirror.sync(repo)


@dataclass
class Ctx:
    """One request: the Starlette request, the hub, the authenticated caller and the route's parameters."""
    request: Request
    hub: Hub
    caller: Caller
    params: dict[str, str] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        return self.hub.store

    def query(self, name: str, default: str | None = None) -> str | None:
        return self.request.query_params.get(name, default)

    def base(self) -> str:
        """The URL clients reached this hub at (for hrefs handed back to them)."""
        host = self.request.headers.get("host", "")
        if not re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9a-fA-F:.]+\](:\d{1,5})?", host):
            host, port = self.request.scope["server"][:2]
            host = f"{host}:{port}"
        return f"{self.request.url.scheme}://{host}"  # https behind a trusted proxy that says so

    async def repo(self, type_: str, *, write: bool = False) -> Repo:
        return await blocking(self.hub.repo, self.caller, type_, self.params["ns"], self.params["name"], write=write)


def repo_type(ctx: Ctx, *, api: bool) -> str:
    """The repo type a route names: ``/api/{models|datasets|spaces}/...``, or ``/{datasets|spaces}/...``
    outside the API (where models have no prefix)."""
    plural = ctx.params.get("plural")
    type_ = PLURAL.get(plural or "models")
    if type_ is None or (not api and plural == "models"):
        raise HubError(404, f"no route for {ctx.request.method} {ctx.request.url.path}")
    return type_


class Router:
    """Patterns of segments: ``literal``, ``{x}`` (one), ``{x}.git`` (one, suffix stripped), ``{x*}`` (the rest)."""

    def __init__(self):
        self.routes: list[tuple[frozenset[str], list[str], Handler]] = []

    def add(self, methods: str, pattern: str, handler: Handler) -> None:
        self.routes.append((frozenset(methods.split()), pattern.strip("/").split("/") if pattern != "/" else [],
                            handler))

    def match(self, method: str, parts: list[str]) -> tuple[Handler, dict[str, str]] | None:
        allowed = False
        for methods, pattern, handler in self.routes:
            params = _match(pattern, parts)
            if params is None:
                continue
            if method in methods or (method == "HEAD" and "GET" in methods):
                return handler, params
            allowed = True
        if allowed:
            raise HubError(405, f"method {method} is not allowed here")
        return None


def _match(pattern: list[str], parts: list[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for i, seg in enumerate(pattern):
        if seg.startswith("{") and seg.endswith("*}"):
            params[seg[1:-2]] = "/".join(parts[i:])
            return params
        if i >= len(parts):
            return None
        if seg.startswith("{") and seg.endswith("}.git"):
            if not parts[i].endswith(".git") or len(parts[i]) <= 4:
                return None
            params[seg[1:-5]] = parts[i][:-4]
        elif seg.startswith("{") and seg.endswith("}"):
            params[seg[1:-1]] = parts[i]
        elif seg != parts[i]:
            return None
    return params if len(parts) == len(pattern) else None


def header_value(text: str, limit: int | None = 500) -> str:
    """``text`` as a response header may carry it: control and non-ASCII characters escaped
    (``\\x0d``, ``\\xe9``, ``\\u202e``), at most ``limit`` characters, no leading or trailing blanks
    (which h11 refuses to send: the client would get no answer at all)."""
    escaped = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text).encode("ascii", "backslashreplace").decode()
    return escaped[:limit].strip(" \t")


def error_response(exc: HubError) -> Response:
    """The Hub's error answer: JSON ``{"error": message}``, ``X-Error-Code`` and ``X-Error-Message``
    (the message, which may quote a caller's name or path, escaped for a header)."""
    headers = {name: header_value(value) for name, value in exc.headers.items()}
    if exc.code:
        headers["X-Error-Code"] = exc.code
    headers["X-Error-Message"] = header_value(str(exc))
    return JSONResponse({"error": str(exc)}, exc.status, headers=headers)


class BlobResponse(FileResponse):
    """A stored file, with byte ranges; a Range header in another unit is ignored (the whole file,
    200), as RFC 9110 14.2 says, where Starlette would answer 400."""

    async def __call__(self, scope, receive, send):
        def known(value: bytes) -> bool:
            unit, eq, _ = value.partition(b"=")
            return bool(eq) and unit.strip().lower() == b"bytes"
        headers = [(k, v) for k, v in scope["headers"] if k != b"range" or known(v)]
        await super().__call__({**scope, "headers": headers}, receive, send)
