"""``lowbit distill``: train a smaller (or pruned) student to imitate a teacher LM, write it as a model directory.

OUT is a model directory (``config.json``, ``model.safetensors``, tokenizer files) that ``lowbit.load`` and
transformers load, and it also holds the run: ``train_log.csv``/``.jsonl``, ``loss.png``, ``checkpoint/`` (for
``--resume``), the teacher cache ``teacher_topk.safetensors`` (with ``--top-k``) and ``lowbit_distill.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from lowbit.errors import InvalidSpecError
from lowbit.io.writer import prepare_run_dir, replace_durably, write_json_durably

CACHE_NAME = "teacher_topk.safetensors"
RUN_FILE = "lowbit_distill.json"


def add_parser(sub: Any, common: Any) -> None:
    d = sub.add_parser("distill", help="distill a teacher LM into a smaller, pruned or quantized student",
                       description="Train --student to match TEACHER's next-token distributions on --data "
                                   "(KL at --temperature, mixed with cross-entropy by --alpha, optionally hidden-state "
                                   "MSE) and write it to OUT as a model directory. --top-k K runs the teacher once "
                                   "and trains against its cached top-K log-probs (+ the rest's mass), so the "
                                   "teacher is not in memory while training.")
    d.add_argument("teacher", help="teacher model directory or builtin:tiny-lm")
    d.add_argument("--student", required=True,
                   help="a model directory (pruned / quantized / QAT'd: its float parameters are trained), or a "
                        "config JSON: overrides of the teacher's config (e.g. {\"num_hidden_layers\": 2}) or a full "
                        "config.json (with model_type)")
    d.add_argument("--init", default="teacher", choices=("teacher", "random"),
                   help="config students: copy the teacher's weights (evenly spaced blocks; needs equal widths, "
                        "default) or keep the random initialisation")
    d.add_argument("--data", required=True, help="training text: .txt / directory of texts / .jsonl")
    d.add_argument("--eval-data", default=None, help="held-out text (default: --eval-fraction of --data)")
    d.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of --data (default 0.1)")
    d.add_argument("-o", "--out", required=True, help="output model directory (also holds logs and checkpoint)")
    d.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    d.add_argument("--resume", action="store_true", help="continue the run saved in OUT/checkpoint")
    k = d.add_argument_group("distillation")
    k.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T (loss × T²; default 1)")
    k.add_argument("--alpha", type=float, default=1.0, help="weight of the KL; 1 − alpha goes to cross-entropy")
    k.add_argument("--kl", default="forward", choices=("forward", "reverse"),
                   help="forward KL(teacher ‖ student) (default) or reverse KL(student ‖ teacher)")
    k.add_argument("--top-k", type=int, default=0,
                   help="cache the teacher's top-K log-probs once and train against them (0 = live teacher)")
    k.add_argument("--cache", default=None, help=f"teacher cache file (default OUT/{CACHE_NAME}); reused when it "
                                                 "matches the data, k and temperature")
    k.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state MSE (live teacher)")
    k.add_argument("--layer-map", default=None, metavar="S:T,...",
                   help="hidden-state pairs, student:teacher indices (0 = embeddings, i = block i's output); "
                        "default: evenly spaced blocks")
    t = d.add_argument_group("training")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--schedule", default="linear", choices=("linear", "cosine", "constant"))
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (default: steps/10)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    common(d)


def _check_flags(args: argparse.Namespace) -> None:
    if args.steps < 1 or args.top_k < 0 or args.hidden_weight < 0 or args.seq_len < 2:
        raise InvalidSpecError("--steps must be ≥ 1, --seq-len ≥ 2, --top-k and --hidden-weight ≥ 0")
    if args.top_k and args.hidden_weight:
        raise InvalidSpecError("--hidden-weight needs the live teacher; it cannot be combined with --top-k")
    if args.layer_map and not args.hidden_weight:
        raise InvalidSpecError("--layer-map applies to the hidden-state loss: give --hidden-weight too")


def load_student(ref: str, teacher: Any, *, init: str, seed: int) -> tuple[Any, str]:
    """The student and its kind (``config``, ``float`` or ``quantized``) from a directory or a config JSON."""
    import lowbit
    from lowbit.compress.distill import check_same_tokenizer, student_from_config
    from lowbit.quantize import load_tokenizer

    path = Path(ref)
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidSpecError(f"{path}: not a JSON config ({exc})") from None
        if not isinstance(config, dict):
            raise InvalidSpecError(f"{path}: a student config must be a JSON object")
        return student_from_config(teacher, config, init=init, seed=seed, where=str(path)), "config"
    student = lowbit.load(ref)
    check_same_tokenizer(load_tokenizer(teacher), load_tokenizer(student), "the teacher", str(ref))
    quantized = bool(getattr(student, "lowbit_method", None))
    for p in student.parameters():
        p.requires_grad_(p.is_floating_point())
    return student, "quantized" if quantized else "float"


def cmd_distill(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    import lowbit
    from lowbit.compress.distill import DistillTrainer, LogitCache, build_logit_cache, parse_layer_map
    from lowbit.quantize import load_tokenizer
    from lowbit.train import TrainConfig, load_causal_lm_data, split_eval
    from lowbit.train.trainer import eval_loss

    _check_flags(args)
    layer_map = parse_layer_map(args.layer_map) if args.layer_map else None
    out = Path(args.out)
    prepare_run_dir(out, resume=args.resume, overwrite=args.overwrite)
    start = time.perf_counter()
    teacher = lowbit.load(args.teacher)
    tokenizer = load_tokenizer(teacher)
    student, kind = load_student(args.student, teacher, init=args.init, seed=args.seed)
    data = load_causal_lm_data(args.data, tokenizer, args.seq_len)
    if args.eval_data:
        train, held_out = data, load_causal_lm_data(args.eval_data, tokenizer, args.seq_len)
    elif args.eval_fraction > 0 and len(data) >= 2:
        train, held_out = split_eval(data, args.eval_fraction, seed=args.seed)
    else:
        train, held_out = data, None
    teacher_ppl = math.exp(eval_loss(teacher, held_out, batch_size=args.batch_size)) if held_out else None
    cache, cache_info = None, None
    if args.top_k:
        path = Path(args.cache) if args.cache else out / CACHE_NAME
        built = not path.is_file()
        t0 = time.perf_counter()
        if built:
            cache = build_logit_cache(teacher, train, path, k=args.top_k, temperature=args.temperature,
                                      batch_size=args.batch_size, show_progress=not args.quiet)
        else:
            cache = LogitCache(path)
            cache.check(train, k=args.top_k, temperature=args.temperature)
        cache_info = {"path": str(path), "built": built, "k": args.top_k, "seconds": round(time.perf_counter() - t0, 3),
                      "bytes": path.stat().st_size}
        del teacher  # training reads the cache: the teacher leaves memory
        teacher = None
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, schedule=args.schedule, seed=args.seed,
                         log_every=args.log_every, checkpoint_every=args.checkpoint_every or max(1, args.steps // 10),
                         resume=args.resume, compute_dtype=args.compute_dtype, show_progress=not args.quiet,
                         out_dir=out)
    trainer = DistillTrainer(student, config, train, teacher, temperature=args.temperature, alpha=args.alpha,
                             kl=args.kl, eval_data=held_out, cache=cache, hidden_weight=args.hidden_weight,
                             layer_map=layer_map)
    before = trainer.evaluate() if held_out is not None else None
    result = trainer.train()
    student.eval()
    save_model_into(student, out, tokenizer)
    trainable = sum(p.numel() for p in trainer.named.values())
    summary = {
        "out": str(out), "teacher": args.teacher, "student": args.student, "student_kind": kind,
        "init": args.init if kind == "config" else None, "steps": result.steps, "tokens": result.tokens,
        "final_loss": result.final_loss, "eval_loss": result.eval_loss,
        "ppl": {"teacher": teacher_ppl, "student_before": math.exp(before) if before is not None else None,
                "student_after": math.exp(result.eval_loss) if result.eval_loss is not None else None},
        "seconds": round(time.perf_counter() - start, 3), "train_seconds": round(result.seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 2), "trainable_params": trainable,
        "total_params": sum(p.numel() for p in student.parameters()),
        "distill": {"temperature": args.temperature, "alpha": args.alpha, "kl": args.kl, "top_k": args.top_k,
                    "hidden_weight": args.hidden_weight,
                    "layer_map": {str(i): j for i, j in trainer.layer_map.items()} or None},
        "cache": cache_info, "peak_memory_bytes": result.peak_memory_bytes,
    }
    if kind == "quantized":
        summary["note"] = ("quantized student: only its float parameters (embeddings, norms, unquantized head) were "
                           "trained; the packed weights stay fixed (use QAT to train those)")
    write_json_durably(out / RUN_FILE, {"result": summary, "data": str(Path(args.data).resolve()),
                                 "train_config": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in dataclasses.asdict(config).items()}})
    if not args.json:
        ppl = summary["ppl"]
        print(f"distilled {args.teacher} into {args.student} ({kind}): {result.steps} steps, {result.tokens} tokens, "
              f"{result.tokens_per_s:.0f} tokens/s, final loss {result.final_loss:.4f}")
        if ppl["student_after"] is not None:
            print(f"  held-out perplexity: teacher {ppl['teacher']:.2f}, student {ppl['student_before']:.2f} → "
                  f"{ppl['student_after']:.2f}")
        print(f"  model → {out}")
    return summary


def save_model_into(model: Any, out: Path, tokenizer: Any) -> None:
    """Write the model files (weights, config.json, tokenizer) into the existing run directory ``out``.

    Everything is staged in a temp directory first; each file is then fsynced and renamed into place.
    """
    import shutil

    from lowbit.io.checkpoint import save

    staged = out / ".model.tmp"
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        save(model, staged, overwrite=True, source_dir=tok_dir)
    try:
        for item in sorted(staged.iterdir()):
            replace_durably(item, out / item.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)

