"""``lowbit finetune``: train a small adapter on a frozen (float or lowbit-quantized) base."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.errors import InvalidSpecError, LowbitError

PEFT_METHODS = ("lora", "qlora", "dora", "adalora", "ia3", "adapter", "prefix", "prompt")
QLORA_FORMATS = {"nf4": {"format": "nf4", "granularity": "group", "group_size": 64, "double_quant": True},
                 "fp4": {"format": "fp4", "granularity": "group", "group_size": 64, "double_quant": True},
                 "int4": {"format": "int", "bits": 4, "granularity": "group", "group_size": 64, "symmetric": False},
                 "int8": {"format": "int", "bits": 8, "granularity": "channel", "symmetric": True}}


def add_parser(sub: Any, common: Any) -> None:
    f = sub.add_parser("finetune", help="train a LoRA/QLoRA/DoRA/AdaLoRA/IA3/adapter/prefix/prompt adapter",
                       description="Train an adapter on MODEL's frozen weights (float or lowbit-quantized) and write "
                                   "a Hugging Face peft adapter directory OUT (plus logs, loss.png, checkpoint/).")
    f.add_argument("model", help="model directory or builtin:tiny-lm")
    f.add_argument("--peft", default="lora", choices=PEFT_METHODS, help="method (default lora; qlora = LoRA over a "
                   "base quantized on the fly to --qlora-format unless MODEL is already quantized)")
    f.add_argument("--data", required=True, help="training data: .txt / directory of texts / .jsonl "
                   "(text, prompt+response, or chat messages; classification: text+label)")
    f.add_argument("--eval-data", default=None, help="held-out data (default: --eval-fraction of --data)")
    f.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of --data (default 0.1)")
    f.add_argument("-o", "--out", required=True, help="output adapter directory")
    f.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    f.add_argument("--resume", action="store_true", help="continue the run saved in OUT/checkpoint")
    t = f.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=8, help="examples per step per process")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4; 3e-2 prompt/prefix/ia3)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--schedule", default="linear", choices=("linear", "cosine", "constant"))
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    t.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (default: steps/10)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"),
                   help="adamw8bit keeps both moments in 8 bits (block-wise), ~4x less optimizer memory")
    t.add_argument("--task", default=None, choices=("causal_lm", "classification"),
                   help="default: causal_lm for models with an LM head, else classification")
    t.add_argument("--field", default=None, help="JSONL text field (default: text, else prompt/response, else messages)")
    t.add_argument("--prompt-field", default="prompt")
    t.add_argument("--response-field", default="response")
    t.add_argument("--messages-field", default="messages")
    t.add_argument("--label-field", default="label", help="classification label field")
    a = f.add_argument_group("adapter")
    a.add_argument("--lora-r", "--r", dest="r", type=int, default=16, help="LoRA rank (default 16)")
    a.add_argument("--lora-alpha", "--alpha", dest="alpha", type=float, default=None, help="LoRA alpha (default 2·r)")
    a.add_argument("--lora-dropout", "--dropout", dest="dropout", type=float, default=0.0)
    a.add_argument("--target-modules", default="all-linear",
                   help="comma-separated layer names, a regex, or all-linear (default)")
    a.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    a.add_argument("--init", default=None, choices=("default", "gaussian", "pissa", "loftq"),
                   help="LoRA initialisation (loftq quantizes the float base itself, as --qlora-format)")
    a.add_argument("--qlora-format", default="nf4", choices=tuple(QLORA_FORMATS),
                   help="base format for qlora / loftq (default nf4 with double quantization)")
    a.add_argument("--init-r", type=int, default=None, help="AdaLoRA initial rank (default 1.5·r)")
    a.add_argument("--target-r", type=int, default=None, help="AdaLoRA final average rank (default r)")
    a.add_argument("--reduction-factor", type=int, default=16, help="bottleneck adapters: hidden / bottleneck")
    a.add_argument("--placement", default="houlsby", choices=("houlsby", "pfeiffer"), help="bottleneck adapters")
    a.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt / prefix tuning")
    a.add_argument("--prompt-init", default="random", choices=("random", "vocab", "text"))
    a.add_argument("--prompt-init-text", default=None)
    common(f)


def adapter_config(args: argparse.Namespace, model: Any, task: str) -> Any:
    """The typed adapter config the flags describe."""
    task_type = "CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS"
    targets = _targets(args.target_modules)
    alpha = args.alpha if args.alpha is not None else 2.0 * args.r
    if args.peft in ("lora", "qlora", "dora"):
        from lowbit.peft.lora import LoraConfig

        init: Any = True if args.init in (None, "default") else args.init
        loftq = {"spec": QLORA_FORMATS[args.qlora_format]} if init == "loftq" else {}
        return LoraConfig(r=args.r, lora_alpha=alpha, lora_dropout=args.dropout, target_modules=targets,
                          use_rslora=args.rslora, use_dora=args.peft == "dora", init_lora_weights=init,
                          loftq_config=loftq, task_type=task_type)
    _no_lora_only_flags(args)
    if args.peft == "adalora":
        from lowbit.peft.adalora import AdaLoraConfig

        init_r = args.init_r or max(args.r + 1, (3 * args.r) // 2)
        return AdaLoraConfig(init_r=init_r, target_r=args.target_r or args.r, lora_alpha=alpha,
                             lora_dropout=args.dropout, target_modules=targets, total_step=args.steps,
                             tinit=max(0, args.steps // 10), tfinal=max(0, args.steps // 5), deltaT=1,
                             task_type=task_type)
    if args.peft == "ia3":
        from lowbit.peft.ia3 import IA3Config

        if targets == "all-linear":
            names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
            targets = [t for t in ("k_proj", "v_proj", "down_proj", "key", "value", "c_attn", "c_proj")
                       if t in names] or "all-linear"
        feed = [t for t in targets if t in ("down_proj", "fc2", "c_proj")] if isinstance(targets, list) else []
        return IA3Config(target_modules=targets, feedforward_modules=feed, task_type=task_type)
    if args.peft == "adapter":
        from lowbit.peft.bottleneck import BottleneckConfig

        return BottleneckConfig(placement=args.placement, reduction_factor=args.reduction_factor,
                                target_modules=None if args.target_modules == "all-linear" else targets,
                                task_type=task_type)
    if args.peft == "prompt":
        from lowbit.peft.prompt import PromptTuningConfig

        init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[args.prompt_init]
        return PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens, prompt_tuning_init=init,
                                  prompt_tuning_init_text=args.prompt_init_text,
                                  tokenizer_name_or_path=str(getattr(model, "lowbit_source", "")) or None,
                                  task_type=task_type)
    from lowbit.peft.prefix import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=args.num_virtual_tokens, task_type=task_type)


def _targets(text: str) -> Any:
    if text == "all-linear":
        return text
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and any(c in parts[0] for c in "\\*[]()|^$+?"):
        return parts[0]  # a regular expression over whole module names
    return parts


def _no_lora_only_flags(args: argparse.Namespace) -> None:
    if args.init not in (None, "default") or args.rslora:
        raise InvalidSpecError(f"--init / --rslora apply to lora/qlora/dora, not --peft {args.peft}")


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    import lowbit
    from lowbit.peft.finetune import finetune, quantize_base
    from lowbit.train import TrainConfig, load_causal_lm_data, load_classification_data, split_eval

    model = lowbit.load(args.model)
    has_head = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    task = args.task or ("causal_lm" if has_head else "classification")
    if task == "classification":
        model = _classifier(args.model, args.data, args)
    base: dict[str, Any] = {"model": str(args.model)}
    if args.peft == "qlora" and not getattr(model, "lowbit_method", None):
        base["quantize"] = QLORA_FORMATS[args.qlora_format]
        quantize_base(model, base["quantize"])
    config = adapter_config(args, model, task)
    tokenizer = _tokenizer(model)
    if task == "causal_lm":
        def read(path: str) -> Any:
            return load_causal_lm_data(path, tokenizer, args.seq_len, field=args.field, prompt_field=args.prompt_field,
                                       response_field=args.response_field, messages_field=args.messages_field)
    else:
        def read(path: str) -> Any:
            return load_classification_data(path, tokenizer, args.seq_len, text_field=args.field or "text",
                                            label_field=args.label_field)[0]
    data = read(args.data)
    if args.eval_data:
        train, held_out = data, read(args.eval_data)
    elif args.eval_fraction > 0 and len(data) >= 2:
        train, held_out = split_eval(data, args.eval_fraction, seed=args.seed)
    else:
        train, held_out = data, None
    prompt_like = args.peft in ("prompt", "prefix", "ia3")
    lr = args.lr if args.lr is not None else (3e-2 if prompt_like else 2e-4)
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr,
                               weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, schedule=args.schedule,
                               seed=args.seed, eval_every=args.eval_every, log_every=args.log_every,
                               checkpoint_every=args.checkpoint_every or max(1, args.steps // 10),
                               resume=args.resume, compute_dtype=args.compute_dtype,
                               gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                               show_progress=not args.quiet, task=task, out_dir=args.out)
    if base.get("quantize") is None and getattr(model, "lowbit_method", None):
        base["quantized"] = model.lowbit_method
    if args.init == "loftq":
        base["loftq"] = True
    result = finetune(model, config, train, train_config, args.out, eval_data=held_out, base=base,
                      overwrite=args.overwrite, data_source=str(Path(args.data).resolve()))
    if args.init == "loftq":
        _save_loftq_base(model, args.out)
    summary = result.to_dict()
    summary.update({"peft": args.peft, "task": task})
    if not args.json:
        print(f"trained {args.peft} on {args.model}: {result.steps} steps, {result.tokens} tokens, "
              f"{result.tokens_per_s:.0f} tokens/s, final loss {result.final_loss:.4f}"
              + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))
        print(f"  trainable parameters: {result.trainable_params:,} of {result.total_params:,}")
        print(f"  adapter → {result.out}")
    return summary


def _save_loftq_base(model: Any, out: str) -> None:
    """LoftQ chose the quantized base itself: it is saved beside the adapter (OUT/base), without adapters."""
    import copy
    from pathlib import Path

    import lowbit
    from lowbit.peft.base import adapter_layers, unwrap_layer

    clean = copy.deepcopy(model)
    for name in list(adapter_layers(clean)):
        unwrap_layer(clean, name)
    clean.lowbit_method = "rtn"
    lowbit.save(clean, Path(out) / "base", overwrite=True)


def _classifier(model_ref: str, data: str, args: argparse.Namespace) -> Any:
    """An encoder with a fresh classification head sized to the labels in --data."""
    from lowbit.errors import UnsupportedModelError

    from lowbit.models.resolve import resolve_model_dir
    from lowbit.train import load_classification_data

    import lowbit

    path = resolve_model_dir(model_ref)
    probe = lowbit.load(model_ref)
    _, labels = load_classification_data(data, _tokenizer(probe), args.seq_len, text_field=args.field or "text",
                                         label_field=args.label_field)
    try:
        from transformers import AutoModelForSequenceClassification
        import torch

        torch.manual_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=len(labels),
                                                                   use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{model_ref}: cannot build a sequence classifier ({exc})") from None
    model.lowbit_source = path
    model.lowbit_method = None
    return model


def _tokenizer(model: Any) -> Any:
    from lowbit.quantize import load_tokenizer

    try:
        return load_tokenizer(model)
    except LowbitError:
        raise
