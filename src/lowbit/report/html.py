"""Render :class:`ReportData` as one self-contained HTML page (inline CSS and SVG, nothing fetched)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

from lowbit.errors import OutputExistsError
from lowbit.report import svg
from lowbit.report.data import ReportData
from lowbit.report.svg import GREY, PALETTE, Series

_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")
UNIFORM_COLORS = ("#5B6770", "#8E6C8A", "#6A8D73", "#A0765B", "#4F6D8F", "#7A7A52")


def format_colors(data: ReportData) -> dict[str, str]:
    """A colour per format label, by decreasing stored bits (float: grey); stable within a page."""
    bits: dict[str, float] = {}
    for r in data.layers:
        bits[r.label] = max(bits.get(r.label, 0.0), r.bits_per_weight)
    colors: dict[str, str] = {}
    i = 0
    for label in sorted(bits, key=lambda k: (-bits[k], k)):
        if label == "float":
            colors[label] = GREY
        else:
            colors[label] = PALETTE[i % len(PALETTE)]
            i += 1
    return colors


def _short_layer(name: str) -> tuple[str, int | None]:
    """("q_proj", 3) for ``model.layers.3.self_attn.q_proj``; (name, None) outside the blocks."""
    m = _BLOCK.match(name)
    if m is None:
        return name.rsplit(".", 1)[-1] if "." in name else name, None
    return m.group("rest").rsplit(".", 1)[-1], int(m.group("index"))


def _block_groups(names: Sequence[str]) -> list[tuple[int, int, str]]:
    groups: list[tuple[int, int, str]] = []
    for i, name in enumerate(names):
        _, block = _short_layer(name)
        text = f"block {block}" if block is not None else ""
        if groups and groups[-1][2] == text and text:
            groups[-1] = (groups[-1][0], i, text)
        elif text:
            groups.append((i, i, text))
    return groups


# ---- formatting ----------------------------------------------------------------------------------
def _mb(nbytes: float | None) -> str:
    if nbytes is None:
        return "–"
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:,.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


# ---- plots ---------------------------------------------------------------------------------------
def layer_error_plot(data: ReportData, colors: dict[str, str]) -> str:
    rows = data.layers
    names = [r.name for r in rows]
    cats = [_short_layer(n)[0] for n in names]
    overlays = []
    same = data.subject.split(" ")[0] if not data.quantized else None  # the what-if's own format: the bars
    uniform_labels = sorted({k for r in rows for k in r.uniform_errors if k != same},
                            key=lambda k: -max((r.uniform_errors.get(k, 0.0) for r in rows), default=0.0))
    for j, label in enumerate(uniform_labels):
        overlays.append(Series(f"uniform {label}", list(range(len(rows))),
                               [r.uniform_errors.get(label, math.nan) for r in rows], kind="line", dashed=True,
                               width=1.4, color=UNIFORM_COLORS[j % len(UNIFORM_COLORS)]))
    present = [label for label in colors if any(r.label == label for r in rows)]
    legend_items = [(label, colors[label], "box") for label in present]
    legend_items += [(s.label, s.color or GREY, "dash") for s in overlays]
    tips = [f"{r.name}\n{r.spec or 'float'} · {r.bits_per_weight:.2f} bits/weight\nrelative error "
            f"{_num(r.rel_error, 5)}" + (f"\npredicted (plan) {_num(r.predicted_error, 5)}"
                                         if r.predicted_error is not None else "") for r in rows]
    return svg.bar_chart(cats, [r.rel_error for r in rows], plot_id="layer-error",
                         title="Relative weight error per layer  ‖W − Ŵ‖ / ‖W‖",
                         ylabel="relative error", colors=[colors.get(r.label, GREY) for r in rows],
                         legend_items=legend_items, overlays=overlays, tooltips=tips,
                         group_labels=_block_groups(names), height=380)


def predicted_error_plot(data: ReportData, colors: dict[str, str]) -> str | None:
    rows = data.layers
    if not any(r.predicted_error is not None for r in rows):
        return None
    names = [r.name for r in rows]
    return svg.bar_chart([_short_layer(n)[0] for n in names], [r.predicted_error for r in rows],
                         plot_id="layer-predicted", title=f"Planner's measurement per layer: {data.predicted_kind}",
                         ylabel="predicted error", colors=[colors.get(r.label, GREY) for r in rows],
                         legend_items=[(k, v, "box") for k, v in colors.items() if any(r.label == k for r in rows)],
                         group_labels=_block_groups(names), height=320)


def histogram_plots(data: ReportData) -> list[str]:
    plots = []
    for i, h in enumerate(data.histograms):
        label = h.spec.split("-")[0]
        cols = f"cols {h.columns[0]}–{h.columns[1] - 1}"
        where = f"row {h.row}, {cols}" if not h.spec.endswith("-t") else "whole tensor (sample)"
        plots.append(svg.histogram(
            h.values, plot_id=f"hist-{i}", title=f"{h.role}: {h.layer}",
            subtitle=f"{h.spec} · {where} · error {svg.format_number(h.group_error)}",
            xlabel="weight value", vlines=h.grid,
            vline_label=f"{label} grid ({len(h.grid)} values)" if h.grid else None, width=340, height=260))
    return plots


def size_quality_plot(data: ReportData) -> str:
    """Size (bits/weight) against perplexity — or against mean weight error without a perplexity text."""
    use_ppl = data.ppl is not None or any(p.ppl is not None for p in data.points)
    series: list[Series] = []
    hlines = []
    ref = next((p for p in data.points if p.kind == "reference"), None)

    def quality(label: str, ppl: float | None) -> float | None:
        if use_ppl:
            return ppl
        if label == "__subject__":
            return data.mean_rel_error
        errs = [(r.uniform_errors.get(label), r.params) for r in data.layers if label in r.uniform_errors]
        w = sum(p for _, p in errs)
        return sum(e * p for e, p in errs if e is not None) / w if w else None

    uniform = [p for p in data.points if p.kind == "uniform"]
    subject = [p for p in data.points if p.kind not in ("uniform", "reference")]
    measured = [(p.bits_per_weight, quality(p.label, p.ppl)) for p in uniform]
    measured += [(p.bits_per_weight, quality("__subject__", p.ppl)) for p in subject]
    front = _frontier([(x, y) for x, y in measured if y is not None and math.isfinite(y)])
    if len(front) >= 2:
        series.append(Series("measured frontier", [x for x, _ in front], [y for _, y in front], kind="line",
                             dashed=True, color="#B0B7BF", width=1.4))
    if uniform:
        series.append(Series("uniform formats (RTN)", [p.bits_per_weight for p in uniform],
                             [quality(p.label, p.ppl) for p in uniform], kind="scatter", color=UNIFORM_COLORS[0],
                             marker="circle", marker_size=5, point_labels=[p.label for p in uniform],
                             tooltips=[f"{p.label}: {p.bits_per_weight:.3f} bits/weight, {_mb(p.size_bytes)}, "
                                       f"{'ppl ' + _num(p.ppl) if use_ppl else 'mean error'}"
                                       f"{' (cached)' if p.cached else ''}" for p in uniform]))
    plan_pts = [p for p in data.plan_front if p.bits_per_weight is not None and p.ppl is not None]
    if use_ppl and plan_pts:
        plan_pts.sort(key=lambda p: p.bits_per_weight or 0.0)
        series.append(Series("plan front (predicted)", [p.bits_per_weight for p in plan_pts],
                             [p.ppl for p in plan_pts], kind="line", marker="diamond", color=PALETTE[2], width=1.6,
                             tooltips=[f"{p.label or 'plan'}: {p.bits_per_weight:.3f} bits/weight, ppl {_num(p.ppl)}"
                                       for p in plan_pts]))
        chosen = [p for p in plan_pts if p.chosen]
        if chosen:
            series.append(Series("chosen plan (predicted)", [p.bits_per_weight for p in chosen],
                                 [p.ppl for p in chosen], kind="scatter", marker="diamond", color=PALETTE[4],
                                 marker_size=6.5))
    for p in subject:
        series.append(Series(f"this model ({p.label})" if data.quantized else p.label, [p.bits_per_weight],
                             [quality("__subject__", p.ppl)], kind="scatter",
                             marker="star", marker_size=6.5, color=PALETTE[3], highlight=True,
                             point_labels=["this model" if data.quantized else p.label],
                             tooltips=[f"{p.label}: {p.bits_per_weight:.3f} bits/weight, {_mb(p.size_bytes)}"]))
    if ref is not None and use_ppl and ref.ppl is not None:
        hlines.append((ref.ppl, f"float reference ({ref.bits_per_weight:g} bits/weight)", "#57606A"))
    ylabel = "perplexity (lower is better)" if use_ppl else "mean relative weight error"
    return svg.xy_chart(series, plot_id="size-quality", title=f"Size vs {'perplexity' if use_ppl else 'weight error'}",
                        xlabel="bits per weight (linear layers, scales included)", ylabel=ylabel, hlines=hlines,
                        height=400)


def plan_front_error_plot(data: ReportData) -> str | None:
    pts = [p for p in data.plan_front if p.bits_per_weight is not None and p.error is not None and p.ppl is None]
    if not pts:
        return None
    pts.sort(key=lambda p: p.bits_per_weight or 0.0)
    series = [Series("plan front", [p.bits_per_weight for p in pts], [p.error for p in pts], kind="line",
                     marker="diamond", color=PALETTE[2],
                     tooltips=[f"{p.label or 'plan'}: {p.bits_per_weight:.3f} bits/weight, error {_num(p.error, 5)}"
                               for p in pts])]
    uniform = [p for p in data.plan_uniform if p.bits_per_weight is not None and p.error is not None]
    if uniform:
        series.append(Series("uniform candidates (predicted)", [p.bits_per_weight for p in uniform],
                             [p.error for p in uniform], kind="scatter", color=UNIFORM_COLORS[0],
                             point_labels=[_spec_label(p.label) for p in uniform],
                             tooltips=[f"{p.label}: {p.bits_per_weight:.3f} bits/weight, error {_num(p.error, 5)}"
                                       for p in uniform]))
    chosen = [p for p in pts if p.chosen]
    if chosen:
        series.append(Series("chosen plan", [p.bits_per_weight for p in chosen], [p.error for p in chosen],
                             kind="scatter", marker="star", color=PALETTE[3], marker_size=6.5, highlight=True))
    return svg.xy_chart(series, plot_id="plan-front", title="Planner's Pareto front (predicted error)",
                        xlabel="bits per weight (planned layers)", ylabel=data.plan_error_unit or "predicted error",
                        height=340)


def speed_plots(data: ReportData) -> list[str]:
    if not data.speed:
        return []
    labels = [s.label for s in data.speed]
    colors = [PALETTE[0] if i == 0 else GREY for i in range(len(labels))]
    out = []
    for key, title, unit in (("prefill_tokens_per_s", "Prefill", "tokens / s"),
                             ("decode_tokens_per_s", "Decode", "tokens / s")):
        out.append(svg.bar_chart(labels, [getattr(s, key) for s in data.speed], plot_id=f"speed-{key[:6]}",
                                 title=f"{title} speed", ylabel=unit, colors=colors, width=320, height=250,
                                 value_labels=True, rotate_labels=False))
    mem_labels, mem_vals, mem_colors = [], [], []
    for i, s in enumerate(data.speed):
        mem_labels.append(s.label)
        mem_vals.append(s.weight_bytes / 1e6)
        mem_colors.append(PALETTE[0] if i == 0 else GREY)
        if s.peak_memory_bytes:
            mem_labels.append("peak")
            mem_vals.append(s.peak_memory_bytes / 1e6)
            mem_colors.append(PALETTE[5])
    legend = [("stored weights", PALETTE[0], "box")]
    if any(s.peak_memory_bytes for s in data.speed):
        legend.append(("peak while generating", PALETTE[5], "box"))
    out.append(svg.bar_chart(mem_labels, mem_vals, plot_id="memory", title="Memory", ylabel="MB", colors=mem_colors,
                             width=320, height=250, value_labels=True, rotate_labels=False, legend_items=legend))
    return out


def _spec_label(name: str) -> str:
    """The short plot label of a spec name (``int4-g128`` for ``int4-g128-asym``); unknown names unchanged."""
    from lowbit.errors import InvalidSpecError
    from lowbit.report.specs import parse_spec_name, short_name

    try:
        return short_name(parse_spec_name(name))
    except InvalidSpecError:
        return name


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both size and quality (lower is better for both), by size."""
    best: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not best or y < best[-1][1]:
            best.append((x, y))
    return best


