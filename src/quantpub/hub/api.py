"""The JSON API under ``/api`` as huggingface_hub uses it (see the project's hub-api reference)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from urllib.parse import parse_qs

import yaml
from starlette.responses import JSONResponse, Response

from quantpub.hub.auth import require_write, visible_blob, whoami
from quantpub.hub.bodies import body_chunks, parse, read_body, read_model
from quantpub.yamlfile import front_matter
from quantpub.hub.errors import HubError, not_stored
from quantpub.hub.names import COMMIT_RE, attributes_problem, check_name, check_namespace, check_path
from quantpub.hub.routing import PREFIX, Ctx, Router, blocking, repo_type
from quantpub.hub.schemas import (Branch, CreateRepo, DeleteRepo, FileOp, Header, LfsOp, Line, PathOp,
                                  Paths, Preupload, Settings, Tag, Yaml)
from quantpub.hub.store import LFS_SUFFIXES, LFS_THRESHOLD, REPO_TYPES, FileEntry, Repo, git_blob_oid, lfs_pointer

MAX_COMMIT_BODY = 4 << 30   # regular files travel base64 inside the commit; LFS files do not
MAX_COMMIT_LINE = 16 << 20  # one operation: a regular file is < 10 MB by the LFS rule


def register(r: Router) -> None:
    r.add("GET", "api/whoami-v2", whoami_v2)
    r.add("POST", "api/validate-yaml", validate_yaml)
    r.add("POST", "api/repos/create", create_repo)
    r.add("DELETE", "api/repos/delete", delete_repo)
    r.add("GET", "api/{plural}", list_repos)
    r.add("GET", "api/{plural}/{ns}/{name}", info)
    r.add("GET", "api/{plural}/{ns}/{name}/revision/{rev}", info)
    r.add("GET", "api/{plural}/{ns}/{name}/refs", refs)
    r.add("POST DELETE", "api/{plural}/{ns}/{name}/branch/{ref}", branch)
    r.add("POST DELETE", "api/{plural}/{ns}/{name}/tag/{ref}", tag)
    r.add("GET", "api/{plural}/{ns}/{name}/tree/{rev}/{path*}", tree)
    r.add("POST", "api/{plural}/{ns}/{name}/paths-info/{rev}", paths_info)
    r.add("GET", "api/{plural}/{ns}/{name}/commits/{rev}", commits)
    r.add("POST", "api/{plural}/{ns}/{name}/preupload/{rev}", preupload)
    r.add("POST", "api/{plural}/{ns}/{name}/commit/{rev}", commit)
    r.add("PUT", "api/{plural}/{ns}/{name}/settings", settings)


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


async def whoami_v2(ctx: Ctx) -> Response:
    if ctx.caller.name is None:
        raise HubError(401, "not logged in: send a token")
    return JSONResponse(whoami(ctx.caller))


async def validate_yaml(ctx: Ctx) -> Response:
    yaml_text, _ = front_matter((await read_model(ctx.request, Yaml)).content)
    try:
        meta = yaml.safe_load(yaml_text) if yaml_text else {}
    except yaml.YAMLError as exc:
        return JSONResponse({"errors": [{"message": f"invalid YAML front matter: {exc}"}]}, 400)
    if meta is not None and not isinstance(meta, dict):
        return JSONResponse({"errors": [{"message": "YAML front matter must be a mapping"}]}, 400)
    return JSONResponse({"errors": [], "warnings": []})


async def create_repo(ctx: Ctx) -> Response:
    body = await read_model(ctx.request, CreateRepo)
    type_ = body.type or "model"
    namespace, name = body.organization, body.name
    if namespace is None and "/" in name:
        namespace, name = name.split("/", 1)
    namespace = namespace or ctx.caller.name or ""
    check_namespace(namespace)
    check_name(name, "repo name")
    require_write(ctx.caller, namespace)
    private = body.private if body.private is not None else body.visibility == "private"
    url = f"{ctx.base()}/{PREFIX[type_]}{namespace}/{name}"
    try:
        repo = await blocking(ctx.store.create_repo, type_, namespace, name, private, ctx.caller.name)
    except HubError as exc:
        if exc.status != 409:
            raise
        return JSONResponse({"error": str(exc), "url": url}, 409)  # the client reads "url" even on 409
    await blocking(ctx.hub.changed, repo)
    return JSONResponse({"url": url, "name": repo.repo_id})


async def delete_repo(ctx: Ctx) -> Response:
    body = await read_model(ctx.request, DeleteRepo)
    namespace, name = body.organization, body.name
    if namespace is None and "/" in name:
        namespace, name = name.split("/", 1)
    repo = await blocking(ctx.hub.repo, ctx.caller, body.type or "model", namespace or ctx.caller.name or "", name,
                          write=True)
    await blocking(ctx.store.delete_repo, repo)
    if ctx.hub.mirror is not None:
        await blocking(ctx.hub.mirror.remove, repo)
    return JSONResponse({})


async def settings(ctx: Ctx) -> Response:
    repo = await ctx.repo(repo_type(ctx, api=True), write=True)
    body = await read_model(ctx.request, Settings)
    private = body.private if body.visibility is None else body.visibility != "public"
    if private is not None:
        await blocking(ctx.store.set_private, repo, private)
    return JSONResponse({})


def _limit(value: str | None) -> int:
    if value is None:
        return 1000
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise HubError(400, f"limit must be a whole number from 1 to 1000, not {value!r}")
    return int(value)


async def list_repos(ctx: Ctx) -> Response:
    """``GET /api/models?author=&search=&limit=``: the repos the caller can see, newest first."""
    type_ = repo_type(ctx, api=True)
    author, search, limit = ctx.query("author"), (ctx.query("search") or "").lower(), _limit(ctx.query("limit"))
    out = []
    for repo, modified in await blocking(ctx.store.repos, type_):
        if not ctx.caller.can_read(repo.namespace, repo.private):
            continue
        if (author and repo.namespace != author) or (search and search not in repo.repo_id.lower()):
            continue
        out.append({"_id": f"{repo.id:024x}", "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.namespace,
                    "private": repo.private, "lastModified": stamp(modified), "downloads": 0, "likes": 0,
                    "tags": []})
        if len(out) >= limit:
            break
    return JSONResponse(out)


def _info(ctx: Ctx, repo: Repo, revision: str) -> dict:
    oid = ctx.store.resolve(repo, revision)
    files = ctx.store.files(oid)
    commit = ctx.store.commit_info(oid)
    siblings = []
    for e in files.values():
        item = {"rfilename": e.path, "size": e.size, "blobId": e.git_oid}
        if e.lfs:
            item["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        siblings.append(item)
    return {"_id": f"{repo.id:024x}", "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.namespace,
            "sha": oid, "lastModified": stamp(commit.created), "createdAt": stamp(commit.created),
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": siblings, "usedStorage": sum(e.size for e in files.values())}


async def info(ctx: Ctx) -> Response:
    repo = await ctx.repo(repo_type(ctx, api=True))
    return JSONResponse(await blocking(_info, ctx, repo, ctx.params.get("rev", "main")))


async def refs(ctx: Ctx) -> Response:
    repo = await ctx.repo(repo_type(ctx, api=True))
    out = {}
    for kind, key, prefix in (("branch", "branches", "heads"), ("tag", "tags", "tags")):
        out[key] = [{"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": c}
                    for n, c in await blocking(ctx.store.refs, repo, kind)]
    out["converts"] = []
    if ctx.query("include_prs"):
        out["pullRequests"] = []
    return JSONResponse(out)


async def branch(ctx: Ctx) -> Response:
    repo = await ctx.repo(repo_type(ctx, api=True), write=True)
    if ctx.request.method == "DELETE":
        await blocking(ctx.store.delete_ref, repo, "branch", ctx.params["ref"])
    else:
        start = (await read_model(ctx.request, Branch)).startingPoint or "main"
        await blocking(ctx.store.create_ref, repo, "branch", ctx.params["ref"], start)
    await blocking(ctx.hub.changed, repo)
    return JSONResponse({})


async def tag(ctx: Ctx) -> Response:
    """POST .../tag/{revision} {"tag": name} creates; DELETE .../tag/{name} deletes."""
    repo = await ctx.repo(repo_type(ctx, api=True), write=True)
    if ctx.request.method == "DELETE":
        await blocking(ctx.store.delete_ref, repo, "tag", ctx.params["ref"])
    else:
        body = await read_model(ctx.request, Tag)
        await blocking(ctx.store.create_ref, repo, "tag", body.tag, ctx.params["ref"])
    await blocking(ctx.hub.changed, repo)
    return JSONResponse({})


def file_item(e: FileEntry) -> dict:
    item = {"type": "file", "path": e.path, "size": e.size, "oid": e.git_oid}
    if e.lfs:
        item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
    return item


def dir_item(path: str) -> dict:
    return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}


def listing(files: dict[str, FileEntry], path: str, recursive: bool) -> list[dict]:
    """Tree items under ``path`` ('' = root): files and directories, one level or all."""
    prefix = check_path(path.strip("/")) + "/" if path.strip("/") else ""
    if prefix and not any(p.startswith(prefix) for p in files):
        raise HubError(404, f"{path} not found", "EntryNotFound")
    items, dirs = [], set()
    for p, e in files.items():
        if not p.startswith(prefix):
            continue
        rest = p[len(prefix):].split("/")
        for depth in range(1, len(rest)):
            d = prefix + "/".join(rest[:depth])
            if d not in dirs and (recursive or depth == 1):
                dirs.add(d)
                items.append(dir_item(d))
        if recursive or len(rest) == 1:
            items.append(file_item(e))
    return items


async def tree(ctx: Ctx) -> Response:
    repo = await ctx.repo(repo_type(ctx, api=True))
    recursive = (ctx.query("recursive") or "false").lower() == "true"

    def run():
        return listing(ctx.store.files(ctx.store.resolve(repo, ctx.params["rev"])), ctx.params["path"], recursive)
    return JSONResponse(await blocking(run))


async def paths_info(ctx: Ctx) -> Response:
    repo = await ctx.repo(repo_type(ctx, api=True))
    raw = await read_body(ctx.request)
    if ctx.request.headers.get("content-type", "").startswith("application/json"):
        paths = parse(Paths, raw).paths
    else:
        paths = parse_qs(raw.decode()).get("paths", [])
    files = await blocking(lambda: ctx.store.files(ctx.store.resolve(repo, ctx.params["rev"])))
    items = []
    for path in paths:
        if path in files:
            items.append(file_item(files[path]))
        elif any(p.startswith(path.rstrip("/") + "/") for p in files):
            items.append(dir_item(path))
    return JSONResponse(items)


async def commits(ctx: Ctx) -> Response:
    repo = await ctx.repo(repo_type(ctx, api=True))
    history = await blocking(lambda: ctx.store.history(ctx.store.resolve(repo, ctx.params["rev"])))
    return JSONResponse([{"id": c.oid, "title": c.summary, "message": c.description, "authors": [{"user": c.author}],
                          "date": stamp(c.created)} for c in history])


def _base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise HubError(400, f"{what} is not valid base64") from None


async def preupload(ctx: Ctx) -> Response:
    repo = await ctx.repo(repo_type(ctx, api=True), write=True)
    body = await read_model(ctx.request, Preupload)
    head = await blocking(ctx.store.resolve, repo, ctx.params["rev"])
    files = await blocking(ctx.store.files, head)
    out = []
    for f in body.files:
        path = check_path(f.path)
        sample = _base64(f.sample, f"{path}: sample")
        lfs = f.size >= LFS_THRESHOLD or b"\0" in sample or path.lower().endswith(LFS_SUFFIXES)
        item = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
        if path in files:
            item["oid"] = files[path].sha256 if files[path].lfs else files[path].git_oid
        out.append(item)
    return JSONResponse({"files": out, "commitOid": head})


async def _lines(ctx: Ctx):
    """The commit body's lines as they arrive: at most one operation (plus a chunk) held at a time."""
    buf = bytearray()
    async for chunk in body_chunks(ctx.request, MAX_COMMIT_BODY):
        start = len(buf)
        buf += chunk
        while (end := buf.find(b"\n", start)) >= 0:
            yield bytes(buf[:end])
            del buf[:end + 1]
            start = 0
        if len(buf) > MAX_COMMIT_LINE:
            raise HubError(413, f"one commit operation is over {MAX_COMMIT_LINE} bytes: send large files as LFS")
    yield bytes(buf)


