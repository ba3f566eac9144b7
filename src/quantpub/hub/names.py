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
# NTFS short names of .git and .gitmodules (git's is_ntfs_dotgit, is_ntfs_dotgitmodules)
_GIT_SHORT = re.compile(r"git~1")
_DRIVE = re.compile(r"[A-Za-z]:")
_GITMODULES_SHORT = re.compile(r"(gitmod|gi7eba)~\d+")
_HFS_IGNORED = dict.fromkeys(map(ord, "\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                                      "\u206a\u206b\u206c\u206d\u206e\u206f\ufeff"))


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


def path_problem(path: object) -> str | None:
    """Why ``path`` cannot be a repo file path, or None when it can.

    Relative, '/'-separated, valid UTF-8 without control characters or backslashes, no empty,
    '.' or '..' parts; and nothing git refuses or that means ``.git`` to some checkout: no part
    that Windows or macOS reads as ``.git`` or ``.gitmodules`` (any case, trailing dots or
    spaces, an NTFS ``:stream``, a short name such as ``GIT~1``, code points HFS+ ignores). The
    hub serves no submodules, so a ``.gitmodules`` file could only be a trap for a clone. Nor what
    no file system or huggingface_hub's downloads take: a part over 255 bytes (a file name over
    246: the client adds '.metadata'), a Windows drive.
    """
    if not isinstance(path, str) or not path:
        return "it is empty"
    if len(path) > 1000:
        return "it is longer than 1000 characters"
    try:
        path.encode()
    except UnicodeEncodeError:
        return "it is not valid Unicode"
    bad = sorted({repr(c) for c in path if c in _CONTROL or c == "\\"})
    if bad:
        return f"it contains {', '.join(bad)}"
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            return "it has an empty, '.' or '..' part (paths are relative, without a leading or doubled '/')"
        longest = 255 if part is not parts[-1] else 255 - len(".metadata")
        if len(part.encode()) > longest:
            return (f"the part {part[:20]!r}... is longer than {longest} bytes: file systems store 255, and "
                    "huggingface_hub's downloads add '.metadata' to a file's name")
        if _DRIVE.match(part):
            return f"the part {part!r} reads as a Windows drive, which huggingface_hub refuses to download"
        seen_as = checkout_name(part)
        if seen_as == ".git" or _GIT_SHORT.fullmatch(seen_as):
            return f"the part {part!r} reads as .git (git's own folder) on some systems; git never stores it"
        if seen_as == ".gitmodules" or _GITMODULES_SHORT.fullmatch(seen_as):
            return (f"the part {part!r} reads as .gitmodules on some systems; the hub serves no submodules, so it "
                    "could only mislead a clone")
        if seen_as in ("", ".", ".."):
            return f"the part {part!r} is only dots and spaces (Windows drops trailing dots and spaces)"
    return None


def checkout_name(part: str) -> str:
    """The name a checkout on Windows or macOS gives a path part: case folded, code points HFS+
    ignores removed, an NTFS ``:stream`` suffix and trailing dots and spaces dropped."""
    return part.translate(_HFS_IGNORED).casefold().split(":", 1)[0].rstrip(" .")


def check_path(path: object) -> str:
    """``path`` if it can be a repo file path (see ``path_problem``), else 400 saying why."""
    problem = path_problem(path)
    if problem:
        raise HubError(400, f"invalid file path {path!r}: {problem}")
    return path


def tree_clash(paths: list[str] | set[str]) -> tuple[str, str] | None:
    """A (file, path under it) pair when a path is both a file and a folder: git cannot store that."""
    files = set(paths)
    for path in sorted(files):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if (parent := "/".join(parts[:depth])) in files:
                return parent, path
    return None


def attributes_problem(path: str, data: bytes | None) -> str | None:
    """Why a ``.gitattributes`` file would fail ``git fsck`` (a clone with transfer.fsckObjects refuses
    it), or None; ``data`` None for an LFS file, which would reach a clone as a pointer."""
    if checkout_name(path.rsplit("/", 1)[-1]) != ".gitattributes":
        return None
    if data is None:
        return "a .gitattributes file must be a regular file, not LFS"
    if len(data) > 100 << 20 or any(len(line) > 2048 for line in data.split(b"\n")):
        return "git refuses a .gitattributes file over 100 MiB or with a line over 2048 bytes"
    return None


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