# ---- page ----------------------------------------------------------------------------------------
CSS = """
:root{--ink:#1F2328;--muted:#57606A;--line:#E6E8EB;--bg:#F4F6F8;--card:#FFFFFF;--accent:#0072B2}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--ink);
 font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans","Liberation Sans",sans-serif}
main{max-width:1060px;margin:0 auto;padding:28px 22px 56px}
.hero{background:linear-gradient(135deg,#0B1F33 0%,#133D63 100%);color:#FFF;border-radius:18px;padding:26px 30px 24px;
 box-shadow:0 6px 24px rgba(11,31,51,.18)}
.hero .eyebrow{font-size:12px;letter-spacing:.12em;text-transform:uppercase;color:#8FB3D6;font-weight:600}
.hero h1{margin:4px 0 2px;font-size:28px;line-height:1.2;font-weight:700;letter-spacing:-.01em;word-break:break-all}
.hero .sub{color:#B9CADB;font-size:13px}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:12px;margin-top:20px}
.kpi{background:rgba(255,255,255,.08);border:1px solid rgba(255,255,255,.10);border-radius:12px;padding:12px 14px}
.kpi.wide{grid-column:span 2}
.kpi .label{font-size:11.5px;text-transform:uppercase;letter-spacing:.07em;color:#9FB6CC;font-weight:600}
.kpi .value{font-size:25px;font-weight:650;font-variant-numeric:tabular-nums;line-height:1.25;margin-top:2px}
.kpi .detail{font-size:12.5px;color:#C7D5E3}
.kpi .bad{color:#FFB8A8}.kpi .good{color:#9FE6C8}
.mix{display:flex;height:10px;border-radius:5px;overflow:hidden;margin:9px 0 8px;background:rgba(255,255,255,.12)}
.mix span{display:block;height:100%}
.chips{display:flex;flex-wrap:wrap;gap:4px 12px;font-size:12.5px;color:#DCE6F0}
.chip{display:inline-flex;align-items:center;gap:6px;white-space:nowrap}
.dot{display:inline-block;width:10px;height:10px;border-radius:3px;flex:none}
.card{background:var(--card);border-radius:14px;padding:20px 22px 18px;margin-top:18px;
 box-shadow:0 1px 2px rgba(0,0,0,.04),0 0 0 1px var(--line)}
.card h2{font-size:18px;margin:0 0 3px;letter-spacing:-.005em}
.card .caption{color:var(--muted);margin:0 0 12px;font-size:13.5px;max-width:78ch}
.grid3{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:10px}
svg.plot{width:100%;height:auto;display:block;border-radius:8px}
.notes{background:#FFF8E6;border:1px solid #F2DDA4;border-radius:12px;padding:10px 16px;margin-top:18px;
 font-size:13.5px}
.notes ul{margin:4px 0;padding-left:18px}
table{border-collapse:collapse;width:100%;font-size:13px;font-variant-numeric:tabular-nums}
th{text-align:left;color:var(--muted);font-weight:600;border-bottom:1px solid var(--line);padding:7px 8px;
 position:sticky;top:0;background:#FFF}
td{border-bottom:1px solid #F0F2F4;padding:5px 8px;vertical-align:middle}
td.num,th.num{text-align:right}
tr:hover td{background:#F8FAFC}
.tablewrap{max-height:560px;overflow:auto;border:1px solid var(--line);border-radius:10px}
details summary{cursor:pointer;color:var(--accent);font-weight:600;margin:4px 0 8px}
code,.mono{font-family:ui-monospace,"SFMono-Regular","DejaVu Sans Mono",Menlo,monospace;font-size:12.5px}
footer{color:var(--muted);font-size:12px;margin-top:22px;text-align:center}
@media print{body{background:#FFF}.card,.hero{box-shadow:none}}
"""


