"""Fine-tuning speed, memory and loss: lowbit LoRA / QLoRA vs Hugging Face peft (+ bitsandbytes), same run.

Targets (the fine-tuning issue), checked in the table's last column:
  LoRA   ≥ 1.3× peft's tokens/s
  QLoRA  ≥ 1.5× peft + bitsandbytes' tokens/s at ≤ 0.6× its peak memory
  both   final loss within 2 % of the peer's

Configurations (``--configs``), each trained by both sides:
  lora      LoRA over the float (fp32) base
  qlora     QLoRA: NF4, 64-blocks, double-quant base (lowbit: ``lowbit.quantize(model, QuantSpec.nf4(64,
            double_quant=True))``; peer: transformers ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant,
            compute dtype = --compute-dtype)`` + ``peft.prepare_model_for_kbit_training`` when it works)
  *-gc      the same with gradient checkpointing (both sides: HF ``gradient_checkpointing_enable`` non-reentrant)
Both sides: r=16, alpha=32, ``target_modules="all-linear"``, dropout 0, torch AdamW (betas 0.9/0.999, no weight
decay) at a constant ``--lr``, gradient clipping 1.0, loss = token-mean cross-entropy of logits[:, :-1] against
labels[:, 1:]. The peer computes in ``--compute-dtype`` (float32 on CPU, as the issue measured it); lowbit
has one row per ``--lowbit-dtypes`` entry (float32, plus bfloat16 autocast on CPUs with native bf16), so the
table shows both the like-for-like ratio and the one lowbit's best setting gives. lowbit trains with its own
:class:`lowbit.train.Trainer`; the peer with a plain loop over the same rows in the same order
(``lowbit.train.trainer.BatchOrder`` with the same seed). The adapters start from different random A
matrices (B = 0 on both sides), so losses agree closely but not bit for bit.

Models (``--models``):
  demo  the built-in tiny-lm (4.2 M params)
  110m  a random-weight Llama (hidden 768, intermediate 2048, 12 layers, GQA 12/4, vocab 4096; 82 M params),
        written once to ``--workdir``
  1b    the random-weight ~1 B Llama of bench/generate.py (hidden 2048, intermediate 5632, 22 layers, GQA 32/4,
        vocab 4096), for ``--device cuda``
Data: ``--data calib`` (default) = the built-in calibration text (src/lowbit/data/tiny-lm/calib.txt, tiny-lm's
tokenizer, whose 4096-token vocabulary fits every model) in ``--seq-len`` windows; ``--data random`` = uniform
random tokens (seed 0).

Protocol: every (configuration, side) runs in a fresh subprocess (``--worker``), so peak memory is its own:
  tokens/s    the median over steps ``--warmup``+1 … ``--steps`` of a step's tokens ÷ its wall time (the clock
              is read after each optimizer step; the first ``--warmup`` (2) steps — allocator growth, first-call
              kernel setup — are left out; with ``--steps`` ≤ ``--warmup`` every step counts); the median keeps
              other tenants' bursts on a shared machine out (the JSON also holds the plain mean)
  peak RSS    the worker's peak resident set (Linux VmHWM) over the whole process: imports, model load,
              quantization and training; CUDA: ``torch.cuda.max_memory_allocated``
  train peak  the same peak reset just before training (``/proc/self/clear_refs``; CUDA: reset_peak_memory_stats)
  final loss  the last step's train loss
``--repeats`` rounds run every worker in turn (lowbit and peer of one configuration back to back), so drift of a
shared machine shifts both sides alike; the table shows medians.

    python bench/finetune.py [--models demo 110m] [--configs lora lora-gc qlora qlora-gc] [--steps 20]
                             [--batch-size 8] [--seq-len 256] [--compute-dtype float32|bfloat16]
                             [--device cpu|cuda] [--threads T] [--repeats 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# keep bench/ off the import path: bench/kernels.py would shadow the `kernels` package bitsandbytes probes for
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "src"))

import torch  # noqa: E402

from lowbit.models.synthetic import LlamaShape, write_random_llama  # noqa: E402

SHAPES = {
    "110m": LlamaShape(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=4096),
    "1b": LlamaShape(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=4096),  # = bench/generate.py's 1b (shared cache)
}
CONFIGS = {  # name → (quantized base, gradient checkpointing)
    "lora": (False, False), "lora-gc": (False, True), "qlora": (True, False), "qlora-gc": (True, True),
}
PEER = "peer"
TARGET_SPEED = {False: 1.3, True: 1.5}  # × peer tokens/s (LoRA, QLoRA)
TARGET_MEMORY = 0.6  # QLoRA: × peer peak memory
TARGET_LOSS = 2.0  # % of the peer's final loss
IGNORE_INDEX = -100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, choices=("demo", "110m", "1b"),
                        help="default: demo 110m (CPU), 1b (CUDA)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (CPU), 4 (CUDA)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 256 (CPU), 512 (CUDA)")
    parser.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16"),
                        help="the peer's autocast dtype; default float32 (CPU, as the issue measured), bfloat16 (CUDA)")
    parser.add_argument("--lowbit-dtypes", nargs="+", default=None, choices=("float32", "bfloat16"),
                        help="lowbit's compute dtypes, one row each; default float32, plus bfloat16 on CPUs with "
                             "native bf16 (AMX / AVX512-BF16); bfloat16 on CUDA")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--data", default="calib", choices=("calib", "random"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lowbit-bench"))
    parser.add_argument("--json", metavar="FILE", default=None, help="write the raw results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON spec of one run
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)  # where the worker writes its JSON
    args = parser.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker), Path(args.result))
        return
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    args.models = args.models or (["1b"] if cuda else ["demo", "110m"])
    args.batch_size = args.batch_size or (4 if cuda else 8)
    args.seq_len = args.seq_len or (512 if cuda else 256)
    args.compute_dtype = args.compute_dtype or ("bfloat16" if cuda else "float32")
    args.lowbit_dtypes = args.lowbit_dtypes or (["bfloat16"] if cuda else
                                                ["float32"] + (["bfloat16"] if cpu_has_bf16() else []))
    args.sides = [f"lowbit:{d}" for d in args.lowbit_dtypes] + [PEER]
    threads = args.threads or torch.get_num_threads()
    print(f"device {args.device}, {threads} threads; batch {args.batch_size} × seq {args.seq_len}, "
          f"{args.steps} steps ({args.warmup} warm-up), r{args.r} all-linear, AdamW lr {args.lr}, "
          f"peer {args.compute_dtype}, lowbit {' and '.join(args.lowbit_dtypes)}, data {args.data}", flush=True)
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "result")},
                               "models": {}}
    for name in args.models:
        results["models"][name] = bench_model(name, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
        print(f"\nraw results: {args.json}")


# ---- the parent: one subprocess per (configuration, side), rounds interleaved ----------------------
def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    source = model_source(name, Path(args.workdir))
    print(f"\n== {name}: {source}", flush=True)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(c, s): [] for c in args.configs for s in args.sides}
    for round_ in range(args.repeats):
        for config in args.configs:
            for side in args.sides:
                done = runs[(config, side)]
                if done and "error" in done[-1]:
                    continue  # unavailable / failed once: not retried
                spec = worker_spec(args, name, source, config, side)
                result = launch_worker(spec, args.timeout)
                done.append(result)
                print(f"  round {round_ + 1}/{args.repeats} {config:<9} {side:<15} {summary(result)}", flush=True)
    rows = [aggregate(config, side, runs[(config, side)]) for config in args.configs for side in args.sides]
    print_table(name, rows, args)
    return {"source": source, "rows": rows, "runs": {f"{c}/{s}": r for (c, s), r in runs.items()}}


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AMX or AVX512-BF16), where oneDNN runs bf16 much faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def worker_spec(args: argparse.Namespace, model: str, source: str, config: str, side: str) -> dict[str, Any]:
    quantized, checkpointing = CONFIGS[config]
    who, _, dtype = side.partition(":")
    return {"model": model, "source": source, "config": config, "side": who, "quantized": quantized,
            "gradient_checkpointing": checkpointing, "device": args.device, "steps": args.steps,
            "warmup": args.warmup, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "compute_dtype": dtype or args.compute_dtype, "r": args.r, "lora_alpha": args.lora_alpha, "lr": args.lr,
            "data": args.data, "seed": args.seed, "threads": args.threads}


def launch_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lowbit-finetune-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result", str(out)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"failed: timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - start
        if out.exists():
            result = json.loads(out.read_text(encoding="utf-8"))
            result["worker_wall_s"] = wall
            return result
        tail = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"error": f"failed: exit {proc.returncode}: {tail[0][:200]}", "stderr_tail": proc.stderr[-4000:]}


def summary(result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"]
    return (f"{result['tokens_per_s']:9.1f} tok/s  peak {fmt_bytes(result['peak_memory_bytes'])}  "
            f"train peak {fmt_bytes(result['train_peak_memory_bytes'])}  loss {result['final_loss']:.4f}  "
            f"({result['worker_wall_s']:.0f} s)")


def aggregate(config: str, side: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in results if "error" not in r]
    if not good:
        quantized, checkpointing = CONFIGS[config]
        who = side if side != PEER else "peft+bnb" if quantized else "peft"
        label = f"{who} {config_label({'quantized': quantized, 'gradient_checkpointing': checkpointing})}"
        return {"config": config, "side": side, "label": label,
                "error": results[-1]["error"] if results else "not run"}

    def median(key: str) -> float:
        return statistics.median(r[key] for r in good)

    return {"config": config, "side": side, "label": good[0]["label"], "tokens_per_s": median("tokens_per_s"),
            "peak_memory_bytes": int(median("peak_memory_bytes")),
            "train_peak_memory_bytes": int(median("train_peak_memory_bytes")),
            "final_loss": good[-1]["final_loss"], "trainable_params": good[0]["trainable_params"],
            "rounds": len(good)}


def print_table(name: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    mem = "peak CUDA mem" if args.device == "cuda" else "peak RSS"
    print(f"\n{name}: fine-tuning, batch {args.batch_size} × {args.seq_len}, {args.steps} steps, peer {args.compute_dtype} "
          f"(ratios against the peer in the same run; median of {args.repeats} round(s))")
    print(f"targets: LoRA ≥ {TARGET_SPEED[False]}× peft's tokens/s; "
          f"QLoRA ≥ {TARGET_SPEED[True]}× peft+bitsandbytes' tokens/s at ≤ {TARGET_MEMORY}× its {mem}; "
          f"final loss within {TARGET_LOSS:g} % of the peer's")
    print(f"('{mem}' = whole worker process incl. load/quantize; 'train peak' = the peak during training only)\n")
    header = ["model", "config", "tokens/s", "× peer", mem, "× peer memory", "train peak", "× peer", "final loss",
              "loss vs peer (%)", "targets"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    by_key = {(r["config"], r["side"]): r for r in rows}
    for r in rows:
        label = r.get("label") or f"{r['side']} {r['config']}"
        if "error" in r:
            print(f"| {name} | {label} | {r['error']} |" + " |" * (len(header) - 3))
            continue
        peer = by_key.get((r["config"], PEER)) if r["side"] != PEER else None
        peer = peer if peer and "error" not in peer else None
        speed = ratio(r["tokens_per_s"], peer and peer["tokens_per_s"])
        memory = ratio(r["peak_memory_bytes"], peer and peer["peak_memory_bytes"])
        train_memory = ratio(r["train_peak_memory_bytes"], peer and peer["train_peak_memory_bytes"])
        loss = None if peer is None else 100 * (r["final_loss"] - peer["final_loss"]) / peer["final_loss"]
        cells = [name, label, f"{r['tokens_per_s']:.1f}", fmt_ratio(speed), fmt_bytes(r["peak_memory_bytes"]),
                 fmt_ratio(memory), fmt_bytes(r["train_peak_memory_bytes"]), fmt_ratio(train_memory),
                 f"{r['final_loss']:.4f}", "" if loss is None else f"{loss:+.2f}",
                 verdict(CONFIGS[r["config"]][0], speed, memory, loss) if peer else ""]
        print("| " + " | ".join(cells) + " |")


def verdict(quantized: bool, speed: float | None, memory: float | None, loss: float | None) -> str:
    checks = [("speed", speed is not None and speed >= TARGET_SPEED[quantized])]
    if quantized:
        checks.append(("mem", memory is not None and memory <= TARGET_MEMORY))
    checks.append(("loss", loss is not None and abs(loss) <= TARGET_LOSS))
    return " ".join(f"{what} {'✓' if ok else '✗'}" for what, ok in checks)


def ratio(value: float, base: float | None) -> float | None:
    return value / base if base else None


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def model_source(name: str, workdir: Path) -> str:
    if name == "demo":
        return "builtin:tiny-lm"
    path = workdir / f"llama-{name}"
    if not (path / "config.json").exists():
        shape = SHAPES[name]
        print(f"writing a random-weight {name} Llama ({shape.num_params() / 1e6:.0f} M params) to {path} …",
              flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        write_random_llama(path, shape)
    return str(path)


# ---- the worker: one configuration, one side, in a fresh process -------------------------------------
def run_worker(spec: dict[str, Any], out: Path) -> None:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    data = training_data(spec)
    try:
        if spec["side"] == "lowbit":
            model, label = build_lowbit(spec, device)
        else:
            model, label = build_peer(spec, device)
    except Unavailable as exc:
        write_result(out, {"error": f"unavailable: {exc}"})
        return
    setup_peak = peak_memory(device)
    reset_peak_memory(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = train_lowbit(model, data, spec) if spec["side"] == "lowbit" else train_peer(model, data, spec, device)
    train_peak = peak_memory(device)
    write_result(out, {
        "label": label, "tokens_per_s": timed_rate(steps, spec["warmup"]),
        "tokens_per_s_mean": timed_rate(steps, spec["warmup"], median=False),
        "final_loss": steps[-1]["loss"], "losses": [s["loss"] for s in steps], "steps": steps,
        "peak_memory_bytes": max(setup_peak, train_peak), "setup_peak_memory_bytes": setup_peak,
        "train_peak_memory_bytes": train_peak, "trainable_params": trainable,
        "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    })


class Unavailable(Exception):
    """The peer cannot run here (missing package, no CPU kernel …)."""


def write_result(out: Path, result: dict[str, Any]) -> None:
    out.write_text(json.dumps(result), encoding="utf-8")


def training_data(spec: dict[str, Any]) -> Any:
    """``[N, seq_len]`` causal-LM rows (labels = input_ids), identical for both sides."""
    from lowbit.train import TokenDataset, load_causal_lm_data

    if spec["data"] == "random":
        gen = torch.Generator().manual_seed(spec["seed"])
        ids = torch.randint(0, 4096, (max(64, spec["batch_size"] * spec["steps"]), spec["seq_len"]), generator=gen)
        return TokenDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    import transformers
    from lowbit.models.resolve import builtin_dir

    tiny = builtin_dir("tiny-lm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    tokenizer.model_max_length = 1 << 30  # one long text, cut into windows by the loader
    return load_causal_lm_data(tiny / "calib.txt", tokenizer, spec["seq_len"])


def lora_settings(spec: dict[str, Any]) -> dict[str, Any]:
    return {"r": spec["r"], "lora_alpha": spec["lora_alpha"], "lora_dropout": 0.0, "target_modules": "all-linear"}


def build_lowbit(spec: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, str]:
    import lowbit
    from lowbit.peft import LoraConfig, apply_adapter

    model = lowbit.load(spec["source"], device=device)  # fp32 master weights
    if spec["quantized"]:
        lowbit.quantize(model, lowbit.QuantSpec.nf4(64, double_quant=True), device=str(device))
    torch.manual_seed(spec["seed"])
    apply_adapter(model, LoraConfig(**lora_settings(spec)))
    return model, f"lowbit {config_label(spec)}"


def build_peer(spec: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, str]:
    import transformers
    try:
        import peft
    except ImportError as exc:
        raise Unavailable(f"peft not installed ({exc})") from None
    from lowbit.models.resolve import resolve_model_dir

    path = resolve_model_dir(spec["source"])
    compute = getattr(torch, spec["compute_dtype"])
    if spec["quantized"]:
        try:
            import bitsandbytes  # noqa: F401
            quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                      quantization_config=quant,
                                                                      device_map=str(device))
            probe_4bit(model, device)
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of bnb here means "cannot run on this machine"
            raise Unavailable(f"bitsandbytes 4-bit on {device.type}: {type(exc).__name__}: {exc}"[:300]) from None
        try:
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            label = "peft+bnb"
        except Exception as exc:  # noqa: BLE001
            print(f"prepare_model_for_kbit_training failed ({exc}); continuing without it", file=sys.stderr)
            label = "peft+bnb (no prepare_model_for_kbit_training)"
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        label = "peft"
    if spec["gradient_checkpointing"]:  # as lowbit's trainer does it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    torch.manual_seed(spec["seed"])
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora_settings(spec)))
    return model, f"{label} {config_label(spec)}"


def probe_4bit(model: torch.nn.Module, device: torch.device) -> None:
    """A forward + backward through the first 4-bit layer (so a missing kernel shows here, not mid-run)."""
    import bitsandbytes as bnb

    layer = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    if layer is None:
        raise Unavailable("transformers loaded no bitsandbytes Linear4bit layer")
    x = torch.randn(2, layer.in_features, device=device, requires_grad=True)
    layer(x).sum().backward()


def config_label(spec: dict[str, Any]) -> str:
    kind = "QLoRA nf4-dq" if spec["quantized"] else "LoRA"
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(spec.get("compute_dtype", "float32"), "?")
    return f"{kind} {dtype}" + (" +gc" if spec["gradient_checkpointing"] else "")


def train_lowbit(model: torch.nn.Module, data: Any, spec: dict[str, Any]) -> list[dict[str, float]]:
    """lowbit's Trainer; its per-step log records (log_every=1) carry tokens and elapsed time."""
    from lowbit.train import TrainConfig, Trainer

    steps: list[dict[str, float]] = []

    class Record:
        @staticmethod
        def on_log(record: dict[str, Any]) -> None:
            steps.append({"step": record["step"], "loss": record["loss"], "tokens": record["tokens"],
                          "elapsed": record["elapsed"]})

    config = TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], lr=spec["lr"], seed=spec["seed"],
                         schedule="constant", weight_decay=0.0, max_grad_norm=1.0, show_progress=False,
                         gradient_checkpointing=spec["gradient_checkpointing"], compute_dtype=spec["compute_dtype"],
                         out_dir=None, plot=False, log_every=1)
    Trainer(model, config, data, callbacks=[Record()]).train()
    return steps


