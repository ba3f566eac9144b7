"""The one error type of the hub: an HTTP status, a message and the Hub's ``X-Error-Code``."""

from __future__ import annotations

from quantpub.errors import EXIT_MACHINE, QuantpubError


class HubError(Exception):
    """A request the hub refuses; ``status`` and ``code`` become the HTTP answer."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        self.status, self.code, self.headers = status, code, dict(headers or {})
        super().__init__(message)


def not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository Not Found: {repo_id}", "RepoNotFound")


def not_stored(path: str, sha256: str) -> HubError:
    """422 for a commit naming content the hub does not have (never uploaded, or collected as garbage)."""
    return HubError(422, f"{path}: content {sha256} is not stored: upload it through the LFS batch API first (an "
                         "upload left uncommitted past the hub's minimum age is collected as garbage: upload it again)")


class HubLockedError(QuantpubError):
    """Another hub process serves (or collects garbage in) this data dir; ``url`` where it serves."""

    exit_code = EXIT_MACHINE

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url
