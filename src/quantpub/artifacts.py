"""What a run leaves on disk, named in one place, and the two ways it is written and checked."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MANIFEST = "quantpub.json"          # per variant: parameters, files with sha256, validation, evaluation
CARDS_DIR = "cards"                 # OUT/cards/<repo name>/README.md


def sha256_file(path: Path) -> str:
    return digests(path)[0]


def digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob id) of a file, from one read: the hub compares LFS files by the first and
    regular files by the second."""
    path = Path(path)
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha256.update(block)
            blob.update(block)
    return sha256.hexdigest(), blob.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary sibling and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)

