"""The measured side of a card: every variant of the model across formats, and which file to choose.

Built from the manifests' ``evaluation`` records only. Every number a card shows here is one
manifest field, formatted (sizes from ``size``, KLD from ``evaluation.kld`` ...); the picks
are rules over those numbers, unit-tested on fixed values. Nothing is shown for what was not
measured.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantpub.formatting import column_unit, gb, size
from quantpub.naming import HUB_URL as HUB
from quantpub.manifest import CalibrationRecord, Evaluation, Manifest

KLD_LIMITS = (0.01, 0.05, 0.1)  # "smallest file whose mean KLD is at most ..."
MEMORY_BUDGETS_GIB = (8, 12, 16, 24)  # "lowest KLD whose measured memory fits in ..."
GIB = 1 << 30


@dataclass(frozen=True)
class Point:
    """One evaluated variant, as the comparison table, the chart and the picks see it."""

    variant: str
    kind: str           # GPTQ, AWQ, GGUF
    repo: str
    label: str          # the branch (the repo's name for main) or the GGUF file's name
    url: str
    size: int
    kld: float
    evaluation: Evaluation
    parameters: Any = None  # the backend's typed parameters

    @property
    def memory(self) -> int | None:
        return self.evaluation.memory.bytes if self.evaluation.memory else None


def _same_text(ev: Evaluation) -> tuple:
    return ev.windows_sha256 or (ev.dataset_name, ev.context, ev.tokens)


def points(family: list[Manifest], hub: str) -> list[Point]:
    """Every variant of ``family`` (manifests of all repos of one model) evaluated on the same
    held-out tokens as most of them, lowest KLD first: numbers from other text do not compare."""
    from quantpub.backends import backend

    evaluated = [m for m in family if m.evaluation and m.evaluation.kld is not None]
    keys = [_same_text(m.evaluation) for m in evaluated]
    common = max(set(keys), key=keys.count) if keys else None
    out = []
    for m in evaluated:
        ev = m.evaluation
        if _same_text(ev) != common:
            continue
        if m.branch:  # "main" is every repo's first branch: the repo's name tells which
            label = m.repo.rsplit("/", 1)[-1] if m.branch == "main" else m.branch
            url = f"{hub}/{m.repo}/tree/{m.branch}"
        else:
            label = sorted(n for n in m.files if n.endswith(".gguf"))[0]
            url = f"{hub}/{m.repo}/blob/main/{label}"
        b = backend(m.method)
        out.append(Point(m.variant, b.kind, m.repo, label, url, m.size, ev.kld, ev, b.read_parameters(m.parameters)))
    return sorted(out, key=lambda p: (p.kld, p.size))


def smallest_within(pts: list[Point], limit: float) -> Point | None:
    """The smallest file whose mean KLD is at most ``limit`` (ties: the lower KLD)."""
    fits = [p for p in pts if p.kld <= limit]
    return min(fits, key=lambda p: (p.size, p.kld)) if fits else None


def best_within(pts: list[Point], budget: int) -> Point | None:
    """The lowest-KLD file whose measured memory is at most ``budget`` bytes (ties: the smaller)."""
    fits = [p for p in pts if p.memory is not None and p.memory <= budget]
    return min(fits, key=lambda p: (p.kld, p.size)) if fits else None


def picks(pts: list[Point], repo: str) -> dict[str, list[dict[str, Any]]]:
    """The rows of "Which file should I choose?": per KLD limit and memory budget, the pick among
    all formats and among this repo's files."""
    own = [p for p in pts if p.repo == repo]
    return {
        "kld": [{"limit": limit, "any": smallest_within(pts, limit), "own": smallest_within(own, limit)}
                for limit in KLD_LIMITS],
        "memory": [{"budget": gib, "any": best_within(pts, gib * GIB), "own": best_within(own, gib * GIB)}
                   for gib in MEMORY_BUDGETS_GIB],
    }


