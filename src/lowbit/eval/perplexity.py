"""Perplexity of a causal LM on a text, over fixed non-overlapping windows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, ModelNotFoundError
from lowbit.progress import progress

DEFAULT_SEQ_LEN = 256


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int  # predicted tokens the mean NLL is taken over
    seq_len: int
    windows: int


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: text file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidSpecError(f"{path}: not UTF-8 text ({exc})") from None
    if not text.strip():
        raise InvalidSpecError(f"{path}: text file is empty")
    return text


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, *, seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 8,
               show_progress: bool = False) -> PerplexityResult:
    """exp(mean NLL) over windows ``token_ids[i*L:(i+1)*L]`` (the last, shorter window included).

    Each window is scored independently (no context carried over), predicting tokens 2..L of it.

    Args:
        token_ids: [T] int64 token ids of the whole text.
    """
    if seq_len < 2:
        raise InvalidSpecError(f"seq_len must be ≥ 2, got {seq_len}")
    ids = token_ids.reshape(-1)
    if ids.numel() < 2:
        raise InvalidSpecError("text is too short: fewer than 2 tokens")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    windows = [ids[i : i + seq_len] for i in range(0, ids.numel(), seq_len)]
    windows = [w for w in windows if w.numel() >= 2]
    full = [w for w in windows if w.numel() == seq_len]
    rest = [w for w in windows if w.numel() != seq_len]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w.unsqueeze(0) for w in rest]
    total_nll = 0.0
    total_tokens = 0
    for batch in progress(batches, desc="perplexity", enabled=show_progress, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits.float()  # [B, L, V] (+ virtual positions in front: prompt tuning)
        logits = logits[:, logits.shape[1] - batch.shape[1]:]
        nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                          reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return PerplexityResult(math.exp(total_nll / total_tokens), total_tokens, seq_len, len(windows))


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids [T] of ``text`` (no special tokens), without the tokenizer's max-length warning."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
