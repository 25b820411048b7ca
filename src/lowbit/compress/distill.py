"""Knowledge distillation on lowbit's trainer: the student learns the teacher's next-token distribution.

    DistillTrainer(student, TrainConfig(...), train_data, teacher=float_model, temperature=1.0, alpha=1.0).train()

The loss of a step is ``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, labels)``, summed over
the label positions and divided by their count (the trainer's token mean), forward KL by default, reverse
(``KL(s ‖ t)``, mode-seeking) on request. The teacher runs without gradients on the same batch. QAT uses it to
imitate the float model instead of fitting a small corpus (which over-fits: on the built-in LM, QAT by plain
cross-entropy on its calibration text made the held-out perplexity worse than GPTQ's start).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InvalidSpecError
from lowbit.train.data import IGNORE_INDEX
from lowbit.train.trainer import COMPUTE_DTYPES, Trainer, TrainConfig

KL_DIRECTIONS = ("forward", "reverse")


class DistillTrainer(Trainer):
    """:class:`~lowbit.train.trainer.Trainer` whose loss is distillation from ``teacher`` (causal LM)."""

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: Any, teacher: nn.Module, *,
                 temperature: float = 1.0, alpha: float = 1.0, kl: str = "forward", eval_data: Any = None,
                 callbacks: Sequence[Any] = ()) -> None:
        super().__init__(model, config, train_data, eval_data, callbacks)
        if config.task != "causal_lm":
            raise InvalidSpecError("distillation trains causal language models (task causal_lm)")
        if temperature <= 0 or not 0.0 <= alpha <= 1.0 or kl not in KL_DIRECTIONS:
            raise InvalidSpecError(f"distillation: temperature must be > 0, alpha in [0, 1], kl one of "
                                   f"{', '.join(KL_DIRECTIONS)} (got {temperature}, {alpha}, {kl!r})")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha, self.kl = temperature, alpha, kl

    def _loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = COMPUTE_DTYPES[self.config.compute_dtype]
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            teacher = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if teacher.shape[-1] != logits.shape[-1]:
            raise InvalidSpecError(f"teacher and student vocabularies differ ({teacher.shape[-1]} vs {logits.shape[-1]} "
                                   "logits): distillation needs the same tokenizer")
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        s, t = logits[:, :-1][keep].float(), teacher[:, :-1][keep].float()  # [n, V] at the label positions
        total = torch.zeros((), device=s.device)
        if self.alpha > 0:
            temp = self.temperature
            log_s, log_t = F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1)
            if self.kl == "forward":
                kd = (log_t.exp() * (log_t - log_s)).sum()
            else:
                kd = (log_s.exp() * (log_s - log_t)).sum()
            total = total + self.alpha * temp * temp * kd
        if self.alpha < 1:
            total = total + (1 - self.alpha) * F.cross_entropy(s, labels[keep], reduction="sum")
        return total
