"""Python entry points of the ``torch.ops.lowbit_cpu`` custom ops, and their fake (meta) kernels.

The fake kernels give ``torch.compile`` the output shapes, so a compiled model calls the C++
kernels as single opaque ops without graph breaks.
"""

from __future__ import annotations

import ctypes
import os

import torch

from lowbit.kernels.cpu_lowbit.build import load_library
from lowbit.kernels.cpu_lowbit.layout import ISAS, CpuPrepared

# Registers the ops (raises BuildError when they cannot be built), then makes the library's symbols
# global, so that code compiled by Inductor's C++ wrapper links to its C shims at load time.
_LIBRARY = ctypes.CDLL(load_library(), mode=os.RTLD_GLOBAL | os.RTLD_NOW)

# Op → the C declaration Inductor's C++ wrapper calls it through (``aot_inductor.custom_ops_to_c_shims``)
# instead of the boxed dispatcher: ~3 µs less per call, ~28 calls per token of a small model.
C_SHIMS: dict[torch._ops.OpOverload, list[str]] = {
    torch.ops.lowbit_cpu.qlinear.default: [
        "AOTITorchError aoti_torch_cpu_qlinear(AtenTensorHandle x, AtenTensorHandle packed, AtenTensorHandle* bias, "
        "int64_t kind, int64_t out_features, int64_t in_features, int64_t group_size, double out_scale, "
        "int64_t int_max_m, int64_t isa, AtenTensorHandle* ret0)"],
}


@torch.library.register_fake("lowbit_cpu::qlinear")
def _qlinear_fake(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, kind: int, out_features: int,
                  in_features: int, group_size: int, out_scale: float, int_max_m: int, isa: int) -> torch.Tensor:
    torch._check(x.shape[-1] == in_features)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("lowbit_cpu::dequantize")
def _dequantize_fake(packed: torch.Tensor, kind: int, out_features: int, in_features: int, group_size: int,
                     isa: int) -> torch.Tensor:
    return packed.new_empty((out_features, in_features), dtype=torch.float32)


def linear(x: torch.Tensor, prepared: CpuPrepared, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + b.

    Args:
        x: [..., K] float32/bfloat16/float16 on CPU.
        prepared: the weight W [N, K] in the kernel layout.
        bias: [N] or None.
    Returns:
        [..., N] in x's dtype. Up to ``prepared.int_max_m`` rows: int8 activations (per 32-column
        block, symmetric) × the weight codes with integer dot products — relative error ~5e-3
        (≲ 1e-2) against :func:`lowbit.kernels.reference.linear`; more rows, or an ``x`` that
        requires grad (training through the quantized weight): exact (dequantize + matmul), so the
        forward matches the backward, which uses the dequantized weight.
    """
    p = prepared
    if x.requires_grad and x.numel() >= 64 * p.in_features:
        # training: one parallel dequantize into x's dtype, then one multi-threaded matmul (AMX for bf16)
        return torch.nn.functional.linear(x, dequantize(p, x.dtype), None if bias is None else bias.to(x.dtype))
    int_max_m = 0 if x.requires_grad else p.int_max_m
    return torch.ops.lowbit_cpu.qlinear(x, p.packed, bias, p.kind, p.out_features, p.in_features, p.group_size,
                                        p.out_scale, int_max_m, p.isa)


def dequantize(prepared: CpuPrepared, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] in ``dtype`` (computed in fp32 exactly as the stored format defines it)."""
    p = prepared
    w = torch.ops.lowbit_cpu.dequantize(p.packed, p.kind, p.out_features, p.in_features, p.group_size, p.isa)
    return w.to(dtype)


def isa_name() -> str:
    """The instruction set the kernels use on this machine (``avx512``, ``avx2_vnni``, ``avx2``, ``scalar``)."""
    code = int(torch.ops.lowbit_cpu.isa())
    return next(name for name, value in ISAS.items() if value == code)
