"""Sentence-embedding similarity between a (quantized) encoder and its float reference."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lowbit.progress import progress


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer: Any, sentences: Sequence[str], *, batch_size: int = 32,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states (as sentence-transformers' MiniLM does), L2-normalised: [S, D]."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()  # [B, L, D]
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def embedding_similarity(model: nn.Module, reference: nn.Module, tokenizer: Any, sentences: Sequence[str], *,
                         batch_size: int = 32, show_progress: bool = False) -> float:
    """Mean cosine similarity of each sentence's embedding under ``model`` and ``reference``."""
    total = 0.0
    chunks = [sentences[i : i + 256] for i in range(0, len(sentences), 256)]
    for chunk in progress(chunks, desc="similarity", enabled=show_progress, unit="chunk"):
        a = sentence_embeddings(model, tokenizer, chunk, batch_size=batch_size)
        b = sentence_embeddings(reference, tokenizer, chunk, batch_size=batch_size)
        total += (a * b).sum(-1).sum().item()
    return total / len(sentences)
