"""Peak memory of streaming quantization vs. loading the float model (transformers), same run.

Writes a synthetic random-weight Llama of ≥ 1.5 GB fp32 (shard by shard), then measures the peak
RSS of three child processes:
  baseline   python + torch + transformers + lowbit imported, the model skeleton built (meta)
  lowbit     `lowbit quantize DIR --bits 4 --group-size 128 -o OUT` (streaming, one tensor at a time)
  peer       transformers AutoModelForCausalLM.from_pretrained(DIR) in fp32, every weight read once
             (the least that quantizing after a full load needs)
and prints them with the model's sizes. Target: lowbit's peak ≤ baseline + quantized output size +
largest tensor (in fact it should be ≈ baseline + a few × the largest tensor, far below the peer).

    python bench/streaming_memory.py [--layers 6] [--hidden 2048] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = """
import sys, torch, transformers, lowbit
from lowbit.models.build import build_empty_model
from lowbit.models.resolve import read_json
build_empty_model(read_json(__import__('pathlib').Path(sys.argv[1]) / 'config.json'))
"""
PEER = """
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
# transformers memory-maps the shards lazily: read every weight, as quantizing it would
print(sum(float(p.detach().sum()) for p in m.parameters()))
"""


def run(argv: list[str]) -> tuple[int, float, str]:
    """Peak RSS of one child, measured in a fresh wrapper so earlier children do not mask it."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "print(json.dumps({'rc': p.returncode, 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,"
               " 's': time.perf_counter() - t, 'out': p.stdout[-2000:], 'err': p.stderr[-3000:]}))\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({result['rc']}):\n{result['err']}")
    return result["rss"], result["s"], result["out"]


def measure(shape: "LlamaShape", work: Path, *, peer: bool = True) -> dict:  # noqa: F821
    """Write the synthetic model under ``work`` (if absent) and measure the three peak RSS figures."""
    from lowbit.models.synthetic import write_random_llama

    model_dir, out_dir = work / "fp32-model", work / "q4"
    if not model_dir.exists():
        write_random_llama(model_dir, shape, max_shard_bytes=512 << 20)
    shutil.rmtree(out_dir, ignore_errors=True)
    base_rss, _, _ = run([sys.executable, "-c", BASELINE, str(model_dir)])
    q_rss, q_s, q_out = run([sys.executable, "-m", "lowbit.cli", "quantize", str(model_dir), "--bits", "4",
                             "--group-size", "128", "--asym", "-o", str(out_dir), "--json", "--quiet"])
    result = {
        "fp32_bytes": shape.num_params() * 4,
        "largest_tensor_bytes": max(shape.vocab_size, shape.intermediate_size) * shape.hidden_size * 4,
        "baseline_rss": base_rss, "lowbit_rss": q_rss, "lowbit_seconds": q_s,
        "summary": json.loads(q_out.strip().splitlines()[-1]),
    }
    if peer:
        result["peer_rss"], result["peer_seconds"], _ = run([sys.executable, "-c", PEER, str(model_dir)])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic model and output")
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers full-load measurement")
    args = parser.parse_args()

    from lowbit.models.synthetic import LlamaShape

    shape = LlamaShape(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       vocab_size=args.vocab)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lowbit-bench-"))
    try:
        r = measure(shape, work, peer=not args.no_peer)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    gb, summary, base = 1e9, r["summary"], r["baseline_rss"]
    print(f"synthetic Llama: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"vocab {args.vocab}: {shape.num_params() / 1e6:.0f} M params, fp32 {r['fp32_bytes'] / gb:.2f} GB")
    print(f"quantized output (int4-g128, lm_head kept fp32): {summary['size_bytes'] / gb:.3f} GB, "
          f"{summary['bits_per_weight']:.3f} bits/weight on linear layers")
    print(f"largest tensor: {r['largest_tensor_bytes'] / gb:.3f} GB\n")
    print(f"{'process':<44} {'peak RSS (GB)':>14} {'above baseline':>15} {'seconds':>8}")
    print(f"{'baseline (imports + meta skeleton)':<44} {base / gb:>14.3f}")
    print(f"{'lowbit quantize (streaming)':<44} {r['lowbit_rss'] / gb:>14.3f} {(r['lowbit_rss'] - base) / gb:>15.3f} "
          f"{r['lowbit_seconds']:>8.1f}")
    if "peer_rss" in r:
        print(f"{'transformers from_pretrained fp32 (peer)':<44} {r['peer_rss'] / gb:>14.3f} "
              f"{(r['peer_rss'] - base) / gb:>15.3f} {r['peer_seconds']:>8.1f}")
    bound = base + summary["size_bytes"] + r["largest_tensor_bytes"]
    print(f"\nlowbit peak / fp32 model size: {r['lowbit_rss'] / r['fp32_bytes']:.2f}")
    if "peer_rss" in r:
        print(f"lowbit working memory / peer's: {(r['lowbit_rss'] - base) / max(1, r['peer_rss'] - base):.3f}")
    ok = r["lowbit_rss"] <= bound
    print(f"bound baseline + output + largest tensor = {bound / gb:.3f} GB → {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
