"""The hub's own URLs for people and tools: web pages, ``resolve`` downloads, git over smart HTTP.

Pages: ``/`` (the repos the caller can see), ``/{ns}/{repo}`` (the rendered card of main,
tables included, with a branch selector), ``/{ns}/{repo}/tree/{rev}[/{dir}]`` (files with
sizes and download links, and that revision's card), ``/{ns}/{repo}/commits/{rev}`` and
``/{ns}/{repo}/commit/{id}``. Cards are rendered by ``cards``; pages run no inline script (a
CSP says so).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse, Response

from quantpub.formatting import size
from quantpub.hub.api import listing, stamp
from quantpub.hub.cards import Card, render_card
from quantpub.hub.errors import HubError
from quantpub.hub.git import http_backend
from quantpub.hub.routing import BlobResponse, Ctx, Router, blocking, repo_type

TEMPLATES = Path(__file__).parent / "web" / "templates"
CSP = "default-src 'self'; img-src 'self' data: https:; style-src 'self'; script-src 'self'; object-src 'none'"
_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))


def register(r: Router) -> None:
    for prefix in ("", "{plural}/"):
        r.add("GET", prefix + "{ns}/{name}/resolve/{rev}/{path*}", resolve)
        for repo in ("{name}.git", "{name}"):
            r.add("GET", f"{prefix}{{ns}}/{repo}/info/refs", git_fetch)
            r.add("POST", f"{prefix}{{ns}}/{repo}/git-upload-pack", git_fetch)
            r.add("POST", f"{prefix}{{ns}}/{repo}/git-receive-pack", git_fetch)
    r.add("GET", "/", index)
    r.add("GET", "{ns}", index)
    r.add("GET", "{ns}/{name}", repo_page)
    r.add("GET", "{ns}/{name}/tree/{rev}/{path*}", tree_page)
    r.add("GET", "{ns}/{name}/blob/{rev}/{path*}", blob_page)
    r.add("GET", "{ns}/{name}/commits/{rev}", commits_page)
    r.add("GET", "{ns}/{name}/commit/{oid}", commit_page)


async def resolve(ctx: Ctx) -> Response:
    repo = await ctx.repo(repo_type(ctx, api=False))
    rev, path = ctx.params["rev"], ctx.params["path"]

    def find():
        oid = ctx.store.resolve(repo, rev)
        return oid, ctx.store.files(oid).get(path)
    oid, entry = await blocking(find)
    if entry is None:
        raise HubError(404, f"Entry not found: {path} at {rev}", "EntryNotFound", {"X-Repo-Commit": oid})
    headers = {"X-Repo-Commit": oid, "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"',
               "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
    return BlobResponse(ctx.store.blob_path(entry.sha256), media_type="application/octet-stream", headers=headers)


async def git_fetch(ctx: Ctx) -> Response:
    if ctx.hub.mirror is None:
        raise HubError(404, "this hub does not serve git (started with git=False)")
    try:
        repo = await ctx.repo(repo_type(ctx, api=False))
    except HubError as exc:
        if exc.status == 404 and ctx.caller.name is None:  # let git ask for credentials (user name + token)
            raise HubError(401, "Repository not found, or private: authenticate with a token",
                           headers={"WWW-Authenticate": 'Basic realm="quantpub hub"'}) from None
        raise
    service = ctx.request.url.path.rsplit("/", 2)
    return await http_backend(ctx.request, ctx.hub.mirror, repo,
                              "info/refs" if service[-1] == "refs" else service[-1])


def page(handler):
    """A page handler whose refusals are HTML pages with the same status."""
    async def wrapped(ctx: Ctx) -> Response:
        try:
            return await handler(ctx)
        except HubError as exc:
            return _page("error.html", exc.status, code=exc.status, message=str(exc))
    return wrapped


def _page(template: str, status: int = 200, **data) -> HTMLResponse:
    html = _env.get_template(template).render(quote=lambda s: quote(s, safe=""), human=size, **data)
    return HTMLResponse(html, status, headers={"Content-Security-Policy": CSP})


@page
async def index(ctx: Ctx) -> Response:
    author = ctx.params.get("ns")
    repos = [(r, stamp(t)) for r, t in await blocking(ctx.store.repos, "model")
             if ctx.caller.can_read(r.namespace, r.private) and author in (None, r.namespace)]
    if author and not repos:
        raise HubError(404, f"no repositories of {author!r} that you can see")
    return _page("index.html", repos=repos, caller=ctx.caller, author=author)


def _repo_view(ctx: Ctx, repo, rev: str) -> dict:
    store = ctx.store
    oid = store.resolve(repo, rev)
    files = store.files(oid)
    readme = files.get("README.md")
    card = render_card(store.blob_path(readme.sha256).read_text(errors="replace")) if readme else Card()
    return {"repo": repo, "rev": rev, "oid": oid, "commit": store.commit_info(oid), "files": files,
            "branches": [n for n, _ in store.refs(repo, "branch")], "tags": [n for n, _ in store.refs(repo, "tag")],
            "card": card, "base": ctx.base(), "git": ctx.hub.mirror is not None}


@page
async def repo_page(ctx: Ctx) -> Response:
    repo = await ctx.repo("model")
    return _page("repo.html", **await blocking(_repo_view, ctx, repo, "main"))


@page
async def tree_page(ctx: Ctx) -> Response:
    repo = await ctx.repo("model")
    view = await blocking(_repo_view, ctx, repo, ctx.params["rev"])
    items = listing(view["files"], ctx.params["path"], recursive=False)
    return _page("tree.html", items=items, path=ctx.params["path"].strip("/"), **view)


@page
async def blob_page(ctx: Ctx) -> Response:
    repo = await ctx.repo("model")
    view = await blocking(_repo_view, ctx, repo, ctx.params["rev"])
    entry = view["files"].get(ctx.params["path"])
    if entry is None:
        raise HubError(404, f"Entry not found: {ctx.params['path']} at {ctx.params['rev']}", "EntryNotFound")
    text = None
    if not entry.lfs and entry.size <= 1 << 20:
        data = await blocking(ctx.store.blob_path(entry.sha256).read_bytes)
        text = None if b"\0" in data else data.decode(errors="replace")
    return _page("blob.html", entry=entry, text=text, **view)


@page
async def commits_page(ctx: Ctx) -> Response:
    repo = await ctx.repo("model")
    view = await blocking(_repo_view, ctx, repo, ctx.params["rev"])
    history = await blocking(ctx.store.history, view["oid"])
    return _page("commits.html", history=[(c, stamp(c.created)) for c in history], **view)


@page
async def commit_page(ctx: Ctx) -> Response:
    repo = await ctx.repo("model")
    view = await blocking(_repo_view, ctx, repo, ctx.params["oid"])
    parent = view["commit"].parent
    before = await blocking(ctx.store.files, parent) if parent else {}
    changed = sorted(p for p in set(before) | set(view["files"])
                     if (before.get(p) and before[p].git_oid) != (view["files"].get(p) and view["files"][p].git_oid))
    return _page("commit.html", changed=changed, before=before, when=stamp(view["commit"].created), **view)
