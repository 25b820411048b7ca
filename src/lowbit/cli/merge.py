"""``lowbit merge``: fold a trained adapter into the base, float or re-quantized, and say what it cost."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lowbit.errors import InvalidSpecError, LowbitError


def add_parser(sub: Any, common: Any) -> None:
    m = sub.add_parser("merge", help="merge an adapter into the base weights (float or re-quantized) and save",
                       description="Load MODEL with the adapter ADAPTER, merge it and save the result to -o. A "
                                   "quantized base is re-quantized with its own spec (--requantize, the default); "
                                   "--merge-dtype keeps a float model instead. Perplexity before and after is reported.")
    m.add_argument("model", help="the adapter's base model (directory or builtin:tiny-lm)")
    m.add_argument("adapter", help="peft adapter directory (lowbit finetune's OUT, or one peft wrote)")
    m.add_argument("-o", "--out", required=True, help="merged model directory")
    m.add_argument("--overwrite", action="store_true")
    how = m.add_mutually_exclusive_group()
    how.add_argument("--requantize", action="store_true", help="re-quantize merged layers with the base's spec "
                     "(default for a quantized base)")
    how.add_argument("--merge-dtype", default=None, choices=("float16", "bfloat16", "float32"),
                     help="keep a float model of this dtype")
    m.add_argument("--method", default=None, choices=("rtn", "hqq", "gptq", "awq"),
                   help="re-quantization method (default: the base's; gptq/awq use --calib)")
    m.add_argument("--calib", default=None, metavar="DATA", help="calibration text for gptq/awq re-quantization")
    m.add_argument("--ppl", nargs="?", const="builtin", default="builtin", metavar="TEXTFILE",
                   help="text for the before/after perplexity (default: the built-in held-out text)")
    m.add_argument("--no-ppl", dest="ppl", action="store_const", const=None, help="skip the perplexity check")
    m.add_argument("--seq-len", type=int, default=256)
    common(m)


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    import lowbit
    from lowbit.peft.finetune import load_with_adapter
    from lowbit.peft.merge import merge_and_unload

    start = time.perf_counter()
    model = load_with_adapter(args.model, args.adapter)
    calibration = None
    method = args.method or getattr(model, "lowbit_method", None)
    if method in ("gptq", "awq"):
        from lowbit.algorithms.calib_data import CalibConfig

        if args.calib is None and args.method is not None:
            raise InvalidSpecError(f"--method {method} needs --calib (calibration text)")
        calibration = CalibConfig(args.calib) if args.calib else None
    measure = _perplexity_fn(model, args)
    before = measure(model) if measure else None
    model, report = merge_and_unload(model, requantize=args.merge_dtype is None, method=method,
                                     merge_dtype=args.merge_dtype, calibration=calibration,
                                     show_progress=not args.quiet)
    after = measure(model) if measure else None
    lowbit.save(model, args.out, overwrite=args.overwrite)
    summary = {"out": str(args.out), **report.to_dict(), "seconds": round(time.perf_counter() - start, 3)}
    if before is not None and after is not None:
        summary.update({"ppl_before": round(before, 4), "ppl_after": round(after, 4),
                        "loss_before": round(_log(before), 6), "loss_after": round(_log(after), 6),
                        "ppl_change": round(after / before - 1, 6)})
    if not args.json:
        kind = f"re-quantized ({report.method})" if report.requantized else f"float ({args.merge_dtype or 'as base'})"
        print(f"merged {report.layers and len(report.layers)} layers into {kind} → {args.out}")
        print(f"  mean relative weight error vs exact merge: {report.mean_weight_rel_error:.4g}; "
              f"adapter update lost: {report.mean_delta_rel_error:.4g}")
        if "ppl_before" in summary:
            print(f"  perplexity {summary['ppl_before']} (adapter) → {summary['ppl_after']} (merged), "
                  f"{100 * summary['ppl_change']:+.2f} %")
    return summary


def _log(x: float) -> float:
    import math

    return math.log(x)


def _perplexity_fn(model: Any, args: argparse.Namespace) -> Any:
    if args.ppl is None:
        return None
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return None
    from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
    from lowbit.models.resolve import builtin_dir
    from lowbit.quantize import load_tokenizer

    path = builtin_dir("tiny-lm") / "eval.txt" if args.ppl == "builtin" else Path(args.ppl)
    ids = tokenize_text(load_tokenizer(model), read_text(path))

    def measure(m: Any) -> float:
        try:
            return perplexity(m, ids, seq_len=args.seq_len, show_progress=False).ppl
        except LowbitError:
            raise
    return measure
