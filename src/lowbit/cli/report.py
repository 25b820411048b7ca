"""``lowbit report``: one self-contained HTML page with plots of what quantization did to a model."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.errors import InvalidSpecError


def add_parser(sub: Any, common: Any) -> None:
    r = sub.add_parser("report", help="write an HTML report with plots of what quantization did to a model",
                       description="Measure MODEL (a lowbit quantized directory, a float model or builtin:tiny-lm) "
                                   "against its float reference and write one self-contained HTML page (inline SVG, "
                                   "nothing fetched): per-layer weight error, weight histograms with the quantization "
                                   "grid, size vs perplexity next to uniform formats (and the planner's front), the "
                                   "methods table, speed and memory. A float MODEL shows what the uniform formats "
                                   "(or --plan) would do to it.")
    r.add_argument("model", help="quantized lowbit directory, float model directory or builtin:tiny-lm")
    r.add_argument("-o", "--out", required=True, help="output .html file")
    r.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    r.add_argument("--reference", default=None, metavar="FLOAT_MODEL",
                   help="the float model to compare with (default: the source recorded in MODEL's config.json)")
    r.add_argument("--plan", default=None, metavar="RECIPE.yaml",
                   help="lowbit plan's recipe; its RECIPE.pareto.json and per-layer measurement JSON beside it are "
                        "read too (a float MODEL is shown quantized to the plan by RTN)")
    r.add_argument("--measurements", default=None, metavar="JSON",
                   help="the planner's per-layer measurement JSON (default: found beside --plan)")
    r.add_argument("--ppl", nargs="?", const="builtin", default="builtin", metavar="TEXTFILE",
                   help="text for perplexity (default: the built-in held-out text)")
    r.add_argument("--no-ppl", dest="ppl", action="store_const", const=None,
                   help="no perplexity: the size plot uses the mean weight error instead")
    r.add_argument("--seq-len", type=int, default=256, help="perplexity window in tokens (default 256)")
    r.add_argument("--ppl-tokens", type=int, default=None, metavar="N",
                   help="score only the first N tokens of the text (faster on big models)")
    r.add_argument("--uniform", default=None, metavar="FORMATS",
                   help="comma-separated uniform formats to compare with, quantized from the reference by RTN "
                        "(default: int8,int4-g128,int3-g128,nf4; names like int4-g64-sym, nf4-b64-dq, fp4, fp8)")
    r.add_argument("--no-uniform", action="store_true", help="skip the uniform formats")
    r.add_argument("--no-cache", dest="cache", action="store_false",
                   help="re-measure the uniform formats instead of reusing cached results "
                        "($LOWBIT_CACHE_DIR/report, default ~/.cache/lowbit/report)")
    r.add_argument("--no-speed", dest="speed", action="store_false", help="skip the speed and memory measurement")
    r.add_argument("--speed-tokens", type=int, default=128, metavar="N",
                   help="speed: decode N tokens after a prompt of min(N, 128) (default 128)")
    r.add_argument("--no-compile", dest="compile", action="store_false", help="speed: decode eagerly")
    r.add_argument("--histograms", type=int, default=3, metavar="N",
                   help="weight histograms to draw: worst, median, best layer (default 3)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    common(r)


def options_from_args(args: argparse.Namespace) -> Any:
    from lowbit.report.build import ReportOptions
    from lowbit.report.specs import DEFAULT_UNIFORM, parse_spec_list

    if args.no_uniform and args.uniform:
        raise InvalidSpecError("--uniform and --no-uniform contradict each other")
    uniform = () if args.no_uniform else tuple(parse_spec_list(args.uniform or ",".join(DEFAULT_UNIFORM)))
    return ReportOptions(reference=args.reference, plan=args.plan, measurements=args.measurements,
                         ppl_text=args.ppl, seq_len=args.seq_len, ppl_tokens=args.ppl_tokens, uniform=uniform,
                         speed=args.speed, speed_tokens=args.speed_tokens, compile=args.compile,
                         histograms=args.histograms, use_cache=args.cache, show_progress=not args.quiet)


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from lowbit.errors import OutputExistsError
    from lowbit.report.build import build_report
    from lowbit.report.html import write_html

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # fail before minutes of measuring, not after
        raise OutputExistsError(f"{out}: already exists; choose another output path or pass --overwrite")
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidSpecError(f"--threads must be ≥ 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    data = build_report(args.model, options_from_args(args))
    write_html(data, out, overwrite=args.overwrite)
    full = data.to_dict()
    summary = {"out": str(out), "plots": plot_count(out.read_text(encoding="utf-8"))}
    summary.update({k: full[k] for k in ("model", "reference", "quantized", "subject", "method", "plan", "params",
                                         "size_bytes", "linear_bytes", "bits_per_weight", "reference_size_bytes",
                                         "reference_bits_per_weight", "ppl", "ppl_reference", "ppl_change",
                                         "ppl_tokens", "format_mix", "mean_rel_error", "worst_layer")})
    summary["layers"] = len(data.layers)
    summary["uniform"] = [p for p in full["points"] if p["kind"] == "uniform"]
    summary["speed"] = full["speed"]
    summary["notes"] = full["notes"]
    summary["seconds"] = data.seconds
    if not args.json:
        print(f"report for {data.model} → {out}  ({summary['plots']} plots, {data.seconds:.1f} s)")
        mix = ", ".join(f"{m['format']} {100 * m['weight_share']:.0f} %" for m in summary["format_mix"])
        print(f"  {data.subject}: {mix}; {data.bits_per_weight:.3f} bits/weight, {data.size_bytes / 1e6:.2f} MB")
        if data.ppl is not None:
            change = f" ({100 * summary['ppl_change']:+.2f} % vs float {data.ppl_reference:.3f})" \
                if summary["ppl_change"] is not None else ""
            print(f"  perplexity {data.ppl:.3f}{change}")
        if summary["mean_rel_error"] is not None:
            worst = summary["worst_layer"] or {}
            print(f"  mean relative weight error {summary['mean_rel_error']:.4g}; worst {worst.get('name')} "
                  f"{worst.get('rel_error')}")
        for note in data.notes:
            print(f"  note: {note}")
    return summary


def plot_count(html: str) -> int:
    """Number of plots (``<svg class="plot" data-plot=…>``) in a rendered report."""
    return html.count('<svg class="plot" data-plot=')
