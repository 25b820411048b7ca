"""Reference quantization math: the single source of truth and the oracle kernels are tested against.

All functions work on a *grouped view* of a weight: ``x`` of shape [R, G, g] where each of the R
rows has G groups of g values, with one scale (and zero-point) per group: scales are [R, G].
"""

from __future__ import annotations

import torch

from lowbit.errors import ShapeError
from lowbit.formats.spec import QuantSpec


def grouped(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> torch.Tensor:
    """View a 2-D weight [N, K] as [R, G, g] according to ``spec.granularity``.

    tensor → [1, 1, N*K]; channel → [N, 1, K]; group → [N, K/g, g].
    """
    n, k = weight.shape
    if spec.granularity == "tensor":
        return weight.reshape(1, 1, n * k)
    if spec.granularity == "channel":
        return weight.reshape(n, 1, k)
    g = spec.group_size
    assert g is not None
    if k % g:
        raise ShapeError(f"{name}: group_size {g} does not divide the input dimension {k} (shape {tuple(weight.shape)}); "
                         f"choose a group size that divides {k}")
    return weight.reshape(n, k // g, g)


def scale_shape(shape: tuple[int, int], spec: QuantSpec) -> tuple[int, int]:
    """Shape [R, G] of the scale tensor for a weight of ``shape`` [N, K]."""
    n, k = shape
    if spec.granularity == "tensor":
        return (1, 1)
    if spec.granularity == "channel":
        return (n, 1)
    assert spec.group_size is not None
    return (n, k // spec.group_size)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer codes before the unsigned storage offset."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def choose_qparams(x: torch.Tensor, bits: int, symmetric: bool, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max (asym) or absmax (sym) scale and integer zero-point per group.

    Args:
        x: [R, G, g] float.
    Returns:
        scale [R, G] float32 (> 0), zero [R, G] float32 integer-valued (all 0 when symmetric).
    """
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = x.abs().amax(dim=-1) / qmax
        scale = scale.clamp(min=eps)
        return scale, torch.zeros_like(scale)
    qmax = (1 << bits) - 1
    xmin = x.amin(dim=-1).clamp(max=0)  # include 0 so that zero is exactly representable
    xmax = x.amax(dim=-1).clamp(min=0)
    scale = ((xmax - xmin) / qmax).clamp(min=eps)
    zero = torch.round(-xmin / scale).clamp(0, qmax)
    return scale, zero


def zero_from_scale(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric zero-point [R, G] for groups ``x`` [R, G, g] given the (stored) scale."""
    xmin = x.amin(dim=-1).clamp(max=0)
    return torch.round(-xmin / scale).clamp(0, (1 << bits) - 1)


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """``q = clamp(round(x/S + Z))`` → integer codes [R, G, g] as float (signed when symmetric)."""
    qmin, qmax = int_range(bits, symmetric)
    return torch.clamp(torch.round(x / scale.unsqueeze(-1) + zero.unsqueeze(-1)), qmin, qmax)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``x' = (q − Z)·S`` with q [R, G, g], scale/zero [R, G]."""
    return (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def quantize_codebook(x: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code index of ``x/absmax`` in an ascending ``codebook`` (values in [-1, 1]). Returns uint8 [R, G, g]."""
    normalized = x / absmax.unsqueeze(-1)
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(normalized.contiguous(), midpoints.to(x.device)).to(torch.uint8)


def dequantize_codebook(codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return codebook.to(absmax.device)[codes.long()] * absmax.unsqueeze(-1)


def double_quantize(scales: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second-level quantization of first-level scales (QLoRA's double quantization).

    ``scales`` (any shape, M values) minus their mean are quantized to int8, symmetric, one fp32
    scale per ``block`` values. Returns (codes int8 [M], block_scale fp32 [ceil(M/block)], offset fp32 [1]).
    """
    flat = scales.reshape(-1).float()
    offset = flat.mean().reshape(1)
    centered = flat - offset
    m = flat.numel()
    pad = (-m) % block
    padded = torch.cat([centered, centered.new_zeros(pad)]).reshape(-1, block)
    block_scale = (padded.abs().amax(dim=1) / 127).clamp(min=1e-12)
    # round *up*: a decoded scale is never smaller than the true one, so no value ever clips
    codes = torch.ceil(padded / block_scale.unsqueeze(1) - 1e-6).clamp(-127, 127).to(torch.int8).reshape(-1)[:m]
    return codes, block_scale, offset


def double_dequantize(codes: torch.Tensor, block_scale: torch.Tensor, offset: torch.Tensor, block: int) -> torch.Tensor:
    flat = codes.reshape(-1).float()
    m = flat.numel()
    pad = (-m) % block
    c = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)
    return (c * block_scale.unsqueeze(1)).reshape(-1)[:m] + offset


# ---- error metrics -------------------------------------------------------------------------
def mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return torch.mean((reference.float() - approx.float()) ** 2).item()


def max_abs_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return (reference.float() - approx.float()).abs().max().item()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖x‖² / ‖x − x'‖²) (inf when exact)."""
    signal = reference.float().pow(2).sum()
    noise = (reference.float() - approx.float()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return (10 * torch.log10(signal / noise)).item()
