"""What the hub accepts as a namespace, repo name, file path, branch or tag (pure functions).

Branch and tag names follow ``git check-ref-format`` for ``refs/heads/<name>`` (tests compare
with git itself), plus the Hub's own rules: no 40-hex names (they would read as commit ids),
no ``refs/`` prefix, no leading ``-`` and not ``HEAD``.
"""

from __future__ import annotations

import re

from quantpub.hub.errors import HubError

NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# First path segments the hub's own URLs use: no user, organisation or repo may take them.
RESERVED = frozenset({"api", "lfs", "static", "models", "datasets", "spaces", "new", "settings", "login",
                      "logout", "join", "organizations", "docs", "search"})
_CONTROL = frozenset(chr(c) for c in range(32)) | {"\x7f"}
_REF_FORBIDDEN = _CONTROL | set(" ~^:?*[\\")


def check_name(name: object, what: str) -> str:
    """A namespace or repo name: letters, digits, '-', '_', '.', at most 96 characters."""
    if (not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name
            or name.lower().endswith(".git")):
        raise HubError(400, f"invalid {what} {name!r}: use 1-96 letters, digits, '-', '_' and '.' "
                            "(not starting or ending with '-' or '.', no '..', not ending in '.git')")
    return name


def check_namespace(name: object) -> str:
    check_name(name, "namespace")
    if name.lower() in RESERVED:
        raise HubError(400, f"namespace {name!r} is reserved by the hub's URLs; choose another")
    return name


def check_path(path: object) -> str:
    """A repo file path: relative, '/'-separated, no '.', '..' or empty parts, nothing under .git."""
    parts = path.split("/") if isinstance(path, str) else []
    if (not parts or not path or len(path) > 1000 or "\\" in path or any(c in _CONTROL for c in path)
            or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git"):
        raise HubError(400, f"invalid file path {path!r}")
    return path


def ref_problem(name: str) -> str | None:
    """Why ``name`` cannot be a branch or tag, or None when it can."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    if len(name) > 200:
        return "it is longer than 200 characters"
    if COMMIT_RE.fullmatch(name.lower()):
        return "a 40-hex name would read as a commit id"
    if name in ("HEAD", "@") or name.startswith(("refs/", "-")):
        return "HEAD, '@', names starting with 'refs/' or '-' are reserved"
    bad = sorted({repr(c) for c in name if c in _REF_FORBIDDEN})
    if bad:
        return f"it contains {', '.join(bad)}"
    for seq in ("..", "@{", "//"):
        if seq in name:
            return f"it contains {seq!r}"
    if name.startswith("/") or name.endswith(("/", ".")):
        return "it starts with '/' or ends with '/' or '.'"
    for part in name.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return f"the part {part!r} starts with '.' or ends with '.lock'"
    return None


def check_ref(kind: str, name: str) -> str:
    problem = ref_problem(name)
    if problem:
        raise HubError(400, f"invalid {kind} name {name!r}: {problem} (git check-ref-format rules)")
    return name
