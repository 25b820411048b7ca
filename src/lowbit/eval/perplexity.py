"""Perplexity of a causal LM on a text, over fixed windows (non-overlapping, or sliding with a stride).

The windows are shared with :mod:`lowbit.eval.kl`, so perplexity and KL divergence of different
models are always taken over the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    stride: int | None = None  # None: non-overlapping windows


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` of the text go through the model; targets ``[score_from, end)`` are scored.

    Position ``t`` of the text is predicted from the window's logits at ``t - 1 - start``, so
    ``score_from > start`` always (the window's first token has no context inside it).
    """

    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def text_windows(n_tokens: int, seq_len: int = DEFAULT_SEQ_LEN, stride: int | None = None) -> list[Window]:
    """The windows perplexity and KL divergence score a text of ``n_tokens`` tokens over.

    ``stride=None`` (or ``stride == seq_len``): non-overlapping windows ``[i·L, (i+1)·L)`` (the last,
    shorter one included), each predicting its tokens 2..L. ``stride=S < L``: Hugging Face's strided
    perplexity — windows of L tokens starting every S tokens, each scoring only the tokens the previous
    window did not (the last S of a full window), until a window reaches the end of the text; every
    token but the first is then predicted exactly once, with at least ``L − S`` tokens of context after
    the first window.
    """
    if seq_len < 2:
        raise InvalidSpecError(f"seq_len must be ≥ 2, got {seq_len}")
    if n_tokens < 2:
        raise InvalidSpecError("text is too short: fewer than 2 tokens")
    if stride is not None and not 1 <= stride <= seq_len:
        raise InvalidSpecError(f"stride must be between 1 and seq_len ({seq_len}), got {stride}")
    step = seq_len if stride is None else stride
    windows: list[Window] = []
    prev_end = 0
    for start in range(0, n_tokens, step):
        end = min(start + seq_len, n_tokens)
        window = Window(start, end, max(prev_end, start + 1))
        if window.scored > 0:
            windows.append(window)
        prev_end = end
        if end == n_tokens:
            break
    return windows


def window_batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Full-length windows ``batch_size`` at a time (in text order), then each shorter one alone."""
    if batch_size < 1:
        raise InvalidSpecError(f"batch_size must be ≥ 1, got {batch_size}")
    length = max(w.length for w in windows)
    full = [w for w in windows if w.length == length]
    rest = [w for w in windows if w.length != length]
    return [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in rest]


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def window_logits(model: nn.Module, ids: torch.Tensor, batch: list[Window]) -> torch.Tensor:
    """Float32 logits [B, L, V] of a batch of equal-length windows of ``ids`` ([T] int64)."""
    from lowbit.eval.numerics import check_finite_output

    inputs = torch.stack([ids[w.start : w.end] for w in batch]).to(model_device(model))  # [B, L]
    logits = model(input_ids=inputs).logits  # [B, L, V] (+ virtual positions in front: prompt tuning)
    check_finite_output(model, logits, lambda: model(input_ids=inputs))  # names the layer that made a NaN
    return logits[:, logits.shape[1] - inputs.shape[1]:].float()


def scored_positions(batch: list[Window], logits: torch.Tensor, ids: torch.Tensor
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per window: (logits [S, V] that predict its scored targets, those targets [S] int64)."""
    for row, w in enumerate(batch):
        first = w.score_from - 1 - w.start
        yield logits[row, first : w.length - 1], ids[w.score_from : w.end].to(logits.device)


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, *, seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 8,
               stride: int | None = None, show_progress: bool = False) -> PerplexityResult:
    """exp(mean NLL) over :func:`text_windows` of ``token_ids``.

    Default: windows ``token_ids[i*L:(i+1)*L]`` (the last, shorter window included), each scored
    independently (no context carried over), predicting tokens 2..L of it. With ``stride`` S < L:
    sliding windows of L tokens advancing by S, each scoring only its last S tokens (all of the first
    window), as Hugging Face's strided perplexity; ``stride=seq_len`` is the default.

    Args:
        token_ids: [T] int64 token ids of the whole text.
    """
    ids = token_ids.reshape(-1)
    windows = text_windows(ids.numel(), seq_len, stride)
    total_nll = 0.0
    total_tokens = 0
    for batch in progress(window_batches(windows, batch_size), desc="perplexity", enabled=show_progress,
                          unit="batch"):
        logits = window_logits(model, ids, batch)
        if all(w.score_from == w.start + 1 for w in batch):  # every position scored: one call
            targets = torch.stack([ids[w.start + 1 : w.end] for w in batch]).to(logits.device)
            nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              reduction="sum")
            total_nll += nll.item()
            total_tokens += targets.numel()
            continue
        for scored, targets in scored_positions(batch, logits, ids):
            total_nll += nn.functional.cross_entropy(scored, targets, reduction="sum").item()
            total_tokens += targets.numel()
    return PerplexityResult(math.exp(total_nll / total_tokens), total_tokens, seq_len, len(windows), stride)


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


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids [T] of ``text`` (no special tokens), without the tokenizer's max-length warning."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
