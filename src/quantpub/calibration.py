"""Calibration samples: load text once, tokenize once, cut seeded windows, hash them.

The text comes from the ``datasets`` hub (wikitext-2-raw-v1, *train* split, by default) or,
offline, from a local .txt / .jsonl / .parquet file. Every artifact records the samples'
sha256, so it says exactly what it was calibrated on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantpub.errors import CalibrationError
from quantpub.matrix import CalibrationSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSet:
    samples: tuple[tuple[int, ...], ...]  # n_samples windows of seq_len token ids
    source: str  # "wikitext/wikitext-2-raw-v1:train" or the local file
    source_tokens: int  # tokens in the whole source text
    seed: int
    sha256: str
    origin: dict[str, str | None] = field(default_factory=dict)  # dataset, config, split or file

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    @property
    def seq_len(self) -> int:
        return len(self.samples[0])

    def as_gptqmodel(self) -> list[dict[str, list[int]]]:
        """The samples in the form GPTQModel's ``quantize`` takes."""
        return [{"input_ids": list(s), "attention_mask": [1] * len(s)} for s in self.samples]

    def record(self) -> dict[str, Any]:
        return {"source": self.source, **self.origin, "n_samples": self.n_samples, "seq_len": self.seq_len,
                "source_tokens": self.source_tokens, "seed": self.seed, "sha256": self.sha256}


def origin(spec: CalibrationSpec, file: str | Path | None) -> dict[str, str | None]:
    """Where the text came from, as a record names it: the dataset, its config and split, or the
    local file's name (its path is one machine's)."""
    if file is not None:
        return {"dataset": None, "config": None, "split": None, "file": Path(file).name}
    return {"dataset": spec.dataset, "config": spec.config, "split": spec.split, "file": None}



def load_text(spec: CalibrationSpec, file: str | Path | None = None) -> tuple[str, str]:
    """(text, description of where it came from).

    Raises:
        CalibrationError: the file is missing or unreadable, or the dataset cannot be loaded.
    """
    if file is not None:
        return _read_file(Path(file), spec.text_column), str(file)
    source = f"{spec.dataset}/{spec.config}:{spec.split}" if spec.config else f"{spec.dataset}:{spec.split}"
    try:
        import datasets

        data = datasets.load_dataset(spec.dataset, spec.config, split=spec.split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many unrelated types when offline
        raise CalibrationError(source, f"cannot load it through datasets ({type(exc).__name__}: {exc}); "
                                       "offline, pass a local text/jsonl/parquet file with --calibration-file") from None
    if spec.text_column not in data.column_names:
        raise CalibrationError(source, f"has no column {spec.text_column!r} (columns: {', '.join(data.column_names)})")
    return "\n\n".join(t for t in data[spec.text_column] if t), source


def _read_file(path: Path, column: str) -> str:
    if not path.is_file():
        raise CalibrationError(str(path), "no such file")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if any(column not in r for r in rows):
                raise CalibrationError(str(path), f"a line has no {column!r} field")
            return "\n\n".join(str(r[column]) for r in rows)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if column not in table.column_names:
                raise CalibrationError(str(path), f"has no column {column!r} (columns: {', '.join(table.column_names)})")
            return "\n\n".join(t for t in table.column(column).to_pylist() if t)
        return path.read_text(encoding="utf-8")
    except CalibrationError:
        raise
    except Exception as exc:  # noqa: BLE001 - json, pyarrow and unicode errors alike
        raise CalibrationError(str(path), f"cannot read it: {exc}") from None


def build(text: str, source: str, tokenizer, *, n_samples: int, seq_len: int, seed: int = 0,
          origin: dict[str, str | None] | None = None) -> CalibrationSet:
    """Tokenize ``text`` once and cut ``n_samples`` windows of ``seq_len`` tokens.

    Window starts are drawn with ``random.Random(seed)``, so the same text, tokenizer and seed
    always give the same samples (and hash).

    Raises:
        CalibrationError: the text has fewer than ``seq_len`` tokens.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len:
        raise CalibrationError(source, f"has {len(ids)} tokens, fewer than one sample of seq_len {seq_len}; "
                                       "use a longer text or a smaller seq_len")
    if len(ids) < n_samples * seq_len:
        log.warning("calibration data %s: %d tokens for %d samples of %d: samples overlap",
                    source, len(ids), n_samples, seq_len)
    rng = random.Random(seed)
    starts = [rng.randrange(len(ids) - seq_len + 1) for _ in range(n_samples)]
    samples = tuple(tuple(ids[s:s + seq_len]) for s in starts)
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps(sample, separators=(",", ":")).encode())
        digest.update(b"\n")
    return CalibrationSet(samples, source, len(ids), seed, digest.hexdigest(), origin or {})


def key(job) -> tuple:
    """What makes two jobs' calibration windows the same windows."""
    spec = job.variant.calibration
    return (spec.dataset, spec.config, spec.split, spec.text_column, spec.seed, job.seq_len, job.n_samples)


def sets_for(plan, jobs, tokenizer, file) -> dict[tuple, CalibrationSet]:
    """One CalibrationSet per distinct calibration of ``jobs``; each text read once (``plan.text``: the plan's
    snapshot, or ``file`` / the dataset when the plan has none)."""
    texts: dict[tuple, tuple[str, str, dict]] = {}
    sets = {}
    for job in jobs:
        k = key(job)
        if k in sets:
            continue
        spec = job.variant.calibration
        if k[:4] not in texts:
            texts[k[:4]] = plan.text("calibration", spec, file)
        text, source, where = texts[k[:4]]
        sets[k] = build(text, source, tokenizer, n_samples=job.n_samples, seq_len=job.seq_len, seed=spec.seed,
                        origin=where)
    return sets
