"""The variant manifest (``OUT/<variant>/quantpub.json``): what was built, from what, how it checked out
and what it measured, as typed records with a schema version.

Builders write it (``Manifest`` then ``write``), evaluation adds ``evaluation``, and the card, publish,
driver and status stages read it through ``read``; no other module indexes a manifest by key. A
manifest from an older quantpub (no ``schema_version``: version 1, the same fields) is read as is;
one that does not validate names its file and says to rebuild the variant.

``.records``: every manifest written is also kept under ``OUT/.records/<variant>/<digest>.json``,
keyed by its files' sha256, so a variant rebuilt byte for byte keeps what was recorded for those
bytes (``recall``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from quantpub.artifacts import MANIFEST, digests, write_text_atomic
from quantpub.errors import QuantpubError

SCHEMA_VERSION = 2
RECORDS_DIR = ".records"


class Record(BaseModel):
    """A nested record: the fields other stages read are typed; what a builder adds besides is kept as is."""

    model_config = ConfigDict(extra="allow")

    def get(self, name: str, default: Any = None) -> Any:
        """A field a builder added that has no type here (``None`` when absent)."""
        return getattr(self, name, default)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int
    sha256: str
    git_oid: str | None = None  # the git blob id (older manifests lack it): how the hub names a regular file


class CalibrationRecord(Record):
    """The calibration windows a variant was built from (``calibration.CalibrationSet.record``)."""

    source: str
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    file: str | None = None
    n_samples: int | None = None
    seq_len: int | None = None
    source_tokens: int | None = None
    seed: int | None = None
    sha256: str | None = None


class Memory(Record):
    bytes: int | None = None
    kind: str | None = None
    how: str | None = None
    context: int | None = None
    runtime: str | None = None
    device: str | None = None


class Evaluation(Record):
    """Perplexity and KL divergence from the unquantised model on held-out text (``evaluate``)."""

    perplexity: float
    perplexity_stderr: float | None = None
    tokens_scored: int | None = None
    kld: float | None = None
    kld_stderr: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None
    top1_agreement_stderr: float | None = None
    delta_p: float | None = None
    delta_p_stderr: float | None = None
    dataset: str | None = None
    dataset_name: str | None = None
    split: str | None = None
    tokens: int | None = None
    windows: int | None = None
    windows_sha256: str | None = None
    context: int | None = None
    stride: int | None = None
    reference_perplexity: float | None = None
    reference_perplexity_stderr: float | None = None
    runtime: str | None = None
    memory: Memory | None = None
    seconds: float | None = None

    def metrics(self) -> dict[str, float]:
        """The numbers (what the ledger keeps), not the description of the text."""
        return {k: v for k, v in self.model_dump().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RuntimeResult(Record):
    """One runtime's load of a variant (``compat.check_variant``)."""

    runtime: str | None = None
    mode: str | None = None
    status: str
    label: str | None = None
    reason: str | None = None
    error: str | None = None
    kld: float | None = None
    device: str | None = None
    generated_tokens: list[int] | None = None


class Compat(Record):
    prompt_tokens: int | None = None
    tolerance: float | None = None
    reference: str | None = None
    runtimes: dict[str, RuntimeResult] = {}


class ImatrixRecord(Record):
    file: str | None = None
    datasets: list[str] = []
    tensors: int | None = None
    tokens: int | None = None
    samples: int | None = None
    seconds: float | None = None


class Validation(Record):
    """How the built files were loaded back and checked; the fields differ by runtime."""

    loaded_with: str | None = None
    seconds: float | None = None
    execution: str | None = None  # how a CPU ran a scheme it has no kernel for


class Build(Record):
    """A builder's own record (compressed-tensors, MLX): how the files were made."""

    route: str | None = None
    seconds: float | None = None


