"""``lowbit report``: the SVG plotting kit, the measurements, and the page rendered in headless Chromium."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
import torch

from lowbit.errors import CorruptFileError, InvalidSpecError, LowbitError, ModelNotFoundError, OutputExistsError
from lowbit.formats.spec import QuantSpec
from lowbit.report import svg
from lowbit.report.measure import grid_values, group_columns, median_group, relative_error, representative_layers
from lowbit.report.plan_files import read_front, read_measurement, read_plan
from lowbit.report.specs import parse_spec_list, parse_spec_name, short_name
from lowbit.tensor import quantize_tensor

CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars")


# ---- helpers -------------------------------------------------------------------------------
def parse_svg(text: str) -> ET.Element:
    root = ET.fromstring(text)  # raises on malformed XML
    assert root.tag == "svg" and root.get("class") == "plot"
    return root


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter("text")]


def require_chromium() -> str:
    """Debian's chromium. Skipped locally when absent; CI (CI set) must have it (`make test-report-deps`)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; CI installs it (apt-get install -y chromium, see the Makefile)")
    pytest.skip("chromium not installed (apt-get install -y chromium)")


def png_pixels(path: Path) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(width, height, a sample of RGB pixels) of a PNG: PIL when installed, else a small zlib decoder
    (8-bit RGB/RGBA, non-interlaced: what Chromium writes)."""
    try:
        from PIL import Image
    except ImportError:
        return _decode_png(path.read_bytes())
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        w, h = rgb.size
        small = rgb.resize((max(1, w // 4), max(1, h // 4)))
        return w, h, list(small.getdata())


def _decode_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, "unsupported PNG layout"
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    pixels = []
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        if y % 4 == 0:
            pixels += [tuple(line[x * bpp:x * bpp + 3]) for x in range(0, width, 4)]
        prev = line
    return width, height, pixels  # type: ignore[return-value]


def report_parser() -> argparse.ArgumentParser:
    from lowbit.cli import _common
    from lowbit.cli import report

    parser = argparse.ArgumentParser(prog="lowbit")
    sub = parser.add_subparsers(dest="command", required=True)
    report.add_parser(sub, _common)
    return parser


def run_report(*argv: str) -> dict:
    from lowbit.cli.report import cmd_report

    args = report_parser().parse_args(["report", *argv])
    return cmd_report(args)


# ---- svg: numbers --------------------------------------------------------------------------
@pytest.mark.parametrize("lo,hi", [(0, 1), (0.013, 0.217), (-3.2, 7.9), (29.36, 32.47), (1e-5, 3e-4), (5, 5),
                                   (0, 0), (-1e6, 2e6)])
def test_nice_ticks_cover_the_range_with_even_steps(lo, hi):
    ticks = svg.nice_ticks(lo, hi)
    assert ticks[0] <= lo + 1e-12 and ticks[-1] >= hi - 1e-12
    assert 2 <= len(ticks) <= 12
    steps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert all(math.isclose(s, steps[0], rel_tol=1e-6) for s in steps)
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5, 10))


def test_nice_ticks_and_labels_survive_non_finite_input():
    assert svg.nice_ticks(float("nan"), 1.0) == [0.0, 1.0]
    assert svg.format_number(float("nan")) == "–"
    assert svg.finite([1.0, None, float("nan"), float("inf"), "x", 2]) == [1.0, 2.0]  # type: ignore[list-item]
    assert svg.format_number(0.25, 0.05) == "0.25" and svg.format_number(2_500_000, 500_000) == "2.5M"
    assert svg.format_number(0.00012, 0.00005) == "1e-4"
    assert svg.log_ticks(0.9, 120) == [1, 2, 5, 10, 20, 50, 100]
    assert svg.log_ticks(0.9, 12000) == [1, 10, 100, 1000, 10000]


# ---- svg: charts ---------------------------------------------------------------------------
def _bars(root: ET.Element) -> list[ET.Element]:
    return [r for r in root.iter("rect") if r.find("title") is not None]


def test_bar_chart_is_valid_xml_with_one_bar_per_finite_value():
    values = [0.1, float("nan"), 0.3, None, -0.05, float("inf")]
    out = svg.bar_chart(["a", "b<", "c&", "d", "e", "f"], values, plot_id="bars", title="x <&> y", ylabel="err",
                        legend_items=[("int4 <g128>", "#123456", "box")])
    root = parse_svg(out)
    assert root.get("data-plot") == "bars"
    assert len(_bars(root)) == 3  # NaN, None and inf leave gaps
    labels = texts(root)
    assert "x <&> y" in labels and "int4 <g128>" in labels and "b<" in labels
    tick_values = [float(t) for t in labels if re.fullmatch(r"-?[0-9.]+", t)]
    assert min(tick_values) <= -0.05 and max(tick_values) >= 0.3  # the y axis spans the data, zero included


def test_bar_chart_without_data_says_so():
    for cats, vals in (([], []), (["a", "b"], [float("nan"), None])):
        root = parse_svg(svg.bar_chart(cats, vals, plot_id="empty"))
        assert "no data" in texts(root)
        assert not _bars(root)


def test_bar_chart_many_categories_uses_group_brackets():
    names = [f"l{i}" for i in range(200)]
    groups = [(i, i + 9, f"block {i // 10}") for i in range(0, 200, 10)]
    root = parse_svg(svg.bar_chart(names, [float(i) for i in range(200)], plot_id="many", group_labels=groups))
    labels = texts(root)
    assert "l5" not in labels and "0" in labels and "19" in labels  # per-bar labels give way to block numbers
    assert len(_bars(root)) == 200  # a value of 0 is finite: drawn as a hairline


def test_xy_chart_axis_ranges_log_scale_and_nan_points():
    s1 = svg.Series("uniform", [3.2, 4.2, float("nan"), 8.0], [32.5, 30.1, 29.0, 29.36], kind="scatter",
                    point_labels=["int3", "int4", "x", "int8"])
    s2 = svg.Series("front", [3.0, 5.0, 7.0], [33.0, 29.9, 29.4], kind="line", marker="diamond")
    root = parse_svg(svg.xy_chart([s1, s2], plot_id="xy", xlabel="bits", ylabel="ppl",
                                  hlines=[(29.3, "float", "#555555")]))
    labels = texts(root)
    xs = [float(t) for t in labels if re.fullmatch(r"[0-9.]+", t)]
    assert min(xs) <= 3.0 and max(xs) >= 8.0
    assert "x" not in labels  # the NaN point is not drawn (nor its label)
    assert len(list(root.iter("path"))) >= 1 and len(list(root.iter("polygon"))) == 3
    wide = svg.Series("ppl", [2, 3, 4, 8], [3000.0, 60.0, 31.0, 29.0])
    log_root = parse_svg(svg.xy_chart([wide], plot_id="log"))
    assert {"10", "100", "1000"} <= set(texts(log_root))  # > 30× spread: log y axis with decade ticks


def test_xy_chart_empty_and_degenerate():
    assert "no data" in texts(parse_svg(svg.xy_chart([], plot_id="e")))
    assert "no data" in texts(parse_svg(svg.xy_chart([svg.Series("s", [float("nan")], [1.0])], plot_id="e2")))
    root = parse_svg(svg.xy_chart([svg.Series("one", [4.0], [30.0], kind="scatter")], plot_id="one"))
    assert len(list(root.iter("circle"))) == 2  # the point and its legend marker


def test_histogram_counts_and_grid_lines():
    values = [i / 100 for i in range(-50, 51)]
    assert sum(svg.histogram_counts(values, 10, -0.5, 0.5)) == len(values)
    grid = [-0.5, -0.25, 0.0, 0.25, 0.5, 5.0]  # 5.0 is far outside the data: not drawn
    root = parse_svg(svg.histogram(values, plot_id="h", vlines=grid, vline_label="grid", bins=10))
    lines = [ln for ln in root.iter("line") if ln.find("title") is not None]
    assert len(lines) == 5
    bars = _bars(root)
    assert len(bars) == 10
    dense = parse_svg(svg.histogram(values, plot_id="d", vlines=[i / 200 for i in range(-100, 101)]))
    ticks = [ln for ln in dense.iter("line") if ln.find("title") is not None]
    assert ticks and all(abs(float(t.get("y1")) - float(t.get("y2"))) < 12 for t in ticks)  # a rug, not walls


def test_histogram_empty_constant_and_nan():
    assert "no data" in texts(parse_svg(svg.histogram([], plot_id="e", vlines=[0.0, 1.0])))
    parse_svg(svg.histogram([0.5] * 10, plot_id="c"))
    root = parse_svg(svg.histogram([float("nan"), 1.0, 2.0, float("inf")], plot_id="n"))
    assert sum(int(b.find("title").text.rsplit(": ", 1)[1]) for b in _bars(root)) == 2


# ---- specs, grids, plan files --------------------------------------------------------------
def test_spec_names():
    assert parse_spec_name("int8") == QuantSpec.int_(8, None, symmetric=True)
    assert parse_spec_name("int4-g128") == QuantSpec.int_(4, 128, symmetric=False)
    assert parse_spec_name("INT3-g64-sym") == QuantSpec.int_(3, 64, symmetric=True)
    assert parse_spec_name("nf4") == QuantSpec.nf4(64) and parse_spec_name("nf4-b32-dq") == QuantSpec.nf4(32, True)
    assert parse_spec_name("fp8").format == "fp8_e4m3"
    for spec in (QuantSpec.int_(4, 128, symmetric=False), QuantSpec.nf4(64), QuantSpec.int_(8, None)):
        assert parse_spec_name(spec.describe()) == spec and parse_spec_name(short_name(spec)) == spec
    assert len(parse_spec_list("int8, int4-g128,int8")) == 2
    for bad in ("int7", "q4_0", "nf4-x", ""):
        with pytest.raises(InvalidSpecError):
            parse_spec_list(bad) if bad == "" else parse_spec_name(bad)


@pytest.mark.parametrize("spec", [QuantSpec.int_(4, 32, symmetric=False), QuantSpec.int_(3, 32, symmetric=True),
                                  QuantSpec.int_(8, None), QuantSpec.nf4(32), QuantSpec.fp4(32),
                                  QuantSpec.fp8("e4m3"), QuantSpec.int_(4, -1)])
def test_grid_holds_every_dequantized_value_of_the_group(spec):
    torch.manual_seed(0)
    w = torch.randn(8, 64) * 0.02
    qw = quantize_tensor(w, spec)
    w_hat = qw.dequantize()
    row, group, err = median_group(w, w_hat, spec)
    assert 0 <= err < 1
    grid = torch.tensor(grid_values(qw, row, group), dtype=torch.float64)
    start, end = group_columns(spec, qw.shape, group)
    got = w_hat[row, start:end].double()
    nearest = (got[:, None] - grid[None, :]).abs().min(dim=1).values
    assert float(nearest.max()) <= 1e-6 * float(grid.abs().max())
    if spec.format == "int":
        assert len(grid) == 2 ** spec.bits


def test_relative_error_and_representative_layers():
    w = torch.ones(4, 4)
    assert relative_error(w, w) == 0.0 and math.isclose(relative_error(w, w * 0.9), 0.1, rel_tol=1e-5)
    assert relative_error(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0
    picks = representative_layers({"a": 0.1, "b": 0.3, "c": 0.2, "d": float("nan")})
    assert picks == [("b", "worst"), ("c", "median"), ("a", "best")]
    assert representative_layers({"only": 0.2}) == [("only", "worst")]
    assert representative_layers({}) == []


def test_plan_files_tolerate_several_shapes(tmp_path):
    front = tmp_path / "f.json"
    front.write_text(json.dumps({"front": [{"bpw": 3.5, "ppl": 31}, {"bits_per_weight": 5, "predicted_error": 0.1}],
                                 "chosen": 1}))
    pts = read_front(front)
    assert [p.bits_per_weight for p in pts] == [3.5, 5.0] and pts[1].chosen and pts[0].ppl == 31
    front.write_text(json.dumps([{"ppl": 3}]))
    with pytest.raises(CorruptFileError, match="no size"):
        read_front(front)
    front.write_text("{not json")
    with pytest.raises(CorruptFileError):
        read_front(front)
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"layers": {"l0": {"int4-g128-asym": 0.1, "int8-ch-sym": {"error": 0.01}, "chosen": "x"}}}))
    table, _ = read_measurement(m)
    assert table == {"l0": {"int4-g128-asym": 0.1, "int8-ch-sym": 0.01}}
    m.write_text(json.dumps([{"layer": "l1", "spec": "nf4-b64", "output_error": 0.2, "chosen": True}]))
    table, chosen = read_measurement(m)
    assert table == {"l1": {"nf4-b64": 0.2}} and chosen == {"l1": "nf4-b64"}
    # what lowbit plan writes
    m.write_text(json.dumps({"format": "lowbit-plan-measure", "candidates": [{"name": "int4-g128-asym"}, {"name": "x"}],
                             "layers": [{"name": "l3", "rel_error": [0.05, None]}]}))
    assert read_measurement(m)[0] == {"l3": {"int4-g128-asym": 0.05}}
    m.write_text(json.dumps({"format": "lowbit-plan-measure", "candidates": [], "layers": [{"name": "l"}]}))
    with pytest.raises(CorruptFileError, match="rel_error"):
        read_measurement(m)
    front.write_text(json.dumps({"format": "lowbit-plan-pareto", "predicted_error_unit": "KL",
                                 "front": [{"bits_per_weight": 3.0, "size_bytes": 9, "predicted_error": 0.3},
                                           {"bits_per_weight": 4.0, "size_bytes": 10, "predicted_error": 0.1}],
                                 "plan": {"bits_per_weight": 4.0, "predicted_error": 0.1, "choices": []},
                                 "uniform": [{"candidate": "int4-g128-asym", "bits_per_weight": 4.25,
                                              "predicted_error": 0.2}]}))
    pts = read_front(front)
    assert [p.chosen for p in pts] == [False, True] and pts[1].error == 0.1 and pts[0].size_bytes == 9
    recipe = tmp_path / "RECIPE.yaml"
    recipe.write_text("default: {format: nf4, group_size: 64}\n")
    (tmp_path / "RECIPE.pareto.json").write_text(json.dumps([{"bits": 4.1, "ppl": 30}]))
    (tmp_path / "RECIPE.measure.json").write_text(json.dumps({"l2": {"nf4-b64": 0.3}}))
    files = read_plan(recipe)
    assert files.recipe is not None and files.recipe.default.format == "nf4"
    assert len(files.front) == 1 and files.predicted_error("l2", ("nf4-b64",)) == 0.3
    with pytest.raises(ModelNotFoundError):
        read_plan(tmp_path / "missing.yaml")


# ---- end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory) -> Path:
    """tiny-lm quantized int4-g128 with int8 down_proj and int3 block 3 (the config records its source)."""
    import lowbit
    from lowbit.recipe import LayerOverride, QuantRecipe

    out = tmp_path_factory.mktemp("report") / "mixed"
    recipe = QuantRecipe(QuantSpec.int_(4, 128, symmetric=False), overrides=(
        LayerOverride("down_proj", QuantSpec.int_(8, None)),
        LayerOverride(r"model\.layers\.3\..*", QuantSpec.int_(3, 128, symmetric=False))))
    lowbit.quantize_pretrained("builtin:tiny-lm", recipe, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory) -> Path:
    """Planner outputs in the shapes ``lowbit plan`` writes (lowbit-plan-pareto / lowbit-plan-measure)."""
    d = tmp_path_factory.mktemp("plan")
    (d / "RECIPE.yaml").write_text("method: rtn\ndefault: {format: int, bits: 4, symmetric: false, group_size: 128}\n")
    front = [{"bits_per_weight": b, "size_bytes": int(b * 1e5), "predicted_error": e}
             for b, e in ((3.3, 0.9), (4.3, 0.3), (5.0, 0.1), (8.0, 0.01))]
    (d / "RECIPE.pareto.json").write_text(json.dumps({
        "format": "lowbit-plan-pareto", "version": 1, "predicted_error_unit": "sum of relative layer output errors",
        "front": front, "plan": dict(front[2], choices=[]),
        "uniform": [{"candidate": "int4-g128-asym", "bits_per_weight": 4.25, "predicted_error": 0.35}]}))
    names = ("int8-ch-sym", "int4-g128-asym", "int3-g128-asym")
    layers = [{"name": f"model.layers.{b}.{n}", "rel_error": [0.0001, 0.01 * (b + 1), 0.03 * (b + 1)]}
              for b in range(4) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    (d / "RECIPE.measure.json").write_text(json.dumps({"format": "lowbit-plan-measure", "version": 1,
                                                       "candidates": [{"name": n} for n in names], "layers": layers}))
    return d


def assert_self_contained(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I)
    assert not re.search(r"<link\b[^>]*\bhref\s*=", html, re.I)
    assert not re.search(r"\b(?:src|href)\s*=\s*[\"']?(?!#|data:)[a-z]+:", html, re.I)
    assert not re.search(r"url\(\s*[\"']?(?!#|data:)", html, re.I)
    assert not re.search(r"@import|<iframe|<img\b", html, re.I)


def screenshot(chromium: str, page: Path, png: Path, profile: Path) -> None:
    cmd = [chromium, *CHROMIUM_ARGS, f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1280,4000",
           page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert png.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"


def test_report_of_a_quantized_model_renders_in_chromium(mixed_model, plan_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "report.html"
    summary = run_report(str(mixed_model), "-o", str(out), "--plan", str(plan_dir / "RECIPE.yaml"),
                         "--uniform", "int8,int4-g128", "--ppl-tokens", "768", "--speed-tokens", "4", "--no-compile",
                         "--json", "--quiet")
    assert summary["reference"] == "builtin:tiny-lm" and summary["quantized"] is True
    assert summary["layers"] == 28 and summary["plots"] >= 6
    mix = {m["format"]: m["layers"] for m in summary["format_mix"]}
    assert mix == {"int4-g128": 18, "int8": 4, "int3-g128": 6}
    assert summary["ppl"] > summary["ppl_reference"] > 1 and summary["ppl_tokens"] == 768
    assert 4 < summary["bits_per_weight"] < 6 and summary["size_bytes"] < summary["reference_size_bytes"]
    assert {u["label"] for u in summary["uniform"]} == {"int8", "int4-g128"}
    assert summary["worst_layer"]["name"].startswith("model.layers.3.")  # the int3 block
    assert summary["speed"] and summary["speed"][0]["decode_tokens_per_s"] > 0
    json.dumps(summary)  # JSON-safe

    html = out.read_text(encoding="utf-8")
    assert_self_contained(html)
    plots = re.findall(r'<svg class="plot" data-plot="([^"]+)"', html)
    assert len(plots) >= 4
    for required in ("layer-error", "layer-predicted", "hist-0", "size-quality", "plan-front", "memory"):
        assert required in plots
    for match in re.finditer(r"<svg .*?</svg>", html, re.S):
        parse_svg(match.group(0))
    data = json.loads(re.search(r'<script type="application/json" id="lowbit-report-data">(.*?)</script>',
                                html, re.S).group(1))
    assert len(data["layers"]) == 28 and data["plan_front"][2]["chosen"] and len(data["plan_uniform"]) == 1
    predicted = {r["name"]: r["predicted_error"] for r in data["layers"]}
    assert predicted["model.layers.0.mlp.down_proj"] == 0.0001 and predicted["model.layers.3.self_attn.q_proj"] == 0.12

    chromium = require_chromium()
    png = tmp_path / "report.png"
    screenshot(chromium, out, png, tmp_path / "chromium-profile")
    width, height, pixels = png_pixels(png)
    assert (width, height) == (1280, 4000)
    non_white = sum(1 for p in pixels if min(p) < 235) / len(pixels)
    mean = sum(sum(p) / 3 for p in pixels) / len(pixels)
    variance = sum((sum(p) / 3 - mean) ** 2 for p in pixels) / len(pixels)
    assert non_white > 0.08 and variance > 200, (non_white, variance)
    colors = {p for p in pixels if max(p) - min(p) > 60}  # saturated pixels: the plots' colours were painted
    assert len(colors) > 20


def test_report_of_a_float_model_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    args = ("builtin:tiny-lm", "--uniform", "int4-g128,nf4", "--ppl-tokens", "512", "--no-speed", "--json", "--quiet")
    first = run_report(*args, "-o", str(tmp_path / "a.html"))
    assert first["quantized"] is False and first["subject"].startswith("int4-g128")
    assert first["plots"] >= 4 and first["notes"]
    assert not any(u["cached"] for u in first["uniform"])
    second = run_report(*args, "-o", str(tmp_path / "b.html"))
    assert all(u["cached"] for u in second["uniform"])
    assert second["ppl"] == first["ppl"] and second["uniform"] == [dict(u, cached=True) for u in first["uniform"]]
    assert_self_contained((tmp_path / "b.html").read_text(encoding="utf-8"))
    with pytest.raises(OutputExistsError):
        run_report(*args, "-o", str(tmp_path / "b.html"))
    no_ppl = run_report("builtin:tiny-lm", "--no-ppl", "--no-uniform", "--no-speed", "--quiet", "--json",
                        "-o", str(tmp_path / "c.html"))
    assert no_ppl["ppl"] is None and no_ppl["plots"] >= 3
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_report_errors_are_clear(mixed_model, tmp_path):
    with pytest.raises(ModelNotFoundError):
        run_report(str(tmp_path / "nope"), "-o", str(tmp_path / "r.html"), "--quiet")
    orphan = tmp_path / "orphan"
    shutil.copytree(mixed_model, orphan)
    config = json.loads((orphan / "config.json").read_text())
    del config["quantization_config"]["source"]
    (orphan / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="--reference"):
        run_report(str(orphan), "-o", str(tmp_path / "r.html"), "--no-speed", "--quiet")
    for flag in ("--ppl", "--plan", "--measurements"):
        with pytest.raises(ModelNotFoundError, match="missing"):
            run_report("builtin:tiny-lm", "-o", str(tmp_path / "r.html"), flag, str(tmp_path / "missing"))
    with pytest.raises(InvalidSpecError):
        run_report("builtin:tiny-lm", "-o", str(tmp_path / "r.html"), "--uniform", "int7")
    with pytest.raises(InvalidSpecError):
        run_report("builtin:tiny-lm", "-o", str(tmp_path / "r.html"), "--uniform", "int8", "--no-uniform")
    assert not (tmp_path / "r.html").exists()


def test_report_is_registered_in_the_cli():
    from lowbit.cli import COMMANDS

    assert "report" in COMMANDS and "plan" in COMMANDS
    from lowbit.cli import build_parser

    args = build_parser().parse_args(["report", "builtin:tiny-lm", "-o", "x.html", "--no-speed"])
    assert args.speed is False and args.uniform is None


def test_render_handles_sparse_and_odd_data():
    """The page renders from hand-made data: NaN errors, an error-only plan front, no perplexity, odd names."""
    from lowbit.report import HistogramPanel, LayerRow, ReportData, SizePoint, SpeedRow, render_html
    from lowbit.report.plan_files import PlanPoint

    data = ReportData(model="<odd & name>", model_dir="/x/<odd & name>", reference="ref", quantized=True,
                      subject="gptq", method="gptq", params=10, size_bytes=1000, linear_bytes=500,
                      bits_per_weight=4.2, reference_size_bytes=4000, reference_bits_per_weight=16.0)
    data.layers = [LayerRow("model.layers.0.mlp.up_proj", "int4-g128-asym", "int4-g128", "gptq", 4.25, 100, 0.1),
                   LayerRow("model.layers.0.mlp.down_proj", "nf4-b64", "nf4", "gptq", 4.25, 100, float("nan")),
                   LayerRow("lm_head", None, "float", "none", 16.0, 50, 0.0)]
    data.points = [SizePoint("float reference", "reference", 16.0, 4000, None),
                   SizePoint("int4-g128", "uniform", 4.23, 900, None)]
    data.plan_front = [PlanPoint(3.5, None, None, 0.2), PlanPoint(4.5, None, None, 0.1, "p", True),
                       PlanPoint(5.0, None, 29.0, None, "with ppl", True)]
    data.histograms = [HistogramPanel("model.layers.0.mlp.up_proj", "int4-g128-asym", "worst", 0, 0, (0, 128), 0.1,
                                      0.1, [], [])]
    data.speed = [SpeedRow("quantized", None, float("nan"), None, 1000)]
    data.notes = ["a note with <markup>"]
    html = render_html(data)
    assert_self_contained(html)
    plots = re.findall(r'<svg class="plot" data-plot="([^"]+)"', html)
    assert {"layer-error", "hist-0", "size-quality", "plan-front", "memory"} <= set(plots)
    for match in re.finditer(r"<svg .*?</svg>", html, re.S):
        parse_svg(match.group(0))
    assert "&lt;odd &amp; name&gt;" in html and "<markup>" not in html
    payload = re.search(r'id="lowbit-report-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(payload)["layers"][1]["rel_error"] is None  # NaN is not JSON: written as null
    assert json.loads(payload)["notes"] == ["a note with <markup>"]
