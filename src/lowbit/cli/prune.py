"""``lowbit prune``: zero weights of a float model's linear layers (magnitude, Wanda, SparseGPT, N:M) and save it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.errors import OutputExistsError


def add_parser(sub: Any, common: Any) -> None:
    from lowbit.cli import add_calibration_args

    p = sub.add_parser(
        "prune", help="prune a float model's linear layers (magnitude, wanda, sparsegpt, N:M) and save it",
        description="Zero a fraction of every linear layer's weights (the output head is left alone). magnitude needs "
                    "no data; wanda scores |W|·‖X‖ on calibration data; sparsegpt also updates the remaining weights "
                    "to compensate (the inverse-Hessian update GPTQ uses); nm is wanda with an N:M pattern (default "
                    "2:4). The saved model is a float model with zeros: it loads, evaluates and quantizes like any "
                    "other.")
    p.add_argument("model", help="float model directory or builtin:tiny-lm")
    p.add_argument("-o", "--out", required=True, help="output model directory")
    p.add_argument("--method", default="wanda", choices=("magnitude", "wanda", "sparsegpt", "nm"),
                   help="how weights are chosen (default wanda)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each layer's weights to zero (default 0.5)")
    p.add_argument("--nm", default=None, metavar="N:M",
                   help="semi-structured pattern: zero N of every M consecutive inputs of each row (e.g. 2:4); "
                        "overrides --sparsity")
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda …)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    add_calibration_args(p.add_argument_group("calibration (wanda, sparsegpt, nm)"))
    common(p)


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.compress.prune import PruneConfig, parse_nm, prune_model
    from lowbit.io.checkpoint import load, save
    from lowbit.quantize import load_tokenizer

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # fail before any work
        raise OutputExistsError(f"{out}: already exists; choose another output path or pass --overwrite")
    config = PruneConfig(args.method, args.sparsity, parse_nm(args.nm) if args.nm else None)
    model = load(args.model)
    tokenizer = load_tokenizer(model) if config.needs_data else None
    calib = CalibConfig(args.calib, args.calib_samples, args.calib_seq_len, args.seed, args.calib_field)
    result = prune_model(model, config, tokenizer=tokenizer, calib=calib, device=args.device,
                         show_progress=not args.quiet)
    model.to("cpu")
    save(model, out, overwrite=args.overwrite)
    report = {"out": str(out), "model": args.model, **result.to_dict()}
    if not args.json:
        print(f"pruned {len(result.layers)} layers of {args.model} ({result.method}"
              f"{'' if result.nm is None else ' ' + result.nm}): {100 * result.sparsity:.1f} % of their weights are "
              f"zero, in {result.seconds:.1f} s → {out}")
        low = sorted(result.layers.items(), key=lambda kv: kv[1])[:1]
        for name, frac in low:
            print(f"  least sparse layer: {name} {100 * frac:.1f} %")
    return report
