"""W8A8: int8 activations × int8 weights → int32 on the tensor cores, then the scales.

Two kernels per call:

1. ``_quantize_act_kernel`` — one program per token row: quantizes x [M, K] to int8 codes with a
   per-token scale/zero computed from the row (dynamic) or a calibrated per-tensor one (static),
   with exactly the reference's arithmetic (IEEE division, round half to even).
2. ``_int8_gemm_kernel`` — acc[M, N] = Σ_k a[m, k]·w[n, k] in int32, then
   y = acc · s_x[m] · s_w[n] + b. The stored weight is used as is: qdata uint8 [N, K] holds q + 128,
   and XOR 0x80 reinterpreted as int8 is q (one bit flip per byte in registers, no repacking, so
   nothing has to be cached per layer). Asymmetric activation codes in [0, 2**b − 1] are shifted
   by −128 into int8 and corrected with the weight column sums, which the GEMM accumulates on the
   side: Σ(q − z)w = Σ(q − 128)w − (z − 128)·Σw (static zero-points are corrected the same way, with
   a shift of 0 for symmetric codes).

The result matches :func:`lowbit.kernels.reference.linear_w8a8` up to float32 rounding of the
final scaling (integer accumulation is exact). Handles symmetric int8 weights with per-channel or
per-tensor scales, and activations quantized dynamically per token, dynamically per tensor (scale
from torch reductions, then the static path) or statically per tensor, symmetric or asymmetric,
4…8 bits. LLM.int8 outlier decomposition is not handled here (the reference runs it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.formats import primitives as P
from lowbit.formats.act import ActSpec
from lowbit.kernels import reference
from lowbit.kernels.triton import tuning
from lowbit.kernels.triton.tiles import grouped_tile, round_half_even
from lowbit.tensor import QuantizedWeight

_QUANT_BLOCK_K = 32 if tuning.INTERPRET else 1024
_c = tuning.config
_GEMM_CONFIGS = tuning.pick(
    [_c(num_stages=3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128), _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128),
     _c(num_stages=3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128), _c(num_stages=4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128),
     _c(num_stages=4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=256), _c(num_stages=4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256),
     _c(num_stages=4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128)],
    interpret_config=_c(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64))


def supports_w8a8(weight: QuantizedWeight, act_spec: ActSpec | None) -> bool:
    """Symmetric int8 weights with per-channel/per-tensor plain scales; any non-outlier activation spec."""
    spec = weight.spec
    return (act_spec is not None and act_spec.outlier_threshold is None and act_spec.bits <= 8
            and spec.format == "int" and spec.bits == 8 and spec.symmetric and not spec.double_quant
            and spec.granularity in ("channel", "tensor"))


@triton.jit
def _quantize_act_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, K, stride_xm,
                         BITS: tl.constexpr, SYMMETRIC: tl.constexpr, DYNAMIC: tl.constexpr,
                         CODE_SHIFT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row m of x [M, K] → int8 codes [M, K], stored minus CODE_SHIFT (128 for asymmetric codes).

    Dynamic: writes the row's scale/zero to scale_ptr[m]/zero_ptr[m] (float32 [M]); static: reads the
    per-tensor scale_ptr[0]/zero_ptr[0]. Grid: (M,).
    """
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    out_row = codes_ptr + row.to(tl.int64) * K
    if DYNAMIC:
        # pass 1: the row's range (0 is always inside it, as in primitives.choose_qparams)
        lo = tl.zeros((BLOCK_K,), dtype=tl.float32)
        hi = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, x)
            hi = tl.maximum(hi, x)
        if SYMMETRIC:
            qmax: tl.constexpr = (1 << (BITS - 1)) - 1
            amax = tl.maximum(-tl.min(lo, axis=0), tl.max(hi, axis=0))
            scale = tl.maximum(tl.math.div_rn(amax, qmax * 1.0), 1e-8)
            zero = 0.0
        else:
            qmax_u: tl.constexpr = (1 << BITS) - 1
            xmin = tl.min(lo, axis=0)
            scale = tl.maximum(tl.math.div_rn(tl.max(hi, axis=0) - xmin, qmax_u * 1.0), 1e-8)
            zero = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(-xmin, scale)), 0.0), qmax_u * 1.0)
        tl.store(scale_ptr + row, scale)
        tl.store(zero_ptr + row, zero)
    else:
        scale = tl.load(scale_ptr)
        zero = tl.load(zero_ptr)
    if SYMMETRIC:
        qmin_f = -(1 << (BITS - 1)) * 1.0
        qmax_f = ((1 << (BITS - 1)) - 1) * 1.0
    else:
        qmin_f = 0.0
        qmax_f = ((1 << BITS) - 1) * 1.0
    # pass 2: q = clamp(round(x / s + z)), exactly primitives.quantize_affine
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = round_half_even(tl.math.div_rn(x, scale) + zero)
        q = tl.minimum(tl.maximum(q, qmin_f), qmax_f) - CODE_SHIFT
        tl.store(out_row + offs, q.to(tl.int8), mask=offs < K)


