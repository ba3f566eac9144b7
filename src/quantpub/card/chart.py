"""The cards' chart: mean KL divergence against file size for every evaluated variant of a model.

Drawn with matplotlib's object API (no pyplot state, no display) into a PNG without a
timestamp or version stamp, so the same numbers give the same bytes and an unchanged chart
makes no new commit.
"""

from __future__ import annotations

from pathlib import Path

from quantpub.card.quality import Point

CHART = "quality.png"  # beside README.md in every repo of the model
MARKERS = {"GPTQ": "o", "AWQ": "s", "GGUF": "^"}


def short_label(p: Point) -> str:
    """``Q4_K_M`` for a GGUF file, the branch for GPTQ/AWQ (``main`` as ``GPTQ main``)."""
    if p.kind == "GGUF":
        return p.variant.removeprefix("gguf-")
    return f"{p.kind} {p.label}" if p.label == "main" else p.label.removeprefix("gptq-")


def write_chart(points: list[Point], path: Path, title: str) -> Path:
    """KLD (log scale) against size, one marker per format, every point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    scale, unit = (1e9, "GB") if max(p.size for p in points) >= 1e9 else (1e6, "MB")
    fig = Figure(figsize=(9, 5.5), dpi=110)
    ax = fig.subplots()
    for kind, marker in MARKERS.items():
        pts = [p for p in points if p.kind == kind]
        if not pts:
            continue
        ax.scatter([p.size / scale for p in pts], [p.kld for p in pts], marker=marker, s=36, label=kind, zorder=3)
        for p in pts:
            ax.annotate(short_label(p), (p.size / scale, p.kld), xytext=(4, 3), textcoords="offset points",
                        fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel(f"file size ({unit})")
    ax.set_ylabel("mean KL divergence from the unquantised model (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3, zorder=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
