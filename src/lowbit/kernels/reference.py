"""Reference kernel: dequantize, then a float matmul. Always available; the oracle for fast kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.tensor import QuantizedWeight


def linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + b.

    Args:
        x: [..., in_features], floating point; gradients flow to ``x`` (the stored weight is frozen).
        weight: the stored weight [out_features, in_features].
        bias: [out_features] or None.
    Returns:
        [..., out_features] in x's dtype.
    """
    w = weight.dequantize(dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
