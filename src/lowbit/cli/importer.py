"""``lowbit import``: a GGUF file → a lowbit model directory (validated first; bad files get one clear error)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, common: Any) -> None:
    i = sub.add_parser("import", help="convert a GGUF file (lowbit's or llama.cpp's) into a lowbit model directory",
                       description="Read FILE.gguf (every count, length and offset is checked against the file "
                                   "before anything is allocated) and write a model directory: Q4_0/Q5_0/Q8_0 "
                                   "tensors stay quantized as lowbit int4/int5/int8 (exact), other block types are "
                                   "dequantized to --dtype. The tokenizer is rebuilt from the file's metadata.")
    i.add_argument("file", help="a .gguf file")
    i.add_argument("-o", "--out", required=True, help="output model directory")
    i.add_argument("--dequantize", dest="keep_quantized", action="store_false",
                   help="dequantize every tensor (default: keep Q4_0/Q5_0/Q8_0 as lowbit int specs)")
    i.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of dequantized tensors (default float32: exactly the file's values)")
    i.add_argument("--overwrite", action="store_true")
    common(i)


def cmd_import(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.io.gguf.importer import import_gguf

    report = import_gguf(args.file, args.out, keep_quantized=args.keep_quantized, dtype=args.dtype,
                         overwrite=args.overwrite, show_progress=not args.quiet)
    if not args.json:
        kept = len(report.kept_quantized)
        print(f"wrote {report.out}: {report.tensors} tensors ({kept} kept quantized, dequantized "
              f"{report.dequantized or 'none'}), tokenizer {report.tokenizer}, {report.seconds:.1f} s")
    return report.to_dict()