def render_html(data: ReportData) -> str:
    """The whole page as one string."""
    colors = format_colors(data)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             f"<title>lowbit report — {escape(_model_title(data))}</title>",
             f"<style>{CSS}</style></head><body><main>"]
    parts.append(_hero(data, colors))
    if data.notes:
        parts.append('<div class="notes"><strong>Notes</strong><ul>'
                     + "".join(f"<li>{escape(n)}</li>" for n in data.notes) + "</ul></div>")
    parts.append(_card("Per-layer error", "How far each layer's dequantized weight Ŵ is from the float weight W, "
                       "coloured by the format it is stored in. Dashed lines: the same layer under each uniform "
                       "format (round-to-nearest) for comparison. Hover a bar for its numbers.",
                       [layer_error_plot(data, colors)]))
    predicted = predicted_error_plot(data, colors)
    if predicted:
        parts.append(_card("Planner's prediction", "What the planner measured for each layer at the format the "
                           "layer is stored in (from its measurement JSON): compare its shape with the weight error "
                           "above.", [predicted]))
    if data.histograms:
        parts.append(_card("Weights and the quantization grid",
                           "Float weights of one scale group (the group with the median error) in the worst, median "
                           "and best layer, with vertical lines at the values that group's codes decode to: "
                           "scale·(q − z) for integers, codebook·absmax for nf4/fp4. Weights between lines are "
                           "rounded to the nearest one.", histogram_plots(data), grid=True))
    parts.append(_card("Size vs quality", _size_caption(data), [size_quality_plot(data)]))
    front = plan_front_error_plot(data)
    if front:
        parts.append(_card("Planner's front", "The allocations on the planner's Pareto front and the uniform "
                           "candidates, by the error it predicts (its own units: "
                           f"{data.plan_error_unit or 'predicted error'}).", [front]))
    speed = speed_plots(data)
    if speed:
        parts.append(_card("Speed and memory", _speed_caption(data), speed, grid=True))
    parts.append(_methods_card(data, colors))
    parts.append(f'<footer>Generated by lowbit {escape(data.lowbit_version)} on {escape(data.created)} in '
                 f'{data.seconds:.1f} s · self-contained page: no scripts, fonts or images are fetched.</footer>')
    # machine-readable copy of the numbers; "<" escaped so no text in it can close the script element
    payload = json.dumps(data.to_dict(), separators=(",", ":")).replace("<", "\\u003c")
    parts.append(f'<script type="application/json" id="lowbit-report-data">{payload}</script>')
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _model_title(data: ReportData) -> str:
    if data.model.startswith("builtin:"):
        return data.model
    return Path(data.model).name or data.model


