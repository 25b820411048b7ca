"""Weight-only quantized linear: fused dequantize-GEMV (split-K) for decode, dequantize-GEMM for prefill.

Both kernels dequantize W tiles in registers (``tiles.dequant_tile``) straight from the packed
layout of :class:`~lowbit.kernels.triton.layout.TritonWeight` — W is never materialised in memory —
and accumulate in float32.

* M ≤ 16 (decode, small batches): the op is bound by reading W once. Programs own a BLOCK_N slice of
  outputs and every SPLIT_K-th K tile, so even a single row launches enough programs to fill the GPU;
  partial sums meet through float32 atomics. Up to 4 rows use CUDA-core FMAs (a broadcast product
  reduced over K — no 16-row tensor-core tile mostly wasted on padding); 5…16 rows use ``tl.dot``.
* M > 16 (prefill): a tiled ``tl.dot`` GEMM with grouped program order (GROUP_M row blocks share the
  W column block while it is in L2), W tiles cast to the activation dtype for the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import ShapeError
from lowbit.kernels.triton import tuning
from lowbit.kernels.triton.layout import TritonWeight
from lowbit.kernels.triton.tiles import dequant_tile, grouped_tile

SPLITK_MAX_M = 16  # rows handled by the split-K kernel; larger batches take the GEMM
_BROADCAST_MAX_M = 4  # rows handled with CUDA-core FMAs inside the split-K kernel
_BROADCAST_REGS = 128  # per-thread budget for the [BLOCK_M, BLOCK_K, BLOCK_N] broadcast product
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# float32 activations: no silent TF32 (10-bit mantissa). "tf32x3" (three TF32 MMAs, ~fp32 accurate) keeps
# the tensor cores; ROCm has no tf32x3, and "ieee" there is a plain FMA loop.
_FP32_DOT = "ieee" if torch.version.hip else "tf32x3"
_c = tuning.config

# 16-bit activations (and ≤ 4-row FMA tiles of any dtype)
_SPLITK = [_c(BLOCK_N=64, BLOCK_K=128, SPLIT_K=4), _c(BLOCK_N=128, BLOCK_K=64, SPLIT_K=4),
           _c(BLOCK_N=64, BLOCK_K=64, SPLIT_K=8), _c(num_warps=2, BLOCK_N=32, BLOCK_K=128, SPLIT_K=8),
           _c(BLOCK_N=128, BLOCK_K=128, SPLIT_K=2), _c(BLOCK_N=64, BLOCK_K=256, SPLIT_K=4),
           _c(BLOCK_N=32, BLOCK_K=256, SPLIT_K=16), _c(num_stages=3, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1)]
_GEMM = [_c(num_stages=3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
         _c(num_stages=3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), _c(num_stages=3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
         _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), _c(num_stages=3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128),
         _c(num_stages=2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)]
# float32 activations on tensor cores (tf32x3 triples the operand registers): short K tiles, more warps
_SPLITK_FP32_DOT = [_c(BLOCK_N=64, BLOCK_K=32, SPLIT_K=4), _c(BLOCK_N=32, BLOCK_K=32, SPLIT_K=8),
                    _c(8, 2, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4)]
_GEMM_FP32 = [_c(8, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32), _c(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
              _c(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), _c(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32)]
_SPLITK_CONFIGS = tuning.pick(_SPLITK, _SPLITK_FP32_DOT, interpret_config=_c(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2))
_GEMM_CONFIGS = tuning.pick(_GEMM, _GEMM_FP32, interpret_config=_c(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64))


def _prune_splitk(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Keep the config family for this call; for the ≤ 4-row FMA path, drop tiles that would spill."""
    block_m = int(kwargs["BLOCK_M"])  # type: ignore[call-overload]
    if block_m > _BROADCAST_MAX_M:
        fp32 = named_args["x_ptr"].dtype == torch.float32
        return tuning.keep(configs, _SPLITK_FP32_DOT if fp32 else _SPLITK)
    configs = tuning.keep(configs, _SPLITK)

    def per_thread(c: triton.Config) -> int:
        return block_m * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps)

    kept = [c for c in configs if per_thread(c) <= _BROADCAST_REGS]
    return kept or [min(configs, key=per_thread)]


