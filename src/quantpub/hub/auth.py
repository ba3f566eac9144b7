"""Users, organisations and tokens of a hub, and what a caller may read or write.

The users file (YAML, checked strictly)::

    users:
      alice:
        admin: true                  # may read and write every namespace (the hub's operator)
        tokens:
          - {token: hf_...write..., role: write}
          - {token: hf_...read..., role: read}
      bob:
        tokens: [{token: hf_..., role: write}]
    orgs:
      quantpub:
        members: {alice: write, bob: read}

Rules (the Hub's): anyone reads public repos; a private repo is visible only to its
namespace's user, that organisation's members and admins (404 to everyone else); writing
needs a write token and the caller's own namespace, or an organisation where the caller is a
``write`` member. A file of ``user:token`` lines (the older format) gives write tokens.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantpub.hub.errors import HubError, not_found
from quantpub.hub.names import SHA256_RE, check_namespace
from quantpub.hub.store import REPO_TYPES, Repo, Store

log = logging.getLogger(__name__)
Role = Literal["read", "write"]
USERS_FILE = "users.yaml"
DEFAULT_USER = "quantpub"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenSpec(_Strict):
    token: str = Field(min_length=8)
    role: Role = "write"


class UserSpec(_Strict):
    admin: bool = False
    tokens: list[TokenSpec] = []


class OrgSpec(_Strict):
    members: dict[str, Role] = {}


class UsersSpec(_Strict):
    users: dict[str, UserSpec]
    orgs: dict[str, OrgSpec] = {}


@dataclass(frozen=True)
class Caller:
    """Who sent a request: ``name`` None for anonymous; ``orgs`` maps organisation -> role."""
    name: str | None = None
    role: Role | None = None
    admin: bool = False
    orgs: dict[str, str] = field(default_factory=dict)

    def is_member(self, namespace: str) -> bool:
        return self.name is not None and (self.admin or namespace == self.name or namespace in self.orgs)

    def can_read(self, namespace: str, private: bool) -> bool:
        return not private or self.is_member(namespace)

    def can_write(self, namespace: str) -> bool:
        return self.role == "write" and (self.admin or namespace == self.name or self.orgs.get(namespace) == "write")


ANONYMOUS = Caller()


class Users:
    """Token -> Caller, built from a ``UsersSpec``."""

    def __init__(self, spec: UsersSpec, source: str = "<memory>"):
        self.spec, self.source = spec, source
        self.path: Path | None = None  # the file they were read from (reloaded when it changes)
        self._by_token: dict[str, Caller] = {}
        for org in spec.orgs:
            check_namespace(org)
            if org in spec.users:
                raise ValueError(f"{source}: {org!r} is both a user and an organisation")
        for name, user in spec.users.items():
            check_namespace(name)
            orgs = {o: s.members[name] for o, s in spec.orgs.items() if name in s.members}
            for t in user.tokens:
                if t.token in self._by_token:
                    raise ValueError(f"{source}: a token of user {name!r} is given twice")
                self._by_token[t.token] = Caller(name, t.role, user.admin, orgs)
        for org, spec_org in spec.orgs.items():
            unknown = sorted(set(spec_org.members) - set(spec.users))
            if unknown:
                raise ValueError(f"{source}: organisation {org!r} lists unknown users {unknown}")

    @classmethod
    def from_tokens(cls, tokens: dict[str, str], admin: bool = False) -> "Users":
        """Write tokens, ``{token: user}``: the older token file and the test fixtures."""
        users: dict[str, UserSpec] = {}
        for token, user in tokens.items():
            users.setdefault(user, UserSpec(admin=admin)).tokens.append(TokenSpec(token=token))
        return cls(UsersSpec(users=users))

    def caller(self, authorization: str) -> Caller | None:
        """The caller an ``Authorization`` header names (Bearer, or Basic with the token as password)."""
        if not authorization:
            return ANONYMOUS
        scheme, _, value = authorization.partition(" ")
        token = value.strip()
        if scheme.lower() == "basic":
            try:
                token = base64.b64decode(token, validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return None
        elif scheme.lower() != "bearer":
            return None
        return self._by_token.get(token)

    def write_token(self) -> str:
        """A write token of an admin (else of anyone): what the embedded hub publishes with."""
        ranked = sorted(self._by_token.items(), key=lambda kv: (not kv[1].admin, kv[1].role != "write"))
        if not ranked or ranked[0][1].role != "write":
            raise ValueError(f"{self.source}: no user has a write token")
        return ranked[0][0]


def require_write(caller: Caller, namespace: str) -> None:
    """401 without a token, 403 for a read token or a namespace the caller may not write."""
    if caller.name is None:
        raise HubError(401, "a write token is required: pass token= or set HF_TOKEN")
    if caller.role != "write":
        raise HubError(403, f"the token of {caller.name} is a read token; writing needs a write token")
    if not caller.can_write(namespace):
        raise HubError(403, f"{caller.name} cannot write to namespace {namespace!r}: only to their own "
                            "namespace and organisations where they are a write member")


def open_repo(store: Store, caller: Caller, type_: str, namespace: str, name: str, *, write: bool = False) -> Repo:
    """The repo if ``caller`` may see it (else 404, as the Hub), and write to it when ``write``."""
    if type_ not in REPO_TYPES:
        raise HubError(400, f"unknown repo type {type_!r}")
    repo = store.get_repo(type_, namespace, name)
    if repo is None or not caller.can_read(repo.namespace, repo.private):
        if write and caller.name is None:
            raise HubError(401, "a write token is required: pass token= or set HF_TOKEN")
        raise not_found(f"{namespace}/{name}")
    if write:
        require_write(caller, repo.namespace)
    return repo


def visible_blob(store: Store, caller: Caller, sha256: str, size: int) -> bool:
    """Stored completely, and referenced by a repo the caller can read, or uploaded by the caller.

    What makes the LFS batch API answer "already stored", and a commit accept an LFS file: a
    sha256 alone (from a published manifest, say) gets no one another user's private bytes.
    """
    if not SHA256_RE.fullmatch(sha256) or not store.has_blob(sha256, size):
        return False
    if caller.name is not None and store.uploaded_by(sha256, caller.name):
        return True
    return any(caller.can_read(ns, private) for ns, private in store.blob_owners(sha256))


def whoami(caller: Caller) -> dict:
    return {"type": "user", "name": caller.name, "fullname": caller.name, "isPro": False, "canPay": False,
            "isAdmin": caller.admin,
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": r} for o, r in sorted(caller.orgs.items())],
            "auth": {"type": "access_token", "accessToken": {"displayName": "token", "role": caller.role}}}


def read_users(path: str | Path) -> Users:
    """A YAML users file, or a file of ``user:token`` lines (write tokens); ValueError saying what is wrong."""
    path = Path(path)
    text = path.read_text()
    try:
        data, yaml_error = yaml.safe_load(text), None
    except yaml.YAMLError as exc:
        data, yaml_error = None, exc
    if isinstance(data, dict):
        try:
            users = Users(UsersSpec.model_validate(data), str(path))
        except ValidationError as exc:
            raise ValueError(f"{path}: {exc}") from None
    else:
        tokens = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, token = line.partition(":")
            if not sep or not user.strip() or len(token.strip()) < 8:
                if yaml_error is not None:
                    raise ValueError(f"{path}: not valid YAML: {' '.join(str(yaml_error).split())}") from None
                raise ValueError(f"{path}:{n}: expected 'user:token' with a token of at least 8 characters, "
                                 "or a YAML users file (see quantpub hub serve --help)")
            tokens[token.strip()] = user.strip()
        users = Users.from_tokens(tokens)
    users.path = path
    return users


class UsersReloader:
    """The users file read again when it changes, so that a revoked token stops working within a
    second or two: polled every ``interval`` seconds, read once it has stayed the same for one poll
    (an editor's half-written file is not taken), and swapped into ``config.users`` in one
    assignment. A file that does not read, or has no token left, keeps the previous users and
    logs one line saying why."""

    def __init__(self, config, path: Path, interval: float = 0.5):
        self.config, self.path, self.interval = config, Path(path), interval
        self.loaded = self.seen = self._signature()

    def _signature(self) -> bytes | None:
        """The file's content digest (a users file is small; an mtime can miss a same-size edit)."""
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

    def check(self) -> None:
        """One poll: reload when the file changed and has stayed so since the last poll."""
        now = self._signature()
        stable, self.seen = now == self.seen, now
        if now == self.loaded or not stable:
            return
        self.loaded = now
        try:
            users = read_users(self.path)
            if not users._by_token:
                raise ValueError("no user has a token")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.error("users file %s not reloaded, the previous users stay: %s", self.path, exc)
            return
        self.config.users = users
        log.info("users file %s reloaded: %d users, %d tokens", self.path, len(users.spec.users),
                 len(users._by_token))

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.check()


def load_or_create_users(data_dir: str | Path, users_file: str | Path | None = None) -> tuple[Users, Path]:
    """``users_file``, else ``DATA_DIR/users.yaml``, created (mode 600) on first use.

    The created file has one admin user, ``quantpub``, with a random write token (plus the
    tokens of an older ``DATA_DIR/tokens`` file, kept working): the operator of a local hub,
    who may publish under any namespace.
    """
    if users_file is not None:
        return read_users(users_file), Path(users_file)
    path = Path(data_dir) / USERS_FILE
    if not path.exists():
        legacy = Path(data_dir) / "tokens"
        tokens = read_users(legacy).spec.users if legacy.exists() else {}
        users = {name: {"admin": True, "tokens": [t.model_dump() for t in u.tokens]} for name, u in tokens.items()}
        users.setdefault(DEFAULT_USER, {"admin": True, "tokens": [{"token": f"hf_{secrets.token_hex(20)}",
                                                                   "role": "write"}]})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("# quantpub hub users (see quantpub.hub.auth); tokens are secrets\n")
            yaml.safe_dump({"users": users, "orgs": {}}, fh, sort_keys=False)
        os.replace(tmp, path)
    return read_users(path), path
