"""QAT on the built-in LM: held-out perplexity of block-wise QAT (and QA-LoRA) against RTN and GPTQ, same format.

Held-out perplexity on the built-in eval text (all windows of 256 tokens); QAT trains and GPTQ calibrates on the
same windows of the built-in calibration corpus (disjoint from the eval text). The float model is the ceiling.
Rows: w2g64 and w3g128 (full-weight QAT from round-to-nearest ranges) and w4g128 (QA-LoRA on the GPTQ model);
``converted Δ`` is the max |logit difference| between the fake-quant model and its packed conversion.

    .venv/bin/python bench/qat.py [--steps 640] [--samples 128] [--formats w2g64,w3g128,w4g128-lora] [--e2e-steps 0]
                                  [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit.algorithms.calib_data import CalibConfig
from lowbit.compress.qat import QATConfig, convert_qat, qat
from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
from lowbit.formats.spec import QuantSpec
from lowbit.io.checkpoint import load
from lowbit.models.resolve import builtin_dir
from lowbit.quantize import load_tokenizer, quantize
from lowbit.recipe import QuantRecipe

FORMATS = {"w2g64": (2, 64, 0), "w3g128": (3, 128, 0), "w4g128-lora": (4, 128, 16)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=640, help="QAT optimizer steps per block")
    ap.add_argument("--samples", type=int, default=128, help="calibration / training windows of 256 tokens")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--e2e-steps", type=int, default=0, help="end-to-end distillation steps after the block phase")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok = load_tokenizer(load("builtin:tiny-lm"))
    ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    probe = ids[:512].reshape(2, 256)
    calib = CalibConfig(source="builtin", samples=args.samples, seq_len=256)
    dense = perplexity(load("builtin:tiny-lm"), ids).ppl
    print(f"float ppl {dense:.3f}", flush=True)
    rows = []
    for name in args.formats.split(","):
        bits, group, rank = FORMATS[name]
        spec = QuantSpec.int_(bits, group, symmetric=False)
        row: dict = {"format": name, "float": dense}
        for method in ("rtn", "gptq"):
            start = time.perf_counter()
            model = quantize(load("builtin:tiny-lm"), QuantRecipe(spec, method), calibration=calib, tokenizer=tok)
            row[method], row[f"{method}_s"] = perplexity(model, ids).ppl, time.perf_counter() - start
        model = load("builtin:tiny-lm")
        lr = 1e-3 if rank else 2e-4
        result = qat(model, QATConfig(spec, steps=args.steps, lora_rank=rank, lr=lr, e2e_steps=args.e2e_steps),
                     tokenizer=tok, calib=calib, show_progress=True, convert=False)
        with torch.no_grad():
            fake = model(input_ids=probe).logits
            convert_qat(model)
            row["converted_max_abs_diff"] = float((model(input_ids=probe).logits - fake).abs().max())
        row["qat"], row["qat_s"] = perplexity(model, ids).ppl, result.seconds
        row["method"] = "QA-LoRA r16 (GPTQ base)" if rank else "block-wise QAT (RTN start)"
        rows.append(row)
        print(f"{name}: rtn {row['rtn']:.3f}  gptq {row['gptq']:.3f}  qat {row['qat']:.3f} ({row['qat_s']:.0f} s)  "
              f"qat/gptq {row['qat'] / row['gptq']:.3f}  converted Δ {row['converted_max_abs_diff']:.2e}", flush=True)
    print(f"\nfloat {dense:.3f}; {args.steps} steps per block, {args.samples} windows, {args.e2e_steps} e2e steps\n")
    print("| format | method | RTN | GPTQ | QAT | QAT / GPTQ | QAT time | converted Δ |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['method']} | {r['rtn']:.3f} | {r['gptq']:.3f} | {r['qat']:.3f} | "
              f"{r['qat'] / r['gptq']:.3f} | {r['qat_s']:.0f} s | {r['converted_max_abs_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
