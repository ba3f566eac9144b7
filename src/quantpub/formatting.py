"""Numbers as people read them: sizes, durations, metrics. One place, so every table and message agrees."""

from __future__ import annotations

from typing import Any, Iterable

UNITS = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def size_unit(largest: float) -> tuple[str, float]:
    """The decimal unit (as the Hub and TheBloke's tables use) in which ``largest`` bytes reads best."""
    for unit, scale in UNITS:
        if largest >= scale:
            return unit, scale
    return "B", 1.0


def size(n: float | None, unit: tuple[str, float] | None = None) -> str:
    """Bytes in a unit that shows them: 512 B, 48.4 MB, 1.23 GB (two decimals from GB up), never 0.0 GB.

    ``unit``: a column's unit from ``column_unit`` (one unit per column of a table).
    """
    if n is None:
        return "-"
    name, scale = unit or size_unit(abs(n))
    if name == "B":
        return f"{n:.0f} B"
    return f"{n / scale:.{2 if scale >= 1e9 else 1}f} {name}"


def column_unit(values: Iterable[float | None]) -> tuple[str, float]:
    """One unit for a table column: the one its largest value reads best in."""
    present = [abs(v) for v in values if v]
    return size_unit(max(present)) if present else ("MB", 1e6)


def gb(n: int) -> str:
    """Bytes as TheBloke's tables show file sizes: decimal gigabytes with 2 decimals, or MB below 0.1 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def metric(value: Any, digits: int = 4) -> str:
    """Enough significant digits to tell variants apart: 0.000123 stays 0.000123, not 0.0000."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}"
