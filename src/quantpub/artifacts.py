"""What a run leaves on disk, named in one place, and the two ways it is written and checked."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "quantpub.json"          # per variant: parameters, files with sha256, validation, evaluation
RUN_RECORD = "quantpub-run.json"    # per output dir: source model, matrix card settings, variant order
CARDS_DIR = "cards"                 # OUT/cards/<repo name>/README.md
RECORDS_DIR = ".records"            # OUT/.records/<variant>/<files digest>.json: the manifest recorded for those bytes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary sibling and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def files_digest(files: dict[str, dict]) -> str:
    """One sha256 for a variant's files (``{name: {"size", "sha256"}}``, the manifest's ``files``)."""
    return hashlib.sha256(json.dumps({n: f["sha256"] for n, f in sorted(files.items())}).encode()).hexdigest()


def remember(out: Path, manifest: dict) -> None:
    """Keep ``manifest`` as the record of its files' exact bytes (``recall`` finds it after a rebuild)."""
    path = Path(out) / RECORDS_DIR / manifest["variant"] / f"{files_digest(manifest['files'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")


def recall(out: Path, variant: str, files: dict[str, dict]) -> dict | None:
    """The manifest recorded for exactly these bytes of ``variant``, if it was built (and measured) before.

    A variant rebuilt byte for byte (its directory was deleted or tampered with) keeps what was
    measured for those bytes (times, validation, evaluation), so its manifest and card, and the
    hub, do not change for a rebuild that changed nothing.
    """
    path = Path(out) / RECORDS_DIR / variant / f"{files_digest(files)}.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("files") == files else None
