"""Reference kernels: dequantize, then a float matmul. Always available; the oracle for fast kernels.

``linear`` is weight-only. ``linear_w8a8`` and ``linear_llm_int8`` also quantize the input
activations (:class:`~lowbit.formats.act.ActSpec`): they compute, in float32,
``dequant(x_q) @ dequant(W)ᵀ + b`` — exactly what an int8×int8→int32 GEMM followed by scaling with
per-token (or per-tensor) activation scales × per-channel weight scales computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats import primitives as P
from lowbit.formats.act import ActSpec
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


# ---- activation quantization ---------------------------------------------------------------
def quantize_activation(x: torch.Tensor, act_spec: ActSpec, input_scale: torch.Tensor | None = None,
                        input_zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize activations ``x`` [M, K] (float32) to integer codes.

    Dynamic specs compute the scale from ``x`` (per row = per token, or per tensor); static specs
    use the calibrated ``input_scale``/``input_zero`` (float32 [1]).
    Returns:
        codes [M, K] float32, integer-valued (in [-2**(b-1), 2**(b-1)-1] when symmetric, else
        [0, 2**b - 1]); scale and zero [M, 1] (per token) or [1, 1] (per tensor).
    """
    m, k = x.shape
    if act_spec.dynamic:
        view = x.reshape(m, 1, k) if act_spec.granularity == "token" else x.reshape(1, 1, m * k)
        scale, zero = P.choose_qparams(view, act_spec.bits, act_spec.symmetric)
    else:
        if input_scale is None or input_zero is None:
            raise ValueError("static activation quantization needs input_scale and input_zero")
        view = x.reshape(1, 1, m * k)
        scale, zero = input_scale.float().reshape(1, 1), input_zero.float().reshape(1, 1)
    codes = P.quantize_affine(view, scale, zero, act_spec.bits, act_spec.symmetric)
    return codes.reshape(m, k), scale, zero


def fake_quantize_activation(x: torch.Tensor, act_spec: ActSpec, input_scale: torch.Tensor | None = None,
                             input_zero: torch.Tensor | None = None) -> torch.Tensor:
    """``dequant(quant(x))`` for ``x`` [M, K] float32: the values an int8 GEMM effectively multiplies."""
    codes, scale, zero = quantize_activation(x, act_spec, input_scale, input_zero)
    return (codes - zero) * scale


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8(): bool [K], True for the input columns of ``x`` [M, K] where any ``|x| > threshold``."""
    return (x.abs() > threshold).any(dim=0)


def linear_w8a8(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, act_spec: ActSpec,
                input_scale: torch.Tensor | None = None, input_zero: torch.Tensor | None = None) -> torch.Tensor:
    """y = dequant(quant(x)) @ W.T + b (activations quantized per ``act_spec``; any weight format).

    Args:
        x: [..., in_features], floating point. The rounding is passed straight through for the
            gradient w.r.t. ``x``.
        weight: the stored weight [out_features, in_features].
        bias: [out_features] or None.
        act_spec: how ``x`` is quantized (``outlier_threshold`` set: see :func:`linear_llm_int8`).
        input_scale, input_zero: float32 [1], the calibrated qparams of a static ``act_spec``.
    Returns:
        [..., out_features] in x's dtype (computed in float32).
    """
    if act_spec.outlier_threshold is not None:
        return linear_llm_int8(x, weight, bias, act_spec)
    x2d = x.reshape(-1, x.shape[-1]).float()
    xq = fake_quantize_activation(x2d.detach(), act_spec, input_scale, input_zero)
    return _float_linear(x2d, xq, weight, bias).reshape(*x.shape[:-1], -1).to(x.dtype)


def linear_llm_int8(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                    act_spec: ActSpec) -> torch.Tensor:
    """LLM.int8() (Dettmers et al. 2022): mixed-precision decomposition + vector-wise quantization.

    Input columns with any ``|x| > act_spec.outlier_threshold`` are multiplied in floating point
    with the dequantized weight columns; the other columns of ``x`` are quantized per
    ``act_spec`` (per-token scales for LLM.int8) and go through the int8 path. Shapes as
    :func:`linear_w8a8`.
    """
    assert act_spec.outlier_threshold is not None
    x2d = x.reshape(-1, x.shape[-1]).float()
    cols = outlier_columns(x2d.detach(), act_spec.outlier_threshold)  # [K]
    regular = x2d.detach().masked_fill(cols, 0.0)  # outliers do not inflate the per-token scales
    # quantizing 0 gives exactly 0, so the int8 part contributes nothing in the outlier columns
    xq = torch.where(cols, x2d.detach(), fake_quantize_activation(regular, act_spec))
    return _float_linear(x2d, xq, weight, bias).reshape(*x.shape[:-1], -1).to(x.dtype)


def _float_linear(x2d: torch.Tensor, xq: torch.Tensor, weight: QuantizedWeight,
                  bias: torch.Tensor | None) -> torch.Tensor:
    # straight-through: the forward uses xq, the gradient w.r.t. x is that of x @ W.T
    xq = x2d + (xq - x2d).detach() if x2d.requires_grad else xq
    return F.linear(xq, weight.dequantize(torch.float32), None if bias is None else bias.float())
