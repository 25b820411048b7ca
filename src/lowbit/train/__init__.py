"""A small plain-PyTorch trainer (data → batches → steps → checkpoints/resume → logs/plots), DDP-ready.

Used by fine-tuning (LoRA and other adapters), QAT and distillation: pass any ``nn.Module`` whose
trainable parameters have ``requires_grad=True``.
"""

from __future__ import annotations

from lowbit.train.data import (TokenDataset, load_causal_lm_data, load_classification_data, split_eval)
from lowbit.train.errors import CheckpointMismatchError, DataError, DataNotFoundError, NonFiniteLossError
from lowbit.train.trainer import TrainConfig, Trainer, TrainResult

__all__ = [
    "CheckpointMismatchError", "DataError", "DataNotFoundError", "NonFiniteLossError", "TokenDataset",
    "TrainConfig", "TrainResult", "Trainer", "load_causal_lm_data", "load_classification_data", "split_eval",
]
