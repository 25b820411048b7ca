"""Per-input-channel scaling folded into the preceding normalisation layer (shared by AWQ and SmoothQuant).

For linears that read the output of a norm layer (y = γ·x̂ + β), multiplying their weights' input
columns by s and dividing γ, β by s leaves the model's function unchanged — *if* nothing else reads
that norm output. Pairs are found generically (a linear whose input tensor *is* a norm's output
tensor in a forward pass), and every fold is verified numerically on the block, which rejects e.g.
post-LN models (BERT) where the norm output is also the residual stream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.models.targets import is_conv1d, is_linear


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm-like: a 1-D ``weight`` scaling the last dimension, not a linear layer."""
    weight = getattr(module, "weight", None)
    return (not is_linear(module) and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and not isinstance(module, nn.Embedding) and "norm" in type(module).__name__.lower())


@torch.no_grad()
def norm_consumers(block: nn.Module, run: Any) -> dict[str, list[str]]:
    """{norm name: [linear names]} inside ``block`` where the linears read exactly that norm's output.

    ``run()`` performs one forward pass of the block.
    """
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keeps every norm output alive so no later tensor can reuse its id()
    consumers: dict[str, list[str]] = {}
    handles = []

    def record(name: str, out: torch.Tensor) -> None:
        alive.append(out)
        produced[id(out)] = name

    for name, module in block.named_modules():
        if is_norm(module):
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: record(name, out)))
        elif is_linear(module) and name:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: consumers.setdefault(produced.get(id(a[0]), ""), []).append(name)
                if a and id(a[0]) in produced else None))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {norm: sorted(set(linears)) for norm, linears in consumers.items() if norm}


def scale_input_columns(module: nn.Module, scale: torch.Tensor) -> None:
    """W[:, j] *= s_j for an nn.Linear (weight [out, in]) or Conv1D (weight [in, out])."""
    with torch.no_grad():
        if is_conv1d(module):
            module.weight.mul_(scale.to(module.weight.dtype).unsqueeze(1))
        else:
            module.weight.mul_(scale.to(module.weight.dtype).unsqueeze(0))


def fold_into_norm(norm: nn.Module, linears: list[nn.Module], scale: torch.Tensor) -> None:
    """Divide the norm's output by ``scale`` [in] and multiply the linears' input columns by it."""
    with torch.no_grad():
        norm.weight.div_(scale.to(norm.weight.dtype))
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(scale.to(bias.dtype))
    for linear in linears:
        scale_input_columns(linear, scale)


@torch.no_grad()
def foldable_pairs(block: nn.Module, run: Any, rtol: float = 1e-3) -> dict[str, list[str]]:
    """The norm → linears pairs of ``block`` whose folding provably leaves its output unchanged.

    Each candidate is checked by folding a random positive scale, comparing the block output with
    the original, and undoing the fold.
    """
    pairs = norm_consumers(block, run)
    reference = _as_tensor(run())
    verified = {}
    gen = torch.Generator().manual_seed(0)
    for norm_name, linear_names in pairs.items():
        norm = block.get_submodule(norm_name)
        linears = [block.get_submodule(n) for n in linear_names]
        dim = norm.weight.shape[0]
        scale = (torch.rand(dim, generator=gen) * 1.5 + 0.5).to(norm.weight.device)
        saved = [t.detach().clone() for t in _fold_tensors(norm, linears)]
        fold_into_norm(norm, linears, scale)
        out = _as_tensor(run())
        for t, original in zip(_fold_tensors(norm, linears), saved):  # undo exactly
            t.data.copy_(original)
        err = (out - reference).abs().max() / reference.abs().max().clamp(min=1e-12)
        if err < rtol:
            verified[norm_name] = linear_names
    return verified


def _as_tensor(out: Any) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def _fold_tensors(norm: nn.Module, linears: list[nn.Module]) -> list[torch.Tensor]:
    tensors = [norm.weight] + ([norm.bias] if isinstance(getattr(norm, "bias", None), torch.Tensor) else [])
    return tensors + [linear.weight for linear in linears]