def _check_git_file(path: str, data: bytes | None) -> None:
    """400 for a path or a .gitattributes file that the git mirror could not serve as the API does."""
    check_path(path)
    problem = attributes_problem(path, data)
    if problem:
        raise HubError(400, f"{path}: {problem}")


async def commit(ctx: Ctx) -> Response:
    """ndjson: a header, then files (base64), LFS files (by sha256) and deletions; streamed, one line at a time."""
    type_ = repo_type(ctx, api=True)
    if type_ not in REPO_TYPES:
        raise HubError(400, f"unknown repo type {type_!r}")
    repo = await ctx.repo(type_, write=True)
    if (ctx.query("create_pr") or "0") not in ("0", "false", "False"):
        raise HubError(400, "pull requests are not supported by this hub")
    header, add, delete, delete_folders = None, [], [], []
    with ctx.store.holds.hold() as hold:  # its blobs are kept from garbage collection until it lands
        async for raw in _lines(ctx):
            if not raw.strip():
                continue
            line = parse(Line, raw, "commit line")
            if line.key == "header":
                header = parse(Header, line.value, "commit header")
            elif line.key == "file":
                op = parse(FileOp, line.value, "file operation")
                data = _base64(op.content, f"{op.path}: content")
                _check_git_file(op.path, data)
                hold(sha := hashlib.sha256(data).hexdigest())
                await blocking(ctx.store.put_blob, [data], len(data), sha)
                add.append(FileEntry(op.path, sha, len(data), git_blob_oid(data), False))
            elif line.key == "lfsFile":
                op = parse(LfsOp, line.value, "lfsFile operation")
                _check_git_file(op.path, None)
                hold(op.oid)
                if not await blocking(visible_blob, ctx.store, ctx.caller, op.oid, op.size):
                    raise not_stored(op.path, op.oid)
                add.append(FileEntry(op.path, op.oid, op.size, git_blob_oid(lfs_pointer(op.oid, op.size)), True))
            else:
                path = parse(PathOp, line.value, f"{line.key} operation").path
                (delete if line.key == "deletedFile" else delete_folders).append(path)
        oid = await _land(ctx, repo, header, add, delete, delete_folders)
    await blocking(ctx.hub.changed, repo)
    return JSONResponse({"commitOid": oid, "commitUrl": f"{ctx.base()}/{PREFIX[repo.type]}{repo.repo_id}/commit/{oid}",
                         "success": True})


async def _land(ctx: Ctx, repo: Repo, header: Header | None, add: list[FileEntry], delete: list[str],
                delete_folders: list[str]) -> str:
    """The commit's checks that need the whole body, then the store's commit: the new commit id."""
    if header is None:
        raise HubError(400, "commit without a header line")
    if header.parentCommit is not None and not COMMIT_RE.fullmatch(header.parentCommit):
        raise HubError(400, f"parentCommit {header.parentCommit!r} is not a 40-hex commit id")
    return await blocking(ctx.store.commit, repo, ctx.params["rev"], summary=header.summary,
                          description=header.description, author=ctx.caller.name, parent=header.parentCommit,
                          add=add, delete=delete, delete_folders=delete_folders, quota=ctx.hub.config.quota)

