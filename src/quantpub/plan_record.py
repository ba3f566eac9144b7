"""``OUT/plan.json``: a model's plan, written once when the model enters a run; the contract every stage reads.

It holds what the plan was made from, so that no stage opens the matrix file, the source's
``config.json`` or its README again: the matrix's validated content and its sha256, the config,
what the source's card says (name, creator, licence, prompt template), the calibration size
overrides, and the calibration and evaluation text, snapshotted into ``OUT/inputs/`` with their
sha256 (a file that exists only on the driver's node, or a dataset the other nodes cannot reach,
is read there once). ``load`` rebuilds the same ``Plan`` from it.

Re-running with an edited matrix: ``changes`` says what differs from the recorded plan (variants
added, variants the matrix no longer has, card settings), and the new plan replaces the old one;
built variants are kept, removed ones are left as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from quantpub.artifacts import write_text_atomic
from quantpub.errors import QuantpubError

PLAN_FILE = "plan.json"
INPUTS_DIR = "inputs"
SCHEMA_VERSION = 1


class TextSnapshot(BaseModel):
    """Calibration or evaluation text as it was read when the plan was made."""

    model_config = ConfigDict(extra="forbid")

    file: str                       # under OUT/inputs/
    sha256: str
    source: str                     # what it was read from, as records name it (dataset:split, or the file)
    origin: dict[str, str | None]   # calibration.origin: the dataset, config and split, or the file's name


class PlanRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    model: str
    matrix_path: str
    matrix_sha256: str
    matrix: dict[str, Any]          # the matrix's validated content (Matrix.model_dump)
    config: dict[str, Any]          # the source's config.json
    device: str
    n_samples: int | None = None    # overrides of the matrix's calibration size
    seq_len: int | None = None
    source: dict[str, Any]          # source.card.Source: what the source's card says
    texts: dict[str, TextSnapshot] = {}


class PlanFileError(QuantpubError):
    """A work or output directory without a readable plan.json."""


def text_key(role: str, spec) -> str:
    """Which snapshot a calibration (or evaluation) spec reads: one per distinct text source."""
    return f"{role}:{spec.dataset}:{spec.config}:{spec.split}:{spec.text_column}"


def snapshot(out: Path, key: str, text: str, source: str, origin: dict[str, str | None]) -> TextSnapshot:
    """Write ``text`` under ``OUT/inputs/`` (named by its hash, so equal texts are one file) and describe it."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    name = f"{key.split(':', 1)[0]}-{digest[:16]}.txt"
    path = Path(out) / INPUTS_DIR / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    return TextSnapshot(file=name, sha256=digest, source=source, origin=origin)


def read_snapshot(out: Path, snap: TextSnapshot) -> str:
    """The snapshotted text, checked against its hash.

    Raises:
        PlanFileError: missing or changed since the plan was written.
    """
    path = Path(out) / INPUTS_DIR / snap.file
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanFileError(f"{path}: the plan's {snap.source} text is missing ({exc.strerror}); run the same "
                            "command again to write the plan anew") from None
    if hashlib.sha256(text.encode()).hexdigest() != snap.sha256:
        raise PlanFileError(f"{path}: changed since the plan was written (sha256 differs); delete it and run the "
                            "same command again")
    return text


def write(out: Path, record: PlanRecord) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out) / PLAN_FILE, record.model_dump_json(indent=2) + "\n")


def read(out: Path) -> PlanRecord:
    """The plan recorded in ``out``.

    Raises:
        PlanFileError: none there (a directory from an older quantpub, or not an output directory), or unreadable.
    """
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise PlanFileError(f"{out}: no {PLAN_FILE}; it is written by `quantpub quantize` and `quantpub run` (an "
                            "output directory of an older quantpub: run the same quantize command again, finished "
                            "variants are kept)")
    try:
        return PlanRecord.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError) as exc:
        raise PlanFileError(f"{path}: cannot read it ({str(exc).splitlines()[0]}); delete it and run the same "
                            "command again") from None


def source_facts(source) -> dict[str, Any]:
    """A ``source.card.Source`` as plan.json keeps it."""
    return dataclasses.asdict(source)


def matrix_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def changes(old: PlanRecord, new: PlanRecord, old_ids: list[str], new_ids: list[str]) -> list[str]:
    """What an edited matrix (or changed overrides) changes for a model, one line each; [] when nothing."""
    if (old.matrix_sha256, old.matrix, old.n_samples, old.seq_len) == \
            (new.matrix_sha256, new.matrix, new.n_samples, new.seq_len):
        return []
    lines = []
    added = [v for v in new_ids if v not in old_ids]
    removed = [v for v in old_ids if v not in new_ids]
    if added:
        lines.append(f"new variants, to build: {', '.join(added)}")
    if removed:
        lines.append(f"no longer in the matrix, left as they are (built files and published branches are kept): "
                     f"{', '.join(removed)}")
    for section in sorted(set(old.matrix) | set(new.matrix)):
        if section not in ("gptq", "awq", "gguf", "compressed_tensors", "mlx") and \
                old.matrix.get(section) != new.matrix.get(section):
            lines.append(f"{section} settings changed: {json.dumps(old.matrix.get(section), sort_keys=True)} -> "
                         f"{json.dumps(new.matrix.get(section), sort_keys=True)}")
    if (old.n_samples, old.seq_len) != (new.n_samples, new.seq_len):
        lines.append(f"calibration overrides changed: n_samples {old.n_samples} -> {new.n_samples}, seq_len "
                     f"{old.seq_len} -> {new.seq_len} (variants already built keep theirs)")
    return lines or ["the matrix file changed, its variants and settings did not"]