class Manifest(BaseModel):
    """One built variant."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    schema_version: int = SCHEMA_VERSION
    variant: str
    method: str
    branch: str | None  # None: files on the repo's main beside other variants' (GGUF)
    repo: str
    parameters: dict[str, Any]  # the backend's parameters (backends.Backend.parameters reads them typed)
    model: str
    calibration: CalibrationRecord | None = None
    device: str
    quantize_seconds: float
    validation: Validation
    experts: dict[str, Any] | None = None
    files: dict[str, FileEntry]
    size: int
    tools: dict[str, str]
    gptq_mode: str | None = None
    variants_in_pass: int | None = None
    streamed: bool | None = None
    compat: Compat | None = None
    sixteen_bit: str | None = None
    imatrix: ImatrixRecord | None = None
    convert_seconds: float | None = None
    build: Build | None = None
    evaluation: Evaluation | None = None

    @property
    def path_in_repo(self) -> str:
        """``quantpub.json`` on a variant's own branch; ``quantpub/<variant>.json`` where variants share main."""
        return MANIFEST if self.branch is not None else f"quantpub/{self.variant}.json"

    @property
    def digest(self) -> str:
        return files_digest(self.files)

    @property
    def quantpub_version(self) -> str:
        return self.tools.get("quantpub", "unknown")

    def timings(self) -> dict[str, float]:
        return {k: v for k, v in (("quantize_seconds", self.quantize_seconds),
                                  ("convert_seconds", self.convert_seconds)) if v is not None}

    def loaded_in(self, modes: tuple[str, ...] = ("model", "vllm")) -> list[str]:
        """Labels of the runtimes (of ``modes``) the variant was tested to load in."""
        runtimes = self.compat.runtimes.values() if self.compat else ()
        return [r.label or r.runtime or "?" for r in runtimes if r.mode in modes and r.status == "loads"]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=False), indent=2) + "\n"


class ManifestError(QuantpubError):
    """A manifest that cannot be read: from another tool, a newer quantpub, or edited by hand."""


def files_of(directory: Path) -> dict[str, FileEntry]:
    """Every file of a built variant's directory (but the manifest) with its size and sha256."""
    found = {}
    for f in sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name != MANIFEST):
        sha256, oid = digests(f)
        found[f.name] = FileEntry(size=f.stat().st_size, sha256=sha256, git_oid=oid)
    return found


def files_digest(files: dict[str, FileEntry]) -> str:
    """One sha256 for a variant's files."""
    return hashlib.sha256(json.dumps({n: f.sha256 for n, f in sorted(files.items())}).encode()).hexdigest()


def read(directory: Path) -> Manifest:
    """The manifest of the variant built in ``directory``.

    Raises:
        ManifestError: missing, not JSON, from a newer quantpub, or not a valid manifest.
    """
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot read it ({exc}); rebuild the variant (run the same command again)") \
            from None
    version = data.get("schema_version", 1)
    if version > SCHEMA_VERSION:
        raise ManifestError(f"{path}: written by a newer quantpub (schema {version}, this one reads up to "
                            f"{SCHEMA_VERSION}); upgrade quantpub")
    data["schema_version"] = SCHEMA_VERSION  # version 1 has the same fields, without the version
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestError(f"{path}: {where}: {first['msg']}; delete {Path(directory).name} and run the same "
                            "command again to rebuild it") from None


def write(directory: Path, manifest: Manifest) -> None:
    """Write ``manifest`` into ``directory`` (atomically) and keep it as the record of its files' bytes."""
    write_text_atomic(Path(directory) / MANIFEST, manifest.to_json())
    remember(Path(directory).parent, manifest)


def remember(out: Path, manifest: Manifest) -> None:
    """Keep ``manifest`` as the record of its files' exact bytes (``recall`` finds it after a rebuild)."""
    path = Path(out) / RECORDS_DIR / manifest.variant / f"{manifest.digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, manifest.to_json())


def recall(out: Path, variant: str, files: dict[str, FileEntry]) -> Manifest | None:
    """The manifest recorded for exactly these bytes of ``variant``, if it was built (and measured) before.

    A variant rebuilt byte for byte (its directory was deleted or tampered with) keeps what was
    measured for those bytes (times, validation, evaluation), so its manifest and card, and the
    hub, do not change for a rebuild that changed nothing.
    """
    path = Path(out) / RECORDS_DIR / variant / f"{files_digest(files)}.json"
    if not path.is_file():
        return None
    try:
        manifest = read_file(path)
    except ManifestError:
        return None
    return manifest if manifest.files == files else None


def read_file(path: Path) -> Manifest:
    """A manifest stored outside a variant directory (a record)."""
    try:
        data = json.loads(Path(path).read_text())
        data["schema_version"] = SCHEMA_VERSION
        return Manifest.model_validate(data)
    except (OSError, ValueError, ValidationError) as exc:
        raise ManifestError(f"{path}: {exc}") from None


def finished(out: Path) -> list[tuple[Path, Manifest]]:
    """Every finished variant directory under ``out`` (not ``.partial-*`` or other dot-directories)."""
    found = []
    for path in sorted(Path(out).glob(f"*/{MANIFEST}")):
        if not path.parent.name.startswith("."):
            found.append((path.parent, read(path.parent)))
    return found