def _prune_gemm(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Drop row tiles taller than the (bucketed) M; 16 rows is the smallest int8 MMA tile."""
    m_bucket = int(named_args["M_BUCKET"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m_bucket)]
    return kept or configs[:1]


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _int8_gemm_kernel(a_ptr, w_ptr, a_scale_ptr, a_zero_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
                      stride_a_qp, stride_w_scale, M_BUCKET, CODE_SHIFT: tl.constexpr, HAS_ZERO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr = 8):
    """out[M, N] = Σ_k (a[m, k] + CODE_SHIFT − a_zero[m]) · w[n, k] · a_scale[m] · w_scale[n] + bias[n].

    Output in out's dtype. a: int8 [M, K] (codes − CODE_SHIFT); w: uint8 [N, K] (q + 128); a_scale/a_zero:
    float32, element m·stride_a_qp (stride 0 = one per-tensor value); w_scale: element n·stride_w_scale.
    Without HAS_ZERO the zero-points are 0 and not read. Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * K
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * K  # the [BLOCK_K, BLOCK_N] tile is K-major, as int8 MMA wants
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + offs_k[None, :], mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0)
        # padding reads 128 (= weight 0) so it adds nothing to w_sum either
        w_u8 = tl.load(w_cols + offs_k[:, None], mask=(offs_k < K)[:, None] & (offs_n < N)[None, :], other=128)
        w = (w_u8 ^ 0x80).to(tl.int8, bitcast=True)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        if HAS_ZERO:
            w_sum += tl.sum(w.to(tl.int32), axis=0)
    a_scale = tl.load(a_scale_ptr + offs_m * stride_a_qp, mask=offs_m < M, other=0.0)
    y = acc.to(tl.float32)  # exact below 2**24; beyond, float32 rounding like the reference's own matmul
    if HAS_ZERO:
        a_zero = tl.load(a_zero_ptr + offs_m * stride_a_qp, mask=offs_m < M, other=0.0)
        y -= (a_zero - CODE_SHIFT)[:, None] * w_sum.to(tl.float32)[None, :]
    w_scale = tl.load(w_scale_ptr + offs_n * stride_w_scale, mask=offs_n < N, other=0.0).to(tl.float32)
    y = y * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def quantize_activation(x2d: torch.Tensor, act_spec: ActSpec, input_scale: torch.Tensor | None = None,
                        input_zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] (float) → (int8 codes [M, K], scale float32 [M] or [1], zero float32 [M] or [1]).

    Codes are those of :func:`lowbit.kernels.reference.quantize_activation`, minus 128 when asymmetric.
    The scale/zero tensors are those computed (dynamic per token) or the static ones, as float32.
    """
    m, k = x2d.shape
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    per_token = act_spec.dynamic and act_spec.granularity == "token"
    if per_token:
        scale = torch.empty(m, dtype=torch.float32, device=x2d.device)
        zero = torch.empty(m, dtype=torch.float32, device=x2d.device)
    elif act_spec.dynamic:  # one scale for the whole tensor: two reductions in torch, then the static path
        scale, zero = P.choose_qparams(x2d.float().reshape(1, 1, -1), act_spec.bits, act_spec.symmetric)
        scale, zero = scale.reshape(1), zero.reshape(1)
    else:
        if input_scale is None or input_zero is None:
            raise ValueError("static activation quantization needs input_scale and input_zero")
        scale = input_scale.float().reshape(1).contiguous()
        zero = input_zero.float().reshape(1).contiguous()
    codes = torch.empty(m, k, dtype=torch.int8, device=x2d.device)
    _quantize_act_kernel[(m,)](x2d, codes, scale, zero, k, x2d.stride(0), BITS=act_spec.bits,
                               SYMMETRIC=act_spec.symmetric, DYNAMIC=per_token, CODE_SHIFT=_code_shift(act_spec),
                               BLOCK_K=_QUANT_BLOCK_K)
    return codes, scale, zero


def _code_shift(act_spec: ActSpec) -> float:
    # asymmetric codes live in [0, 2**b − 1]: shifted by −128 they fit int8
    return 0.0 if act_spec.symmetric else 128.0


def linear_w8a8(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, act_spec: ActSpec,
                input_scale: torch.Tensor | None = None, input_zero: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`lowbit.kernels.reference.linear_w8a8`: x [..., K] → [..., N] in x's dtype.

    With a gradient required for ``x`` it defers to the reference (straight-through estimator).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return reference.linear_w8a8(x, weight, bias, act_spec, input_scale, input_zero)
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    codes, a_scale, a_zero = quantize_activation(x2d, act_spec, input_scale, input_zero)
    w_scale = weight.tensors["scale"].reshape(-1)  # [N] (per channel) or [1] (per tensor)
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)

    def grid(cfg: dict) -> tuple[int]:
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    # a stride of 0 broadcasts a single (per-tensor) scale/zero over all rows or columns
    _int8_gemm_kernel[grid](codes, weight.tensors["qdata"].contiguous(), a_scale, a_zero, w_scale,
                            bias if bias is not None else w_scale, out, m, n, k,
                            1 if a_scale.numel() > 1 else 0, 1 if w_scale.numel() > 1 else 0, tuning.m_bucket(m),
                            CODE_SHIFT=_code_shift(act_spec), HAS_ZERO=not (act_spec.symmetric and act_spec.dynamic),
                            HAS_BIAS=bias is not None)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
