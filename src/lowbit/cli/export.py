"""``lowbit export``: write a model as GGUF (llama.cpp and its ecosystem) or as a GPTQ-format checkpoint."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lowbit.errors import InvalidSpecError


def add_parser(sub: Any, common: Any) -> None:
    from lowbit.io.gguf.mixes import MIXES

    x = sub.add_parser("export", help="write MODEL as GGUF (llama.cpp, Ollama, LM Studio) or GPTQ-format files",
                       description="Export MODEL (HF directory, lowbit directory, .gguf or builtin:tiny-lm). "
                                   "--format gguf writes one file llama.cpp runs, quantized with llama.cpp's type "
                                   "mixes by lowbit's own block code; lowbit integer layers whose grid is a GGUF "
                                   "type (int4/int5 sym/asym, int8 sym; groups of 32k) are written code for code. "
                                   "--format gptq writes the qweight/qzeros/scales/g_idx checkpoint transformers, "
                                   "GPTQModel and vLLM load (needs a lowbit int-quantized MODEL).")
    x.add_argument("model", help="model directory, .gguf file or builtin:tiny-lm")
    x.add_argument("-o", "--out", required=True, help="output .gguf file (gguf) or directory (gptq)")
    x.add_argument("--format", default="gguf", choices=("gguf", "gptq"), help="output format (default: gguf)")
    x.add_argument("--type", default=None, metavar="TYPE",
                   help=f"GGUF type: {', '.join(MIXES)} (default: q4_k_m)")
    x.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="per-tensor override searched in GGUF tensor names, e.g. attn_v=q8_0 (repeatable)")
    x.add_argument("--plan", default=None, metavar="PLAN.yaml",
                   help="per-tensor GGUF block types chosen by `lowbit plan --candidates q3_k,q4_k,…` (the planned "
                        "tensors get exactly those; others follow --type)")
    x.add_argument("--calib", default=None, metavar="DATA",
                   help="importance-weighted rounding: measure each layer's input importance on DATA (text, "
                        ".jsonl, directory, saved dataset, or 'builtin') — what llama.cpp's imatrix does")
    x.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    x.add_argument("--calib-seq-len", type=int, default=256, help="tokens per window (default 256)")
    x.add_argument("--no-code-map", dest="code_map", action="store_false",
                   help="re-round lowbit integer layers from their float values instead of mapping codes")
    x.add_argument("--gptq-format", default="gptq", choices=("gptq", "gptq_v2"),
                   help="GPTQ zero-point convention: gptq (v1, what transformers/vLLM/AutoGPTQ read; default) or "
                        "gptq_v2 (GPTQModel's own; GPTQModel loads asymmetric models only in this one)")
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    common(x)


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    if args.format == "gptq":
        return _export_gptq(args)
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.io.gguf.writer import export_gguf

    calib = None
    if args.calib:
        calib = CalibConfig(source="builtin" if args.calib == "builtin" else args.calib,
                            samples=args.calib_samples, seq_len=args.calib_seq_len)
    tensor_plan = None
    if args.plan:
        from lowbit.plan.recipe_out import read_gguf_plan

        tensor_plan = read_gguf_plan(args.plan)
    report = export_gguf(args.model, args.out, type=args.type or "q4_k_m", calib=calib,
                         tensor_types=args.tensor_type, code_map=args.code_map, overwrite=args.overwrite,
                         show_progress=not args.quiet, tensor_plan=tensor_plan)
    if not args.json:
        types = ", ".join(f"{k} ×{v}" for k, v in sorted(report.types.items()))
        print(f"wrote {report.out}: {report.file_bytes / 1e6:.1f} MB, {report.bits_per_weight:.2f} bits/weight "
              f"({types}) in {report.seconds:.1f} s")
        if report.code_mapped:
            print(f"  {len(report.code_mapped)} tensors written code for code from lowbit's quantized weights")
        for line in report.fallbacks:
            print(f"  {line}", file=sys.stderr)
    return {"format": "gguf", **report.to_dict()}


def _export_gptq(args: argparse.Namespace) -> dict[str, Any]:
    import time

    import lowbit
    from lowbit.io.gptq_format import export_gptq

    if args.type or args.calib or args.tensor_type:
        raise InvalidSpecError("--type/--calib/--tensor-type apply to --format gguf; a GPTQ export keeps the "
                               "model's own quantization (quantize it with `lowbit quantize --method gptq` first)")
    start = time.perf_counter()
    model = lowbit.load(args.model)
    out = export_gptq(model, args.out, overwrite=args.overwrite, checkpoint_format=args.gptq_format)
    report = out if isinstance(out, dict) else {"out": str(out)}
    report.setdefault("seconds", round(time.perf_counter() - start, 3))
    if not args.json:
        print(f"wrote GPTQ-format checkpoint {report['out']}")
    return {"format": "gptq", **report}
