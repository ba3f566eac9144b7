"""Mixture-of-experts calibration coverage, from the quantizer's own per-module log.

The router sends each calibration token to only ``k`` of the experts, so an expert can see
few tokens; its GPTQ Hessian is then rank-deficient and rests on the damp. GPTQModel logs the
token count each module was calibrated with; an expert below ``min_tokens`` (its input width,
the smallest count that can give a full-rank Hessian) is reported as starved.
"""

from __future__ import annotations

import re
from typing import Any

_EXPERT = re.compile(r"experts\.(\d+)\.")


def expert_coverage(quant_log: Any, min_tokens: int) -> dict[str, Any] | None:
    """Tokens per (layer, expert) and the starved ones; None when the log has no experts."""
    tokens: dict[str, int] = {}
    for row in _rows(quant_log):
        match = _EXPERT.search(str(row.get("module", "")))
        if match and "samples" in row:
            key = f"layer {row.get('layer')} expert {match.group(1)}"
            count = int(float(row["samples"]))
            tokens[key] = min(tokens.get(key, count), count)
    if not tokens:
        return None
    starved = sorted((k for k, n in tokens.items() if n < min_tokens), key=_order)
    return {"min_tokens": min_tokens, "tokens": dict(sorted(tokens.items(), key=lambda kv: _order(kv[0]))),
            "starved": starved}


def _order(key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", key))


def _rows(log: Any):
    """Every dict in GPTQModel's nested quantize() result."""
    if isinstance(log, dict):
        if "module" in log:
            yield log
        else:
            for value in log.values():
                yield from _rows(value)
    elif isinstance(log, (list, tuple)):
        for item in log:
            yield from _rows(item)
