"""A local server for the Hugging Face Hub HTTP API, web pages and git: ``quantpub hub serve``.

The names below load on first use, so that ``quantpub.hub.commands`` (the command line's
parsers) imports without the server's libraries.
"""

from __future__ import annotations

from importlib import import_module

_HOMES = {"Users": "auth", "load_or_create_users": "auth", "read_users": "auth", "HubConfig": "server",
          "HubServer": "server", "serve": "server", "start_in_thread": "server"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
