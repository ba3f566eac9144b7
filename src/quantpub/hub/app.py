"""The hub's ASGI application: routing on raw path segments, authentication, errors, guards.

Routes match the *raw* path split on '/', each segment then percent-decoded, because
huggingface_hub sends a branch such as ``feature/x`` as one segment ``feature%2Fx``.
Handlers are ``async def handler(ctx) -> Response``; blocking store work runs in threads.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import unquote

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from quantpub.hub.auth import Caller
from quantpub.hub.errors import HubError, not_found
from quantpub.hub.git import GitMirror
from quantpub.hub.store import REPO_TYPES, Repo, Store

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "web" / "static"
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_UNSAFE_HEADER = re.compile(r"[^\x20-\x7e]")
Handler = Callable[["Ctx"], Awaitable[Response]]


async def blocking(fn, *args, **kwargs):
    """Run store, git or file work in a worker thread."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


@dataclass
class Hub:
    """What every handler shares: config, store, git mirror, the URL signer."""
    config: object
    store: Store
    mirror: GitMirror | None

    def repo(self, caller: Caller, type_: str, namespace: str, name: str, *, write: bool = False) -> Repo:
        """The repo if ``caller`` may see it (else 404, as the Hub), and write to it when ``write``."""
        if type_ not in REPO_TYPES:
            raise HubError(400, f"unknown repo type {type_!r}")
        repo = self.store.get_repo(type_, namespace, name)
        if repo is None or not caller.can_read(repo.namespace, repo.private):
            if write and caller.name is None:
                raise HubError(401, "a write token is required: pass token= or set HF_TOKEN")
            raise not_found(f"{namespace}/{name}")
        if write:
            require_write(caller, repo.namespace)
        return repo

    def changed(self, repo: Repo) -> None:
        """Bring the git mirror in step after a commit or a ref change."""
        if self.mirror is not None:
            self.mirror.sync(repo)


def repo_type(ctx: "Ctx", *, api: bool) -> str:
    """The repo type a route names: ``/api/{models|datasets|spaces}/...``, or ``/{datasets|spaces}/...``
    outside the API (where models have no prefix)."""
    plural = ctx.params.get("plural")
    type_ = PLURAL.get(plural or "models")
    if type_ is None or (not api and plural == "models"):
        raise HubError(404, f"no route for {ctx.request.method} {ctx.request.url.path}")
    return type_


def require_write(caller: Caller, namespace: str) -> None:
    if caller.name is None:
        raise HubError(401, "a write token is required: pass token= or set HF_TOKEN")
    if caller.role != "write":
        raise HubError(403, f"the token of {caller.name} is a read token; writing needs a write token")
    if not caller.can_write(namespace):
        raise HubError(403, f"{caller.name} cannot write to namespace {namespace!r}: only to their own "
                            "namespace and organisations where they are a write member")


@dataclass
class Ctx:
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
        return f"http://{host}"

    async def repo(self, type_: str, *, write: bool = False) -> Repo:
        return await blocking(self.hub.repo, self.caller, type_, self.params["ns"], self.params["name"], write=write)


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


def error_response(exc: HubError, method: str = "GET") -> Response:
    headers = dict(exc.headers)
    if exc.code:
        headers["X-Error-Code"] = exc.code
    headers["X-Error-Message"] = _UNSAFE_HEADER.sub("?", str(exc))[:500]
    return JSONResponse({"error": str(exc)}, exc.status, headers=headers)


def create_app(config) -> Starlette:
    """The application over ``config.data_dir`` (a ``HubConfig``); takes the data dir's lock."""
    from quantpub.hub import api, lfs, web

    store = Store(config.data_dir)
    mirror = GitMirror(store) if config.git else None
    if mirror is not None:
        mirror.sync_all()
    hub = Hub(config, store, mirror)
    router = Router()
    api.register(router)
    lfs.register(router)
    web.register(router)

    async def dispatch(request: Request) -> Response:
        try:
            raw = request.scope.get("raw_path") or request.scope["path"].encode()
            parts = [unquote(p) for p in raw.decode("latin-1").split("?")[0].split("/")[1:]]
            if parts and parts[-1] == "" and len(parts) > 1:
                parts = parts[:-1]
            caller = config.users.caller(request.headers.get("authorization", ""))
            if caller is None:
                raise HubError(401, "invalid credentials in Authorization header")
            found = router.match(request.method, parts if parts != [""] else [])
            if found is None:
                raise HubError(404, f"no route for {request.method} {request.url.path}")
            handler, params = found
            return await handler(Ctx(request, hub, caller, params))
        except HubError as exc:
            return error_response(exc)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            return error_response(HubError(400, f"malformed request: {exc}"))

    app = Starlette(routes=[Mount("/static", StaticFiles(directory=STATIC), name="static"),
                            Route("/{path:path}", dispatch, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])],
                    middleware=[])
    app.state.config, app.state.hub = config, hub
    app.add_middleware(Guard, log_requests=config.log_requests)
    return app


class Guard:
    """ASGI middleware: the connection is closed after a response whose request body was not read
    to its end (so leftover bytes are never parsed as a request), response headers never carry
    control characters, unexpected errors answer 500, one log line per request (no query)."""

    def __init__(self, app, log_requests: bool = False):
        self.app, self.log_requests = app, log_requests

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
                clean = [(k, _UNSAFE_HEADER.sub("?", v.decode("latin-1")).encode("latin-1"))
                         for k, v in message.get("headers", [])]
                clean.append((b"x-content-type-options", b"nosniff"))
                if not state["body_done"]:
                    clean = [(k, v) for k, v in clean if k.lower() != b"connection"] + [(b"connection", b"close")]
                message = {**message, "headers": clean}
                state["started"], state["status"] = True, message["status"]
            await send(message)

        if b"transfer-encoding" in headers and b"content-length" in headers:
            # RFC 9112 6.1: a smuggling attempt; answer and close rather than pick one framing
            state["body_done"] = False
            refusal = HubError(400, "both Transfer-Encoding and Content-Length: send one of them")
            return await error_response(refusal)(scope, guarded_receive, guarded_send)
        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:  # noqa: BLE001 - answer 500 and keep serving
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            if not state["started"]:
                state["body_done"] = False
                await error_response(HubError(500, "internal server error"))(scope, guarded_receive, guarded_send)
        finally:
            level = logging.INFO if self.log_requests else logging.DEBUG
            log.log(level, "%s %s -> %s", scope["method"], _UNSAFE_HEADER.sub("?", scope["path"])[:300], state["status"])
