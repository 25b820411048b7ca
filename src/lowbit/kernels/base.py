"""The contract every weight-only linear kernel implements, and the autograd wrapper around it.

A kernel family (reference, CPU, Triton …) is a :class:`WeightKernel`:

* ``supports(weight)`` says whether it handles this stored weight (format, bits, group size …);
* ``prepare(weight)`` repacks the stored tensors into the kernel's preferred layout **once** (when a
  :class:`~lowbit.nn.quant_linear.QuantLinear` first runs on a device, or when
  :func:`lowbit.kernels.dispatch.prepare_model` is called at load/quantize time) — never per call;
* ``apply(x, prepared, bias)`` computes ``y = x @ W.T + b`` for ``x`` [..., K] and returns [..., N]
  in ``x``'s dtype. It chooses its own path by batch size (GEMV for decode, GEMM for prefill);
* ``dequantize(prepared, dtype)`` (optional) gives W [N, K]; it serves the backward pass w.r.t. ``x``
  (y = x Wᵀ ⇒ dx = dy W), so fine-tuning through a quantized base uses the same kernels.

The reference kernel (kernels/reference.py: dequantize + float matmul) is the oracle: each fast
kernel is tested against it over a shape grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from lowbit.tensor import QuantizedWeight

Prepared = Any


@dataclass(frozen=True)
class WeightKernel:
    """A weight-only linear kernel family for one or more device types."""

    name: str
    device_types: tuple[str, ...]
    supports: Callable[[QuantizedWeight], bool]
    prepare: Callable[[QuantizedWeight], Prepared]
    apply: Callable[[torch.Tensor, Prepared, "torch.Tensor | None"], torch.Tensor]
    dequantize: Callable[[Prepared, torch.dtype], torch.Tensor] | None = None
    priority: int = 0  # the highest-priority supporting kernel wins

    def __repr__(self) -> str:
        return f"WeightKernel({self.name!r}, devices={self.device_types})"


@dataclass
class PreparedLinear:
    """A weight prepared for one kernel on one device (what QuantLinear caches)."""

    kernel: WeightKernel
    state: Prepared
    weight: QuantizedWeight  # the canonical stored weight (for the backward fallback)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _KernelLinear.apply(x, self, bias)
        return self.kernel.apply(x, self.state, bias)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.kernel.dequantize is not None:
            return self.kernel.dequantize(self.state, dtype)
        return self.weight.dequantize(dtype)


class _KernelLinear(torch.autograd.Function):
    """Forward through the fast kernel; backward w.r.t. x through the dequantized weight (W frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, prepared: PreparedLinear, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.prepared = prepared
        ctx.x_dtype = x.dtype
        return prepared.kernel.apply(x, prepared.state, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = ctx.prepared.dequantize(grad_out.dtype)  # [N, K]
            grad_x = (grad_out @ w).to(ctx.x_dtype)
        grad_bias = None
        if ctx.needs_input_grad[2]:  # a trained bias (adapters' bias="all" / "lora_only")
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias
