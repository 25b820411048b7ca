"""One small training loop (nanoGPT-style) for fine-tuning, QAT and distillation.

    trainer = Trainer(model, TrainConfig(steps=200, batch_size=8, lr=2e-4, out_dir="run"), train_data, eval_data)
    result = trainer.train()

The model is any ``nn.Module`` called as ``model(input_ids=..., attention_mask=...)`` returning an
object with ``.logits`` (``[B, S, V]`` for ``task="causal_lm"``, ``[B, C]`` for ``"classification"``).
Parameters with ``requires_grad=True`` are trained; the rest stay frozen. Each optimizer step:

    rows of the global batch (deterministic from ``seed``) → forward (autocast) → summed CE / global label count
    → backward (× grad_accum micro-batches) → NaN/Inf check → clip → optimizer.step()
    → callbacks.after_optimizer_step → zero_grad → eval / log / checkpoint

Callbacks are plain objects with any of: ``extra_loss(model, step) -> Tensor | None`` (added to the
loss once per step, in the last micro-batch's backward; not part of the logged loss),
``after_optimizer_step(model, step)`` (gradients are still in ``p.grad``), ``on_log(record)`` (rank 0
only). Steps are numbered from 1. The logged ``loss`` is the token-mean cross-entropy of the step.
Two runs with the same config and seed give bit-identical parameters on CPU, also across a
kill + ``resume=True`` (see :mod:`lowbit.train.checkpoint`); under ``torchrun`` see
:mod:`lowbit.train.distributed`.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InvalidSpecError
from lowbit.memory import current_rss, format_bytes, peak_rss, release_memory, trim_heap
from lowbit.train import checkpoint as ckpt_io
from lowbit.train.data import IGNORE_INDEX
from lowbit.train.distributed import DistContext, all_gather, all_reduce_sum, init_distributed, wrap_ddp
from lowbit.train.errors import CheckpointMismatchError, NonFiniteLossError
from lowbit.train.logs import PLOT_NAME, TrainLog, plot_loss

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adamw8bit")
COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASKS = ("causal_lm", "classification")


@dataclass
class TrainConfig:
    """Everything a run needs besides the model and data. Batch sizes are per process (per rank).

    ``schedule``: lr after ``warmup_steps`` of linear warm-up — ``linear`` decay / ``cosine`` decay to
    ``min_lr_ratio·lr``, or ``constant``. ``eval_batches``: batches of eval data per evaluation
    (``None`` = all). ``out_dir``: logs, plot and checkpoint (``None`` = write nothing).
    ``resume``: continue from ``out_dir/checkpoint`` when one exists (else start fresh).
    ``compute_dtype``: autocast dtype for forward/backward (master weights keep their dtype).
    """

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    eval_batches: int | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    out_dir: str | Path | None = None
    resume: bool = False
    compute_dtype: str = "float32"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    show_progress: bool = True
    task: str = "causal_lm"
    plot: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if int(getattr(self, name)) < 1:
                raise InvalidSpecError(f"TrainConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        for name, allowed in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS), ("compute_dtype", COMPUTE_DTYPES),
                              ("task", TASKS)):
            if getattr(self, name) not in allowed:
                raise InvalidSpecError(f"TrainConfig.{name}={getattr(self, name)!r}; "
                                       f"choose one of {', '.join(allowed)}")
        if (self.checkpoint_every or self.resume) and self.out_dir is None:
            raise InvalidSpecError("TrainConfig: checkpoint_every/resume need an out_dir")
        if self.lr <= 0 or self.warmup_steps < 0 or self.eval_every < 0 or self.checkpoint_every < 0:
            raise InvalidSpecError("TrainConfig: lr must be > 0 and warmup_steps/eval_every/checkpoint_every ≥ 0")


@dataclass
class TrainResult:
    """What a run did. ``final_loss``: the last step's train loss; ``eval_loss``: the last evaluation
    (``None`` without eval data); ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` on CUDA,
    the process's peak RSS (whole process, model loading included) on CPU; ``tokens_per_s`` counts
    non-padding tokens of all ranks over this run's wall time; ``history``: the logged records."""

    steps: int
    tokens: int
    tokens_per_s: float
    final_loss: float
    eval_loss: float | None
    peak_memory_bytes: int
    seconds: float
    log_path: Path | None = None
    plot_path: Path | None = None
    checkpoint_path: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of step ``step`` (1-based)."""
    s = step - 1
    if s < config.warmup_steps:
        return config.lr * (s + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (s - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    low = config.min_lr_ratio
    if config.schedule == "cosine":
        return config.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))
    return config.lr * (1 - (1 - low) * progress)


class BatchOrder:
    """The global example order: a fresh ``torch.randperm`` per epoch from ``(seed, epoch)``.

    ``rows(start, count)`` are the example indices at stream positions ``[start, start+count)``;
    positions run on across epochs, so a run is resumed from one integer.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def rows(self, start: int, count: int) -> torch.Tensor:
        return torch.stack([self._perm_of(p // self.n)[p % self.n] for p in range(start, start + count)])


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        from lowbit.train.adamw8bit import AdamW8bit

        return AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _collate(data: Any, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    if hasattr(data, "batch"):
        return data.batch(rows)
    items = [data[int(i)] for i in rows]
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in items[0]}


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str = "causal_lm",
             compute_dtype: str = "float32") -> torch.Tensor:
    """Summed cross-entropy over the label tokens (causal LM: logits[:, :-1] predict labels[:, 1:])."""
    dtype = COMPUTE_DTYPES[compute_dtype]
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    if task == "causal_lm":
        # prompt tuning prepends virtual positions: the last S logits belong to the S input tokens
        logits = logits[:, logits.shape[1] - labels.shape[1]:]
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def eval_loss(model: nn.Module, data: Any, *, batch_size: int = 8, task: str = "causal_lm") -> float:
    """Token-mean loss of ``model`` on ``data`` (any model: no trainable parameters needed)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in _collate(data, torch.arange(start, min(start + batch_size,
                                                                                      len(data)))).items()}
        total += float(summed_loss(model, batch, task))
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if task == "causal_lm" else batch["labels"].numel()
    model.train(was_training)
    return total / max(count, 1)


class Trainer:
    def __init__(self, model: nn.Module, config: TrainConfig, train_data: Any, eval_data: Any = None,
                 callbacks: Sequence[Any] = ()) -> None:
        self.model, self.config = model, config
        self.train_data, self.eval_data = train_data, eval_data
        self.callbacks = list(callbacks)
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.named:
            raise InvalidSpecError("the model has no trainable parameters (none with requires_grad=True)")
        if len(train_data) == 0:
            raise InvalidSpecError("the training data holds no examples")
        self.out_dir = Path(config.out_dir) if config.out_dir is not None else None

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.config
        dist = init_distributed()
        torch.manual_seed(cfg.seed + dist.rank)
        was_training = self.model.training
        device = self._prepare_model(dist)
        release_memory()  # what loading/quantizing freed goes back to the OS before the peak is measured
        model = wrap_ddp(self.model, dist) if dist.enabled else self.model
        optimizer = make_optimizer(list(self.named.values()), cfg)
        run = {"step": 0, "position": 0, "tokens": 0, "elapsed": 0.0, "loss": float("nan"), "eval_loss": None}
        if cfg.resume and self.out_dir is not None and (path := ckpt_io.find_checkpoint(self.out_dir)):
            run.update(self._restore(ckpt_io.load_checkpoint(path), optimizer, dist))
        log = TrainLog(self.out_dir, resume_step=run["step"]) if dist.is_main and self.out_dir else None
        order = BatchOrder(len(self.train_data), cfg.seed)
        is_cuda = device.type == "cuda"
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        bar = self._progress_bar(run["step"], dist)
        t0, last_log, ckpt_path = time.perf_counter(), (time.perf_counter(), run["tokens"]), None
        run_tokens = 0
        for step in range(run["step"] + 1, cfg.steps + 1):
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = self._step_batches(order, run["position"], dist, device)
            run["position"] += cfg.batch_size * dist.world_size * cfg.grad_accum
            loss, tokens = self._forward_backward(model, batches, step, dist)
            grad_norm = self._check_finite(step, loss, run["step"])
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(self.named.values(), cfg.max_grad_norm, grad_norm)
            optimizer.step()
            for cb in self.callbacks:
                if hasattr(cb, "after_optimizer_step"):
                    cb.after_optimizer_step(self.model, step)
            optimizer.zero_grad(set_to_none=True)
            if step % 4 == 1:  # the step's activations were freed: keep fragmentation from raising the peak
                trim_heap()
            run.update(step=step, loss=loss, tokens=run["tokens"] + tokens)
            run_tokens += tokens
            now = time.perf_counter()
            due = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
            evaluated = self.eval_data is not None and bool(due)
            if evaluated:
                run["eval_loss"] = self.evaluate(dist, device)
            if step % cfg.log_every == 0 or step == cfg.steps or evaluated:
                rate = (run["tokens"] - last_log[1]) / max(now - last_log[0], 1e-9)
                record = {"step": step, "loss": loss, "lr": lr, "tokens": run["tokens"], "tokens_per_s": rate,
                          "eval_loss": run["eval_loss"] if evaluated else None,
                          "elapsed": run["elapsed"] + now - t0}
                last_log = (now, run["tokens"])
                if log is not None:
                    log.write(record)
                if dist.is_main:
                    for cb in self.callbacks:
                        if hasattr(cb, "on_log"):
                            cb.on_log(record)
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                ckpt_path = self._save(optimizer, dict(run, elapsed=run["elapsed"] + now - t0), dist)
            if bar is not None:
                bar.set_postfix_str(f"loss {loss:.4f}  {run_tokens / max(now - t0, 1e-9):,.0f} tok/s  "
                                    f"mem {format_bytes(self._memory_now(device))}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        self.model.train(was_training)
        seconds = time.perf_counter() - t0
        plot_path = None
        if log is not None and cfg.plot and log.records:
            plot_path = plot_loss(log.records, self.out_dir / PLOT_NAME)
        peak = torch.cuda.max_memory_allocated(device) if is_cuda else (peak_rss() or current_rss())
        return TrainResult(steps=run["step"], tokens=run["tokens"], tokens_per_s=run_tokens / max(seconds, 1e-9),
                           final_loss=run["loss"], eval_loss=run["eval_loss"], peak_memory_bytes=int(peak),
                           seconds=seconds, log_path=log.csv_path if log else None, plot_path=plot_path,
                           checkpoint_path=ckpt_path, history=list(log.records) if log else [])

    # ---- one step ------------------------------------------------------------------------------
    def _step_batches(self, order: BatchOrder, position: int, dist: DistContext,
                      device: torch.device) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches: rows ``[r·B, (r+1)·B)`` of each global micro-batch of ``B·world`` rows."""
        b, world = self.config.batch_size, dist.world_size
        batches = []
        for a in range(self.config.grad_accum):
            rows = order.rows(position + a * b * world + dist.rank * b, b)
            batches.append({k: v.to(device) for k, v in _collate(self.train_data, rows).items()})
        return batches

    def _forward_backward(self, model: nn.Module, batches: list[dict[str, torch.Tensor]], step: int,
                          dist: DistContext) -> tuple[float, int]:
        """Accumulate gradients of the global token-mean loss → (that loss, global tokens this step)."""
        counts = torch.tensor([[self._label_count(b), int(b["attention_mask"].sum())] for b in batches]).sum(0)
        n_labels, tokens = (int(x) for x in all_reduce_sum(counts.double(), dist))
        loss_sum = torch.zeros((), dtype=torch.float64)
        for a, batch in enumerate(batches):
            last = a == len(batches) - 1
            with nullcontext() if last or not dist.enabled else model.no_sync():
                summed = self._loss_sum(model, batch)
                # DDP averages gradients over ranks; × world_size turns that into the exact global sum.
                loss = summed * (dist.world_size / max(n_labels, 1))
                if last:
                    for cb in self.callbacks:
                        extra = cb.extra_loss(self.model, step) if hasattr(cb, "extra_loss") else None
                        if extra is not None:
                            loss = loss + extra
                loss.backward()
            loss_sum += summed.detach().double().cpu()
        return float(all_reduce_sum(loss_sum, dist)) / max(n_labels, 1), tokens

    def _label_count(self, batch: dict[str, torch.Tensor]) -> int:
        labels = batch["labels"]
        labels = labels[:, 1:] if self.config.task == "causal_lm" else labels
        return int((labels != IGNORE_INDEX).sum())

    def _loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(model, batch, self.config.task, self.config.compute_dtype)

    def _check_finite(self, step: int, loss: float, good_step: int) -> torch.Tensor:
        """The gradient norm; stops before the optimizer step when the loss or a gradient is NaN/Inf."""
        grads = [p.grad for p in self.named.values() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if math.isfinite(loss) and bool(torch.isfinite(norm)):
            return norm
        bad = next((n for n, p in self.named.items()
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())), None)
        where = f"the gradient of {bad} holds NaN/Inf" if bad else "the gradients are finite"
        kept = f"; the checkpoint of step {good_step} is kept" if self.config.checkpoint_every and good_step else ""
        raise NonFiniteLossError(f"step {step}: loss is {loss}, {where}; stopped before the optimizer step{kept} "
                                 "(lower the lr, enable max_grad_norm, or use compute_dtype=float32)",
                                 step=step, parameter=bad)

    @torch.no_grad()
    def evaluate(self, dist: DistContext | None = None, device: torch.device | None = None) -> float:
        """Token-mean eval loss over ``eval_batches`` batches of the eval data (split over ranks)."""
        dist = dist or DistContext()
        device = device or next(iter(self.named.values())).device
        n, b = len(self.eval_data), self.config.batch_size
        limit = n if not self.config.eval_batches else min(n, self.config.eval_batches * b * dist.world_size)
        totals = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        for start in range(dist.rank * b, limit, b * dist.world_size):
            rows = torch.arange(start, min(start + b, limit))
            batch = {k: v.to(device) for k, v in _collate(self.eval_data, rows).items()}
            totals[0] += float(self._loss_sum(self.model, batch))
            totals[1] += self._label_count(batch)
        self.model.train()
        loss_sum, count = all_reduce_sum(totals, dist).tolist()
        return loss_sum / max(count, 1)

    # ---- setup, checkpoints, progress ------------------------------------------------------------
    def _prepare_model(self, dist: DistContext) -> torch.device:
        device = next(iter(self.named.values())).device
        if dist.enabled and torch.cuda.is_available() and device.type == "cpu":
            device = torch.device("cuda", dist.local_rank)
            self.model.to(device)
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model.train()
        return device

    def _restore(self, ckpt: ckpt_io.Checkpoint, optimizer: torch.optim.Optimizer, dist: DistContext) -> dict[str, Any]:
        ckpt_io.check_params(self.named, ckpt)
        saved = ckpt.state.get("config", {})
        if saved.get("optimizer", self.config.optimizer) != self.config.optimizer:
            raise CheckpointMismatchError(f"{ckpt.path}: written with optimizer {saved.get('optimizer')!r}, "
                                          f"resumed with {self.config.optimizer!r}")
        with torch.no_grad():
            for name, p in self.named.items():
                p.copy_(ckpt.params[name])
        ckpt_io.restore_optimizer(optimizer, self.named, ckpt)
        ckpt_io.restore_rng(ckpt, dist.rank)
        ckpt_io.restore_callbacks(self.callbacks, ckpt)
        return {k: ckpt.state[k] for k in ("step", "position", "tokens", "elapsed", "loss", "eval_loss")}

    def _save(self, optimizer: torch.optim.Optimizer, run: dict[str, Any], dist: DistContext) -> Path | None:
        rng, rng_values = ckpt_io.rng_state(0)
        for key in [k for k in rng if k.startswith("torch_")]:  # every rank's torch RNG, gathered to rank 0
            kind = key.split(".")[0]
            for r, t in enumerate(all_gather(rng.pop(key), dist)):
                rng[f"{kind}.rank{r}"] = t
        if not dist.is_main:
            return None
        tensors, scalars = ckpt_io.optimizer_tensors(optimizer, self.named)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()}
        cb_tensors, cb_values = ckpt_io.callback_state(self.callbacks)
        state = dict(run, world_size=dist.world_size, config=config, optimizer_scalars=scalars, callbacks=cb_values,
                     **rng_values)
        return ckpt_io.save_checkpoint(self.out_dir, params=dict(self.named), optimizer=tensors, rng=rng, state=state,
                                       callbacks=cb_tensors)

    def _progress_bar(self, start: int, dist: DistContext) -> Any:
        if not (self.config.show_progress and dist.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.steps, initial=start, desc="train", unit="step", file=sys.stderr,
                    leave=False, dynamic_ncols=True)

    @staticmethod
    def _memory_now(device: torch.device) -> int:
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (HF models; non-reentrant, so frozen-base adapters still get gradients)."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise InvalidSpecError(f"gradient_checkpointing: {type(model).__name__} has no gradient_checkpointing_enable() "
                               "(only Hugging Face models are supported)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False

