"""Decode speed of lowbit's compiled loop vs transformers (and llama.cpp), same run, as ratios.

Models (``--models``):
  demo  the built-in tiny-lm (4.2 M params)
  1b    a random-weight ~1 B Llama of TinyLlama's shape (hidden 2048, intermediate 5632, 22 layers,
        GQA 32/4, vocab 4096), written once to ``--workdir`` (4.0 GB fp32)
  7b    a random-weight Llama-2-7B (CUDA only; written in fp16)

Protocol (every row): a ``--prompt-tokens`` (32) pseudo-random prompt, ``--new-tokens`` (128) greedy
tokens, decode tokens/s = tokens after the first / time after the prefill, median of ``--repeats``
rounds; every configuration is loaded and warmed up first, then each round measures them all in turn.
  transformers  ``model.generate`` eager (its default dynamic cache); decode time = t(N) − t(1)
  lowbit        :class:`lowbit.generate.Generator` (static cache, compiled decode step), after one
                warm-up generation (compilation); fp32, int8 per-channel sym, int4-g128 asym/sym (RTN);
                ``+head``: the output head (lm_head; untied from the input embedding where the two are
                tied) in int8 per-channel sym as well, as llama.cpp quantizes ``output.weight``
  llama.cpp     ``--gguf FILE [FILE …]`` with llama-cpp-python installed: same prompt length and tokens
The memory-bandwidth limit is measured in the same run (reading a 1 GiB buffer) and turned into the
decode rate at which every weight byte a token reads is read once.

    python bench/generate.py [--models demo 1b] [--threads 2] [--gguf q4_0.gguf] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lowbit  # noqa: E402
from lowbit.formats.spec import QuantSpec  # noqa: E402
from lowbit.recipe import LayerOverride, QuantRecipe  # noqa: E402
from lowbit.generate import Generator  # noqa: E402
from lowbit.models.synthetic import LlamaShape, write_random_llama  # noqa: E402

SHAPES = {
    "1b": LlamaShape(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=4096),
    "7b": LlamaShape(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
}
INT8_HEAD = (LayerOverride("lm_head", QuantSpec.int_(8, None)),)  # int8 per-channel sym output head (untied)
LOWBIT_FORMATS: dict[str, QuantSpec | QuantRecipe | None] = {
    "fp32": None,
    "int8": QuantSpec.int_(8, None),
    "int4-g128": QuantSpec.int_(4, 128, symmetric=False),
    "int4-g128-sym": QuantSpec.int_(4, 128),
    "int8+head": QuantRecipe(QuantSpec.int_(8, None), overrides=INT8_HEAD),
    "int4-g128+head": QuantRecipe(QuantSpec.int_(4, 128, symmetric=False), overrides=INT8_HEAD),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "1b"], choices=("demo", "1b", "7b"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=list(LOWBIT_FORMATS), choices=list(LOWBIT_FORMATS))
    parser.add_argument("--no-peers", action="store_true", help="skip transformers (slow on the 1b model)")
    parser.add_argument("--gguf", nargs="*", default=[], help="GGUF files of the same weights for llama.cpp")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lowbit-bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bandwidth = read_bandwidth(device)
    print(f"device {device}, {torch.get_num_threads()} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    results: dict[str, Any] = {"device": str(device), "bandwidth_bytes_per_s": bandwidth, "models": {}}
    for name in args.models:
        if name == "7b" and device.type != "cuda":
            print("7b: skipped (GPU only)")
            continue
        results["models"][name] = bench_model(name, args, device, bandwidth)
    if args.json:
        print(json.dumps(results))


def bench_model(name: str, args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict[str, Any]:
    """Every configuration is loaded (and compiled) first; then ``--repeats`` rounds measure each once
    in turn, so a machine whose speed drifts (other tenants, clocks) shifts every row alike."""
    source = model_source(name, Path(args.workdir), device)
    vocab = 4096 if name == "demo" else SHAPES[name].vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    print(f"\n== {name}: {source}", flush=True)
    float_dtype = torch.float32 if device.type == "cpu" else torch.float16
    contenders: list[tuple[str, Callable[[], float], int | None]] = []
    float_model = None
    if not args.no_peers:
        for dtype in ([torch.float32, torch.bfloat16] if device.type == "cpu" else [torch.float16]):
            model = lowbit.load(source, dtype=dtype, device=device)
            float_model = model if dtype == float_dtype else float_model
            contenders.append((f"transformers eager {str(dtype)[6:]}", hf_decoder(model, prompt, args),
                               weight_bytes(model)))
    for fmt in args.formats:
        spec = LOWBIT_FORMATS[fmt]
        if spec is None and float_model is not None:
            model = float_model  # the same weights; the Generator keeps its own static cache
        else:
            model = lowbit.load(source, dtype=float_dtype, device=device)
        if spec is not None:
            model = lowbit.quantize(model, spec)
        kernels = sorted({m.kernel_name for m in model.modules() if isinstance(m, lowbit.QuantLinear)})
        label = f"lowbit {fmt if spec is not None else str(float_dtype)[6:]}" + (f" [{','.join(kernels)}]" if kernels else "")
        print(f"  compiling {label} …", flush=True)
        contenders.append((label, lowbit_decoder(model, prompt, args), weight_bytes(model)))
    for path in args.gguf:
        decoder = llama_cpp_decoder(path, args)
        contenders.append((f"llama.cpp {Path(path).name}", decoder, None) if callable(decoder)
                          else (f"llama.cpp {Path(path).name}", lambda d=decoder: d, None))
    rates: dict[str, list[float]] = {label: [] for label, _, _ in contenders}
    notes: dict[str, str] = {}
    for round_ in range(args.repeats):
        for label, measure, _ in contenders:
            value = measure()
            if isinstance(value, str):
                notes[label] = value
            else:
                rates[label].append(value)
        print(f"  round {round_ + 1}/{args.repeats}: " + ", ".join(f"{label.split(' [')[0]} {r[-1]:.1f}"
                                                                for label, r in rates.items() if r), flush=True)
    rows = [row(label, notes.get(label) or statistics.median(rates[label]), nbytes)
            for label, _, nbytes in contenders]
    print_table(name, rows, bandwidth)
    release()
    return {"rows": rows, "rounds": rates}


def row(label: str, tokens_per_s: float | str, bytes_per_token: int | None) -> dict[str, Any]:
    print(f"  {label:<44} {tokens_per_s if isinstance(tokens_per_s, str) else f'{tokens_per_s:8.2f} tok/s'}",
          flush=True)
    return {"label": label, "decode_tokens_per_s": tokens_per_s, "bytes_per_token": bytes_per_token}


def print_table(name: str, rows: list[dict[str, Any]], bandwidth: float) -> None:
    def rate(prefix: str) -> float | None:
        for r in rows:
            if r["label"].startswith(prefix) and isinstance(r["decode_tokens_per_s"], float):
                return r["decode_tokens_per_s"]
        return None

    hf32, ours32 = rate("transformers eager float32"), rate("lowbit float32")
    print(f"\n{name}: decode tokens/s (ratios in the same run)")
    print(f"  {'':<44} {'tok/s':>8} {'× hf fp32':>10} {'× lowbit fp32':>14} {'% bw limit':>11}")
    for r in rows:
        value = r["decode_tokens_per_s"]
        if not isinstance(value, float):
            print(f"  {r['label']:<44} {value}")
            continue
        limit = bandwidth / r["bytes_per_token"] if r["bytes_per_token"] else None
        print(f"  {r['label']:<44} {value:8.2f} {fmt_ratio(value, hf32):>10} {fmt_ratio(value, ours32):>14} "
              f"{'' if limit is None else f'{100 * value / limit:10.0f}%':>11}")


def fmt_ratio(value: float, base: float | None) -> str:
    return "" if not base else f"{value / base:.2f}×"


# ---- measurements --------------------------------------------------------------------------
def hf_decoder(model: torch.nn.Module, prompt: torch.Tensor, args: argparse.Namespace) -> Callable[[], float]:
    prompt = prompt.to(next(model.parameters()).device)

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(prompt.device)
        return time.perf_counter() - start

    run(2)  # warm-up

    def measure() -> float:
        t1, tn = run(1), run(args.new_tokens)
        return (args.new_tokens - 1) / max(tn - t1, 1e-9)

    return measure


def lowbit_decoder(model: torch.nn.Module, prompt: torch.Tensor, args: argparse.Namespace) -> Callable[[], float]:
    gen = Generator(model, max_cache_len=args.prompt_tokens + args.new_tokens, compile=True)
    gen.generate(prompt, 4)  # compile
    if not gen.compiled:
        print("  (compilation failed: eager)")
    return lambda: gen.generate(prompt, args.new_tokens).decode_tokens_per_s


def llama_cpp_decoder(path: str, args: argparse.Namespace) -> Callable[[], float] | str:
    try:
        from llama_cpp import Llama
    except ImportError as err:
        return f"n/a (llama-cpp-python not installed: {err})"
    llm = Llama(model_path=path, n_ctx=args.prompt_tokens + args.new_tokens + 8, n_threads=torch.get_num_threads(),
                verbose=False, logits_all=False)
    prompt = torch.randint(0, llm.n_vocab(), (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()

    def measure() -> float:
        llm.reset()
        llm.eval(prompt)
        token = llm.sample(temp=0.0)
        start = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        return (args.new_tokens - 1) / (time.perf_counter() - start)

    return measure


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of reading a buffer much larger than the last-level cache (best of 5)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        buf.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    del buf
    return nbytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every parameter/buffer once, except the input embedding (one row)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    total = 0
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor is embed and not (head_weight is not None and head_weight is embed):
            total += embed.shape[1] * embed.element_size()
            continue
        total += tensor.numel() * tensor.element_size()
    return total


def model_source(name: str, workdir: Path, device: torch.device) -> str:
    if name == "demo":
        return "builtin:tiny-lm"
    path = workdir / f"llama-{name}"
    if not (path / "config.json").exists():
        print(f"writing a random-weight {name} Llama to {path} …", flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        write_random_llama(path, SHAPES[name], dtype=torch.float16 if name == "7b" else torch.float32)
    return str(path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
