"""Figures on their own Agg canvas: no pyplot, no global backend or figure registry (safe in any
process and thread), written whole or not at all. matplotlib is imported when a figure is made."""

from __future__ import annotations

import os


def canvas_figure(width: float, height: float, *, dpi: float = 100):
    """A matplotlib Figure of ``width`` x ``height`` inches on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str, *, dpi: float | None = None) -> None:
    """Write ``fig`` as PNG (at ``dpi``, default the figure's) under a temporary name first, so a reader
    never sees half a file."""
    tmp = path + ".tmp"
    try:
        fig.savefig(tmp, format="png", dpi=dpi or fig.dpi)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
