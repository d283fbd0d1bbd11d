"""Small line plots as inline SVG (no plotting library): series against slice ids, threshold lines, marked points."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

__all__ = ["Series", "line_plot", "nice_ticks"]

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
MARK_STYLES = {
    "glitch": ("#d62728", "circle"),
    "rehoming": ("#ff7f0e", "square"),
    "error": ("#d62728", "circle"),
    "warning": ("#e0a800", "circle"),
    "excluded": ("#7f7f7f", "cross"),
}


@dataclass
class Series:
    """One line of a plot.

    Attributes
    ----------
    name : str
        Legend text.
    x, y : list of float
        Points; a ``None`` or NaN ``y`` breaks the line.
    color : str, optional
    dashed : bool
    marks : dict
        ``{index: kind}`` points drawn with a marker of that kind (``glitch``, ``rehoming``, ``error``,
        ``warning``, ``excluded``) and ``class="mark-<kind>"``.
    """

    name: str
    x: list
    y: list
    color: str | None = None
    dashed: bool = False
    marks: dict = field(default_factory=dict)


def nice_ticks(low: float, high: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0) * 0.1
    raw = (high - low) / max(1, n)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _finite(value) -> bool:
    return value is not None and isinstance(value, int | float) and math.isfinite(value)


def _marker(kind: str, x: float, y: float) -> str:
    color, shape = MARK_STYLES.get(kind, ("#d62728", "circle"))
    cls = f'class="mark-{escape(kind)}"'
    if shape == "square":
        return f'<rect {cls} x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="none" stroke="{color}" ' \
               f'stroke-width="2"/>'
    if shape == "cross":
        return (f'<path {cls} d="M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}M{x - 5:.1f},{y + 5:.1f}'
                f'L{x + 5:.1f},{y - 5:.1f}" stroke="{color}" stroke-width="2"/>')
    return f'<circle {cls} cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="{color}" stroke-width="2"/>'


def line_plot(series: list[Series], *, title: str, xlabel: str = "slice", ylabel: str = "",
              hlines: list[tuple[float, str, str]] | None = None, width: int = 640, height: int = 240,
              integer_x: bool = True) -> str:
    """An SVG line plot.

    Parameters
    ----------
    series : list of Series
    title, xlabel, ylabel : str
    hlines : list of (value, label, color), optional
        Horizontal reference lines (thresholds).
    width, height : int
        Size in pixels.
    integer_x : bool
        Ticks on whole numbers only (slice ids).

    Returns
    -------
    str
        ``<svg ...>...</svg>`` (inline in HTML, no external reference).
    """
    hlines = hlines or []
    xs = [x for s in series for x, y in zip(s.x, s.y) if _finite(x) and _finite(y)]
    ys = [y for s in series for x, y in zip(s.x, s.y) if _finite(x) and _finite(y)]
    ys += [v for v, _, _ in hlines if _finite(v)]
    if not xs:
        return ""
    left, right, top = 64, 16, 28
    legend_rows = math.ceil(len(series) / 3)
    bottom = 40 + 16 * legend_rows
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or (abs(y0) * 0.1 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * ph

    parts = [f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>',
             f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
             f'{escape(title)}</text>']
    for t in nice_ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                         f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="10">{_label(t)}'
                         f'</text>')
    xticks = nice_ticks(x0, x1, min(10, max(2, int(x1 - x0)) if integer_x else 6))
    if integer_x:
        xticks = sorted({round(t) for t in xticks if abs(t - round(t)) < 1e-9})
    for t in xticks:
        if x0 <= t <= x1:
            parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" '
                         f'stroke="#666"/><text x="{sx(t):.1f}" y="{top + ph + 15}" text-anchor="middle" '
                         f'font-size="10">{_label(t)}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{top + ph + 30}" text-anchor="middle" font-size="11">'
                 f'{escape(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text transform="translate(14,{top + ph / 2:.0f}) rotate(-90)" text-anchor="middle" '
                     f'font-size="11">{escape(ylabel)}</text>')
    for value, label, color in hlines:
        if _finite(value):
            parts.append(f'<line class="threshold" x1="{left}" x2="{left + pw}" y1="{sy(value):.1f}" '
                         f'y2="{sy(value):.1f}" stroke="{color}" stroke-dasharray="6,3"/>'
                         f'<text x="{left + pw - 2}" y="{sy(value) - 3:.1f}" text-anchor="end" font-size="10" '
                         f'fill="{color}">{escape(label)}</text>')
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="5,4"' if s.dashed else ""
        runs, current = [], []
        for x, y in zip(s.x, s.y):
            if _finite(x) and _finite(y):
                current.append(f"{sx(x):.1f},{sy(y):.1f}")
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        for run in runs:
            if len(run) > 1:
                parts.append(f'<polyline class="series" points="{" ".join(run)}" fill="none" stroke="{color}" '
                             f'stroke-width="1.8"{dash}/>')
        for x, y in zip(s.x, s.y):
            if _finite(x) and _finite(y):
                parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>')
        for index, kind in sorted(s.marks.items()):
            if 0 <= index < len(s.x) and _finite(s.x[index]) and _finite(s.y[index]):
                parts.append(_marker(kind, sx(s.x[index]), sy(s.y[index])))
        lx = left + (i % 3) * (pw / 3)
        ly = height - 16 * legend_rows + 16 * (i // 3) + 8
        parts.append(f'<line x1="{lx:.0f}" x2="{lx + 18:.0f}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
                     f'stroke-width="2"{dash}/><text x="{lx + 22:.0f}" y="{ly}" font-size="11">{escape(s.name)}'
                     f'</text>')
    parts.append("</svg>")
    return "".join(parts)