def ranks(pts: list[Point]) -> dict[str, int]:
    """Rank by mean KLD among all evaluated variants of the model (1 = closest to the original)."""
    return {p.variant: i for i, p in enumerate(pts, 1)}


def significant(values: list[float], least: int = 3, most: int = 6) -> int:
    """The fewest significant digits (at least ``least``) that print distinct values distinctly."""
    distinct = {v for v in values if v is not None and math.isfinite(v)}
    for digits in range(least, most + 1):
        if len({fmt(v, digits) for v in distinct}) == len(distinct):
            return digits
    return most


def fmt(value: float | None, digits: int) -> str:
    """``digits`` significant digits, trailing zeros kept (0.0700, not 0.07)."""
    return "-" if value is None else f"{value:#.{digits}g}".rstrip(".")


def pm(value: float | None, err: float | None, digits: int) -> str:
    """``17.23 ± 0.12``: the value to ``digits`` significant digits, its standard error to 2."""
    if value is None:
        return "-"
    return fmt(value, digits) + (f" ± {err:.2g}" if err is not None and math.isfinite(err) else "")


def percent(value: float | None, err: float | None = None, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:+.3f}%" if signed else f"{100 * value:.2f}%"
    return text + (f" ± {100 * err:.2g}%" if err is not None and math.isfinite(err) else "")


def memory_cell(evaluation: Evaluation | None, unit: tuple[str, float] | None = None) -> str:
    """Measured memory in ``unit`` (a column's one unit: ``memory_unit``), as ``48.4 MB RAM``."""
    m = evaluation.memory if evaluation else None
    return f"{size(m.bytes, unit)} {m.kind}" if m and m.bytes is not None else "-"


def memory_unit(pts: list[Point]) -> tuple[str, float]:
    """One unit for every memory cell of a card, so a column never mixes 48.4 MB and 0.11 GB."""
    return column_unit(p.memory for p in pts)


def bits_per_weight(size: int, parameters: int | None) -> str:
    """A file's bits per weight of the model (its size over the source's parameters, as llama.cpp reports it)."""
    return f"{size * 8 / parameters:.2f}" if parameters else "-"


def table(pts: list[Point], kld_digits: int, ppl_digits: int, parameters: int | None = None) -> list[dict[str, str]]:
    """The comparison table's cells, formatted so that no two different measurements print alike."""
    stat_digits = {k: significant([getattr(p.evaluation, k) for p in pts]) for k in ("kld_median", "kld_p99", "kld_max")}
    unit = memory_unit(pts)
    rows = []
    for p in pts:
        ev = p.evaluation
        rows.append({
            "kind": p.kind, "repo": p.repo, "label": p.label, "url": p.url, "size": gb(p.size),
            "bpw": bits_per_weight(p.size, parameters),
            "ppl": pm(ev.perplexity, ev.perplexity_stderr, ppl_digits),
            "kld": pm(p.kld, ev.kld_stderr, kld_digits),
            **{k: fmt(getattr(ev, k), d) for k, d in stat_digits.items()},
            "top1": percent(ev.top1_agreement), "delta_p": percent(ev.delta_p, signed=True),
            "memory": memory_cell(ev, unit),
        })
    return rows


def pick_cell(p: Point | None, show: str, kld_digits: int, unit: tuple[str, float] | None = None) -> str:
    if p is None:
        return "none this close" if show == "kld" else "none measured fits"
    kld = f"KLD {fmt(p.kld, kld_digits)}"
    extra = kld if show == "kld" else f"{memory_cell(p.evaluation, unit)}, {kld}"
    return f"[{p.label}]({p.url}) ({p.kind}, {gb(p.size)}, {extra})"


