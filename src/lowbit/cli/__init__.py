"""The ``lowbit`` command line: quantize | eval | generate | finetune | merge | info | demo.

With ``--json`` the last line on stdout is one JSON object; user errors print one line on stderr
and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any, Sequence

from lowbit.errors import InvalidSpecError, LowbitError

FORMAT_CHOICES = ("int", "nf4", "fp4", "fp8", "fp8_e4m3", "fp8_e5m2", "fp16", "bf16")
METHOD_CHOICES = ("rtn", "hqq", "gptq", "awq", "static", "smoothquant", "llm-int8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Quantize, evaluate and inspect language models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model's linear layers and save it",
                       description="Quantize MODEL (HF directory, lowbit directory or builtin:tiny-lm) into OUT, "
                                   "streaming from its safetensors shards one tensor at a time.")
    q.add_argument("model", help="model directory or builtin:tiny-lm")
    q.add_argument("-o", "--out", required=True, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--method", default="rtn", choices=METHOD_CHOICES, help="algorithm (default: rtn, round-to-nearest)")
    q.add_argument("--format", default=None, choices=FORMAT_CHOICES, help="number format (default: int)")
    q.add_argument("--bits", type=int, default=None, help="integer bits: 2, 3, 4, 5, 6 or 8 (default: 4)")
    q.add_argument("--group-size", type=int, default=None,
                   help="columns per scale group (default: 128 for int, 64 for nf4/fp4, per-channel for fp8); "
                        "0 = per output channel, -1 = per tensor")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=None, help="symmetric (zero-point 0)")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric: scale + zero-point (default)")
    q.add_argument("--double-quant", action="store_true", help="8-bit quantize the scales (blocks of 256)")
    q.add_argument("--scale-dtype", default=None, choices=("float16", "bfloat16", "float32"))
    q.add_argument("--skip", action="append", default=None, metavar="PATTERN",
                   help="keep matching layers in float (repeatable; default: lm_head)")
    q.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="quantize only matching layers (repeatable)")
    q.add_argument("--layer-bits", action="append", default=[], metavar="PATTERN=BITS",
                   help="mixed precision: matching layers use BITS instead (repeatable, int format); "
                        "lm_head=8 quantizes the output head too (untied from the embedding where tied)")
    q.add_argument("--tied-head", choices=("untie", "share"), default=None,
                   help="when the quantized lm_head is tied to the input embedding: 'untie' (default) keeps a "
                        "float embedding beside it; 'share' makes the embedding read its rows from the quantized "
                        "head, so the matrix is stored once, quantized (as llama.cpp stores token_embd)")
    q.add_argument("--recipe", default=None, help="JSON/YAML recipe (default spec, skip, include, overrides)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    q.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="cap on this process's memory (e.g. 6GB, 800MiB): work whose estimated peak passes it is "
                        "refused before it starts, and the run stops with an error (nothing written) if the "
                        "resident size goes over it; calibrated methods read one block at a time")
    c = q.add_argument_group("calibration (gptq, awq, static, smoothquant)")
    add_calibration_args(c)
    c.add_argument("--damp", type=float, default=None, help="GPTQ dampening, fraction of mean diag(H) (default 0.05)")
    c.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: columns by decreasing activation energy, with static groups so no runtime "
                        "permutation is needed (default: on)")
    c.add_argument("--device", default="cpu", help="compute device for calibration (cpu, cuda, cuda:1 …)")
    a = q.add_argument_group("activations (static, smoothquant, llm-int8; weights default to int8 per-channel sym)")
    a.add_argument("--alpha", type=float, default=None, help="SmoothQuant migration strength (default 0.5)")
    a.add_argument("--threshold", type=float, default=None, help="LLM.int8 outlier threshold (default 6.0)")
    a.add_argument("--act-dynamic", action="store_true", help="dynamic per-token activation scales (no calibration)")
    a.add_argument("--act-observer", default=None, choices=("minmax", "ema", "percentile", "mse"),
                   help="static activation observer (default minmax)")
    a.add_argument("--act-sym", action="store_true", help="symmetric activation codes (default asymmetric)")
    _common(q)

    from lowbit.cli import eval as eval_cli

    eval_cli.add_parser(sub, _common)

    g = sub.add_parser("generate", help="greedy text generation with the compiled decode loop",
                       description="Greedily continue --prompt with MODEL (static KV cache, compiled decode "
                                   "step; compilation takes a few seconds on the first token).")
    g.add_argument("model", help="model directory or builtin:tiny-lm")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--no-compile", dest="compile", action="store_false", help="decode eagerly")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available, else cpu)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    _common(g)

    from lowbit.cli import distill, export, finetune, importer, merge, plan, prune, qat, report

    finetune.add_parser(sub, _common)
    merge.add_parser(sub, _common)
    export.add_parser(sub, _common)
    importer.add_parser(sub, _common)
    report.add_parser(sub, _common)
    plan.add_parser(sub, _common)
    prune.add_parser(sub, _common)
    distill.add_parser(sub, _common)
    qat.add_parser(sub, _common)

    i = sub.add_parser("info", help="describe a model directory without loading its weights")
    i.add_argument("path")
    _common(i)

    d = sub.add_parser("demo", help="quantize the built-in LM to int8 / int4 / nf4 and compare")
    d.add_argument("--seq-len", type=int, default=256)
    _common(d)
    return parser


def add_calibration_args(group: Any) -> None:
    """The calibration-data flags every calibrated verb shares (quantize, plan)."""
    group.add_argument("--calib", default="builtin", metavar="DATA",
                       help="text file, .jsonl, directory of texts, or saved `datasets` dataset "
                            "(default: built-in corpus)")
    group.add_argument("--calib-field", default="text", help="text field of JSONL records / dataset column")
    group.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    group.add_argument("--calib-seq-len", type=int, default=256, help="tokens per window (default 256)")
    group.add_argument("--seed", type=int, default=0, help="seed for drawing the calibration windows")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _version() -> str:
    from lowbit import __version__

    return f"lowbit {__version__}"


# ---- commands ----------------------------------------------------------------------------
def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.io.streaming import quantize_pretrained

    from lowbit.algorithms.calib_data import CalibConfig

    recipe = recipe_from_args(args)
    calib = CalibConfig(args.calib, args.calib_samples, args.calib_seq_len, args.seed, args.calib_field)
    from lowbit.memory import current_rss, memory_budget, peak_rss

    with memory_budget(args.max_memory):
        result = quantize_pretrained(args.model, recipe, args.out, overwrite=args.overwrite,
                                     show_progress=not args.quiet, calibration=calib, device=args.device)
    summary = result.to_dict()
    if args.max_memory is not None:
        summary["max_memory_bytes"] = memory_budget(args.max_memory).limit
        summary["peak_rss_bytes"] = peak_rss() or current_rss()
    stored = Counter(spec.describe() for spec in result.layer_specs.values())
    summary["spec"] = stored.most_common(1)[0][0] if stored else recipe.default.describe()
    if not args.json:
        print(f"quantized {result.layers_quantized} layers of {args.model} with {recipe.method} "
              f"{summary['spec']} in {result.seconds:.1f} s")
        print(f"  bits per weight (linear layers): {result.size.bits_per_weight:.3f}")
        print(f"  stored size: {result.size.size_bytes / 1e6:.2f} MB  →  {result.out}")
    return summary


def recipe_from_args(args: argparse.Namespace) -> Any:
    from lowbit.formats.spec import QuantSpec
    from lowbit.recipe import DEFAULT_SKIP, LayerOverride, QuantRecipe

    spec_flags = [args.format, args.bits, args.group_size, args.symmetric, args.scale_dtype]
    if args.recipe:
        if any(v is not None for v in spec_flags) or args.double_quant or args.layer_bits:
            raise InvalidSpecError("--recipe gives the spec; do not combine it with --format/--bits/--group-size/"
                                   "--sym/--asym/--double-quant/--scale-dtype/--layer-bits")
        import dataclasses

        recipe = QuantRecipe.load(args.recipe)
        changes: dict[str, Any] = {}
        if args.skip:
            changes["skip"] = tuple(args.skip)
        if args.include:
            changes["include"] = tuple(args.include)
        if getattr(args, "tied_head", None):
            changes["tied_head"] = args.tied_head
        return dataclasses.replace(recipe, **changes) if changes else recipe  # method options and the rest kept
    activation_method = args.method in ("static", "smoothquant", "llm-int8")
    if activation_method and all(v is None for v in (args.format, args.bits, args.group_size, args.symmetric)):
        args.bits, args.group_size, args.symmetric = 8, 0, True  # W8A8: int8 per-channel symmetric weights
    fmt = args.format or "int"
    if fmt != "int" and args.bits not in (None, {"nf4": 4, "fp4": 4, "fp16": 16, "bf16": 16}.get(fmt, 8)):
        raise InvalidSpecError(f"--bits {args.bits} does not apply to --format {fmt}")
    default_group = {"int": 128, "nf4": 64, "fp4": 64}.get(fmt, 0)
    group = default_group if args.group_size is None else args.group_size
    if group < -1:
        raise InvalidSpecError(f"--group-size must be ≥ 1, 0 (per channel) or -1 (per tensor); got {group}")
    granularity = {0: "channel", -1: "tensor"}.get(group, "group")
    kwargs: dict[str, Any] = {"format": fmt, "granularity": granularity, "group_size": group if group > 0 else None,
                              "double_quant": args.double_quant}
    if fmt == "int":
        kwargs["bits"] = 4 if args.bits is None else args.bits
        kwargs["symmetric"] = False if args.symmetric is None else args.symmetric
    kwargs["scale_dtype"] = args.scale_dtype or ("float32" if fmt.startswith("fp8") else "float16")
    default = QuantSpec(**kwargs)
    overrides = []
    for item in args.layer_bits:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.isdigit():
            raise InvalidSpecError(f"--layer-bits expects PATTERN=BITS, got {item!r}")
        if fmt != "int":
            raise InvalidSpecError("--layer-bits needs --format int")
        overrides.append(LayerOverride(pattern, default.replace(bits=int(bits))))
    options = method_options_from_args(args)
    return QuantRecipe(default, args.method, tuple(args.skip) if args.skip else DEFAULT_SKIP,
                       tuple(args.include) if args.include else None, tuple(overrides), options,
                       tied_head=getattr(args, "tied_head", None) or "untie")


def method_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Method options from the flags; a flag for another method is an error, not silently ignored."""
    flags = {  # option name: (value given, methods it applies to)
        "damp": (args.damp, ("gptq",)),
        "act_order": (args.act_order, ("gptq",)),
        "alpha": (args.alpha, ("smoothquant",)),
        "threshold": (args.threshold, ("llm-int8",)),
        "act_dynamic": (args.act_dynamic or None, ("static", "smoothquant")),
        "act_observer": (args.act_observer, ("static", "smoothquant")),
        "act_symmetric": (args.act_sym or None, ("static", "smoothquant")),
    }
    options = {}
    for name, (value, methods) in flags.items():
        if value is None:
            continue
        if args.method not in methods:
            flag = "--" + name.replace("_", "-").replace("act-symmetric", "act-sym")
            raise InvalidSpecError(f"{flag} applies to --method {' / '.join(methods)}, not {args.method}")
        options[name] = value
    return options


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise InvalidSpecError(f"--threads must be ≥ 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lowbit.generate import generate_text
    from lowbit.io.checkpoint import load

    _set_threads(args.threads)
    if args.max_new_tokens < 1:
        raise InvalidSpecError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(args.model, device=device)
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise LowbitError(f"{args.model}: generation needs a causal language model (this one has no LM head)")
    text, result = generate_text(model, _tokenizer(model), args.prompt, args.max_new_tokens, compile=args.compile)
    if not args.json:
        print(args.prompt + text)
        if not args.quiet:
            print(f"[{len(result.tokens)} tokens, prefill {result.prefill_tokens_per_s:.1f} tok/s, "
                  f"decode {result.decode_tokens_per_s:.1f} tok/s{'' if result.compiled else ', eager'}]",
                  file=sys.stderr)
    return {"text": text, "tokens": result.tokens, "prompt_tokens": result.prompt_tokens,
            "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
            "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 2), "compiled": result.compiled}


def _tokenizer(model: Any) -> Any:
    from transformers import AutoTokenizer

    source = model.lowbit_source
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise LowbitError(f"{source}: cannot load a tokenizer from this directory ({exc})") from None


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.info import describe

    info = describe(args.path)
    if not args.json:
        for key, value in info.items():
            if key != "spec_counts":
                print(f"{key:<20} {value}")
        for spec, count in info.get("spec_counts", {}).items():
            print(f"  {count:>4} × {spec}")
    return info


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.demo import format_table, run_demo

    start = time.perf_counter()
    rows = run_demo(seq_len=args.seq_len, show_progress=not args.quiet)
    if not args.json:
        print("lowbit demo — builtin:tiny-lm, perplexity on its held-out text "
              f"({args.seq_len}-token windows)\n")
        print(format_table(rows))
        print(f"\n{time.perf_counter() - start:.1f} s")
    return {"rows": [r.to_dict() for r in rows], "seconds": round(time.perf_counter() - start, 3)}


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli.eval import cmd_eval as run

    return run(args)


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli.finetune import cmd_finetune as run

    return run(args)


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli.merge import cmd_merge as run

    return run(args)


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli.export import cmd_export as run

    return run(args)


def cmd_import(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli.importer import cmd_import as run

    return run(args)


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli.prune import cmd_prune as run

    return run(args)


def cmd_distill(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli.distill import cmd_distill as run

    return run(args)


def cmd_qat(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli.qat import cmd_qat as run

    return run(args)


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli.plan import cmd_plan as run

    return run(args)


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.cli.report import cmd_report as run

    return run(args)


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "demo": cmd_demo,
            "generate": cmd_generate, "finetune": cmd_finetune, "merge": cmd_merge, "export": cmd_export,
            "import": cmd_import, "report": cmd_report, "plan": cmd_plan, "prune": cmd_prune,
            "distill": cmd_distill, "qat": cmd_qat}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        summary = COMMANDS[args.command](args)
    except LowbitError as exc:
        print(f"lowbit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary))
    return 0


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="transformers")
    warnings.formatwarning = lambda message, *args, **kwargs: f"lowbit: warning: {message}\n"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
