"""``lowbit eval``: size, perplexity (optionally strided), KL divergence against a reference, multiple-choice
tasks, embedding similarity and generation speed of one model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.errors import InvalidSpecError, LowbitError

TEXT_KEYS = ("params", "size_bytes", "bits_per_weight", "prefill_tokens_per_s", "decode_tokens_per_s",
             "peak_memory_bytes", "ppl", "tokens", "stride", "kl", "kl_median", "kl_p99", "kl_max", "top1_agreement",
             "kl_tokens", "kl_ppl", "kl_reference_ppl", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n",
             "chance", "cosine", "sentences")


def add_parser(sub: Any, common: Any) -> None:
    e = sub.add_parser("eval", help="size, bits per weight, perplexity, KL divergence, tasks, similarity, speed",
                       description="Measure MODEL (HF directory, lowbit directory, .gguf or builtin:tiny-lm). "
                                   "Perplexity and KL divergence use the same windows of the tokenized text for "
                                   "every model: non-overlapping --seq-len windows, or sliding ones with --stride.")
    e.add_argument("model", help="model directory, .gguf file or builtin:tiny-lm")
    e.add_argument("--ppl", nargs="?", const="builtin", default=None, metavar="TEXTFILE",
                   help="perplexity on TEXTFILE (no value: the built-in held-out text)")
    e.add_argument("--seq-len", type=int, default=256, help="perplexity / KL window in tokens (default 256)")
    e.add_argument("--stride", type=int, default=None, metavar="S",
                   help="--ppl/--kl: sliding windows of --seq-len tokens advancing by S, each scoring only its "
                        "last S tokens (Hugging Face's strided perplexity; default: non-overlapping windows)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--kl", nargs="?", const="source", default=None, metavar="REFERENCE",
                   help="KL(P_reference ‖ P_model) per token (nats) and top-1 agreement against REFERENCE (a model "
                        "with the same tokenizer; no value: the model this one was quantized from), streamed "
                        "window by window over --kl-text; reports kl, kl_median, kl_p99, kl_max, top1_agreement, "
                        "kl_tokens")
    e.add_argument("--kl-text", default="builtin", metavar="TEXTFILE",
                   help="text for --kl (default: the built-in held-out text)")
    e.add_argument("--tasks", nargs="?", const="builtin", default=None, metavar="FILE.jsonl",
                   help="multiple-choice accuracy (lm-eval's loglikelihood scoring) on a JSONL file of "
                        '{"context", "choices", "answer"[, "task"]} lines; reports acc, acc_norm (length-'
                        "normalised), their stderr and n (no value: the built-in cloze tasks of tiny-lm)")
    e.add_argument("--similarity", nargs="?", const="builtin", default=None, metavar="TEXTFILE",
                   help="mean cosine of sentence embeddings vs --reference, one sentence per line "
                        "(no value: lines of the built-in held-out text)")
    e.add_argument("--reference", default=None,
                   help="float model for --similarity (default: the model this one was quantized from)")
    e.add_argument("--speed", action="store_true",
                   help="generation speed: prefill a fixed 128-token prompt, then greedily decode 128 tokens "
                        "with the compiled decode loop (one warm-up run, median of 3); reports "
                        "prefill_tokens_per_s, decode_tokens_per_s and peak_memory_bytes (peak RSS on CPU)")
    e.add_argument("--no-compile", dest="compile", action="store_false",
                   help="--speed: decode eagerly instead of through torch.compile")
    e.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    e.add_argument("--adapter", default=None, metavar="DIR",
                   help="evaluate MODEL with this peft adapter (lowbit finetune's OUT, or one peft wrote)")
    common(e)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli import _set_threads
    from lowbit.eval.size import model_size
    from lowbit.io.checkpoint import load

    _set_threads(args.threads)
    if args.stride is not None and args.ppl is None and args.kl is None:
        raise InvalidSpecError("--stride applies to --ppl and --kl")
    if args.kl_text != "builtin" and args.kl is None:
        raise InvalidSpecError("--kl-text applies to --kl")
    if args.adapter:
        from lowbit.peft.finetune import load_with_adapter

        model = load_with_adapter(args.model, args.adapter)
    else:
        model = load(args.model)
    summary: dict[str, Any] = {"model": args.model, **model_size(model).to_dict()}
    if args.adapter:
        summary["adapter"] = str(args.adapter)
    if args.speed:
        summary.update(_eval_speed(model, args))
    if args.ppl is not None:
        summary.update(_eval_ppl(model, args))
    if args.kl is not None:
        summary.update(_eval_kl(model, args))
    if args.tasks is not None:
        summary.update(_eval_tasks(model, args))
    if args.similarity is not None:
        summary.update(_eval_similarity(model, args))
    if not args.json:
        print(f"{args.model}")
        for key in TEXT_KEYS:
            if key in summary:
                print(f"  {key:<16} {summary[key]}")
        for name, score in summary.get("tasks", {}).items():
            print(f"  {name:<16} acc {score['acc']:.4f}  acc_norm {score['acc_norm']:.4f}  n {score['n']}")
    return summary


def _require_lm(model: Any, args: argparse.Namespace, flag: str) -> None:
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise LowbitError(f"{args.model}: {flag} needs a causal language model; this one has no LM head"
                          + (" (use --similarity for encoders)" if flag == "--ppl" else ""))


def _text_path(value: str) -> Path:
    from lowbit.models.resolve import builtin_dir

    return builtin_dir("tiny-lm") / "eval.txt" if value == "builtin" else Path(value)


def _source_model(model: Any, args: argparse.Namespace, need: str) -> str:
    """The float model ``model`` was quantized from (its config's quantization_config.source); else an error
    saying ``MODEL: <need>``."""
    from lowbit.models.resolve import read_json

    qcfg = read_json(Path(model.lowbit_source) / "config.json").get("quantization_config") or {}
    source = qcfg.get("source")
    if source is None:
        raise LowbitError(f"{args.model}: {need}")
    return str(source)


def _eval_speed(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.eval.speed import measure_speed

    _require_lm(model, args, "--speed")
    report = measure_speed(model, compile=args.compile)
    return {"prefill_tokens_per_s": round(report.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(report.decode_tokens_per_s, 2),
            "peak_memory_bytes": report.peak_memory_bytes, "speed_prompt_tokens": report.prompt_tokens,
            "speed_new_tokens": report.new_tokens, "compiled": report.compiled, "device": report.device}


def _eval_ppl(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
    from lowbit.quantize import load_tokenizer

    _require_lm(model, args, "--ppl")
    path = _text_path(args.ppl)
    ids = tokenize_text(load_tokenizer(model), read_text(path))
    result = perplexity(model, ids, seq_len=args.seq_len, batch_size=args.batch_size, stride=args.stride,
                        show_progress=not args.quiet)
    out = {"ppl": round(result.ppl, 4), "tokens": result.tokens, "seq_len": result.seq_len, "ppl_text": str(path)}
    if args.stride is not None:
        out["stride"] = args.stride
    return out


def _eval_kl(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.eval.kl import check_same_vocabulary, kl_divergence
    from lowbit.eval.perplexity import model_device, read_text, tokenize_text
    from lowbit.io.checkpoint import load
    from lowbit.quantize import load_tokenizer

    _require_lm(model, args, "--kl")
    reference_name = args.kl
    if args.kl == "source":
        reference_name = _source_model(model, args, "--kl needs a REFERENCE model (--kl REFERENCE); this one "
                                                    "records no model it was quantized from")
    path = _text_path(args.kl_text)
    text = read_text(path)
    reference = load(reference_name, device=model_device(model))
    _require_lm(reference, argparse.Namespace(model=reference_name), "--kl")
    tokenizer = load_tokenizer(model)
    check_same_vocabulary(tokenizer, load_tokenizer(reference), args.model, reference_name)
    result = kl_divergence(model, reference, tokenize_text(tokenizer, text), seq_len=args.seq_len,
                           batch_size=args.batch_size, stride=args.stride, show_progress=not args.quiet)
    out = {"kl": result.kl, "kl_median": result.kl_median, "kl_p99": result.kl_p99, "kl_max": result.kl_max,
           "top1_agreement": result.top1_agreement, "kl_tokens": result.tokens,
           "kl_ppl": round(result.ppl, 4), "kl_reference_ppl": round(result.reference_ppl, 4),
           "kl_reference": reference_name, "kl_text": str(path), "seq_len": result.seq_len}
    if args.stride is not None:
        out["stride"] = args.stride
    return out


def _eval_tasks(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.eval.tasks import DEFAULT_TASK, evaluate_tasks, read_tasks
    from lowbit.models.resolve import builtin_dir
    from lowbit.quantize import load_tokenizer

    _require_lm(model, args, "--tasks")
    path = builtin_dir("tiny-lm") / "tasks.jsonl" if args.tasks == "builtin" else Path(args.tasks)
    items = read_tasks(path)
    result = evaluate_tasks(model, load_tokenizer(model), items, batch_size=args.batch_size,
                            show_progress=not args.quiet)
    out: dict[str, Any] = {**result.overall.to_dict(), "tasks_file": str(path)}
    if set(result.tasks) != {DEFAULT_TASK}:
        out["tasks"] = {name: score.to_dict() for name, score in result.tasks.items()}
    return out


def _eval_similarity(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.eval.perplexity import read_text
    from lowbit.eval.similarity import embedding_similarity
    from lowbit.io.checkpoint import load
    from lowbit.quantize import load_tokenizer

    reference = args.reference if args.reference is not None else _source_model(
        model, args, "--similarity needs --reference (the float model to compare with)")
    path = _text_path(args.similarity)
    sentences = [line.strip() for line in read_text(path).splitlines() if len(line.strip()) > 20][:512]
    if not sentences:
        raise InvalidSpecError(f"{path}: no sentences (lines longer than 20 characters) to embed")
    ref_model = load(reference)
    cosine = embedding_similarity(model, ref_model, load_tokenizer(model), sentences, show_progress=not args.quiet)
    return {"cosine": round(cosine, 6), "sentences": len(sentences), "reference": str(reference)}
