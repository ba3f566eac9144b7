"""The hub's ASGI application, assembled: the store, the git mirror, the routes, the guard."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, request_response
from starlette.staticfiles import StaticFiles

from quantpub.hub import admin, api, lfs, web
from quantpub.hub.bodies import drain_unread
from quantpub.hub.errors import HubError
from quantpub.hub.git import GitMirror
from quantpub.hub.guard import Guard
from quantpub.hub.routing import Ctx, Hub, Router, error_response
from quantpub.hub.store import Store

STATIC = Path(__file__).parent / "web" / "static"


def create_app(config) -> Starlette:
    """The application over ``config.data_dir`` (a ``HubConfig``); takes the data dir's lock."""
    store = Store(config.data_dir)
    mirror = GitMirror(store) if config.git else None
    if mirror is not None:
        mirror.sync_all()
    hub = Hub(config, store, mirror)
    router = Router()
    api.register(router)
    admin.register(router)
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
            await drain_unread(request)
            return error_response(exc)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            return error_response(HubError(400, f"malformed request: {exc}"))

    app = Starlette(routes=[Mount("/static", StaticFiles(directory=STATIC), name="static")])
    app.router.default = request_response(dispatch)  # every other path, also one Starlette's patterns miss ('\n')
    app.state.config, app.state.hub = config, hub
    app.add_middleware(Guard, config=config)
    return app
