"""``lowbit qat``: quantization-aware training of a float model (block-wise, optionally QA-LoRA), saved packed.

OUT is a model directory (``config.json``, ``model.safetensors``, tokenizer files) that ``lowbit.load`` loads; it
also holds ``lowbit_qat.json`` (the run's figures) and, while the run is going, ``checkpoint/`` (each finished
block, for ``--resume``; removed when the run ends).
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Any

from lowbit.errors import InvalidSpecError

RUN_FILE = "lowbit_qat.json"


def add_parser(sub: Any, common: Any) -> None:
    q = sub.add_parser(
        "qat", help="quantization-aware training: train a quantized model to match the float one, save it packed",
        description="Quantize MODEL's linear layers to --bits/--group-size and train them block by block so that "
                    "each quantized block reproduces the float block's output on --data (weights through the "
                    "straight-through estimator, learnable scales and zero-points; --steps optimizer steps per "
                    "block). --lora R instead starts from GPTQ, freezes the weights and trains a group-wise "
                    "adapter that merges into the zero-points exactly (QA-LoRA). The result is a packed lowbit "
                    "model that computes exactly what training simulated.")
    q.add_argument("model", help="float model directory or builtin:tiny-lm")
    q.add_argument("-o", "--out", required=True, help="output model directory")
    q.add_argument("--bits", type=int, default=4, help="integer bits (2, 3, 4, 5, 6, 8; default 4)")
    q.add_argument("--group-size", type=int, default=128, help="columns per scale group (0: one per row; default 128)")
    q.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero-point; default asymmetric)")
    q.add_argument("--format", default="int", choices=("int", "nf4", "fp4"),
                   help="int (--bits, default) or a 4-bit codebook with per-block absmax (block = --group-size)")
    q.add_argument("--act-bits", type=int, default=None, metavar="B",
                   help="also quantize every layer's input, dynamically per token, to B bits (e.g. 8: W4A8)")
    q.add_argument("--data", required=True, help="training text: .txt, .jsonl, a directory of texts, or 'builtin'")
    q.add_argument("--data-field", default="text", help="text field of JSONL records")
    q.add_argument("--samples", type=int, default=128, help="training windows drawn from --data (default 128)")
    q.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    q.add_argument("--steps", type=int, default=640, help="optimizer steps per block (default 640)")
    q.add_argument("--batch-size", type=int, default=2, help="windows per step (default 2)")
    q.add_argument("--lr", type=float, default=None, help="learning rate of the weights (adapters with --lora); "
                                                          "default 2e-4 (1e-3 with --lora)")
    q.add_argument("--lr-qparams", type=float, default=2e-3, help="learning rate of scales and zero-points (0 "
                                                                  "freezes them; default 2e-3)")
    q.add_argument("--lora", type=int, default=0, metavar="R", help="QA-LoRA rank (0: full-weight QAT)")
    q.add_argument("--lora-alpha", type=float, default=None, help="QA-LoRA alpha (default: the rank)")
    q.add_argument("--e2e-steps", type=int, default=0,
                   help="after the block phase: N steps of end-to-end distillation from the float model on the same "
                        "windows, training scales, zero-points and adapters (default 0)")
    q.add_argument("--e2e-lr", type=float, default=1e-4, help="learning rate of the end-to-end phase (default 1e-4)")
    q.add_argument("--init", default=None, choices=("rtn", "gptq"),
                   help="starting ranges (default rtn; gptq with --lora)")
    q.add_argument("--eval-data", default=None, help="held-out text: report perplexity before (RTN) and after")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu", help="compute device (cpu, cuda …)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.add_argument("--resume", action="store_true", help="continue the run saved in OUT/checkpoint")
    common(q)


def cmd_qat(args: argparse.Namespace) -> dict[str, Any]:

    import lowbit
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.cli.distill import save_model_into
    from lowbit.io.writer import prepare_run_dir, write_json_durably
    from lowbit.compress.qat import QATConfig, qat
    from lowbit.formats.spec import QuantSpec
    from lowbit.quantize import load_tokenizer

    if args.samples < 1 or args.seq_len < 2 or args.group_size < 0:
        raise InvalidSpecError("--samples must be ≥ 1, --seq-len ≥ 2, --group-size ≥ 0")
    from lowbit.formats.act import ActSpec

    if args.format == "int":
        spec = QuantSpec.int_(args.bits, args.group_size or None, symmetric=args.symmetric)
    else:
        if not args.group_size:
            raise InvalidSpecError(f"--format {args.format} needs a block size: --group-size N (e.g. 64)")
        spec = QuantSpec(args.format, 4, True, "group", args.group_size)
    act_spec = None if args.act_bits is None else ActSpec.dynamic_per_token(bits=args.act_bits)
    lr = args.lr if args.lr is not None else (1e-3 if args.lora else 2e-4)
    config = QATConfig(spec, act_spec=act_spec, steps=args.steps, batch_size=args.batch_size, lr=lr, lr_qparams=args.lr_qparams,
                       lora_rank=args.lora, lora_alpha=args.lora_alpha, init=args.init, seed=args.seed,
                       e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr)
    out = Path(args.out)
    start = time.perf_counter()
    model = lowbit.load(args.model)
    tokenizer = load_tokenizer(model)
    calib = CalibConfig(args.data, args.samples, args.seq_len, args.seed, args.data_field)
    eval_ids = None
    ppl: dict[str, float | None] = {"float": None, "qat": None}
    if args.eval_data:
        from lowbit.eval.perplexity import perplexity, read_text, tokenize_text

        eval_ids = tokenize_text(tokenizer, read_text(Path(args.eval_data)))
    fresh = not out.exists()
    prepare_run_dir(out, resume=args.resume, overwrite=args.overwrite)  # after the inputs are known to be readable
    try:
        if eval_ids is not None:
            ppl["float"] = perplexity(model, eval_ids).ppl
        result = qat(model, config, tokenizer=tokenizer, calib=calib, device=args.device,
                     show_progress=not args.quiet, checkpoint_dir=out / "checkpoint", resume=args.resume)
    except BaseException:
        if fresh and not (out / "checkpoint" / "state.json").exists():  # nothing worth keeping: leave no empty OUT
            shutil.rmtree(out, ignore_errors=True)
        raise
    model.to("cpu")
    if eval_ids is not None:
        ppl["qat"] = perplexity(model, eval_ids).ppl
    save_model_into(model, out, tokenizer)
    summary = {"out": str(out), "model": args.model, "data": args.data, **result.to_dict(),
               "ppl": ppl if args.eval_data else None, "total_seconds": round(time.perf_counter() - start, 3),
               "file_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
    write_json_durably(out / RUN_FILE, summary)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    if not args.json:
        act = f" + {config.act_spec.describe()} activations" if config.act_spec else ""
        print(f"QAT {args.model} → {result.config.spec.describe()}{act}"
              f"{f' + QA-LoRA r{args.lora}' if args.lora else ''}: {len(result.layers)} layers, "
              f"{config.steps} steps per block, block MSE {summary['mse_start']:.4g} → {summary['mse_end']:.4g}, "
              f"{result.seconds:.1f} s → {out}")
        if ppl["qat"] is not None and not math.isnan(ppl["qat"]):
            print(f"  held-out perplexity: float {ppl['float']:.3f}, QAT {ppl['qat']:.3f}")
    return summary
