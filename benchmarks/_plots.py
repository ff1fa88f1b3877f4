"""Line, bar and Pareto charts as PNG with matplotlib: a Figure on its own Agg canvas (no pyplot, no global
backend switch, no display needed).

matplotlib is in requirements.txt (and comes with mlflow), so it is in every desmoe environment.
"""

from __future__ import annotations

import math
import textwrap

from desmoe.figures import canvas_figure, save_png

DPI = 110
SIZE = (8.0, 5.0)


BAND_ABOVE = 8
"""A series with a spread and more points than this draws it as a min-max band, not error bars."""


def _figure(size: tuple[float, float]):
    """A Figure on its own Agg canvas (desmoe.figures), and its axes."""
    fig = canvas_figure(*size)
    return fig, fig.add_subplot()


def _ok(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _finish(fig, ax, path: str, title: str, xlabel: str, ylabel: str, outside: bool = False) -> None:
    """Title (wrapped to the width of the axes), labels, grid, legend (``outside``: right of the axes), save."""
    axes_in = fig.get_figwidth() * (0.62 if outside else 0.85)
    ax.set_title(textwrap.fill(title, width=int(axes_in * 72 / (9 * 0.55)), break_on_hyphens=False), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        if outside:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_png(fig, path, dpi=DPI)


def line_chart(path: str, series: dict[str, list[tuple]], *, title: str, xlabel: str, ylabel: str,
               hlines: dict[str, float] | None = None, markers: bool = True, integer_x: bool = False,
               band: bool | None = None) -> None:
    """One line per series (label -> [(x, y)] or [(x, y, y_low, y_high)]: the spread, e.g. min-max over seeds,
    drawn as error bars, or as a shaded band for a series of more than BAND_ABOVE points; ``band`` True or
    False: always a band, always error bars); ``hlines`` (label -> y) are drawn dashed; ``integer_x``:
    integer x ticks."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(SIZE)
    for label, pts in series.items():
        pts = [p for p in pts if _ok(p[1])]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        spread = all(len(p) >= 4 and _ok(p[2]) and _ok(p[3]) for p in pts)
        if spread and (len(pts) > BAND_ABOVE if band is None else band):
            line, = ax.plot(xs, ys, marker="o" if markers else None, markersize=3, label=label)
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.2,
                            linewidth=0)
        elif spread:
            err = [[y - p[2] for y, p in zip(ys, pts)], [p[3] - y for y, p in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, marker="o" if markers else None, capsize=3, label=label)
        else:
            ax.plot(xs, ys, marker="o" if markers or len(xs) == 1 else None, label=label)
    for label, y in (hlines or {}).items():
        if _ok(y):
            ax.axhline(y, linestyle="--", color="0.4", linewidth=1, label=label)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(fig, ax, path, title, xlabel, ylabel)


def bar_chart(path: str, groups: list[str], series: dict[str, list], *, title: str, ylabel: str,
              xlabel: str = "", zero_based: bool = True) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series (label -> value per group: a number,
    or (value, low, high) for a bar with an error bar from low to high, e.g. min-max over seeds; None: no bar);
    more series than the colour cycle has colours take tab20's, so that no two share one."""
    from matplotlib import colormaps, rcParams

    fig, ax = _figure(SIZE)
    k = max(1, len(series))
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    if k > len(colors):
        colors = [colormaps["tab20"](i % 20) for i in range(k)]
    width = 0.8 / k
    vals = []
    for j, (label, s) in enumerate(series.items()):
        s = [v if isinstance(v, (tuple, list)) else (v, None, None) for v in s]
        kept = [(i, v) for i, v in enumerate(s) if _ok(v[0])]
        xs = [i - 0.4 + (j + 0.5) * width for i, _ in kept]
        ys = [v[0] for _, v in kept]
        vals += ys
        ax.bar(xs, ys, width=width, label=label, color=colors[j % len(colors)])
        bars = [(x, v) for x, (_, v) in zip(xs, kept) if _ok(v[1]) and _ok(v[2])]
        if bars:
            ax.errorbar([x for x, _ in bars], [v[0] for _, v in bars], fmt="none", ecolor="black", capsize=2,
                        yerr=[[v[0] - v[1] for _, v in bars], [v[2] - v[0] for _, v in bars]], linewidth=0.8)
            vals += [v[i] for _, v in bars for i in (1, 2)]
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    if not zero_based and vals:
        lo, hi = min(vals), max(vals)
        ax.set_ylim(lo - (hi - lo) * 0.1, hi + (hi - lo) * 0.1)
    _finish(fig, ax, path, title, xlabel, ylabel, outside=True)


def pareto_chart(path: str, series: dict[str, dict], *, title: str, xlabel: str, ylabel: str,
                 hlines: dict[str, float] | None = None, extra_points: dict[str, tuple[float, float]] | None = None
                 ) -> None:
    """Points with error bars and a front line per series: label -> {"points": [(x, y, (x_lo, x_hi), (y_lo, y_hi),
    text)], "front": [(x, y), ...]}; each point is annotated with its text (e.g. the LR). ``extra_points``:
    label -> (x, y) drawn as stars; ``hlines`` dashed."""
    from matplotlib import rcParams

    fig, ax = _figure((10.0, 6.0))
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, s) in enumerate(series.items()):
        col = colors[i % len(colors)]
        pts = [p for p in s.get("points", []) if _ok(p[0]) and _ok(p[1])]
        if pts:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            xerr = [[x - p[2][0] for x, p in zip(xs, pts)], [p[2][1] - x for x, p in zip(xs, pts)]]
            yerr = [[y - p[3][0] for y, p in zip(ys, pts)], [p[3][1] - y for y, p in zip(ys, pts)]]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o", color=col, capsize=2, markersize=4, alpha=0.8)
            for p in pts:
                ax.annotate(str(p[4]), (p[0], p[1]), textcoords="offset points", xytext=(4, 3), fontsize=7, color=col)
        front = [p for p in s.get("front", []) if _ok(p[0]) and _ok(p[1])]
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=col, linewidth=1.5,
                    label=f"{label} (front)")
        elif pts:
            ax.plot([], [], "o", color=col, label=label)
    for label, (x, y) in (extra_points or {}).items():
        if _ok(x) and _ok(y):
            ax.plot([x], [y], "*", color="black", markersize=11, label=label)
    for label, y in (hlines or {}).items():
        if _ok(y):
            ax.axhline(y, linestyle="--", color="0.4", linewidth=1, label=label)
    _zoom_to_fronts(ax, series, extra_points or {})
    _finish(fig, ax, path, title, xlabel, ylabel, outside=True)


def _zoom_to_fronts(ax, series: dict[str, dict], extra_points: dict[str, tuple[float, float]]) -> None:
    """Keep the fronts readable: points far right of every front (dominated, e.g. an LR that diverged) are
    left off the axes, and a note says how many; the tables hold their numbers."""
    front_x = [p[0] for s in series.values() for p in s.get("front", []) if _ok(p[0]) and _ok(p[1])]
    pts = [p for s in series.values() for p in s.get("points", []) if _ok(p[0]) and _ok(p[1])]
    if not front_x or not pts:
        return
    right = max(front_x)
    far = [p for p in pts if p[0] > 1.5 * right + 1e-9]
    if not far or right <= 0:
        return
    shown = [p for p in pts if p not in far]
    ax.set_xlim(-0.03 * right, 1.15 * right)
    ys = [y for p in shown for y in (p[1], p[3][0], p[3][1])] + [y for _, y in extra_points.values() if _ok(y)]
    lo, hi = min(ys), max(ys)
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.text(0.99, 0.01, f"{len(far)} dominated point(s) beyond F = {1.5 * right:.2f} not shown (see the tables)",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.3")
