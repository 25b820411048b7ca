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
    m.add_argument("--method", default=None, choices=("rtn", "hqq"),
                   help="data-free re-quantization (--no-calib): fresh rtn or hqq, each vs rounding onto the base's grid")
    m.add_argument("--calib", default=None, metavar="DATA",
                   help="calibration data for re-quantization (GPTQ on the base's grid): any finetune --data format "
                        "(default: the adapter's training data when lowbit trained it, else the built-in corpus)")
    m.add_argument("--no-calib", action="store_true", help="re-quantize without data (rounding)")
    m.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    m.add_argument("--eval-data", default=None, metavar="FILE",
                   help="also report the token-mean loss on FILE (finetune --data formats: JSONL prompt/response "
                        "scores the responses) before and after merging")
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
    method = args.method or getattr(model, "lowbit_method", None)
    if args.method and not args.no_calib:
        raise InvalidSpecError("--method chooses the data-free re-quantizer: use it with --no-calib")
    calibration = None if args.no_calib or args.merge_dtype else _calibration(model, args)
    measure = _perplexity_fn(model, args)
    loss_fn = _loss_fn(model, args)
    before = measure(model) if measure else None
    loss_before = loss_fn(model) if loss_fn else None
    model, report = merge_and_unload(model, requantize=args.merge_dtype is None, method=method,
                                     merge_dtype=args.merge_dtype, calibration=calibration,
                                     show_progress=not args.quiet)
    after = measure(model) if measure else None
    loss_after = loss_fn(model) if loss_fn else None
    lowbit.save(model, args.out, overwrite=args.overwrite)
    summary = {"out": str(args.out), **report.to_dict(), "seconds": round(time.perf_counter() - start, 3)}
    if before is not None and after is not None:
        summary.update({"ppl_before": round(before, 4), "ppl_after": round(after, 4),
                        "loss_before": round(_log(before), 6), "loss_after": round(_log(after), 6),
                        "ppl_change": round(after / before - 1, 6)})
    if loss_before is not None:
        summary.update({"eval_loss_before": round(loss_before, 6), "eval_loss_after": round(loss_after, 6)})
    if calibration is not None:
        summary["calib_samples"] = int(calibration["input_ids"].shape[0])
    if not args.json:
        kind = f"re-quantized ({report.method})" if report.requantized else f"float ({args.merge_dtype or 'as base'})"
        print(f"merged {report.layers and len(report.layers)} layers into {kind} → {args.out}")
        print(f"  mean relative weight error vs exact merge: {report.mean_weight_rel_error:.4g}; "
              f"adapter update lost: {report.mean_delta_rel_error:.4g}")
        if loss_before is not None:
            print(f"  loss on {args.eval_data}: {loss_before:.4f} (adapter) → {loss_after:.4f} (merged)")
        if "ppl_before" in summary:
            print(f"  perplexity {summary['ppl_before']} (adapter) → {summary['ppl_after']} (merged), "
                  f"{100 * summary['ppl_change']:+.2f} %")
    return summary


def _read_data(model: Any, path: str, seq_len: int) -> Any:
    from lowbit.quantize import load_tokenizer
    from lowbit.train import load_causal_lm_data

    return load_causal_lm_data(path, load_tokenizer(model), seq_len)


def _calibration(model: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """Token windows for GPTQ-on-grid re-quantization (only when a quantized layer is adapted)."""
    from lowbit.peft.base import adapter_layers
    from lowbit.peft.finetune import read_run

    if not any(layer.is_quantized for layer in adapter_layers(model).values()):
        return None
    source = args.calib or read_run(args.adapter).get("data")
    if source is None or not Path(source).exists():
        source = str(_builtin_calib())
    data = _read_data(model, source, args.seq_len)
    rows = torch_randperm(len(data), args.calib_samples)
    return {"input_ids": data.tensors["input_ids"][rows], "attention_mask": data.tensors["attention_mask"][rows]}


def torch_randperm(n: int, k: int) -> Any:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[: max(1, min(k, n))].sort().values


def _builtin_calib() -> Path:
    from lowbit.models.resolve import builtin_dir

    return builtin_dir("tiny-lm") / "calib.txt"


def _loss_fn(model: Any, args: argparse.Namespace) -> Any:
    if args.eval_data is None:
        return None
    from lowbit.train.trainer import eval_loss

    data = _read_data(model, args.eval_data, args.seq_len)
    return lambda m: eval_loss(m, data)


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
