"""``lowbit prune``: zero weights of a float model's linear layers (magnitude, Wanda, SparseGPT, N:M), or remove heads,
MLP neurons and blocks (structured: a smaller dense model), and save it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.errors import InvalidSpecError, OutputExistsError

METHODS = ("magnitude", "wanda", "sparsegpt", "nm", "structured")


def add_parser(sub: Any, common: Any) -> None:
    from lowbit.cli import add_calibration_args

    p = sub.add_parser(
        "prune", help="prune a float model (magnitude, wanda, sparsegpt, N:M; structured: remove heads/neurons/blocks)",
        description="Zero a fraction of every linear layer's weights (the output head is left alone). magnitude needs "
                    "no data; wanda scores |W|·‖X‖ on calibration data; sparsegpt also updates the remaining weights "
                    "to compensate (the inverse-Hessian update GPTQ uses); nm is wanda with an N:M pattern (default "
                    "2:4). The saved model is a float model with zeros: it loads, evaluates and quantizes like any "
                    "other. structured removes attention heads (whole KV groups, or the same number of query heads "
                    "from every group), MLP neurons and whole blocks chosen by their importance on calibration data: "
                    "the result is a smaller dense model (faster as well as smaller).")
    p.add_argument("model", help="float model directory or builtin:tiny-lm")
    p.add_argument("-o", "--out", required=True, help="output model directory")
    p.add_argument("--method", default="wanda", choices=METHODS, help="how weights are chosen (default wanda)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of each layer's weights to zero (default 0.5); structured: the --heads and --mlp "
                        "fraction not given otherwise")
    p.add_argument("--nm", default=None, metavar="N:M",
                   help="semi-structured pattern: zero N of every M consecutive inputs of each row (e.g. 2:4); "
                        "overrides --sparsity")
    j = p.add_argument_group("joint pruning + quantization (--method sparsegpt)")
    j.add_argument("--bits", type=int, default=None,
                   help="also quantize the kept weights to this many bits in the same SparseGPT pass (the result is "
                        "a packed lowbit model whose pruned weights are exactly 0)")
    j.add_argument("--group-size", type=int, default=128, help="columns per scale group with --bits (0: per row)")
    j.add_argument("--symmetric", action="store_true", help="symmetric grid with --bits (default asymmetric)")
    s = p.add_argument_group("structured (--method structured)")
    s.add_argument("--heads", type=float, default=None, metavar="F",
                   help="fraction of every layer's query heads to remove (GQA: whole KV groups or the same number "
                        "from every group; an impossible fraction is an error listing the possible ones)")
    s.add_argument("--mlp", type=float, default=None, metavar="F", help="fraction of every layer's MLP neurons to remove")
    s.add_argument("--blocks", type=int, default=None, metavar="N", help="number of whole decoder blocks to remove")
    s.add_argument("--importance", default="activation", choices=("activation", "magnitude", "random"),
                   help="how heads/neurons/blocks are ranked: on calibration data (default), by weight norms "
                        "(no data), or at random (a baseline)")
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda …)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    add_calibration_args(p.add_argument_group("calibration (wanda, sparsegpt, nm, structured)"))
    common(p)


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.compress.prune import PruneConfig, parse_nm, prune_model
    from lowbit.io.checkpoint import load, save
    from lowbit.quantize import load_tokenizer

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # fail before any work
        raise OutputExistsError(f"{out}: already exists; choose another output path or pass --overwrite")
    if args.method == "structured":
        if args.bits is not None:
            raise InvalidSpecError("--bits: joint quantization is SparseGPT's; prune structured, then quantize")
        return _structured(args, out)
    given = [flag for flag, value in (("--heads", args.heads), ("--mlp", args.mlp), ("--blocks", args.blocks))
             if value is not None]
    if given:
        raise InvalidSpecError(f"{', '.join(given)}: only with --method structured (this is --method {args.method})")
    sparsity = 0.5 if args.sparsity is None else args.sparsity
    quant = None
    if args.bits is not None:
        from lowbit.formats.spec import QuantSpec

        quant = QuantSpec.int_(args.bits, args.group_size or None, symmetric=args.symmetric)
    config = PruneConfig(args.method, sparsity, parse_nm(args.nm) if args.nm else None, quant=quant)
    model = load(args.model)
    tokenizer = load_tokenizer(model) if config.needs_data else None
    calib = CalibConfig(args.calib, args.calib_samples, args.calib_seq_len, args.seed, args.calib_field)
    result = prune_model(model, config, tokenizer=tokenizer, calib=calib, device=args.device,
                         show_progress=not args.quiet)
    model.to("cpu")
    save(model, out, overwrite=args.overwrite)
    report = {"out": str(out), "model": args.model, **result.to_dict(),
              "quantized": None if quant is None else quant.describe()}
    if not args.json:
        joint = "" if quant is None else f", quantized to {quant.describe()} in the same pass"
        print(f"pruned {len(result.layers)} layers of {args.model} ({result.method}"
              f"{'' if result.nm is None else ' ' + result.nm}{joint}): {100 * result.sparsity:.1f} % of their "
              f"weights are zero, in {result.seconds:.1f} s → {out}")
        low = sorted(result.layers.items(), key=lambda kv: kv[1])[:1]
        for name, frac in low:
            print(f"  least sparse layer: {name} {100 * frac:.1f} %")
    return report


def structured_config(args: argparse.Namespace) -> Any:
    """--heads/--mlp/--blocks; --sparsity S fills in whichever of --heads/--mlp is not given (alone: both = S;
    with no part given at all: both = 0.5)."""
    from lowbit.compress.structured import StructuredConfig

    if args.nm:
        raise InvalidSpecError("--nm is a pattern of zeros; --method structured removes whole heads/neurons/blocks")
    parts = (args.heads, args.mlp, args.blocks)
    base = args.sparsity if args.sparsity is not None else (0.5 if all(v is None for v in parts) else 0.0)
    return StructuredConfig(heads=base if args.heads is None else args.heads,
                            mlp=base if args.mlp is None else args.mlp, blocks=args.blocks or 0,
                            importance=args.importance, seed=args.seed)


def _structured(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.compress.structured import prune_structured
    from lowbit.io.checkpoint import load, save
    from lowbit.quantize import load_tokenizer

    config = structured_config(args)
    model = load(args.model)
    tokenizer = load_tokenizer(model) if config.needs_data else None
    calib = CalibConfig(args.calib, args.calib_samples, args.calib_seq_len, args.seed, args.calib_field)
    result = prune_structured(model, config, tokenizer=tokenizer, calib=calib if config.needs_data else None,
                              device=args.device, show_progress=not args.quiet)
    model.to("cpu")
    save(model, out, overwrite=args.overwrite)
    file_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    report = {"out": str(out), "model": args.model, **result.to_dict(), "file_bytes": file_bytes}
    if not args.json:
        before, after = result.shape_before, result.shape_after
        print(f"pruned {args.model} (structured, {config.importance}): {result.params_before:,} → "
              f"{result.params_after:,} parameters ({100 * result.param_ratio:.1f} %), {file_bytes:,} bytes, in "
              f"{result.seconds:.1f} s → {out}")
        print(f"  heads {before['num_attention_heads']}/{before['num_key_value_heads']} → "
              f"{after['num_attention_heads']}/{after['num_key_value_heads']} (query/KV), intermediate "
              f"{before['intermediate_size']} → {after['intermediate_size']}, blocks {before['num_hidden_layers']} → "
              f"{after['num_hidden_layers']}" + (f" (removed {result.removed_blocks})" if result.removed_blocks else ""))
    return report
