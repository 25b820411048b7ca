"""Fast CPU W8A8: int8 activations × int8 weights → int32 with ``torch._int_mm``, then the scales.

Exact integer accumulation, so it matches :func:`lowbit.kernels.reference.linear_w8a8` up to
float32 rounding of the final scaling (the reference rounds inside its float matmul instead).
Handles symmetric int8 weights with per-channel or per-tensor scales and any activation spec
(≤ 8-bit codes, symmetric or asymmetric, static or dynamic, with or without LLM.int8 outlier columns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats.act import ActSpec
from lowbit.kernels import reference
from lowbit.tensor import QuantizedWeight


def supports_int8(weight: QuantizedWeight, act_spec: ActSpec | None) -> bool:
    spec = weight.spec
    return (act_spec is not None and hasattr(torch, "_int_mm")
            and spec.format == "int" and spec.bits == 8 and spec.symmetric and not spec.double_quant
            and spec.granularity in ("channel", "tensor"))


def linear_int8(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, act_spec: ActSpec,
                input_scale: torch.Tensor | None = None, input_zero: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`lowbit.kernels.reference.linear_w8a8` (no gradient: falls back to it)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return reference.linear_w8a8(x, weight, bias, act_spec, input_scale, input_zero)
    x2d = x.reshape(-1, x.shape[-1]).float()  # [M, K]
    w_codes = (weight.tensors["qdata"] ^ 128).view(torch.int8)  # stored code q+128 → q, [N, K]
    w_scale = weight.scale.reshape(1, -1)  # [1, N] or [1, 1]
    cols = None
    if act_spec.outlier_threshold is not None:
        cols = reference.outlier_columns(x2d, act_spec.outlier_threshold)
        codes, scale, zero = reference.quantize_activation(x2d.masked_fill(cols, 0.0), act_spec)
    else:
        codes, scale, zero = reference.quantize_activation(x2d, act_spec, input_scale, input_zero)
    if act_spec.symmetric:
        acc = torch._int_mm(codes.to(torch.int8), w_codes.t())  # [M, N] int32
    else:  # (q − z) = (q − 128) − (z − 128): shift both into int8 range, correct with the weight row sums
        acc = torch._int_mm((codes - 128).to(torch.int8), w_codes.t())
        acc -= (zero - 128).to(torch.int32) * w_codes.sum(dim=1, dtype=torch.int32).reshape(1, -1)
    y = acc.float() * scale * w_scale
    if cols is not None and bool(cols.any()):
        w_cols = w_codes[:, cols].float() * w_scale.reshape(-1, 1)  # dequantized outlier columns [N, k_out]
        y += F.linear(x2d[:, cols], w_cols)
    if bias is not None:
        y += bias.float()
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)
