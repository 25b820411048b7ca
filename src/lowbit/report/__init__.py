"""``lowbit report``: one self-contained HTML page showing what quantization did to a model.

    from lowbit.report import ReportOptions, build_report, write_html

    data = build_report("out/int4", ReportOptions(reference="builtin:tiny-lm", speed=False))
    write_html(data, "report.html")

The page's plots are inline SVG drawn by :mod:`lowbit.report.svg` (no matplotlib, nothing fetched):
per-layer weight error, weight histograms with the quantization grid, size vs perplexity against
uniform formats (and the planner's front), the methods table, speed and memory.
"""

from __future__ import annotations

from lowbit.report.build import ReportOptions, build_report
from lowbit.report.data import HistogramPanel, LayerRow, ReportData, SizePoint, SpeedRow
from lowbit.report.html import render_html, write_html

__all__ = ["HistogramPanel", "LayerRow", "ReportData", "ReportOptions", "SizePoint", "SpeedRow", "build_report",
           "render_html", "write_html"]
