"""The git-lfs batch API (upload and download) and the signed URLs it hands out.

A caller learns that an object is "already stored" only when it may read a repo that
references it (or uploaded it itself); otherwise it is asked to upload the bytes, which the
hub checks against the sha256. So a sha256 alone, e.g. from a published manifest, gets no one
another user's private file, neither by download nor by naming it in a commit. Upload and
download URLs carry an HMAC signature (the client sends no token with them) and expire.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Literal

from pydantic import Field
from starlette.responses import JSONResponse, Response

from quantpub.hub.auth import visible_blob
from quantpub.hub.bodies import body_chunks, read_body, read_model
from quantpub.hub.errors import HubError
from quantpub.hub.names import SHA256_RE
from quantpub.hub.quota import check_quota, pending_uploads
from quantpub.hub.routing import BlobResponse, Ctx, Router, blocking, repo_type
from quantpub.hub.schemas import _Body

URL_TTL = 24 * 3600
LFS_JSON = "application/vnd.git-lfs+json"
WRITE_BATCH = 1 << 20


class LfsObject(_Body):
    oid: str
    size: int = Field(ge=0)


class Batch(_Body):
    operation: Literal["upload", "download"]
    objects: list[LfsObject] = Field(max_length=10000)


def register(r: Router) -> None:
    for prefix in ("", "{plural}/"):
        r.add("POST", prefix + "{ns}/{name}.git/info/lfs/objects/batch", batch)
    r.add("PUT", "lfs/upload/{oid}", upload)
    r.add("POST", "lfs/verify/{oid}", verify)
    r.add("GET", "lfs/download/{oid}", download)


def _sign(ctx: Ctx, *fields: object) -> str:
    return hmac.new(ctx.hub.config.secret, ":".join(map(str, fields)).encode(), hashlib.sha256).hexdigest()


def _signed(ctx: Ctx, action: str, oid: str, size: int, user: str) -> int:
    """Check the URL's signature for (action, oid, size, user, expiry); 403 if forged or expired."""
    q = ctx.request.query_params
    try:
        expires, sig = int(q["expires"]), q["sig"]
    except (KeyError, ValueError):
        raise HubError(403, "missing or malformed URL signature") from None
    if not hmac.compare_digest(sig, _sign(ctx, action, oid, size, user, expires)) or expires < time.time():
        raise HubError(403, "invalid or expired URL signature")
    if user and user not in ctx.hub.config.users.spec.users:
        raise HubError(403, f"user {user} of this upload URL is no longer in the hub's users file")
    return expires


def _href(ctx: Ctx, action: str, oid: str, size: int, user: str = "") -> str:
    expires = int(time.time()) + URL_TTL
    return (f"{ctx.base()}/lfs/{action}/{oid}?size={size}&user={user}&expires={expires}"
            f"&sig={_sign(ctx, action, oid, size, user, expires)}")


async def batch(ctx: Ctx) -> Response:
    type_ = repo_type(ctx, api=False)
    body = await read_model(ctx.request, Batch)
    upload_op = body.operation == "upload"
    repo = await ctx.repo(type_, write=upload_op)
    user = ctx.caller.name or ""
    limit = ctx.hub.config.max_file_size

    def answer(obj: LfsObject) -> dict:
        item = {"oid": obj.oid, "size": obj.size}
        if not SHA256_RE.fullmatch(obj.oid):
            return {**item, "error": {"code": 422, "message": "oid must be a lowercase sha256"}}
        if upload_op:
            if obj.size > limit:
                return {**item, "error": {"code": 413, "message": f"{obj.size} bytes exceeds the per-file limit "
                                                                  f"of {limit}; split the file"}}
            if visible_blob(ctx.store, ctx.caller, obj.oid, obj.size) and ctx.store.touch_blob(obj.oid):
                return item  # already stored, the caller may see it, and it is now young for garbage collection
            return {**item, "authenticated": True, "actions": {
                "upload": {"href": _href(ctx, "upload", obj.oid, obj.size, user), "expires_in": URL_TTL},
                "verify": {"href": _href(ctx, "verify", obj.oid, obj.size, user), "expires_in": URL_TTL}}}
        size = ctx.store.repo_has_blob(repo, obj.oid)
        if size is None or size != obj.size or not ctx.store.has_blob(obj.oid, size):
            return {**item, "error": {"code": 404, "message": f"object {obj.oid} is not in {repo.repo_id}"}}
        return {**item, "authenticated": True, "actions": {
            "download": {"href": _href(ctx, "download", obj.oid, obj.size), "expires_in": URL_TTL}}}

    objects = await blocking(lambda: [answer(o) for o in body.objects])
    if upload_op and ctx.hub.config.quota is not None:
        wanted = {o["oid"]: o["size"] for o in objects if "actions" in o}
        await blocking(lambda: check_quota(ctx.store.db(), ctx.hub.config.quota, repo.namespace, wanted,
                                           pending_uploads(ctx.store.db(), user)))
    return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, media_type=LFS_JSON)


def _size(ctx: Ctx) -> tuple[str, int, str]:
    oid, q = ctx.params["oid"], ctx.request.query_params
    try:
        size = int(q.get("size", ""))
    except ValueError:
        raise HubError(403, "missing or malformed URL signature") from None
    return oid, size, q.get("user", "")


async def upload(ctx: Ctx) -> Response:
    """PUT the bytes of one object (no token: the URL is signed for one user, oid and size)."""
    oid, size, user = _size(ctx)
    _signed(ctx, "upload", oid, size, user)
    declared = ctx.request.headers.get("content-length")
    if declared != str(size):
        raise HubError(400, f"Content-Length {declared} does not match the announced size {size}")
    writer = await blocking(ctx.store.blob_writer, size, oid)
    try:
        pending: list[bytes] = []
        async for chunk in body_chunks(ctx.request, size):
            pending.append(chunk)
            if sum(map(len, pending)) >= WRITE_BATCH:
                await blocking(writer.write, b"".join(pending))
                pending = []
        await blocking(writer.write, b"".join(pending))
        await blocking(writer.finish)
    finally:
        await blocking(writer.abort)
    if user:
        await blocking(ctx.store.record_upload, oid, user, size)
    return JSONResponse({})


async def verify(ctx: Ctx) -> Response:
    oid, size, user = _size(ctx)
    _signed(ctx, "verify", oid, size, user)
    await read_body(ctx.request)
    if not await blocking(ctx.store.has_blob, oid, size):
        raise HubError(404, f"object {oid} was not uploaded completely")
    return JSONResponse({})


async def download(ctx: Ctx) -> Response:
    oid, size, _ = _size(ctx)
    _signed(ctx, "download", oid, size, "")
    path = ctx.store.blob_path(oid)
    if not await blocking(ctx.store.has_blob, oid, size):
        raise HubError(404, f"object {oid} is not stored")
    return BlobResponse(path, media_type="application/octet-stream", headers={"ETag": f'"{oid}"'})
