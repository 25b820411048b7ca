"""Seconds to export a ~1 B random Llama (TinyLlama's shape) to GGUF Q4_K_M: lowbit vs llama.cpp.

llama.cpp's path is its own two steps, from the same llama.cpp source as the installed
llama-cpp-python (its sdist, fetched with ``pip download`` into --llama-src when not given):
``convert_hf_to_gguf.py --outtype f16`` then llama-quantize Q4_K_M (the C API
``llama_model_quantize`` of llama-cpp-python, all cores). lowbit's path is one command:
``lowbit export MODEL --type q4_k_m``. Each is timed as a whole fresh process (imports, reading,
writing), interleaved over ``--rounds`` rounds; the median is reported with the ratio.

The model gets the built-in tokenizer (padded to the model's vocabulary). llama.cpp's converter does
not know that tokenizer's pre-tokenizer hash and would refuse it ("BPE pre-tokenizer was not
recognized" — exactly the problem lowbit's reading of tokenizer.json avoids), so the bench runs the
converter with its hash lookup answered "gpt-2" (the same regex); the tensor work is untouched.

    .venv/bin/python bench/export.py [--model-dir /tmp/lowbit-bench/llama-1b] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONVERT_WRAPPER = r'''
import sys
src = sys.argv.pop(1)
sys.path.insert(0, src + "/gguf-py"); sys.path.insert(0, src)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
'''

QUANTIZE = r'''
import ctypes, os, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = os.cpu_count()
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
'''


def llama_source(dest: Path) -> Path:
    """The vendored llama.cpp of the installed llama-cpp-python's sdist."""
    import llama_cpp

    version = llama_cpp.__version__
    target = dest / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(dest)], check=True)
    with tarfile.open(dest / f"llama_cpp_python-{version}.tar.gz") as tar:
        tar.extractall(dest, filter="data")
    return target


def make_model(path: Path) -> Path:
    from lowbit.models.resolve import builtin_dir
    from lowbit.models.synthetic import LlamaShape, write_random_llama

    if not (path / "config.json").is_file():
        shape = LlamaShape(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000)
        print(f"writing random ~1 B Llama to {path} …", file=sys.stderr)
        write_random_llama(path, shape)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            shutil.copy(builtin_dir("tiny-lm") / name, path / name)
    return path


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/lowbit-bench/llama-1b")
    ap.add_argument("--llama-src", default=str(Path(tempfile.gettempdir()) / "lowbit-bench" / "llama-src"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        import sentencepiece  # noqa: F401  (convert_hf_to_gguf.py imports it before looking for tokenizer.model)
    except ImportError:
        sys.exit("llama.cpp's convert_hf_to_gguf.py needs `pip install sentencepiece` (its own requirement)")
    model = make_model(Path(args.model_dir))
    src = llama_source(Path(args.llama_src))
    ours_t, conv_t, quant_t = [], [], []
    with tempfile.TemporaryDirectory(dir=Path(args.model_dir).parent) as d:
        work = Path(d)
        for r in range(args.rounds):
            ours = work / "ours.gguf"
            ours_t.append(timed([sys.executable, "-m", "lowbit", "export", str(model), "--type", "q4_k_m", "-o",
                                 str(ours), "--overwrite", "--quiet"]))
            f16, theirs = work / "f16.gguf", work / "theirs.gguf"
            conv_t.append(timed([sys.executable, "-c", CONVERT_WRAPPER, str(src), str(model), "--outtype", "f16",
                                 "--outfile", str(f16)]))
            quant_t.append(timed([sys.executable, "-c", QUANTIZE, str(f16), str(theirs)]))
            print(f"round {r + 1}: lowbit {ours_t[-1]:.1f} s | llama.cpp convert {conv_t[-1]:.1f} s + quantize "
                  f"{quant_t[-1]:.1f} s; sizes {ours.stat().st_size / 1e6:.1f} MB vs {theirs.stat().st_size / 1e6:.1f} MB",
                  flush=True)
            for f in (ours, f16, theirs):
                f.unlink(missing_ok=True)
    o, c, q = statistics.median(ours_t), statistics.median(conv_t), statistics.median(quant_t)
    result = {"model": str(model), "cores": os.cpu_count(), "lowbit_s": round(o, 2), "llama_cpp_convert_s": round(c, 2),
              "llama_cpp_quantize_s": round(q, 2), "llama_cpp_total_s": round(c + q, 2),
              "ratio_lowbit_over_llama_cpp": round(o / (c + q), 3)}
    print(f"\nQ4_K_M export of {model.name}: lowbit {o:.1f} s vs llama.cpp {c + q:.1f} s "
          f"(convert {c:.1f} + quantize {q:.1f}) → {o / (c + q):.2f}× their time")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