def _hero(data: ReportData, colors: dict[str, str]) -> str:
    sub = [f"<span class='mono'>{escape(data.model_dir)}</span>"]
    if data.reference and data.quantized:
        sub.append(f"reference <span class='mono'>{escape(data.reference)}</span>")
    sub.append(f"method {escape(data.method)}")
    if data.plan:
        sub.append(f"plan <span class='mono'>{escape(Path(data.plan).name)}</span>")
    mix = data.format_mix
    bar = "".join(f'<span style="width:{100 * share:.2f}%;background:{colors.get(label, GREY)}" '
                  f'title="{escape(label)}: {n} layers, {100 * share:.1f} % of weights"></span>'
                  for label, n, share in mix)
    chips = "".join(f'<span class="chip"><span class="dot" style="background:{colors.get(label, GREY)}"></span>'
                    f'{escape(label)} · {n} layer{"s" if n != 1 else ""} · {100 * share:.0f} %</span>'
                    for label, n, share in mix)
    ratio = (data.reference_size_bytes / data.size_bytes) if data.reference_size_bytes and data.size_bytes else None
    kpis = [_kpi("Format mix", f'<div class="mix">{bar}</div><div class="chips">{chips}</div>', raw=True, wide=True),
            _kpi("Size", _mb(data.size_bytes),
                 f"{ratio:.2f}× smaller than float ({_mb(data.reference_size_bytes)})" if ratio else "")]
    kpis.append(_kpi("Bits / weight", f"{data.bits_per_weight:.3f}",
                     f"float: {data.reference_bits_per_weight:g}" if data.reference_bits_per_weight else ""))
    if data.ppl is not None:
        detail = ""
        if data.ppl_reference:
            change = data.ppl / data.ppl_reference - 1
            cls = "bad" if change > 0.01 else "good"
            detail = f'float {_num(data.ppl_reference)} · <span class="{cls}">{100 * change:+.2f} %</span>'
        kpis.append(_kpi("Perplexity", _num(data.ppl), detail, raw_detail=True))
    err = data.mean_rel_error
    if err is not None:
        worst = max((r for r in data.layers if r.rel_error is not None and r.spec), key=lambda r: r.rel_error or 0.0,
                    default=None)
        kpis.append(_kpi("Mean weight error", _num(err, 4),
                         f"worst {_short_layer(worst.name)[0]} (block {_short_layer(worst.name)[1]}) "
                         f"{_num(worst.rel_error, 4)}" if worst and _short_layer(worst.name)[1] is not None
                         else (f"worst {worst.name} {_num(worst.rel_error, 4)}" if worst else "")))
    eyebrow = "lowbit quantization report" + ("" if data.quantized else f" · what-if: {data.subject}")
    return (f'<header class="hero"><div class="eyebrow">{escape(eyebrow)}</div>'
            f"<h1>{escape(_model_title(data))}</h1><div class='sub'>{' · '.join(sub)}</div>"
            f'<div class="kpis">{"".join(kpis)}</div></header>')


