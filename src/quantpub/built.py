"""What a builder leaves for each variant: a directory moved into place whole, its manifest, its ``Outcome``.

A variant is built in ``OUT/.partial-<id>-<pid>/`` and renamed to ``OUT/<id>/`` only once its
files are saved, checked and its manifest written: a killed build never leaves a directory under
the final name, and a re-run skips every variant whose manifest exists.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantpub import isolate, manifest
from quantpub.backends import backend
from quantpub.errors import QuantizeError
from quantpub.manifest import CalibrationRecord, Manifest, Validation

log = logging.getLogger(__name__)
SAME_BUILD = ("variant", "method", "branch", "repo", "parameters", "model")  # a record must agree on these too


@dataclass(frozen=True)
class Outcome:
    """How building one variant ended: built (``path``), skipped (already built), or ``error`` with its
    ``ending``: ``failed`` (an exception), ``crashed`` (native code killed its process) or
    ``interrupted`` (its process was killed from outside)."""

    variant: str
    path: Path | None
    skipped: bool = False
    error: str | None = None
    ending: str = "failed"

    @classmethod
    def ended(cls, variant: str, exc: isolate.Ended) -> Outcome:
        return cls(variant, None, error=str(exc), ending=exc.kind)

    @property
    def phase(self) -> str:
        """The progress phase this outcome reports: done, or how it ended."""
        return "done" if self.error is None else self.ending


def partial_dir(out: Path, variant: str) -> Path:
    """A fresh ``OUT/.partial-<variant>-<pid>`` (an earlier one of this process removed)."""
    partial = Path(out) / f".partial-{variant}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    return partial


@contextmanager
def building(partial: Path, variant: str, model: str) -> Iterator[None]:
    """The body builds ``variant`` in ``partial``. On a failure ``partial`` is removed: a crash or kill of a worker
    (``isolate.Ended``) goes on as it is, anything else as the variant's ``QuantizeError``."""
    try:
        yield
    except isolate.Ended:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise QuantizeError(variant, model, f"{type(exc).__name__}: {exc}") from exc


def move_into_place(partial: Path, final: Path) -> None:
    """``partial`` becomes ``final``; a directory there without a manifest (finished ones were skipped) goes."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def write_manifest(partial: Path, job, calib, model: str, device: str, seconds: float, validation: dict[str, Any],
                   **extra: Any) -> Manifest:
    """The manifest of the variant built in ``partial`` for ``job`` (a plan Job), written there.

    A variant rebuilt byte for byte keeps the manifest recorded for those bytes (``manifest.recall``).
    """
    b = backend(job.method)
    files = manifest.files_of(partial)
    size = extra.pop("size", None) or sum(f.size for f in files.values())  # GGUF: the model's files, not the imatrix
    built = Manifest(
        variant=job.id, method=job.method, branch=job.variant.branch, repo=job.repo, parameters=b.parameters(job),
        model=model, calibration=CalibrationRecord(**calib.record()) if calib is not None else None, device=device,
        quantize_seconds=seconds, validation=Validation(**validation), files=files,
        size=size, tools=b.tools(), **extra)
    recorded = manifest.recall(partial.parent, job.id, files)
    if recorded is not None and all(getattr(recorded, k) == getattr(built, k) for k in SAME_BUILD):
        log.info("%s: rebuilt byte for byte; keeping what was recorded for these files", job.id)
        built = recorded
    manifest.write(partial, built)
    return built
