"""Line and bar charts as PNG with Pillow (matplotlib is not part of the pinned stack)."""

from __future__ import annotations

import math

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]
"""matplotlib's tab10 colours, so the charts look familiar."""

W, H = 720, 440
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 36, 52


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    ticks = [math.floor(lo / step) * step]
    while ticks[-1] < hi - step * 1e-9:  # the last tick is at or above hi
        ticks.append(ticks[0] + step * len(ticks))
    return [round(t, 10) for t in ticks]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2g}"
    return f"{v:.3g}"


class _Canvas:
    def __init__(self, title: str, xlabel: str, ylabel: str, xr: tuple[float, float], yr: tuple[float, float],
                 xticks: list | None = None):
        from PIL import Image, ImageDraw, ImageFont

        self.img = Image.new("RGB", (W, H), "white")
        self.d = ImageDraw.Draw(self.img)
        self.font = ImageFont.load_default()
        self.yt = nice_ticks(*yr)
        self.y0, self.y1 = self.yt[0], self.yt[-1]
        if xticks is None:
            self.xt = nice_ticks(*xr)
            self.x0, self.x1 = self.xt[0], self.xt[-1]
        else:
            self.xt = xticks
            self.x0, self.x1 = xr
        d = self.d
        d.text((LEFT, 10), title, fill="black", font=self.font)
        d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
        for t in self.yt:
            y = self.py(t)
            d.line([LEFT - 4, y, LEFT, y], fill="black")
            d.line([LEFT + 1, y, W - RIGHT - 1, y], fill=(230, 230, 230))
            d.text((4, y - 6), _fmt(t), fill="black", font=self.font)
        for t in self.xt:
            label = t[1] if isinstance(t, tuple) else _fmt(t)
            x = self.px(t[0] if isinstance(t, tuple) else t)
            d.line([x, H - BOTTOM, x, H - BOTTOM + 4], fill="black")
            d.text((x - 3 * len(label), H - BOTTOM + 6), label, fill="black", font=self.font)
        d.text(((LEFT + W - RIGHT) // 2 - 3 * len(xlabel), H - 22), xlabel, fill="black", font=self.font)
        d.text((4, TOP - 16), ylabel, fill="black", font=self.font)

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / ((self.x1 - self.x0) or 1) * (W - RIGHT - LEFT)

    def py(self, y: float) -> float:
        return H - BOTTOM - (y - self.y0) / ((self.y1 - self.y0) or 1) * (H - BOTTOM - TOP)

    def legend(self, labels: list[str], colors: list) -> None:
        for i, (label, c) in enumerate(zip(labels, colors)):
            y = TOP + 6 + 16 * i
            self.d.rectangle([W - RIGHT + 10, y, W - RIGHT + 22, y + 10], fill=c)
            self.d.text((W - RIGHT + 28, y - 1), label, fill="black", font=self.font)

    def save(self, path: str) -> None:
        self.img.save(path, format="PNG")


def line_chart(path: str, series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
               hlines: dict[str, float] | None = None, markers: bool = True) -> None:
    """One line per series (label -> [(x, y), ...]); ``hlines`` (label -> y) are drawn dashed."""
    pts = [p for s in series.values() for p in s if p[1] is not None and math.isfinite(p[1])]
    ys = [y for _, y in pts] + list((hlines or {}).values())
    xs = [x for x, _ in pts] or [0.0, 1.0]
    ys = ys or [0.0, 1.0]
    pad = (max(ys) - min(ys)) * 0.05 or 0.1
    c = _Canvas(title, xlabel, ylabel, (min(xs), max(xs)), (min(ys) - pad, max(ys) + pad))
    colors = []
    for i, (label, s) in enumerate(series.items()):
        col = COLORS[i % len(COLORS)]
        colors.append(col)
        xy = [(c.px(x), c.py(y)) for x, y in s if y is not None and math.isfinite(y)]
        if len(xy) > 1:
            c.d.line(xy, fill=col, width=2)
        if markers or len(xy) == 1:
            for x, y in xy:
                c.d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    labels = list(series)
    for j, (label, y) in enumerate((hlines or {}).items()):
        col = (90, 90, 90)
        py = c.py(y)
        x = LEFT
        while x < W - RIGHT:
            c.d.line([x, py, min(x + 6, W - RIGHT), py], fill=col, width=1)
            x += 10
        labels.append(label)
        colors.append(col)
    c.legend(labels, colors)
    c.save(path)


def bar_chart(path: str, groups: list[str], series: dict[str, list[float | None]], *, title: str, ylabel: str,
              zero_based: bool = True) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series (label -> value per group)."""
    vals = [v for s in series.values() for v in s if v is not None and math.isfinite(v)] or [0.0, 1.0]
    lo = min(0.0, min(vals)) if zero_based else min(vals) - (max(vals) - min(vals)) * 0.1
    hi = max(vals) * 1.05 if max(vals) > 0 else 0.1
    n = len(groups)
    xticks = [(i + 0.5, g) for i, g in enumerate(groups)]
    c = _Canvas(title, "", ylabel, (0.0, float(n)), (lo, hi), xticks=xticks)
    k = max(1, len(series))
    width = 0.8 / k
    colors = []
    for j, (label, s) in enumerate(series.items()):
        col = COLORS[j % len(COLORS)]
        colors.append(col)
        for i, v in enumerate(s):
            if v is None or not math.isfinite(v):
                continue
            x0 = c.px(i + 0.1 + j * width)
            x1 = c.px(i + 0.1 + (j + 1) * width) - 1
            c.d.rectangle([x0, min(c.py(v), c.py(max(lo, 0.0))), x1, max(c.py(v), c.py(max(lo, 0.0)))], fill=col)
    c.legend(list(series), colors)
    c.save(path)