def scored_text(info: Evaluation) -> str:
    """What every file was scored on, from the evaluation record (older records say less)."""
    where = info.dataset_name or info.dataset or "held-out text"
    if info.split:
        where += f" ({info.split} split)"
    shape = f"{info.windows} windows of {info.context} tokens" if info.windows and info.context \
        else f"windows of {info.context} tokens" if info.context else None
    if info.tokens_scored:
        head = f"{info.tokens_scored} next-token predictions" + (f" ({shape})" if shape else "")
    elif info.tokens:
        head = f"{info.tokens} tokens" + (f" ({shape})" if shape else "")
    else:
        head = shape or "the same tokens"
    return f"{head} of {where}"


def context(family: list[Manifest], repo: str, hub: str, parameters: int | None = None) -> dict[str, Any] | None:
    """What the quality and "which file" sections of ``repo``'s card render, or None when nothing was measured."""
    pts = points(family, hub)
    if not pts:
        return None
    info = pts[0].evaluation
    chosen = picks(pts, repo)
    kld_digits = significant([p.kld for p in pts])
    ppl_digits = significant([p.evaluation.perplexity for p in pts], least=4)
    left_out = sum(1 for m in family if m.evaluation and m.evaluation.kld is not None) - len(pts)
    return {
        "rows": table(pts, kld_digits, ppl_digits, parameters), "info": info, "count": len(pts), "ranks": ranks(pts),
        "kld_digits": kld_digits, "ppl_digits": ppl_digits, "left_out": left_out,
        "scored_on": scored_text(info),
        "reference_ppl": pm(info.reference_perplexity, info.reference_perplexity_stderr, ppl_digits),
        "measured_memory": any(p.memory is not None for p in pts),
        "memory_context": next((p.evaluation.memory.context for p in pts if p.memory is not None), None),
        "kld_picks": [{"limit": f"{r['limit']:g}", "any": pick_cell(r["any"], "kld", kld_digits),
                       "own": pick_cell(r["own"], "kld", kld_digits)} for r in chosen["kld"]],
        "memory_unit": memory_unit(pts),
        "memory_picks": _merge_budgets([{"budget": r["budget"],
                                         "any": pick_cell(r["any"], "memory", kld_digits, memory_unit(pts)),
                                         "own": pick_cell(r["own"], "memory", kld_digits, memory_unit(pts))}
                                        for r in chosen["memory"]]),
    }


def _merge_budgets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row for neighbouring budgets with the same picks: "8 to 16 GiB", "12 GiB or more"."""
    groups: list[list[dict[str, Any]]] = []
    for row in rows:
        if groups and (groups[-1][0]["any"], groups[-1][0]["own"]) == (row["any"], row["own"]):
            groups[-1].append(row)
        else:
            groups.append([row])
    out = []
    for i, group in enumerate(groups):
        low, high = group[0]["budget"], group[-1]["budget"]
        label = f"{low} GiB or more" if i == len(groups) - 1 and len(group) > 1 else \
            f"{low} to {high} GiB" if len(group) > 1 else f"{low} GiB"
        out.append({**group[0], "budget": label})
    return out


def dataset_cell(calib: CalibrationRecord | None, hub: str = HUB) -> str:
    """The calibration dataset, linked on huggingface.co where it lives (whatever hub the card is for)."""
    if not calib:
        return "-"
    source = str(calib.source)
    match = re.fullmatch(r"([\w./-]+?)/([\w.-]+):(\w+)", source)
    if match and not Path(source.split(":")[0]).exists():
        dataset, config, split = match.groups()
        return f"[{dataset}]({hub}/datasets/{dataset}/viewer/{config}/{split})"
    return f"{Path(source).name} (local file)"


def measured(m: Manifest, q: dict[str, Any] | None) -> dict[str, Any]:
    """The per-format tables' quality cells of one variant (formatted as in the comparison table)."""
    ev = m.evaluation
    if not ev or q is None:
        return {"eval": None, "ppl": "-", "kld": "-", "memory": "-", "rank": None}
    return {"eval": ev, "ppl": fmt(ev.perplexity, q["ppl_digits"]), "kld": fmt(ev.kld, q["kld_digits"]),
            "memory": memory_cell(ev, q["memory_unit"]), "rank": q["ranks"].get(m.variant)}
