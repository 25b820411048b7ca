"""GGUF quality on the built-in LM, everything scored by llama.cpp (llama-cpp-python) on the same windows.

Rows: llama.cpp's own quantizer (llama-quantize via the C API, from lowbit's F16 export) vs lowbit's
export of the same types — plain, with importance weighting from calibration data (imatrix), and
lowbit GPTQ models written code for code (Q4_0 from int4 sym g32, Q4_1 from int4 asym g32).
Perplexity is llama.cpp's on the built-in held-out text (non-overlapping windows), calibration text
is the built-in calib corpus (disjoint).

    .venv/bin/python bench/gguf_quality.py [--seq-len 256] [--windows 0 (=all)] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import llama_cpp  # noqa: E402

from gguf_support import llama_cpp_ppl, llama_cpp_quantize, open_llama, token_windows  # noqa: E402
from lowbit.algorithms.calib_data import CalibConfig  # noqa: E402
from lowbit.cli import main as cli  # noqa: E402
from lowbit.eval.perplexity import read_text, tokenize_text  # noqa: E402
from lowbit.io.gguf.writer import export_gguf  # noqa: E402
from lowbit.models.resolve import builtin_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_dir("tiny-lm")))
    ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    windows = token_windows(ids, args.seq_len, args.windows or None)
    calib = CalibConfig(source="builtin", samples=args.calib_samples, seq_len=args.seq_len)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)

        def score(label: str, path: Path) -> None:
            ppl = llama_cpp_ppl(open_llama(llama_cpp, path, args.seq_len), windows)
            size = path.stat().st_size
            rows.append({"model": label, "bytes": size, "ppl": round(ppl, 4)})
            print(f"{label:48s} {size / 1e6:8.3f} MB  ppl {ppl:9.4f}", flush=True)

        f16 = root / "f16.gguf"
        export_gguf("builtin:tiny-lm", f16, type="f16", show_progress=False)
        score("F16 (lowbit export)", f16)
        for mix in ("q4_k_m", "q3_k_m", "q5_k_m", "q4_0", "q4_1"):
            theirs = root / f"llamacpp-{mix}.gguf"
            llama_cpp_quantize(llama_cpp, f16, theirs, f"MOSTLY_{mix.upper()}")
            score(f"{mix.upper()} llama.cpp llama-quantize", theirs)
            ours = root / f"lowbit-{mix}.gguf"
            export_gguf("builtin:tiny-lm", ours, type=mix, show_progress=False)
            score(f"{mix.upper()} lowbit", ours)
            ours_i = root / f"lowbit-{mix}-imatrix.gguf"
            export_gguf("builtin:tiny-lm", ours_i, type=mix, calib=calib, show_progress=False)
            score(f"{mix.upper()} lowbit + importance (calib)", ours_i)
        for label, sym, mix in (("GPTQ int4 g32 sym → Q4_0 code for code", "--sym", "q4_0"),
                                ("GPTQ int4 g32 asym → Q4_1 code for code", "--asym", "q4_1")):
            q = root / f"gptq-{mix}"
            cli(["quantize", "builtin:tiny-lm", "-o", str(q), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 sym, "--calib-samples", str(args.calib_samples), "--quiet"])
            out = root / f"gptq-{mix}.gguf"
            report = export_gguf(q, out, type=mix, show_progress=False)
            assert report.code_mapped, "expected code-mapped tensors"
            score(label, out)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
