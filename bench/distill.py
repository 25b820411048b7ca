"""Knowledge distillation on the built-in LM: what KD adds over plain cross-entropy, and pruning recovery.

Teacher: builtin:tiny-lm (Llama, 4 blocks, hidden 256). Student: the same architecture with 2 blocks
(``student_from_config(teacher, {"num_hidden_layers": 2})``), initialised randomly (seed 0) or from the teacher
(blocks 0 and 3, embeddings / norms / tied head copied). Each row trains for N steps on the built-in calibration
text (src/lowbit/data/tiny-lm/calib.txt, ``--seq-len`` windows, ``--batch-size`` rows per step, AdamW, linear decay
from ``--lr``, the same row order for every row) with
  CE          plain token-mean cross-entropy (lowbit's Trainer)
  KD          forward KL to the live teacher at T = ``--temperature`` (DistillTrainer, alpha 1)
  KD top-k    the same against the teacher's cached top-``--top-k`` log-probs + the rest bucket (cache built once,
              its build time shown in its own row)
and is scored by perplexity on the held-out text (eval.txt, non-overlapping ``--seq-len`` windows).
Seconds: wall time of training only (1 CPU thread unless ``--threads``).

Pruning recovery (when lowbit.compress.structured exists): the teacher structurally pruned (``--heads`` of the
heads = KV groups, ``--mlp`` of the MLP neurons, calibrated on 64 × 256 tokens of the built-in corpus), then
distilled from the unpruned teacher; "recovered" = (ppl_pruned − ppl_after) / (ppl_pruned − ppl_teacher).

    python bench/distill.py [--steps 200 500] [--batch-size 8] [--seq-len 128] [--lr 1e-3] [--top-k 64]
                            [--prune-steps 100] [--threads 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.compress.distill import DistillTrainer, build_logit_cache, student_from_config
from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
from lowbit.models.resolve import builtin_dir
from lowbit.quantize import load_tokenizer
from lowbit.train import TrainConfig, Trainer, load_causal_lm_data


def held_out_ppl(model: torch.nn.Module, ids: torch.Tensor, seq_len: int) -> float:
    return perplexity(model, ids, seq_len=seq_len, batch_size=16).ppl


def train(student: torch.nn.Module, teacher: torch.nn.Module | None, data, steps: int, args, cache=None) -> float:
    """Train in place; returns seconds. teacher None and no cache: plain CE."""
    config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, seed=0, show_progress=False,
                         log_every=max(1, steps))
    if teacher is None and cache is None:
        trainer = Trainer(student, config, data)
    else:
        trainer = DistillTrainer(student, config, data, teacher, temperature=args.temperature, cache=cache)
    return trainer.train().seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="*", default=[200, 500])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--prune-steps", type=int, nargs="*", default=[50, 200])
    p.add_argument("--heads", type=float, default=0.5)
    p.add_argument("--mlp", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    teacher = lowbit.load("builtin:tiny-lm")
    tok = load_tokenizer(teacher)
    data = load_causal_lm_data(builtin_dir("tiny-lm") / "calib.txt", tok, args.seq_len)
    eval_ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    teacher_ppl = held_out_ppl(teacher, eval_ids, args.seq_len)
    rows = [{"model": "teacher (4 blocks)", "steps": 0, "ppl": teacher_ppl, "seconds": 0.0}]
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-distill-bench-"))
    t0 = time.perf_counter()
    cache = build_logit_cache(teacher, data, tmp / "topk.safetensors", k=args.top_k, temperature=args.temperature,
                              batch_size=16, show_progress=False)
    rows.append({"model": f"teacher top-{args.top_k} cache build ({cache.path.stat().st_size / 1e6:.1f} MB)",
                 "steps": 0, "ppl": None, "seconds": time.perf_counter() - t0})
    variants = [("random init + CE", "random", False, False), ("random init + KD", "random", True, False),
                ("teacher init + CE", "teacher", False, False), ("teacher init + KD", "teacher", True, False),
                (f"teacher init + KD top-{args.top_k} cached", "teacher", True, True)]
    for steps in args.steps:
        for name, init, kd, cached in variants:
            student = student_from_config(teacher, {"num_hidden_layers": 2}, init=init, seed=0)
            seconds = train(student, teacher if kd and not cached else None, data, steps, args,
                            cache if cached else None)
            rows.append({"model": f"2 blocks: {name}", "steps": steps, "ppl": held_out_ppl(student, eval_ids,
                                                                                         args.seq_len),
                         "seconds": seconds})
            print(f"  {rows[-1]}", file=sys.stderr)
    if importlib.util.find_spec("lowbit.compress.structured") is not None and args.prune_steps:
        rows += prune_recovery(teacher, tok, data, eval_ids, teacher_ppl, args)
    print(f"Distillation on builtin:tiny-lm — held-out perplexity (eval.txt, {args.seq_len}-token windows); "
          f"batch {args.batch_size} × {args.seq_len} tokens, lr {args.lr}, T {args.temperature}, "
          f"{args.threads} thread(s)\n")
    print("| model | steps | held-out ppl | recovered | seconds |\n|---|---:|---:|---:|---:|")
    for r in rows:
        ppl = "" if r["ppl"] is None else f"{r['ppl']:.2f}"
        rec = f"{100 * r['recovered']:.0f} %" if r.get("recovered") is not None else ""
        print(f"| {r['model']} | {r['steps'] or ''} | {ppl} | {rec} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


def prune_recovery(teacher, tok, data, eval_ids, teacher_ppl: float, args) -> list[dict]:
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.compress.structured import StructuredConfig, prune_structured

    pruned = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    prune_structured(pruned, StructuredConfig(heads=args.heads, mlp=args.mlp), tokenizer=tok,
                     calib=CalibConfig(source="builtin", samples=64, seq_len=256))
    prune_seconds = time.perf_counter() - t0
    size = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in teacher.parameters())
    base = held_out_ppl(pruned, eval_ids, args.seq_len)
    label = f"pruned ({100 * args.heads:.0f} % heads, {100 * args.mlp:.0f} % MLP; {100 * size:.0f} % of params)"
    rows = [{"model": label, "steps": 0, "ppl": base, "seconds": prune_seconds}]
    for steps in args.prune_steps:
        for name, kd in (("+ CE", False), ("+ KD", True)):
            student = copy.deepcopy(pruned)
            for q in student.parameters():
                q.requires_grad_(True)
            seconds = train(student, teacher if kd else None, data, steps, args)
            ppl = held_out_ppl(student, eval_ids, args.seq_len)
            recovered = (base - ppl) / (base - teacher_ppl) if base > teacher_ppl else math.nan
            rows.append({"model": f"pruned {name}", "steps": steps, "ppl": ppl, "recovered": recovered,
                         "seconds": seconds})
            print(f"  {rows[-1]}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
