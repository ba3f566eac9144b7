"""``quantpub hub serve`` and ``quantpub hub gc``: their arguments and what they call.

Kept light (argparse only at import): the command line builds every parser on each start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from quantpub.errors import EXIT_HUB, EXIT_MACHINE

log = logging.getLogger("quantpub")
GB = 1000 ** 3


def add_commands(hub: argparse.ArgumentParser) -> None:
    """The ``serve`` and ``gc`` subcommands of ``quantpub hub``."""
    sub = hub.add_subparsers(dest="hub_command", required=True, metavar="HUB_COMMAND")
    s = sub.add_parser("serve", help="serve the Hub HTTP API (repos, branches, LFS, downloads by revision)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    s.add_argument("--data-dir", default="hub-data", help="where repos are stored (default ./hub-data)")
    s.add_argument("--users", "--token-file", dest="users", metavar="FILE",
                   help="users, organisations and tokens (YAML, see quantpub.hub.auth; or 'user:token' lines), read "
                        "again when it changes; default: DATA_DIR/users.yaml, created with one admin user 'quantpub'")
    s.add_argument("--max-connections", type=int, default=100, help="connections in all; past it, 503 (default 100)")
    s.add_argument("--max-client-connections", type=int, default=16,
                   help="connections from one client address at once; past it, 429 (default 16; 0: no limit)")
    s.add_argument("--max-head-kib", type=int, default=64,
                   help="request line and headers, KiB; past it, 431 (default 64)")
    s.add_argument("--max-headers", type=int, default=100, help="header fields per request; past it, 431 (default 100)")
    s.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS",
                   help="a reverse proxy's IP or network (repeatable): its X-Forwarded-For and X-Forwarded-Proto "
                        "are believed; no one's are by default")
    s.add_argument("--quota-gb", type=float, help="GB each user's or organisation's repos may store (default: no "
                                                  "quota); past it, 413")
    s.add_argument("--gc-every-hours", type=float, default=1.0,
                   help="collect unreferenced blobs this often while serving (default 1; 0: never)")
    s.add_argument("--gc-min-age-hours", type=float, default=24.0,
                   help="keep unreferenced blobs younger than this: uploads whose commit is still to come (default 24)")
    s.set_defaults(func=serve_command)
    g = sub.add_parser("gc", help="find blobs no commit references (refused commits, deleted repos, uploads never "
                                  "committed); dry run unless --delete; through the hub if one serves the data dir")
    g.add_argument("--data-dir", default="hub-data", help="the hub's data dir (default ./hub-data)")
    g.add_argument("--url", help="collect through the hub serving at this URL (default: the one serving --data-dir, "
                                 "as its lock file says, else none: the data dir directly)")
    g.add_argument("--token", help="an admin's token for --url (default $HF_TOKEN, else an admin's write token from "
                                   "DATA_DIR/users.yaml)")
    g.add_argument("--delete", action="store_true", help="remove them")
    g.add_argument("--min-age-hours", type=float, default=24.0,
                   help="keep blobs younger than this: uploads whose commit may still come (default 24)")
    g.set_defaults(func=gc_command)


def serve_command(args: argparse.Namespace) -> int:
    from quantpub.hub.auth import load_or_create_users
    from quantpub.hub.errors import HubLockedError
    from quantpub.hub.server import HubConfig, serve

    users, where = load_or_create_users(args.data_dir, args.users)
    log.info("users and tokens: %s", where)
    config = HubConfig(Path(args.data_dir), users=users, log_requests=True, max_connections=args.max_connections,
                       max_client_connections=args.max_client_connections, max_head_bytes=args.max_head_kib * 1024,
                       max_headers=args.max_headers, trusted_proxies=tuple(args.trusted_proxy),
                       quota=None if args.quota_gb is None else int(args.quota_gb * GB),
                       gc_every=args.gc_every_hours * 3600, gc_min_age=args.gc_min_age_hours * 3600)
    try:
        serve(config, host=args.host, port=args.port)
    except HubLockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MACHINE
    return 0


def gc_command(args: argparse.Namespace) -> int:
    from quantpub.hub.errors import HubLockedError
    from quantpub.hub.gc import GcReport, collect_offline

    url, min_age = args.url, args.min_age_hours * 3600
    if url is None:
        try:
            print(collect_offline(args.data_dir, delete=args.delete, min_age=min_age))
            return 0
        except HubLockedError as exc:
            if exc.url is None:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_MACHINE
            url = exc.url
            log.info("a hub serves %s at %s: collecting through it", args.data_dir, url)
    token = args.token or os.environ.get("HF_TOKEN") or _admin_token(Path(args.data_dir))
    request = urllib.request.Request(f"{url.rstrip('/')}/api/admin/gc", method="POST",
                                     data=json.dumps({"delete": args.delete, "min_age": min_age}).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=3600) as resp:
            print(GcReport(**json.load(resp)))
    except urllib.error.HTTPError as exc:
        print(f"error: the hub at {url} answered {exc.code}: {exc.headers.get('X-Error-Message') or exc.reason}",
              file=sys.stderr)
        return EXIT_HUB
    except urllib.error.URLError as exc:
        print(f"error: cannot reach the hub at {url}: {exc.reason}", file=sys.stderr)
        return EXIT_HUB
    return 0


def _admin_token(data_dir: Path) -> str:
    """An admin's write token from the data dir's own users file ('' when there is none)."""
    from quantpub.hub.auth import USERS_FILE, read_users

    try:
        return read_users(data_dir / USERS_FILE).write_token()
    except (OSError, ValueError):
        return ""