def train_peer(model: torch.nn.Module, data: Any, spec: dict[str, Any], device: torch.device) -> list[dict[str, float]]:
    """A plain AdamW loop equivalent to lowbit's Trainer: same rows in the same order, loss, clipping, lr."""
    import torch.nn.functional as F
    from contextlib import nullcontext

    from lowbit.train.trainer import BatchOrder

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    order = BatchOrder(len(data), spec["seed"])
    compute = None if spec["compute_dtype"] == "float32" else getattr(torch, spec["compute_dtype"])
    batch_size = spec["batch_size"]
    torch.manual_seed(spec["seed"])
    model.train()
    steps: list[dict[str, float]] = []
    tokens = 0
    start = time.perf_counter()
    for step in range(1, spec["steps"] + 1):
        batch = {k: v.to(device) for k, v in data.batch(order.rows((step - 1) * batch_size, batch_size)).items()}
        with torch.autocast(device.type, dtype=compute) if compute is not None else nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]  # [B, S-1, V], [B, S-1]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        elapsed = time.perf_counter() - start
        steps.append({"step": step, "loss": float(loss.detach()), "tokens": tokens, "elapsed": elapsed})
    return steps


def timed_rate(steps: list[dict[str, float]], warmup: int, *, median: bool = True) -> float:
    """Tokens/s of the steps after the first ``warmup`` (all steps when there are no more): the median
    of the per-step rates (robust to other tenants' bursts on a shared machine), or with
    ``median=False`` their tokens ÷ their total time."""
    ends = [(s["tokens"], s["elapsed"]) for s in steps]
    starts = [(0, 0.0)] + ends[:-1]
    per_step = [(t1 - t0, e1 - e0) for (t0, e0), (t1, e1) in zip(starts, ends)]
    timed = per_step[warmup:] if len(per_step) > warmup else per_step
    if median:
        return statistics.median(tokens / max(seconds, 1e-9) for tokens, seconds in timed)
    return sum(t for t, _ in timed) / max(sum(s for _, s in timed), 1e-9)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    from lowbit.memory import current_rss, peak_rss

    return int(peak_rss() or current_rss())


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's counter, or the process's VmHWM (Linux: writing 5 to clear_refs)."""
    from lowbit.memory import release_memory

    release_memory()  # drop load/quantize garbage first, as a long run would
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # then the train peak is the whole-process peak


if __name__ == "__main__":
    main()