def _prune_gemm(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Keep the config family for the activation dtype, without row tiles taller than the (bucketed) M."""
    configs = tuning.keep(configs, _GEMM_FP32 if named_args["x_ptr"].dtype == torch.float32 else _GEMM)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= int(named_args["M_BUCKET"])]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


@triton.autotune(configs=_SPLITK_CONFIGS, key=["BLOCK_M", "N", "K"], reset_to_zero=["out_ptr"],
                 prune_configs_by={"early_config_prune": _prune_splitk})
@triton.jit
def _splitk_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, lut_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO_CONST: tl.constexpr,
                   USE_LUT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """out[M, N] (float32, zero-initialised) += x[M, K] · Wᵀ over this program's K tiles (+ bias once).

    Grid: (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)). Program (n, s, m) handles K tiles s, s+SPLIT_K, …
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = dequant_tile(codes_ptr, scale_ptr, zero_ptr, lut_ptr, k0, offs_k, offs_n, N, K,
                         BITS, GROUP, BLOCK_K, HAS_ZERO, ZERO_CONST, USE_LUT)  # [BLOCK_K, BLOCK_N] fp32
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
        if BLOCK_M >= 16:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
        else:
            # [BLOCK_M, BLOCK_K, 1] * [1, BLOCK_K, BLOCK_N] summed over K: a GEMV per row on CUDA cores
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]  # added by one split only
    out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.atomic_add(out_ptr + out_offs, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _gemm_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, lut_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, M_BUCKET,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO_CONST: tl.constexpr,
                 USE_LUT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8):
    """out[M, N] (x's dtype) = x[M, K] · Wᵀ + bias. Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),).

    ``M_BUCKET`` only keys the autotuner.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
        w = dequant_tile(codes_ptr, scale_ptr, zero_ptr, lut_ptr, k0, offs_k, offs_n, N, K,
                         BITS, GROUP, BLOCK_K, HAS_ZERO, ZERO_CONST, USE_LUT)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def apply(x: torch.Tensor, weight: TritonWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Wᵀ + b.

    Args:
        x: [..., K] float16/bfloat16/float32 (other float dtypes are computed in float32), on the
            weight's device.
        weight: from :func:`lowbit.kernels.triton.layout.prepare`.
        bias: [N] any float dtype, or None.
    Returns:
        [..., N] in x's dtype.
    """
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ShapeError(f"input has {x.shape[-1]} features; the quantized weight expects {k} (shape {weight.shape})")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    if x2d.dtype not in _KERNEL_DTYPES:
        x2d = x2d.float()
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    bias_arg = bias.contiguous() if bias is not None else weight.scale
    meta = {**weight.kernel_meta(), "HAS_BIAS": bias is not None,
            "DOT_PRECISION": _FP32_DOT if x2d.dtype == torch.float32 else None}
    if m <= SPLITK_MAX_M:
        block_m = tuning.m_bucket(m) if m <= _BROADCAST_MAX_M else 16  # 1, 2, 4 rows of FMAs, or one MMA tile
        out = torch.zeros(m, n, dtype=torch.float32, device=x2d.device)

        def splitk_grid(cfg: dict) -> tuple[int, int, int]:
            return triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"], triton.cdiv(m, block_m)

        _splitk_kernel[splitk_grid](x2d, *weight.kernel_args(), bias_arg, out, m, n, k, x2d.stride(0),
                             BLOCK_M=block_m, **meta)
    else:
        out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)

        def gemm_grid(cfg: dict) -> tuple[int]:
            return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

        _gemm_kernel[gemm_grid](x2d, *weight.kernel_args(), bias_arg, out, m, n, k, x2d.stride(0), tuning.m_bucket(m),
                           **meta)
    return out.to(x.dtype).reshape(*lead, n)
