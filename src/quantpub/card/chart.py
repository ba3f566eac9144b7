"""The cards' chart: mean KL divergence against file size for every evaluated variant of a model.

Drawn with matplotlib's object API (no pyplot state, no display) into a PNG without a
timestamp or version stamp, so the same numbers give the same bytes and an unchanged chart
makes no new commit.
"""

from __future__ import annotations

from pathlib import Path

from quantpub.card.quality import Point

CHART = "quality.png"  # beside README.md in every repo of the model
MARKERS = {"GPTQ": ("o", "tab:blue"), "AWQ": ("s", "tab:orange"), "GGUF": ("^", "tab:green"),  # same in every chart
           "compressed-tensors": ("D", "tab:red"), "MLX": ("v", "tab:purple")}


def short_label(p: Point) -> str:
    """``Q4_K_M`` for a GGUF file; ``4b g32 act`` for GPTQ, ``4b g128`` for AWQ and MLX (the legend says
    which); ``W4A16 g64``, ``W8A8``, ``FP8_DYNAMIC`` for compressed-tensors (the repo name is too long)."""
    params = p.parameters
    if p.kind == "GGUF":
        return params.name if params is not None else p.variant.removeprefix("gguf-")
    if getattr(params, "scheme", None):
        group = getattr(params, "group_size", None) or (128 if params.scheme == "W4A16" else None)
        return params.scheme + (f" g{group}" if group else "")
    bits = getattr(params, "bits", None)
    if bits is None:
        return p.label
    group = getattr(params, "group_size", None)
    return f"{bits}b {f'g{group}' if group else 'no group'}{' act' if getattr(params, 'act_order', False) else ''}"


def _place_labels(ax, points: list[Point], scale: float, labels: list[str]) -> None:
    """Label every point, trying a few offsets until the label overlaps no placed label, marker or the frame."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    markers = [ax.transData.transform((p.size / scale, p.kld)) for p in points]
    placed: list = []
    candidates = [(5, 2), (5, -12), (-5, 2), (-5, -12), (5, 13), (5, -23), (-5, 13), (-5, -23), (5, 24), (5, -34)]
    for i in sorted(range(len(points)), key=lambda i: (points[i].size, points[i].kld)):
        p = points[i]
        for dx, dy in candidates:
            text = ax.annotate(labels[i], (p.size / scale, p.kld), xytext=(dx, dy), textcoords="offset pixels",
                               fontsize=7, ha="left" if dx > 0 else "right")
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            clear = not any(box.overlaps(b) for b in placed) and not any(
                box.x0 - 3 <= x <= box.x1 + 3 and box.y0 - 3 <= y <= box.y1 + 3 for x, y in markers)
            if inside and clear:
                break
            text.remove()
        else:  # nowhere clear: the first offset, overlapping
            text = ax.annotate(labels[i], (p.size / scale, p.kld), xytext=candidates[0], textcoords="offset pixels",
                               fontsize=7)
            box = text.get_window_extent(renderer)
        placed.append(box)


def write_chart(points: list[Point], path: Path, title: str) -> Path:
    """KLD (log scale) against size, one marker per format, every point labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale, unit = (1e9, "GB") if max(p.size for p in points) >= 1e9 else (1e6, "MB")
    fig = Figure(figsize=(9, 5.5), dpi=110)
    FigureCanvasAgg(fig)  # draws off-screen; labels are placed by their measured extents
    ax = fig.subplots()
    for kind, (marker, color) in MARKERS.items():
        pts = [p for p in points if p.kind == kind]
        if not pts:
            continue
        ax.scatter([p.size / scale for p in pts], [p.kld for p in pts], marker=marker, color=color, s=36, label=kind,
                   zorder=3)
    ax.set_yscale("log")
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel(f"file size ({unit})")
    ax.set_ylabel("mean KL divergence from the unquantised model (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3, zorder=0)
    ax.legend()
    fig.tight_layout()
    _place_labels(ax, points, scale, [short_label(p) for p in points])
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
