"""Wall-clock time of GPTQ w4g128 on a Llama-2-7B-shaped model (random weights).

Issue-3 target: the whole 32-block model with 128 × 2048 calibration tokens in ≤ 2 minutes on one
H100 (a textbook GPTQ takes ≈ 7.1 min there). The run goes through the product path: the model is
read lazily one block at a time (``lowbit.load(lazy_blocks=True)``), calibrated on ``--device`` with
the layer-by-layer runner (one Hessian shared by q/k/v and one by gate/up), quantized with act-order
and static groups, and the per-block times are printed.

Random weights need no tokenizer: the calibration windows are pseudo-random token ids.
On CPU the full protocol would take hours; ``--layers``, ``--samples`` and ``--seq-len`` shrink it,
and the 32-block figure is then an extrapolation from the per-block time (printed as such).

    python bench/gptq_time.py                        # GPU: 32 blocks, 128 × 2048 tokens
    python bench/gptq_time.py --device cpu --layers 2 --samples 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lowbit  # noqa: E402
from lowbit.algorithms.calib_data import CalibConfig  # noqa: E402
from lowbit.models.synthetic import LlamaShape, write_random_llama  # noqa: E402

TARGET_S = 120.0
FULL_LAYERS = 32


class RandomTokens:
    """Stands in for a tokenizer: any text becomes ``count`` pseudo-random ids < ``vocab``."""

    def __init__(self, vocab: int, count: int, seed: int = 0) -> None:
        self.ids = torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": self.ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: 32 on GPU, 2 on CPU)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lowbit-bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    layers = args.layers or (FULL_LAYERS if device.type == "cuda" else 2)
    shape = LlamaShape(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)
    path = Path(args.workdir) / f"llama7b-{layers}l-fp16"
    if not (path / "config.json").exists():
        print(f"writing a random-weight Llama-2-7B shape with {layers} blocks (fp16) to {path} …", flush=True)
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        write_random_llama(path, shape, dtype=torch.float16)

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = lowbit.load(path, dtype=dtype, lazy_blocks=True)
    recipe = lowbit.QuantRecipe(lowbit.QuantSpec.int_(4, 128, symmetric=False), method="gptq")
    calib = CalibConfig(samples=args.samples, seq_len=args.seq_len)
    tokens = RandomTokens(shape.vocab_size, args.samples * args.seq_len)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    lowbit.quantize(model, recipe, calibration=calib, tokenizer=tokens, device=str(device), show_progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    per_block = seconds / layers
    full = per_block * FULL_LAYERS
    measured = layers == FULL_LAYERS and args.samples == 128 and args.seq_len == 2048
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nGPTQ w4g128 (act-order, static groups, true-sequential, shared Hessians) on {name}")
    print(f"  {layers} blocks × {args.samples} × {args.seq_len} calibration tokens: {seconds:.1f} s "
          f"({per_block:.2f} s per block)")
    label = "measured" if measured else "extrapolated from this run (per-block time × 32; not the full protocol)"
    print(f"  Llama-2-7B, 32 blocks: {full:.1f} s — {label}; target ≤ {TARGET_S:.0f} s on one H100 "
          f"({'met' if full <= TARGET_S else 'not met'})")
    if args.json:
        print(json.dumps({"device": name, "layers": layers, "samples": args.samples, "seq_len": args.seq_len,
                          "seconds": seconds, "seconds_per_block": per_block, "seconds_32_blocks": full,
                          "full_protocol": measured}))


if __name__ == "__main__":
    main()