def _kpi(label: str, value: str, detail: str = "", *, raw: bool = False, raw_detail: bool = False,
         wide: bool = False) -> str:
    body = value if raw else f'<div class="value">{escape(value)}</div>'
    det = f'<div class="detail">{detail if raw_detail else escape(detail)}</div>' if detail else ""
    return f'<div class="kpi{" wide" if wide else ""}"><div class="label">{escape(label)}</div>{body}{det}</div>'


def _card(title: str, caption: str, plots: Sequence[str], grid: bool = False) -> str:
    inner = "".join(plots)
    if grid:
        inner = f'<div class="grid3">{inner}</div>'
    return f'<section class="card"><h2>{escape(title)}</h2><p class="caption">{escape(caption)}</p>{inner}</section>'


def _size_caption(data: ReportData) -> str:
    if data.ppl is None and not any(p.ppl is not None for p in data.points):
        return ("Bits per weight against the parameter-weighted mean relative weight error (no perplexity text was "
                "scored). Lower-left is better.")
    where = f"{data.ppl_tokens} tokens of the {data.ppl_text}" if data.ppl_tokens else "the held-out text"
    return (f"Perplexity on {where} ({data.seq_len}-token windows) against bits per weight. Circles: the float "
            "reference quantized uniformly by round-to-nearest; star: this model; dashed line: the float model. "
            "Lower-left is better.")


