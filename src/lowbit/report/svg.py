"""A small inline-SVG plotting kit: axes with nice ticks, bars, lines, scatter, histograms, legends.

Every chart is one ``<svg class="plot" data-plot="ID">`` string, standalone and well-formed XML,
that references nothing outside itself (no fonts, images or scripts), so an HTML page embedding it
is self-contained. Non-finite values (NaN, ±Inf) are dropped; a chart with no finite data draws its
frame and says "no data".

    bar_chart(["a", "b"], [1.0, 2.5], plot_id="demo", title="…", ylabel="error")
    xy_chart([Series("ppl", xs, ys, kind="line")], plot_id="pareto", xlabel="bits / weight")
    histogram(values, vlines=grid, plot_id="hist-0")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence
from xml.sax.saxutils import escape, quoteattr

# Okabe–Ito colour-blind safe palette, then a few extra hues.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#7F3C8D", "#11A579", "#3969AC", "#F2B701")
GREY = "#9AA0A6"
INK = "#1F2328"
MUTED = "#57606A"
GRID = "#E6E8EB"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', 'Liberation Sans', sans-serif"
MARKERS = ("circle", "square", "diamond", "triangle", "star")
RUG_THRESHOLD = 48  # histogram grids with more lines than this are drawn as short ticks
MAX_LINE_MARKERS = 40  # a line series with more points is drawn without its markers


@dataclass
class Series:
    """One line / scatter series of an :func:`xy_chart` (or an overlay of a :func:`bar_chart`).

    ``kind``: ``line`` (joined points, markers too when ``marker`` is set), ``scatter`` (markers
    only). ``tooltips`` are per-point hover texts (SVG ``<title>``); ``point_labels`` are drawn
    beside the points.
    """

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    kind: str = "line"
    color: str | None = None
    dashed: bool = False
    marker: str | None = None
    marker_size: float = 4.5
    width: float = 2.0
    tooltips: Sequence[str] | None = None
    point_labels: Sequence[str] | None = None
    highlight: bool = False  # drawn last, with a halo


@dataclass
class Margins:
    left: float = 64
    right: float = 16
    top: float = 40
    bottom: float = 48


@dataclass
class _Frame:
    """Maps data coordinates to pixels inside the plotting area."""

    width: float
    height: float
    margins: Margins
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    log_x: bool = False
    log_y: bool = False
    parts: list[str] = field(default_factory=list)
    placed: list[tuple[float, float, float, float]] = field(default_factory=list)  # label boxes drawn so far

    def free_spot(self, x: float, y: float, width: float, anchor: str, height: float = 12.0) -> float:
        """A y near ``y`` where a label of ``width`` px does not overlap one already placed (then reserves it)."""
        left = x - width if anchor == "end" else x
        for dy in (0, 12, -12, 24, -24, 36, -36):
            top = y + dy - height + 2
            if top < self.y1 or top + height > self.y0:
                continue  # keep labels inside the plotting area
            box = (left, top, left + width, top + height)
            if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in self.placed):
                self.placed.append(box)
                return y + dy
        return y

    @property
    def x0(self) -> float:
        return self.margins.left

    @property
    def x1(self) -> float:
        return self.width - self.margins.right

    @property
    def y0(self) -> float:  # bottom of the plotting area (pixel y grows downwards)
        return self.height - self.margins.bottom

    @property
    def y1(self) -> float:
        return self.margins.top

    def x(self, value: float) -> float:
        return _map(value, self.xlim, (self.x0, self.x1), self.log_x)

    def y(self, value: float) -> float:
        return _map(value, self.ylim, (self.y0, self.y1), self.log_y)


def _map(value: float, lim: tuple[float, float], px: tuple[float, float], log: bool) -> float:
    lo, hi = lim
    if log:
        value, lo, hi = math.log10(max(value, 1e-300)), math.log10(lo), math.log10(hi)
    t = 0.5 if hi == lo else (value - lo) / (hi - lo)
    return px[0] + t * (px[1] - px[0])


# ---- numbers -------------------------------------------------------------------------------
def finite(values: Sequence[float | None]) -> list[float]:
    """The finite numbers of ``values`` (None, NaN and ±Inf dropped)."""
    out = []
    for v in values:
        if v is None:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def _is_finite(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def nice_step(span: float, target: int = 5) -> float:
    """A 1/2/2.5/5 × 10^k step giving about ``target`` intervals over ``span`` (> 0)."""
    if not span > 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw * 0.999:
            return m * mag
    return 10 * mag


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Ticks at multiples of a nice step covering [lo, hi] (the first ≤ lo, the last ≥ hi)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target)
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9 or len(ticks) < 2:
        ticks.append(0.0 if abs(v) < step * 1e-9 else round(v, 12))
        v = start + len(ticks) * step
    if ticks[-1] < hi - step * 1e-9:
        ticks.append(round(start + len(ticks) * step, 12))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis over [lo, hi] (> 0): 1-2-5 per decade, or decades only when wide."""
    lo, hi = max(lo, 1e-300), max(hi, lo * 1.0001)
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1, 2, 5) if math.log10(hi / lo) <= 2.5 else (1,)
    ticks = [m * 10.0 ** k for k in range(k0, k1 + 1) for m in mults]
    inside = [t for t in ticks if lo * 0.999 <= t <= hi * 1.001]
    if len(inside) >= 2:
        return inside
    return [10.0 ** k0, 10.0 ** k1]


