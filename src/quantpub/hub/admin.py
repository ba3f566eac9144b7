"""What a hub's admins may ask of it while it serves: ``POST /api/admin/gc`` (garbage collection)."""

from __future__ import annotations

from pydantic import Field
from starlette.responses import JSONResponse, Response

from quantpub.hub.bodies import read_model
from quantpub.hub.errors import HubError
from quantpub.hub.gc import collect
from quantpub.hub.routing import Ctx, Router, blocking
from quantpub.hub.schemas import _Body


class GcRequest(_Body):
    delete: bool = False
    min_age: float = Field(24 * 3600.0, ge=0)  # seconds


def register(r: Router) -> None:
    r.add("POST", "api/admin/gc", gc)


async def gc(ctx: Ctx) -> Response:
    """``{"delete": false, "min_age": seconds}`` -> the ``GcReport`` as JSON; admins only."""
    if ctx.caller.name is None:
        raise HubError(401, "garbage collection needs an admin's token")
    if not ctx.caller.admin:
        raise HubError(403, f"{ctx.caller.name} is not an admin of this hub (admin: true in its users file)")
    body = await read_model(ctx.request, GcRequest)
    report = await blocking(collect, ctx.store, delete=body.delete, min_age=body.min_age)
    return JSONResponse(report.to_dict())
