"""KL divergence and top-1 agreement of a (quantized) model against its reference, streamed window by window.

For every window of the text (the same :func:`lowbit.eval.perplexity.text_windows` perplexity uses),
both models run on the same tokens; at every scored position the per-token divergence
``KL(P_ref ‖ P_model) = Σ_v p_ref(v) · (log p_ref(v) − log p_model(v))`` (nats) and whether the two
argmaxes agree are accumulated, and the logits are dropped. Memory is one batch of windows' logits per
model — llama.cpp's ``--kl-divergence`` instead stores every reference logit first (gigabytes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import UnsupportedModelError
from lowbit.eval.perplexity import DEFAULT_SEQ_LEN, scored_positions, text_windows, window_batches, window_logits
from lowbit.progress import progress

ROWS_PER_CHUNK = 64  # positions whose [rows, V] float32 temporaries exist at once


@dataclass
class KLResult:
    """Divergence of ``model`` from ``reference`` over ``tokens`` scored positions.

    ``kl`` is the mean per-token KL(P_ref ‖ P_model) in nats; ``kl_median``/``kl_p99``/``kl_max`` are
    quantiles of the per-token values; ``top1_agreement`` is the fraction of positions where both
    models' most likely next token is the same; ``ppl``/``reference_ppl`` are each model's perplexity on
    the same positions (computed from the same logits, free).
    """

    kl: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    tokens: int
    windows: int
    seq_len: int
    ppl: float
    reference_ppl: float
    stride: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(softmax(ref_logits) ‖ softmax(logits)) in nats: [N] float32 from two [N, V] inputs."""
    out = []
    for i in range(0, logits.shape[0], ROWS_PER_CHUNK):
        logp = torch.log_softmax(logits[i : i + ROWS_PER_CHUNK].float(), dim=-1)
        logq = torch.log_softmax(ref_logits[i : i + ROWS_PER_CHUNK].float(), dim=-1)
        out.append((logq.exp() * (logq - logp)).sum(-1).clamp_min(0.0))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def kl_divergence(model: nn.Module, reference: nn.Module, token_ids: torch.Tensor, *,
                  seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 8, stride: int | None = None,
                  show_progress: bool = False) -> KLResult:
    """Mean KL(P_reference ‖ P_model) and top-1 agreement over the perplexity windows of ``token_ids``.

    Both models must predict over the same vocabulary (same tokenizer); the reference runs on the
    model's device. Memory: one batch of windows' logits per model ([batch_size, seq_len, V] float32)
    plus 4 bytes per scored token for the quantiles.

    Args:
        token_ids: [T] int64 token ids of the text (tokenized with the models' shared tokenizer).
        seq_len, stride: the windows, as :func:`lowbit.eval.perplexity.perplexity` takes them.
    """
    ids = token_ids.reshape(-1)
    windows = text_windows(ids.numel(), seq_len, stride)
    per_token: list[torch.Tensor] = []
    agree = 0
    nll = ref_nll = 0.0
    for batch in progress(window_batches(windows, batch_size), desc="kl divergence", enabled=show_progress,
                          unit="batch"):
        logits = window_logits(model, ids, batch)  # [B, L, V]
        ref_logits = window_logits(reference, ids, batch).to(logits.device)
        if logits.shape[-1] != ref_logits.shape[-1]:
            raise UnsupportedModelError(f"the model predicts over {logits.shape[-1]} tokens and the reference over "
                                        f"{ref_logits.shape[-1]}: KL divergence needs the same vocabulary")
        for (p, targets), (q, _) in zip(scored_positions(batch, logits, ids), scored_positions(batch, ref_logits, ids)):
            per_token.append(token_kl(p, q).cpu())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            nll += nn.functional.cross_entropy(p, targets, reduction="sum").item()
            ref_nll += nn.functional.cross_entropy(q, targets, reduction="sum").item()
        del logits, ref_logits
    values = torch.cat(per_token).double().sort().values  # [N], ascending
    n = values.numel()
    return KLResult(kl=values.mean().item(), kl_median=_quantile(values, 0.5), kl_p99=_quantile(values, 0.99),
                    kl_max=values[-1].item(),
                    top1_agreement=agree / n, tokens=n, windows=len(windows), seq_len=seq_len,
                    ppl=math.exp(nll / n), reference_ppl=math.exp(ref_nll / n), stride=stride)


def _quantile(ascending: torch.Tensor, q: float) -> float:
    """The q-quantile of sorted values [N], interpolated linearly (numpy's and torch.quantile's default)."""
    pos = q * (ascending.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, ascending.numel() - 1)
    return (ascending[lo] + (pos - lo) * (ascending[hi] - ascending[lo])).item()


def check_same_vocabulary(tokenizer: Any, ref_tokenizer: Any, model_name: str, reference_name: str) -> None:
    """Raise :class:`UnsupportedModelError` unless both tokenizers map the same strings to the same ids."""
    vocab, ref_vocab = tokenizer.get_vocab(), ref_tokenizer.get_vocab()
    if vocab == ref_vocab:
        return
    differ = sorted(set(vocab.items()) ^ set(ref_vocab.items()), key=lambda kv: kv[1])[:3]
    raise UnsupportedModelError(
        f"{model_name} and {reference_name} have different tokenizers ({len(vocab)} vs {len(ref_vocab)} tokens; "
        f"e.g. {', '.join(f'{t!r}→{i}' for t, i in differ)}): KL divergence compares next-token distributions "
        "over one shared vocabulary")
