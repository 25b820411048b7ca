"""Pruning on the built-in LM: perplexity after 50 % unstructured and 2:4 pruning by magnitude, Wanda and SparseGPT.

With ``--joint-bits B …`` (default 4 3 2): SparseGPT quantizing the kept weights to intB-g128 in the same pass
(the SparseGPT paper's joint mode) against pruning first and rounding the survivors afterwards.

Held-out perplexity on the built-in eval text (all windows of 256 tokens), calibration on the built-in calib
corpus (disjoint). The reference ordering is Wanda's README on Llama-2-7B wikitext at 50 %: dense 5.12,
magnitude 14.89, SparseGPT 6.51, Wanda 6.42.

    .venv/bin/python bench/prune.py [--calib-samples 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lowbit.algorithms.calib_data import CalibConfig
from lowbit.compress.prune import PruneConfig, prune_model
from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
from lowbit.io.checkpoint import load
from lowbit.models.resolve import builtin_dir
from lowbit.quantize import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--joint-bits", type=int, nargs="*", default=[4, 3, 2],
                    help="SparseGPT + int quantization rows, joint vs prune-then-round, per bit width (none: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok = load_tokenizer(load("builtin:tiny-lm"))
    ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    calib = CalibConfig(source="builtin", samples=args.calib_samples, seq_len=256)
    rows = [{"method": "dense", "pattern": "-", "ppl": perplexity(load("builtin:tiny-lm"), ids).ppl, "seconds": 0.0}]
    for pattern in (None, (2, 4)):
        for method in ("magnitude", "wanda", "sparsegpt"):
            model = load("builtin:tiny-lm")
            start = time.perf_counter()
            result = prune_model(model, PruneConfig(method, args.sparsity, pattern), tokenizer=tok, calib=calib)
            rows.append({"method": method, "pattern": result.nm or f"{100 * args.sparsity:.0f} % unstructured",
                         "sparsity": result.sparsity, "ppl": perplexity(model, ids).ppl,
                         "seconds": time.perf_counter() - start})
            print(f"{rows[-1]['pattern']:18s} {method:10s} ppl {rows[-1]['ppl']:8.3f}  ({rows[-1]['seconds']:.1f} s)",
                  flush=True)
    from lowbit.formats.spec import QuantSpec
    from lowbit.quantize import quantize

    for bits in args.joint_bits:  # SparseGPT + int quantization in one pass vs pruning first and rounding afterwards
        spec = QuantSpec.int_(bits, 128, symmetric=False)
        for joint in (False, True):
            model = load("builtin:tiny-lm")
            start = time.perf_counter()
            config = PruneConfig("sparsegpt", args.sparsity, quant=spec if joint else None)
            prune_model(model, config, tokenizer=tok, calib=calib)
            if not joint:
                quantize(model, spec)  # round-to-nearest keeps the zeros (code z)
            rows.append({"method": "sparsegpt + " + ("joint " if joint else "then RTN ") + spec.describe(),
                         "pattern": f"{100 * args.sparsity:.0f} % unstructured", "ppl": perplexity(model, ids).ppl,
                         "seconds": time.perf_counter() - start})
            print(f"{rows[-1]['pattern']:18s} {rows[-1]['method']:30s} ppl {rows[-1]['ppl']:8.3f}  "
                  f"({rows[-1]['seconds']:.1f} s)", flush=True)
    print("\n| pattern | method | ppl |\n|---|---|---:|")
    for r in rows:
        print(f"| {r['pattern']} | {r['method']} | {r['ppl']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
