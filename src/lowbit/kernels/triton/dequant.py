"""Dequantize a prepared weight to a dense W [N, K] (the backward pass w.r.t. the input: dx = dy · W)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton import tuning
from lowbit.kernels.triton.layout import TritonWeight
from lowbit.kernels.triton.tiles import dequant_tile

_c = tuning.config
_CONFIGS = tuning.pick([_c(BLOCK_N=64, BLOCK_K=128), _c(BLOCK_N=128, BLOCK_K=64), _c(8, 2, BLOCK_N=128, BLOCK_K=128)],
                       interpret_config=_c(BLOCK_N=32, BLOCK_K=32))


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _dequant_kernel(codes_ptr, scale_ptr, zero_ptr, lut_ptr, out_ptr, N, K,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO_CONST: tl.constexpr,
                    USE_LUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[N, K] = W in out's dtype (computed in float32, then rounded once, like the reference).

    Grid: (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N)).
    """
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_t = dequant_tile(codes_ptr, scale_ptr, zero_ptr, lut_ptr, k0, offs_k, offs_n, N, K,
                       BITS, GROUP, BLOCK_K, HAS_ZERO, ZERO_CONST, USE_LUT)  # Wᵀ tile [BLOCK_K, BLOCK_N]
    w = tl.trans(w_t)  # [BLOCK_N, BLOCK_K]: the store below is then contiguous along K
    offs = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


def dequantize(weight: TritonWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` (float16/bfloat16/float32; others via float32).

    Equals :meth:`lowbit.tensor.QuantizedWeight.dequantize` of the weight it was prepared from.
    """
    n, k = weight.shape
    kernel_dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    out = torch.empty(n, k, dtype=kernel_dtype, device=weight.device)

    def grid(cfg: dict) -> tuple[int, int]:
        return triton.cdiv(k, cfg["BLOCK_K"]), triton.cdiv(n, cfg["BLOCK_N"])

    _dequant_kernel[grid](*weight.kernel_args(), out, n, k, **weight.kernel_meta())
    return out.to(dtype)