def _speed_caption(data: ReportData) -> str:
    s = data.speed[0]
    return (f"Greedy generation on {s.device or 'cpu'} ({'compiled' if s.compiled else 'eager'} decode loop), "
            "median of 3 runs. Weights: bytes stored; peak: the process's peak memory while the first model "
            "generated (measured before anything else was loaded).")


def _methods_card(data: ReportData, colors: dict[str, str]) -> str:
    has_pred = any(r.predicted_error is not None for r in data.layers)
    uniform = sorted({k for r in data.layers for k in r.uniform_errors})
    head = ("<tr><th>layer</th><th>format</th><th>method</th><th class='num'>bits/weight</th>"
            "<th class='num'>weights</th><th class='num'>rel. error</th>"
            + ("<th class='num'>predicted</th>" if has_pred else "")
            + "".join(f"<th class='num'>{escape(u)}</th>" for u in uniform) + "</tr>")
    body = []
    for r in data.layers:
        cells = [f"<td class='mono'>{escape(r.name)}</td>",
                 f"<td><span class='chip'><span class='dot' style='background:{colors.get(r.label, GREY)}'></span>"
                 f"{escape(r.spec or 'float')}</span></td>",
                 f"<td>{escape(r.method)}</td>", f"<td class='num'>{r.bits_per_weight:.3f}</td>",
                 f"<td class='num'>{r.params:,}</td>", f"<td class='num'>{_num(r.rel_error, 5)}</td>"]
        if has_pred:
            cells.append(f"<td class='num'>{_num(r.predicted_error, 5)}</td>")
        cells += [f"<td class='num'>{_num(r.uniform_errors.get(u), 5)}</td>" for u in uniform]
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = f"<div class='tablewrap'><table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table></div>"
    if len(data.layers) > 40:
        table = f"<details><summary>Show all {len(data.layers)} layers</summary>{table}</details>"
    compare = " (and the uniform formats’ error for comparison)" if uniform else ""
    return (f'<section class="card"><h2>Methods</h2><p class="caption">Every linear layer: its stored format, the '
            f"method that chose its values, stored bits per weight (scales and zero-points included) and relative "
            f"weight error{compare}.</p>{table}</section>")


def write_html(data: ReportData, out: str | Path, *, overwrite: bool = False) -> Path:
    """Render and write atomically: a temporary sibling file, fsynced, then renamed over ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; choose another output path or pass --overwrite")
    if out.exists() and out.is_dir():
        raise OutputExistsError(f"{out}: is a directory; give a file name such as report.html")
    from lowbit.plan.measure import write_text_atomic

    write_text_atomic(out, render_html(data))  # temp sibling, fsync, 0666 less umask, rename
    return out
