"""Structured pruning: what a smaller dense model buys (size, decode speed, float and int4) and what it costs
(perplexity), and how much of that cost distillation from the unpruned model wins back.

Part 1, speed and size (a mid-size random Llama): transformers builds a random Llama from a config (default hidden
768, intermediate 2560, 12 blocks, 16 query heads in 4 KV groups of head_dim 64, vocab 32000: ~144 M parameters)
and saves it to a temporary directory; ``lowbit prune --method structured --heads 0.25 --mlp 0.25`` removes one KV
group (4 query heads + their K/V head) and a quarter of the MLP neurons of every block (importance ``magnitude`` by
default: the weights are random); ``lowbit quantize --bits 4 --group-size 128`` (asymmetric RTN, the output head
kept float, the CLI default) packs each. The shape is chosen so that every linear layer's input width is a multiple
of 128 before and after pruning (group size 128), and LlamaConfig accepts the pruned head count (transformers 5
wants hidden_size to be a multiple of num_attention_heads: 768 = 16·48 = 12·64; a power-of-two width such as 1024
cannot lose 25 % of 16 heads). Columns: parameters (logical weights, the same for float and int4), bytes of the
saved safetensors files, decode tokens/s: lowbit's :class:`lowbit.generate.Generator` (static cache, compiled
decode step; bench/generate.py's ``lowbit_decoder``), a ``--prompt-tokens`` pseudo-random prompt, ``--new-tokens``
greedy tokens, tokens after the first / time after the prefill, median of ``--repeats`` rounds. Every model is
loaded and compiled first, then each round measures all four in turn (so machine drift shifts all alike); the
ratio rows are pruned / dense from the same run. The float output head (vocab × hidden, 98 MB here) is read every
token by both models alike, so it dilutes the int4 ratio most; ``--int8-head`` quantizes it to int8 as well.

Part 2, quality and recovery (the built-in LM, builtin:tiny-lm: Llama, hidden 256, 4 blocks, 4 query heads in 2
KV groups): held-out perplexity on src/lowbit/data/tiny-lm/eval.txt (non-overlapping ``--seq-len`` windows) of the
dense model, of it structurally pruned (``--lm-heads`` 0.5 = one KV group per block, ``--lm-mlp`` 0.25, activation
importance on 64 × 256 tokens of the built-in calibration corpus), and of that pruned model after N steps of
distillation from the dense teacher (DistillTrainer: forward KL to the live teacher at T = 1, alone ("KD") and with
the hidden-state MSE of every block's output ("KD + hidden", ``hidden_weight`` 1); AdamW, lr ``--lr`` decaying
linearly, ``--batch-size`` × ``--seq-len`` tokens a step from the built-in calibration text calib.txt, disjoint from
the eval text). recovered = (ppl_pruned − ppl_after) / (ppl_pruned − ppl_dense).

    .venv/bin/python bench/prune_structured.py [--threads 1] [--steps 50 100 200] [--json out.json]
        [--hidden 768 --intermediate 2560 --layers 12 --q-heads 16 --kv-heads 4 --head-dim 64]
        [--importance magnitude] [--new-tokens 64] [--repeats 5] [--int8-head] [--eager] [--skip-speed]
        [--skip-recovery]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lowbit  # noqa: E402
from lowbit.compress.structured import count_params  # noqa: E402


def _bench_generate() -> Any:
    """bench/generate.py as a module: its decode timing (``lowbit_decoder``) is the one every bench uses."""
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(*argv: str) -> dict[str, Any]:
    """Run a ``lowbit`` command in this process; its ``--json`` report."""
    from lowbit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([*argv, "--json", "--quiet"])
    if rc != 0:
        raise SystemExit(f"lowbit {' '.join(argv)}: exit status {rc}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def st_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ---- part 1: size and decode speed of a mid-size random Llama -----------------------------------------------
def build_random_llama(path: Path, args: argparse.Namespace) -> None:
    import transformers

    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.q_heads,
                                      num_key_value_heads=args.kv_heads, head_dim=args.head_dim, vocab_size=32000,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)


def speed_and_size(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from lowbit.generate import Generator

    gen = _bench_generate()
    dense_dir, pruned_dir = tmp / "dense", tmp / "pruned"
    t0 = time.perf_counter()
    build_random_llama(dense_dir, args)
    print(f"built a random Llama in {time.perf_counter() - t0:.1f} s → {dense_dir}", flush=True)
    t0 = time.perf_counter()
    report = cli("prune", str(dense_dir), "--method", "structured", "--heads", str(args.heads), "--mlp",
                 str(args.mlp), "--importance", args.importance, "-o", str(pruned_dir))
    print(f"pruned in {time.perf_counter() - t0:.1f} s: {report['shape_before']} → {report['shape_after']}",
          flush=True)
    quant_flags = ["--bits", "4", "--group-size", "128", *(["--layer-bits", "lm_head=8"] if args.int8_head else [])]
    fmt4 = "int4-g128" + ("+int8 head" if args.int8_head else "")
    sources = {("dense", "float32"): dense_dir, ("pruned", "float32"): pruned_dir}
    for which, src in (("dense", dense_dir), ("pruned", pruned_dir)):
        t0 = time.perf_counter()
        cli("quantize", str(src), "-o", str(tmp / f"{which}-int4"), *quant_flags)
        print(f"quantized {which} in {time.perf_counter() - t0:.1f} s", flush=True)
        sources[(which, fmt4)] = tmp / f"{which}-int4"
    params = {"dense": report["params_before"], "pruned": report["params_after"]}

    prompt = torch.randint(0, 32000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    measures: dict[tuple[str, str], Callable[[], float]] = {}
    for key, src in sources.items():
        model = lowbit.load(src)
        t0 = time.perf_counter()
        if args.eager:
            g = Generator(model, max_cache_len=args.prompt_tokens + args.new_tokens, compile=False)
            g.generate(prompt, 4)
            measures[key] = lambda g=g: g.generate(prompt, args.new_tokens).decode_tokens_per_s
        else:
            measures[key] = gen.lowbit_decoder(model, prompt, args)
        print(f"ready: {' '.join(key)} ({time.perf_counter() - t0:.1f} s)", flush=True)
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in measures}
    for round_ in range(args.repeats):
        for key, measure in measures.items():
            rates[key].append(measure())
        print(f"  round {round_ + 1}/{args.repeats}: " + ", ".join(f"{' '.join(k)} {r[-1]:.1f}"
                                                                for k, r in rates.items()), flush=True)
    rows = []
    for fmt in ("float32", fmt4):
        for which in ("dense", "pruned"):
            rows.append({"model": which, "format": fmt, "params": params[which],
                         "file_bytes": st_bytes(sources[(which, fmt)]),
                         "decode_tokens_per_s": statistics.median(rates[(which, fmt)]),
                         "rounds": rates[(which, fmt)]})
    return {"shape_before": report["shape_before"], "shape_after": report["shape_after"],
            "importance": args.importance, "threads": torch.get_num_threads(), "compiled": not args.eager,
            "rows": rows}


def print_speed(result: dict[str, Any], args: argparse.Namespace) -> None:
    b, a = result["shape_before"], result["shape_after"]
    print(f"\nStructured pruning of a random Llama (hidden {args.hidden}, vocab 32000): heads "
          f"{b['num_attention_heads']}/{b['num_key_value_heads']} → {a['num_attention_heads']}/"
          f"{a['num_key_value_heads']} (query/KV), intermediate {b['intermediate_size']} → {a['intermediate_size']}, "
          f"{b['num_hidden_layers']} blocks; {result['importance']} importance. Decode: {args.prompt_tokens}-token "
          f"prompt, {args.new_tokens} greedy tokens, median of {args.repeats} interleaved rounds, "
          f"{result['threads']} thread(s), {'compiled' if result['compiled'] else 'eager'}\n")
    print("| model | format | parameters | safetensors bytes | decode tok/s |\n|---|---|---:|---:|---:|")
    rows = result["rows"]
    for i in range(0, len(rows), 2):
        dense, pruned = rows[i], rows[i + 1]
        for r in (dense, pruned):
            print(f"| {r['model']} | {r['format']} | {r['params'] / 1e6:.1f} M | {r['file_bytes'] / 1e6:.1f} MB | "
                  f"{r['decode_tokens_per_s']:.2f} |")
        print(f"| **pruned / dense** | {dense['format']} | {pruned['params'] / dense['params']:.3f}× | "
              f"{pruned['file_bytes'] / dense['file_bytes']:.3f}× | "
              f"{pruned['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.3f}× |")


# ---- part 2: perplexity cost and distillation recovery on the built-in LM -------------------------------------
def recovery(args: argparse.Namespace) -> list[dict[str, Any]]:
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.compress.distill import DistillTrainer
    from lowbit.compress.structured import StructuredConfig, prune_structured
    from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
    from lowbit.models.resolve import builtin_dir
    from lowbit.quantize import load_tokenizer
    from lowbit.train import TrainConfig, load_causal_lm_data

    teacher = lowbit.load("builtin:tiny-lm")
    tok = load_tokenizer(teacher)
    eval_ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    data = load_causal_lm_data(builtin_dir("tiny-lm") / "calib.txt", tok, args.seq_len)

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, eval_ids, seq_len=args.seq_len, batch_size=16).ppl

    dense = ppl(teacher)
    rows = [{"model": "dense", "steps": 0, "params": count_params(teacher), "ppl": dense, "seconds": 0.0}]
    pruned = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    prune_structured(pruned, StructuredConfig(heads=args.lm_heads, mlp=args.lm_mlp), tokenizer=tok,
                     calib=CalibConfig(source="builtin", samples=64, seq_len=256))
    seconds = time.perf_counter() - t0
    base = ppl(pruned)
    rows.append({"model": f"pruned ({100 * args.lm_heads:.0f} % heads, {100 * args.lm_mlp:.0f} % MLP)", "steps": 0,
                 "params": count_params(pruned), "ppl": base, "seconds": seconds})
    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    for steps in args.steps:
        for name, hidden_weight in (("KD", 0.0), ("KD + hidden", 1.0)):
            student = copy.deepcopy(pruned)
            for p in student.parameters():
                p.requires_grad_(True)
            config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, seed=0, show_progress=False,
                                 log_every=steps)
            seconds = DistillTrainer(student, config, data, teacher, hidden_weight=hidden_weight).train().seconds
            after = ppl(student)
            rows.append({"model": f"pruned + {name}", "steps": steps, "params": count_params(student), "ppl": after,
                         "recovered": (base - after) / (base - dense) if base > dense else math.nan,
                         "seconds": seconds})
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def print_recovery(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nbuiltin:tiny-lm — held-out perplexity (eval.txt, {args.seq_len}-token windows); distillation from the "
          f"dense model on calib.txt, batch {args.batch_size} × {args.seq_len} tokens, lr {args.lr}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| model | steps | parameters | held-out ppl | recovered | seconds (prune / train) |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        rec = f"{100 * r['recovered']:.0f} %" if r.get("recovered") is not None else ""
        print(f"| {r['model']} | {r['steps'] or ''} | {r['params'] / 1e6:.2f} M | {r['ppl']:.2f} | {rec} | "
              f"{r['seconds']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write every figure to OUT (JSON)")
    s = p.add_argument_group("part 1: random Llama, size and decode speed")
    s.add_argument("--hidden", type=int, default=768)
    s.add_argument("--intermediate", type=int, default=2560)
    s.add_argument("--layers", type=int, default=12)
    s.add_argument("--q-heads", type=int, default=16)
    s.add_argument("--kv-heads", type=int, default=4)
    s.add_argument("--head-dim", type=int, default=64)
    s.add_argument("--heads", type=float, default=0.25, help="fraction of query heads removed (default 0.25)")
    s.add_argument("--mlp", type=float, default=0.25, help="fraction of MLP neurons removed (default 0.25)")
    s.add_argument("--importance", default="magnitude", choices=("magnitude", "activation", "random"))
    s.add_argument("--prompt-tokens", type=int, default=16)
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--int8-head", action="store_true", help="quantize the output head to int8 as well")
    s.add_argument("--eager", action="store_true", help="decode without compiling (faster start, slower tokens)")
    s.add_argument("--skip-speed", action="store_true")
    r = p.add_argument_group("part 2: built-in LM, perplexity and distillation recovery")
    r.add_argument("--lm-heads", type=float, default=0.5, help="heads removed (0.5 = one of the 2 KV groups)")
    r.add_argument("--lm-mlp", type=float, default=0.25)
    r.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--seq-len", type=int, default=128)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--skip-recovery", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"args": vars(args)}
    if not args.skip_speed:
        with tempfile.TemporaryDirectory(prefix="lowbit-prune-bench-") as tmp:
            results["speed"] = speed_and_size(args, Path(tmp))
        print_speed(results["speed"], args)
    if not args.skip_recovery:
        results["recovery"] = recovery(args)
        print_recovery(results["recovery"], args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