def format_number(value: float, step: float | None = None) -> str:
    """A short label for ``value``; ``step`` (the tick spacing) decides the decimals."""
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    ref = abs(step) if step else abs(value)
    a = abs(value)
    if a >= 1e6 and ref >= 1e5:
        return _trim(f"{value / 1e6:.{_decimals(ref / 1e6)}f}") + "M"
    if a >= 1e4 and ref >= 1e3:
        return _trim(f"{value / 1e3:.{_decimals(ref / 1e3)}f}") + "k"
    if ref < 1e-3 or a < 1e-4:
        return f"{value:.{1 if step is None else 0}e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.{_decimals(ref)}f}" if step else _trim(f"{value:.{max(0, 3 - int(math.floor(math.log10(a))))}f}")


def _decimals(step: float) -> int:
    if step <= 0:
        return 0
    d = max(0, -int(math.floor(math.log10(step) + 1e-9)))
    if abs(round(step * 10 ** d) - step * 10 ** d) > 1e-6:
        d += 1  # 2.5 → one more decimal
    return min(d, 8)


def _trim(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


def _limits(values: list[float], *, include_zero: bool = False, pad: float = 0.05,
            log: bool = False) -> tuple[float, float]:
    if log:
        values = [v for v in values if v > 0]
    if not values:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = min(values), max(values)
    if include_zero and not log:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if log:
        return lo / (1 + pad * 4), hi * (1 + pad * 4)
    if hi == lo:
        d = abs(hi) * 0.1 or 1.0
        return lo - d, hi + d
    span = hi - lo
    lo2 = lo if (include_zero and lo == 0) else lo - pad * span
    hi2 = hi if (include_zero and hi == 0) else hi + pad * span
    return lo2, hi2


# ---- drawing primitives ---------------------------------------------------------------------
def _attrs(**kw: object) -> str:
    parts = []
    for key, value in kw.items():
        if value is None:
            continue
        name = key.rstrip("_").replace("_", "-")
        if isinstance(value, float):
            value = f"{value:.2f}".rstrip("0").rstrip(".")
        parts.append(f"{name}={quoteattr(str(value))}")
    return " ".join(parts)


def _text(x: float, y: float, text: str, *, size: float = 11, anchor: str = "middle", color: str = MUTED,
          weight: str | None = None, rotate: float | None = None, baseline: str | None = None) -> str:
    transform = f"rotate({rotate:.1f} {x:.1f} {y:.1f})" if rotate else None
    attrs = _attrs(x=x, y=y, font_size=size, text_anchor=anchor, fill=color, font_weight=weight, transform=transform,
                   dominant_baseline=baseline)
    return f"<text {attrs}>{escape(text)}</text>"


def _el(tag: str, tooltip: str | None = None, **attrs: object) -> str:
    """``<tag …/>``, or ``<tag …><title>tooltip</title></tag>`` (a hover text) when ``tooltip`` is given."""
    if tooltip:
        return f"<{tag} {_attrs(**attrs)}>{_title(tooltip)}</{tag}>"
    return f"<{tag} {_attrs(**attrs)}/>"


def _title(text: str | None) -> str:
    return f"<title>{escape(text)}</title>" if text else ""


def _marker(shape: str, x: float, y: float, r: float, color: str, tooltip: str | None = None,
            halo: bool = False) -> str:
    stroke = "#FFFFFF"
    sw = 2.0 if halo else 1.0
    if shape == "square":
        el = f"<rect {_attrs(x=x - r, y=y - r, width=2 * r, height=2 * r, fill=color, stroke=stroke, stroke_width=sw)}"
    elif shape == "diamond":
        pts = f"{x:.1f},{y - r * 1.3:.1f} {x + r * 1.3:.1f},{y:.1f} {x:.1f},{y + r * 1.3:.1f} {x - r * 1.3:.1f},{y:.1f}"
        el = f"<polygon {_attrs(points=pts, fill=color, stroke=stroke, stroke_width=sw)}"
    elif shape == "triangle":
        pts = f"{x:.1f},{y - r * 1.3:.1f} {x + r * 1.2:.1f},{y + r:.1f} {x - r * 1.2:.1f},{y + r:.1f}"
        el = f"<polygon {_attrs(points=pts, fill=color, stroke=stroke, stroke_width=sw)}"
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r * (1.7 if i % 2 == 0 else 0.75)
            ang = -math.pi / 2 + i * math.pi / 5
            pts.append(f"{x + rad * math.cos(ang):.1f},{y + rad * math.sin(ang):.1f}")
        el = f"<polygon {_attrs(points=' '.join(pts), fill=color, stroke=stroke, stroke_width=sw)}"
    else:
        el = f"<circle {_attrs(cx=x, cy=y, r=r, fill=color, stroke=stroke, stroke_width=sw)}"
    return f"{el}>{_title(tooltip)}</{el[1:el.index(' ')]}>"


def _open(plot_id: str, width: float, height: float, title: str | None, label: str | None = None) -> list[str]:
    aria = label or title or plot_id
    attrs = _attrs(class_="plot", data_plot=plot_id, viewBox=f"0 0 {width:g} {height:g}", width=width, height=height,
                   role="img", aria_label=aria, font_family=FONT)
    return [f"<svg {attrs}>",
            f"<rect {_attrs(x=0, y=0, width=width, height=height, fill='#FFFFFF')}/>",
            _text(12, 22, title, size=13.5, anchor="start", color=INK, weight="600") if title else ""]


def _y_axis(f: _Frame, ylabel: str | None, ticks: list[float], log: bool) -> None:
    step = None if log or len(ticks) < 2 else ticks[1] - ticks[0]
    for t in ticks:
        py = f.y(t)
        f.parts.append(f"<line {_attrs(x1=f.x0, x2=f.x1, y1=py, y2=py, stroke=GRID, stroke_width=1)}/>")
        f.parts.append(_text(f.x0 - 6, py + 3.5, format_number(t, step), size=10.5, anchor="end"))
    if ylabel:
        cy = (f.y0 + f.y1) / 2
        f.parts.append(_text(14, cy, ylabel, size=11, rotate=-90, color=MUTED))


def _x_axis_numeric(f: _Frame, xlabel: str | None, ticks: list[float], log: bool, label_dy: float = 15) -> None:
    step = None if log or len(ticks) < 2 else ticks[1] - ticks[0]
    for t in ticks:
        px = f.x(t)
        f.parts.append(f"<line {_attrs(x1=px, x2=px, y1=f.y0, y2=f.y1, stroke=GRID, stroke_width=1)}/>")
        f.parts.append(_text(px, f.y0 + label_dy, format_number(t, step), size=10.5))
    _x_label(f, xlabel)


def _x_label(f: _Frame, xlabel: str | None) -> None:
    if xlabel:
        f.parts.append(_text((f.x0 + f.x1) / 2, f.height - 8, xlabel, size=11))


def _frame_box(f: _Frame) -> None:
    f.parts.append(f"<line {_attrs(x1=f.x0, x2=f.x1, y1=f.y0, y2=f.y0, stroke='#8C959F', stroke_width=1)}/>")
    f.parts.append(f"<line {_attrs(x1=f.x0, x2=f.x0, y1=f.y0, y2=f.y1, stroke='#8C959F', stroke_width=1)}/>")


def _no_data(f: _Frame, message: str = "no data") -> None:
    f.parts.append(_text((f.x0 + f.x1) / 2, (f.y0 + f.y1) / 2, message, size=13, color=GREY))


def legend(items: Sequence[tuple[str, str, str]], x: float, y: float, max_width: float) -> tuple[str, float]:
    """Legend entries (label, color, kind: ``box`` | ``line`` | ``dash`` | a marker shape) in rows
    starting at (x, y), wrapping at ``max_width``. Returns (svg, height used)."""
    parts: list[str] = []
    cx, cy = x, y
    row_h = 16
    for label, color, kind in items:
        w = 22 + 6.2 * len(label) + 14
        if cx > x and cx + w > x + max_width:
            cx, cy = x, cy + row_h
        if kind == "box":
            parts.append(f"<rect {_attrs(x=cx, y=cy - 8, width=11, height=11, rx=2, fill=color)}/>")
        elif kind in ("line", "dash"):
            parts.append(_el("line", x1=cx, x2=cx + 16, y1=cy - 2.5, y2=cy - 2.5, stroke=color, stroke_width=2.2,
                             stroke_dasharray="4 3" if kind == "dash" else None))
        else:
            parts.append(_marker(kind, cx + 6, cy - 2.5, 4.2, color))
        parts.append(_text(cx + 20, cy + 1.5, label, size=11, anchor="start", color=INK))
        cx += w
    return "".join(parts), (cy - y) + row_h if items else 0.0


def _legend_rows(items: Sequence[tuple[str, str, str]], max_width: float) -> int:
    rows, cx = 1, 0.0
    for label, _, _ in items:
        w = 22 + 6.2 * len(label) + 14
        if cx > 0 and cx + w > max_width:
            rows, cx = rows + 1, 0.0
        cx += w
    return rows if items else 0


# ---- charts ---------------------------------------------------------------------------------
def bar_chart(categories: Sequence[str], values: Sequence[float | None], *, plot_id: str, title: str | None = None,
              xlabel: str | None = None, ylabel: str | None = None, colors: Sequence[str] | None = None,
              legend_items: Sequence[tuple[str, str, str]] = (), overlays: Sequence[Series] = (),
              tooltips: Sequence[str] | None = None, width: float = 960, height: float = 340,
              max_labels: int = 48, rotate_labels: bool = True, value_labels: bool = False,
              group_labels: Sequence[tuple[int, int, str]] = ()) -> str:
    """Vertical bars, one per category, with a y axis from 0 (or below, for negative values).

    ``overlays`` are :class:`Series` whose ``xs`` are category indexes (0-based), drawn over the bars
    (e.g. a reference line per layer). With more than ``max_labels`` categories only every k-th
    label is written. ``group_labels`` (first index, last index, text) draw brackets under the labels
    (e.g. transformer blocks), and replace them when there are more than ``max_labels`` categories.
    Missing / non-finite values leave a gap.
    """
    n = len(categories)
    vals = [float(v) if _is_finite(v) else math.nan for v in values] + [math.nan] * max(0, n - len(values))
    all_y = finite(vals) + [y for s in overlays for y in finite(s.ys)]
    every = max(1, math.ceil(n / max_labels))
    show_labels = n > 0 and not (group_labels and n > max_labels)
    rotated = rotate_labels and n > 8
    longest = max((len(c) for i, c in enumerate(categories) if i % every == 0), default=0)
    label_room = (min(120.0, 5.0 * longest + 8) if rotated else 18.0) if show_labels else 0.0
    bracket_room = 26.0 if group_labels else 0.0
    n_leg = _legend_rows(legend_items, width - 80)
    margins = Margins(left=64, right=16, top=40 + 16 * n_leg, bottom=10 + label_room + bracket_room
                      + (18 if xlabel else 0))
    lim = _limits(all_y, include_zero=True, pad=0.06)
    yt = nice_ticks(*lim)
    f = _Frame(width, height, margins, (-0.5, max(n, 1) - 0.5), (min(yt[0], lim[0]), max(yt[-1], lim[1])))
    f.parts += _open(plot_id, width, height, title)
    if legend_items:
        svg, _ = legend(legend_items, 16, 40, width - 80)
        f.parts.append(svg)
    _y_axis(f, ylabel, yt, False)
    if not all_y:
        _no_data(f)
    slot = (f.x1 - f.x0) / max(n, 1)
    bw = max(1.0, slot * (0.78 if n < 60 else 0.9))
    zero = f.y(0.0)
    for i, v in enumerate(vals):
        if not math.isfinite(v):
            continue
        cx = f.x(i)
        top, bottom = (f.y(v), zero) if v >= 0 else (zero, f.y(v))
        color = (colors[i] if colors and i < len(colors) else None) or PALETTE[0]
        tip = tooltips[i] if tooltips and i < len(tooltips) else f"{categories[i]}: {format_number(v)}"
        f.parts.append(_el("rect", tip, x=cx - bw / 2, y=top, width=bw, height=max(0.5, bottom - top), fill=color,
                           rx=min(2.0, bw / 4)))
        if value_labels:
            f.parts.append(_text(cx, top - 4, format_number(v), size=10.5, color=INK))
    for s in overlays:
        _draw_series(f, s, PALETTE[1])
    _frame_box(f)
    for i, name in enumerate(categories):
        if i % every or not show_labels:
            continue
        px = f.x(i)
        if rotated:
            f.parts.append(_text(px + 3, f.y0 + 10, name, size=10, anchor="end", rotate=-45))
        else:
            f.parts.append(_text(px, f.y0 + 15, name, size=10.5))
    yb = f.y0 + label_room + 4
    for first, last, text in group_labels:
        xa, xb = f.x(first) - slot * 0.42, f.x(last) + slot * 0.42
        f.parts.append(_el("path", d=f"M{xa:.1f},{yb:.1f} v4 H{xb:.1f} v-4", fill="none", stroke="#B0B7BF",
                           stroke_width=1))
        short = text.split()[-1] if text.split() else text  # "block 12" → "12" when the bracket is narrow
        for candidate in (text, short):
            if xb - xa > 6.2 * len(candidate):
                f.parts.append(_text((xa + xb) / 2, yb + 17, candidate, size=10.5))
                break
    _x_label(f, xlabel)
    f.parts.append("</svg>")
    return "".join(f.parts)


def xy_chart(series: Sequence[Series], *, plot_id: str, title: str | None = None, xlabel: str | None = None,
             ylabel: str | None = None, width: float = 960, height: float = 380, log_x: bool = False,
             log_y: bool | None = None, hlines: Sequence[tuple[float, str, str]] = (),
             xlim: tuple[float, float] | None = None, ylim: tuple[float, float] | None = None,
             include_zero_y: bool = False) -> str:
    """Lines and scatter markers on numeric axes, with a legend of the labelled series.

    ``hlines``: horizontal reference lines (y, label, color), e.g. the float model's perplexity.
    ``log_y=None`` picks a log y axis when the data spans more than 30× (and is positive).
    """
    xs_all = [x for s in series for x, y in zip(s.xs, s.ys) if _is_finite(x) and _is_finite(y)]
    ys_all = [y for s in series for x, y in zip(s.xs, s.ys) if _is_finite(x) and _is_finite(y)]
    ys_all += [h[0] for h in hlines if _is_finite(h[0])]
    if log_y is None:
        pos = [y for y in ys_all if y > 0]
        log_y = bool(pos) and len(pos) == len(ys_all) and max(pos) / min(pos) > 30
    if log_x and any(x <= 0 for x in xs_all):
        log_x = False
    items = [(s.label, s.color or PALETTE[i % len(PALETTE)],
              (s.marker or "circle") if s.kind == "scatter" else ("dash" if s.dashed else "line"))
             for i, s in enumerate(series) if s.label]
    items += [(label, color, "dash") for _, label, color in hlines if label]
    n_leg = _legend_rows(items, width - 80)
    margins = Margins(left=64, right=24, top=40 + 16 * n_leg, bottom=48 if xlabel else 32)
    xl = xlim or _limits(xs_all, pad=0.06, log=log_x)
    yl = ylim or _limits(ys_all, pad=0.08, log=log_y, include_zero=include_zero_y)
    xt = log_ticks(*xl) if log_x else nice_ticks(*xl)
    yt = log_ticks(*yl) if log_y else nice_ticks(*yl)
    if not log_x and xlim is None:
        xl = (min(xt[0], xl[0]), max(xt[-1], xl[1]))
    if not log_y and ylim is None:
        yl = (min(yt[0], yl[0]), max(yt[-1], yl[1]))
    xt = [t for t in xt if xl[0] - 1e-12 <= t <= xl[1] + 1e-12]
    yt = [t for t in yt if yl[0] - 1e-12 <= t <= yl[1] + 1e-12]
    f = _Frame(width, height, margins, xl, yl, log_x, log_y)
    f.parts += _open(plot_id, width, height, title)
    if items:
        svg, _ = legend(items, 16, 40, width - 80)
        f.parts.append(svg)
    _y_axis(f, ylabel, yt, log_y)
    _x_axis_numeric(f, xlabel, xt, log_x)
    if not xs_all:
        _no_data(f)
    for y, label, color in hlines:
        if _is_finite(y):
            py = f.y(y)
            f.parts.append(_el("line", f"{label}: {format_number(y)}", x1=f.x0, x2=f.x1, y1=py, y2=py, stroke=color,
                               stroke_width=1.6, stroke_dasharray="6 4"))
    ordered = sorted(enumerate(series), key=lambda item: item[1].highlight)
    for i, s in ordered:
        _draw_series(f, s, PALETTE[i % len(PALETTE)])
    _frame_box(f)
    f.parts.append("</svg>")
    return "".join(f.parts)


def _draw_series(f: _Frame, s: Series, default_color: str) -> None:
    color = s.color or default_color
    pts = [(i, f.x(x), f.y(y)) for i, (x, y) in enumerate(zip(s.xs, s.ys)) if _is_finite(x) and _is_finite(y)
           and (not f.log_x or x > 0) and (not f.log_y or y > 0)]
    if s.kind == "line" and len(pts) >= 2:
        # a gap (non-finite value) breaks the line
        runs: list[list[tuple[float, float]]] = [[]]
        prev = None
        for i, px, py in pts:
            if prev is not None and i != prev + 1:
                runs.append([])
            runs[-1].append((px, py))
            prev = i
        for run in runs:
            if len(run) >= 2:
                d = "M" + " L".join(f"{px:.1f},{py:.1f}" for px, py in run)
                f.parts.append(_el("path", d=d, fill="none", stroke=color, stroke_width=s.width,
                                   stroke_linejoin="round", stroke_dasharray="5 4" if s.dashed else None))
    if s.kind == "scatter" or (s.marker and len(pts) <= MAX_LINE_MARKERS):
        for i, px, py in pts:
            tip = s.tooltips[i] if s.tooltips and i < len(s.tooltips) else None
            f.parts.append(_marker(s.marker or "circle", px, py, s.marker_size, color, tip, halo=s.highlight))
    if s.point_labels:
        for i, px, py in pts:
            if i < len(s.point_labels) and s.point_labels[i]:
                anchor = "end" if px > f.x1 - 90 else "start"
                dx = -8 if anchor == "end" else 8
                dy = 17 if s.highlight else -7  # highlighted points label below, the others above
                text = s.point_labels[i]
                ty = f.free_spot(px + dx, py + dy, 6.3 * len(text), anchor)
                f.parts.append(_text(px + dx, ty, text, size=10.5, anchor=anchor, color=INK,
                                     weight="600" if s.highlight else None))


def histogram_counts(values: Sequence[float], bins: int, lo: float, hi: float) -> list[int]:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi] (values outside are dropped; hi included)."""
    counts = [0] * max(1, bins)
    if not hi > lo:
        counts[0] = len([v for v in values if v == lo])
        return counts
    width = (hi - lo) / len(counts)
    for v in values:
        if lo <= v <= hi:
            counts[min(len(counts) - 1, int((v - lo) / width))] += 1
    return counts


def histogram(values: Sequence[float], *, plot_id: str, title: str | None = None, xlabel: str | None = None,
              ylabel: str | None = "count", bins: int | None = None, vlines: Sequence[float] = (),
              vline_label: str | None = None, color: str = PALETTE[0], vline_color: str = PALETTE[3],
              width: float = 420, height: float = 260, subtitle: str | None = None) -> str:
    """Histogram of ``values`` with vertical lines at ``vlines`` (e.g. the quantization grid).

    The x range covers the data (and the lines within 5 % of it); lines far outside are not drawn.
    More than ``RUG_THRESHOLD`` lines in range are drawn as short ticks along the x axis.
    """
    vals = finite(values)
    n_bins = bins or max(8, min(60, int(2 * math.sqrt(max(1, len(vals))))))
    grid = sorted(finite(vlines))
    if vals:
        lo, hi = min(vals), max(vals)
        if hi == lo:
            lo, hi = lo - (abs(lo) * 0.1 or 1.0), hi + (abs(hi) * 0.1 or 1.0)
        span = hi - lo
        near = [g for g in grid if lo - 0.05 * span <= g <= hi + 0.05 * span]
        lo, hi = min([lo, *near]), max([hi, *near])
        span = hi - lo
        xl = (lo - 0.03 * span, hi + 0.03 * span)
    else:
        near = []
        xl = _limits(grid, pad=0.05) if grid else (0.0, 1.0)
    counts = histogram_counts(vals, n_bins, min(vals) if vals else 0.0, max(vals) if vals else 1.0)
    items = [(vline_label, vline_color, "line")] if vline_label and near else []
    top = 40 + (16 if subtitle else 0) + 16 * _legend_rows(items, width - 40)
    margins = Margins(left=52, right=14, top=top, bottom=46 if xlabel else 30)
    yt = nice_ticks(0, max(counts) if vals else 1, 4)
    f = _Frame(width, height, margins, xl, (0.0, yt[-1]))
    f.parts += _open(plot_id, width, height, title)
    dense = len(near) > RUG_THRESHOLD
    if subtitle:
        f.parts.append(_text(12, 40, subtitle, size=10.5, anchor="start"))
    if items:
        svg, _ = legend(items, 14, 40 + (16 if subtitle else 0), width - 40)
        f.parts.append(svg)
    _y_axis(f, ylabel, yt, False)
    _x_axis_numeric(f, xlabel, [t for t in nice_ticks(*xl, 4) if xl[0] <= t <= xl[1]], False, 21 if dense else 15)
    if not vals:
        _no_data(f)
    else:
        b_lo, b_hi = min(vals), max(vals)
        bw = (b_hi - b_lo) / len(counts) if b_hi > b_lo else (xl[1] - xl[0]) / 20
        for i, c in enumerate(counts):
            if not c:
                continue
            xa = f.x(b_lo + i * bw) if b_hi > b_lo else f.x(b_lo) - 3
            xb = f.x(b_lo + (i + 1) * bw) if b_hi > b_lo else f.x(b_lo) + 3
            tip = f"{format_number(b_lo + i * bw)} … {format_number(b_lo + (i + 1) * bw)}: {c}"
            f.parts.append(_el("rect", tip, x=xa + 0.5, y=f.y(c), width=max(0.8, xb - xa - 1), height=f.y0 - f.y(c),
                               fill=color, fill_opacity=0.78))
    # a fine grid (int8, fp8) is drawn as a rug of ticks below the axis, not a wall of lines
    opacity = 0.9 if len(near) <= 20 else 0.6
    for g in near:
        px = f.x(g)
        y_a, y_b = (f.y0 + 1, f.y0 + 7) if dense else (f.y0, f.y1)  # a rug sits just below the axis
        f.parts.append(_el("line", f"grid value {format_number(g)}", x1=px, x2=px, y1=y_a, y2=y_b, stroke=vline_color,
                           stroke_width=1 if dense else 1.2, stroke_opacity=opacity))
    _frame_box(f)
    f.parts.append("</svg>")
    return "".join(f.parts)
