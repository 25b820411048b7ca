"""GGUF k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): llama.cpp's scale searches and bit layouts.

Every encoder takes a batch of super-blocks ``x`` float32 [B, 256] (plus, for the importance path,
per-element importance [B, 256]) and returns the stored bytes uint8 [B, type_size]; every decoder
is the inverse uint8 [B, type_size] → float32 [B, 256], with the same float operations, in the same
order, as ``gguf.quants`` / ggml's ``dequantize_row_*`` (so the results are bitwise equal).

On CPU the per-block work — the scale searches (make_qkx2/3_quants, make_qx_quants, make_q3_quants,
make_qp_quants), the importance weights and sums, the final requantization — runs in C++
(``lowbit_cpu::gguf_*`` ops, ``kernels/cpu_lowbit/csrc/gguf_search.cpp``, built on first use) with
llama.cpp's float operations in its order, so the bytes are llama.cpp's (``llama-quantize``, with or
without an imatrix). The torch versions (:mod:`lowbit.io.gguf.search_torch`) are the fallback, off
the CPU, without a compiler, or with ``LOWBIT_GGUF_SEARCH=torch``: the same algorithms over all blocks
at once, which agree with llama.cpp except where float summation order decides a near tie. Scale coding and bit packing are torch in both cases. Block layouts (bytes):

====== ============================================================================================
Q2_K   scales[16] (low nibble: 4-bit scale, high nibble: 4-bit min) | qs[64] 2-bit | d f16 | dmin f16
Q3_K   hmask[32] (3rd bit) | qs[64] low 2 bits | scales[12] (16 × 6-bit, biased by 32) | d f16
Q4_K   d f16 | dmin f16 | scales[12] (8 × 6-bit scale + 8 × 6-bit min) | qs[128] 4-bit
Q5_K   d f16 | dmin f16 | scales[12] | qh[32] (5th bit) | qs[128] low 4 bits
Q6_K   ql[128] low 4 bits | qh[64] high 2 bits | scales[16] int8 | d f16
====== ============================================================================================
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Callable

import torch

from lowbit.io.gguf.search_torch import (GROUP_MAX_EPS, fdiv, half, half_bytes, make_q3_quants,
                                         make_qkx_quants_torch, make_qp_quants, make_qx_quants_torch, signed_absmax)

QK_K = 256

Tensor = torch.Tensor
Encoder = Callable[[Tensor, "Tensor | None"], Tensor]  # blocks x float32 [B, bs] (+ importance [B, bs]) → bytes
Decoder = Callable[[Tensor], Tensor]  # bytes uint8 [B, type_size] → float32 [B, bs]


# ---- the same in C++ (lowbit_cpu::gguf_*, csrc/gguf_search.cpp), blocks as rows [B, n] --------------
# The C++ ops run llama.cpp's scalar code op for op (blocks side by side in SIMD lanes; sums in
# sequence), so their bytes are llama.cpp's, and they are over ten times faster than the torch
# versions (search_torch.py). Those remain the fallback: for tensors off the CPU, when the C++
# kernels cannot be built (BuildError: no compiler …), and with LOWBIT_GGUF_SEARCH=torch. The
# functions below take either path.
SEARCH_ENV = "LOWBIT_GGUF_SEARCH"
_cpp_loaded: bool | None = None  # None: not tried yet (the kernels are built on first k-quant use)
_cpp_lock = threading.Lock()


def _load_cpp() -> bool:
    try:
        import lowbit.kernels.cpu_lowbit  # noqa: F401  (builds once per machine, registers torch.ops.lowbit_cpu)
    except Exception as err:
        build = sys.modules.get("lowbit.kernels.cpu_lowbit.build")
        if build is None or not isinstance(err, build.BuildError):
            raise
        warnings.warn(f"lowbit: GGUF k-quant searches run in torch (slower): {err}", stacklevel=5)
        return False
    return True


def cpp_searches(device: torch.device) -> bool:
    """Whether the searches of blocks on ``device`` run in C++ (CPU, kernels built, LOWBIT_GGUF_SEARCH ≠ torch)."""
    global _cpp_loaded
    if device.type != "cpu" or os.environ.get(SEARCH_ENV, "").strip().lower() == "torch":
        return False
    if _cpp_loaded is None:
        with _cpp_lock:
            if _cpp_loaded is None:
                _cpp_loaded = _load_cpp()
    return _cpp_loaded


def qkx_search(x: Tensor, w: Tensor | None, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """make_qkx2/3_quants of blocks x [B, n] (rows) with weights w [B, n] → (scale [B], neg_min [B], codes
    uint8 [B, n]). ``w=None``: llama.cpp's reference weights, |x| when ``use_mad`` (Q2_K), else
    ``sqrt(Σx²/n) + |x|`` (Q4_K, Q5_K)."""
    if cpp_searches(x.device):
        return torch.ops.lowbit_cpu.gguf_qkx_search(x, w, nmax, rmin, rdelta, nstep, use_mad)
    if w is None:
        w = x.abs() if use_mad else x.abs().add_(torch.sqrt((x * x).sum(1, keepdim=True) / x.shape[1]))
    scale, neg_min, codes = make_qkx_quants_torch(x.t().contiguous(), w.t().contiguous(), nmax, rmin, rdelta,
                                                  nstep, use_mad)
    return scale, neg_min, codes.t().to(torch.uint8)


def qx_search(x: Tensor, nmax: int, w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """make_qx_quants (rmse_type 1) of blocks x [B, n] (rows) with weights w [B, n] (None: x²) →
    (scale [B], codes uint8 [B, n])."""
    if cpp_searches(x.device):
        return torch.ops.lowbit_cpu.gguf_qx_search(x, w, nmax)
    scale, codes = make_qx_quants_torch(x.t().contiguous(), nmax, (x * x if w is None else w).t().contiguous())
    return scale, codes.t().to(torch.uint8)


def q3_search(x: Tensor) -> tuple[Tensor, Tensor]:
    """make_q3_quants (nmax 4, refined) of blocks x [B, 16] (rows) → (scale [B], codes uint8 [B, 16])."""
    if cpp_searches(x.device):
        return torch.ops.lowbit_cpu.gguf_q3_search(x, 4)
    scale, codes = make_q3_quants(x.t().contiguous())
    return scale, codes.t().to(torch.uint8)


def qp_search(x: Tensor, nmax: int, w: Tensor) -> tuple[Tensor, Tensor]:
    """make_qp_quants of non-negative values x [B, m] (rows) with weights w [B, m] → (scale [B], codes uint8)."""
    if cpp_searches(x.device):
        return torch.ops.lowbit_cpu.gguf_qp_search(x, w, nmax)
    scale, codes = make_qp_quants(x.t().contiguous(), nmax, w.t().contiguous())
    return scale, codes.t().to(torch.uint8)


def row_sums(x: Tensor) -> Tensor:
    """Σ x of each row of x [R, m] — in C++ summed in order, as llama.cpp does."""
    if cpp_searches(x.device):
        return torch.ops.lowbit_cpu.gguf_row_sums(x)
    return x.sum(1)


def requantize(x: Tensor, d: Tensor, dmin: Tensor | None, codes: Tensor, lo: int, hi: int) -> Tensor:
    """Final codes of sub-blocks x [S, n] (rows) against their stored scale d [S] (and min dmin [S]):
    ``round((x + dmin)/d)`` (``round(x/d)`` without mins) clamped to [lo, hi], offset by −lo; sub-blocks
    whose scale is 0 keep ``codes`` (uint8 [S, n], from the search), as llama.cpp does. Returns uint8 [S, n]."""
    if cpp_searches(x.device):
        return torch.ops.lowbit_cpu.gguf_requantize(x, d, dmin, codes, lo, hi)
    q = torch.div(x, d.unsqueeze(1)) if dmin is None else torch.add(x, dmin.unsqueeze(1)).div_(d.unsqueeze(1))
    q = q.round_().clamp_(lo, hi).sub_(lo).to(torch.uint8)
    dead = (d == 0).nonzero().squeeze(1)
    if dead.numel():
        q[dead] = codes[dead]
    return q


def make_qx_quants(xt: Tensor, nmax: int, wt: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`make_qx_quants_torch`'s contract (blocks as columns xt, wt [n, B]; float codes [n, B]), in C++
    when :func:`cpp_searches`."""
    if not cpp_searches(xt.device):
        return make_qx_quants_torch(xt, nmax, wt)
    scale, codes = torch.ops.lowbit_cpu.gguf_qx_search(xt.t(), wt.t(), nmax)
    return scale, codes.t().float()


def make_qkx_quants(xt: Tensor, wt: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`make_qkx_quants_torch`'s contract (blocks as columns xt, wt [n, B]; float codes [n, B]), in
    C++ when :func:`cpp_searches`."""
    if not cpp_searches(xt.device):
        return make_qkx_quants_torch(xt, wt, nmax, rmin, rdelta, nstep, use_mad)
    scale, neg_min, codes = torch.ops.lowbit_cpu.gguf_qkx_search(xt.t(), wt.t(), nmax, rmin, rdelta, nstep, use_mad)
    return scale, neg_min, codes.t().float()


# ---- shared pieces ---------------------------------------------------------------------------------
def columns(x: Tensor, n: int) -> Tensor:
    """Values x [..] cut into blocks of n and laid out as columns: [n, numel/n] (the searches' layout)."""
    return x.reshape(-1, n).t().contiguous()


def importance_weights(x: Tensor, imp: Tensor, sigma2_scale: float) -> Tensor:
    """llama.cpp's per-element weight ``importance · sqrt(σ² + x²)`` of super-blocks x, imp [B, 256], with
    ``σ² = sigma2_scale · Σx² / 256`` per super-block (in C++: Σ in order, sqrt correctly rounded)."""
    if cpp_searches(x.device):
        return torch.ops.lowbit_cpu.gguf_importance_weights(x, imp, sigma2_scale)
    sigma2 = sigma2_scale * (x * x).sum(1, keepdim=True) / x.shape[1]
    return torch.sqrt(x * x + sigma2).mul_(imp)


# The packers work on 4 bytes at a time: uint8 codes viewed as int32 words. Shifting a word by less
# than a byte moves each byte's bits within that byte as long as they fit (codes below 2^(8 − shift)),
# and masks drop what crosses in from a neighbour, so the bytes come out as byte-wise ops would give.
def words(q: Tensor) -> Tensor:
    """uint8 codes [B, 32k] as int32 words [B, 8k] (4 codes a word)."""
    return q.to(torch.uint8).contiguous().view(torch.int32)


def as_bytes(w: Tensor, width: int) -> Tensor:
    """int32 words back to bytes uint8 [B, width]."""
    return w.contiguous().view(torch.uint8).reshape(-1, width)


def pack_2bit(q: Tensor) -> Tensor:
    """2-bit codes [B, 256] → qs [B, 64]: byte 32h + l holds elements 128h + l + 32t at bits 2t."""
    b = words(q).reshape(-1, 2, 4, 8)
    return as_bytes(b[:, :, 0] | (b[:, :, 1] << 2) | (b[:, :, 2] << 4) | (b[:, :, 3] << 6), 64)


def unpack_2bit(qs: Tensor) -> Tensor:
    """Inverse of :func:`pack_2bit`: qs [B, 64] → codes uint8 [B, 256]."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def bit_planes(bits: Tensor, planes: int) -> Tensor:
    """Bits [B, planes·32] (element 32t + j) → bytes [B, 32] with element 32t + j at bit t of byte j."""
    b = words(bits).reshape(-1, planes, 8)
    out = b[:, 0].clone()
    for t in range(1, planes):
        out |= b[:, t] << t
    return as_bytes(out, 32)


def unbit_planes(packed: Tensor, planes: int) -> Tensor:
    """Inverse of :func:`bit_planes`: bytes [B, 32] → bits uint8 [B, planes·32]."""
    shifts = torch.arange(planes, dtype=torch.uint8, device=packed.device).view(1, planes, 1)
    return ((packed.reshape(-1, 1, 32) >> shifts) & 1).reshape(-1, planes * 32)


def pack_nibbles_k(q: Tensor) -> Tensor:
    """4-bit codes [B, 256] → qs [B, 128]: byte 32c + l = element 64c + l | element 64c + 32 + l << 4."""
    b = words(q).reshape(-1, 4, 2, 8)
    return as_bytes(b[:, :, 0] | (b[:, :, 1] << 4), 128)


def unpack_nibbles_k(qs: Tensor) -> Tensor:
    """Inverse of :func:`pack_nibbles_k`: qs [B, 128] → codes uint8 [B, 256]."""
    b = qs.reshape(-1, 4, 1, 32)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(-1, 256)


def pack_scale_min_k4(ls: Tensor, lm: Tensor) -> Tensor:
    """Q4_K/Q5_K's 12 scale bytes from 6-bit scales and mins [B, 8] (get_scale_min_k4's inverse)."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], 1)


def unpack_scale_min_k4(sc: Tensor) -> tuple[Tensor, Tensor]:
    """12 scale bytes [B, 12] → (6-bit scales [B, 8], 6-bit mins [B, 8]) as uint8."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], 1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], 1)
    return scales, mins


def pack_scales_q3(s: Tensor) -> Tensor:
    """Q3_K's 12 scale bytes from 16 biased 6-bit scales [B, 16]."""
    s = s.to(torch.uint8)
    low = (s[:, :8] & 0x0F) | ((s[:, 8:] & 0x0F) << 4)
    hi = (s >> 4).reshape(-1, 4, 4)  # [B, g, i] = scale 4g + i
    high = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return torch.cat([low, high], 1)


def unpack_scales_q3(sc: Tensor) -> Tensor:
    """Inverse of :func:`pack_scales_q3`: [B, 12] → biased 6-bit scales uint8 [B, 16]."""
    low = torch.cat([sc[:, :8] & 0x0F, sc[:, :8] >> 4], 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=sc.device).view(1, 4, 1)
    high = ((sc[:, 8:12].reshape(-1, 1, 4) >> shifts) & 3).reshape(-1, 16)
    return low | (high << 4)


def _super_max(v: Tensor) -> Tensor:
    """Max over a super-block's sub-block values v [B, m], floored at 0 (``if (v > max) max = v``, max=0)."""
    return v.amax(dim=-1).clamp(min=0)


def _code_scales(values: Tensor, vmax: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """RTN of sub-block scales/mins [B, m] onto ``levels`` steps of vmax/levels: (codes [B, m], step f16 [B])."""
    inv = torch.where(vmax > 0, fdiv(float(levels), torch.where(vmax > 0, vmax, 1.0)), 0.0)
    codes = torch.round(inv.unsqueeze(-1) * values).clamp_(0, levels)
    step = half(torch.where(vmax > 0, vmax / levels, 0.0))
    return codes, step


def _sub_scales(d: Tensor, codes: Tensor, offset: int = 0) -> Tensor:
    """Stored sub-block scales: f16 super-block scale d [B] × (6/4-bit codes [B, m] − offset) → [B·m]."""
    return (d.float().unsqueeze(-1) * (codes.float() - offset)).reshape(-1)


# ---- Q2_K ------------------------------------------------------------------------------------------
def quantize_q2_k(x: Tensor, imp: Tensor | None) -> Tensor:
    """Super-blocks x [B, 256] → Q2_K bytes [B, 84]: 16 sub-blocks of 16, 2-bit codes, 4-bit scales/mins."""
    b = x.shape[0]
    xs = x.reshape(-1, 16)
    if imp is None:
        scales, mins, codes = qkx_search(xs, None, 3, -0.5, 0.1, 15, use_mad=True)  # weights |x|
        scales, mins = scales.view(b, 16), mins.view(b, 16)
        ls, d = _code_scales(scales, _super_max(scales), 15)
        lm, dmin = _code_scales(mins, _super_max(mins), 15)
    else:
        w = importance_weights(x, imp, 1.0).view(-1, 16)
        scales, mins, codes = qkx_search(xs, w, 3, -0.9, 0.05, 36, use_mad=False)
        sw = row_sums(w).view(b, 16)
        dm, ls = qp_search(scales.view(b, 16), 15, sw)
        mm, lm = qp_search(mins.view(b, 16), 15, sw)
        d, dmin = half(dm), half(mm)
    q = requantize(xs, _sub_scales(d, ls), _sub_scales(dmin, lm), codes, 0, 3).view(b, QK_K)
    sc = ls.to(torch.uint8) | (lm.to(torch.uint8) << 4)
    return torch.cat([sc, pack_2bit(q), half_bytes(d), half_bytes(dmin)], 1)


def dequantize_q2_k(blocks: Tensor) -> Tensor:
    """Q2_K bytes uint8 [B, 84] → float32 [B, 256] (ggml's dequantize_row_q2_K, op for op)."""
    sc, qs = blocks[:, :16], blocks[:, 16:80]
    d = blocks[:, 80:82].contiguous().view(torch.float16).float()
    dmin = blocks[:, 82:84].contiguous().view(torch.float16).float()
    dl = (d * (sc & 0x0F).float()).unsqueeze(-1)
    ml = (dmin * (sc >> 4).float()).unsqueeze(-1)
    q = unpack_2bit(qs).reshape(-1, 16, 16).float()
    return (dl * q - ml).reshape(-1, QK_K)


# ---- Q3_K ------------------------------------------------------------------------------------------
def quantize_q3_k(x: Tensor, imp: Tensor | None) -> Tensor:
    """Super-blocks x [B, 256] → Q3_K bytes [B, 110]: 16 sub-blocks of 16, 3-bit codes, 6-bit signed scales."""
    b = x.shape[0]
    xs = x.reshape(-1, 16)
    if imp is None:
        scales, codes = q3_search(xs)
        scales = scales.view(b, 16)
        vmax = signed_absmax(scales, 1)[1]
        nz = vmax != 0
        iscale = torch.where(nz, fdiv(-32.0, torch.where(nz, vmax, 1.0)), 0.0)
        ls = torch.round(iscale.unsqueeze(-1) * scales).clamp_(-32, 31).add_(32)
        d = half(torch.where(nz, fdiv(1.0, torch.where(nz, iscale, 1.0)), 0.0))
        ls = torch.where(nz.unsqueeze(-1), ls, 0.0)
    else:
        w = importance_weights(x, imp, 2.0).view(-1, 16)
        scales, codes = qx_search(xs, 4, w)
        d_block, ls = qx_search(scales.view(b, 16), 32, row_sums(w).view(b, 16))
        d = half(d_block)
    q = words(requantize(xs, _sub_scales(d, ls, 32), None, codes, -4, 3).view(b, QK_K))
    hmask, low = as_bytes((q >> 2) & 0x01010101, QK_K), as_bytes(q & 0x03030303, QK_K)
    return torch.cat([bit_planes(hmask, 8), pack_2bit(low), pack_scales_q3(ls), half_bytes(d)], 1)


def dequantize_q3_k(blocks: Tensor) -> Tensor:
    """Q3_K bytes uint8 [B, 110] → float32 [B, 256] (ggml's dequantize_row_q3_K, op for op)."""
    hmask, qs, sc = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = blocks[:, 108:110].contiguous().view(torch.float16).float()
    scales = unpack_scales_q3(sc).to(torch.int8) - 32
    dl = (d * scales.float()).unsqueeze(-1)
    low = unpack_2bit(qs).to(torch.int8)
    high = unbit_planes(hmask, 8) ^ 1  # the stored bit is set when the code is ≥ 4: offset −4 otherwise
    q = (low - (high << 2).to(torch.int8)).float().reshape(-1, 16, 16)
    return (dl * q).reshape(-1, QK_K)


# ---- Q4_K / Q5_K -----------------------------------------------------------------------------------
def _quantize_k_scale_min(x: Tensor, imp: Tensor | None, nmax: int, rmin: float, nstep: int
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shared Q4_K/Q5_K search: x [B, 256] → (codes uint8 [B, 256], ls [B, 8], lm [B, 8], d f16 [B], dmin f16 [B])."""
    b = x.shape[0]
    xs = x.reshape(-1, 32)
    if imp is None:
        scales, mins, codes = qkx_search(xs, None, nmax, rmin, 0.1, nstep, use_mad=False)  # weights rms + |x|
        scales, mins = scales.view(b, 8), mins.view(b, 8)
        ls, d = _code_scales(scales, _super_max(scales), 63)
        lm, dmin = _code_scales(mins, _super_max(mins), 63)
    else:
        w = importance_weights(x, imp, 2.0).view(-1, 32)
        scales, mins, codes = qkx_search(xs, w, nmax, -0.9, 0.05, 36, use_mad=False)
        sw = row_sums(w).view(b, 8)
        d_block, ls = qp_search(scales.view(b, 8), 63, sw)
        m_block, lm = qp_search(mins.view(b, 8), 63, sw)
        d, dmin = half(d_block), half(m_block)
    q = requantize(xs, _sub_scales(d, ls), _sub_scales(dmin, lm), codes, 0, nmax).view(b, QK_K)
    return q, ls, lm, d, dmin


def quantize_q4_k(x: Tensor, imp: Tensor | None) -> Tensor:
    """Super-blocks x [B, 256] → Q4_K bytes [B, 144]: 8 sub-blocks of 32, 4-bit codes, 6-bit scales/mins."""
    q, ls, lm, d, dmin = _quantize_k_scale_min(x, imp, 15, -1.0, 20)
    return torch.cat([half_bytes(d), half_bytes(dmin), pack_scale_min_k4(ls, lm), pack_nibbles_k(q)], 1)


def quantize_q5_k(x: Tensor, imp: Tensor | None) -> Tensor:
    """Super-blocks x [B, 256] → Q5_K bytes [B, 176]: as Q4_K with a 5th bit plane."""
    q, ls, lm, d, dmin = _quantize_k_scale_min(x, imp, 31, -0.5, 15)
    qw = words(q)
    high, low = as_bytes((qw >> 4) & 0x01010101, QK_K), as_bytes(qw & 0x0F0F0F0F, QK_K)
    return torch.cat([half_bytes(d), half_bytes(dmin), pack_scale_min_k4(ls, lm), bit_planes(high, 8),
                      pack_nibbles_k(low)], 1)


def _dequantize_k_scale_min(blocks: Tensor, q: Tensor) -> Tensor:
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    dmin = blocks[:, 2:4].contiguous().view(torch.float16).float()
    sc, m = unpack_scale_min_k4(blocks[:, 4:16])
    dl = (d * sc.float()).unsqueeze(-1)
    ml = (dmin * m.float()).unsqueeze(-1)
    return (dl * q.reshape(-1, 8, 32).float() - ml).reshape(-1, QK_K)


def dequantize_q4_k(blocks: Tensor) -> Tensor:
    """Q4_K bytes uint8 [B, 144] → float32 [B, 256] (ggml's dequantize_row_q4_K, op for op)."""
    return _dequantize_k_scale_min(blocks, unpack_nibbles_k(blocks[:, 16:144]))


def dequantize_q5_k(blocks: Tensor) -> Tensor:
    """Q5_K bytes uint8 [B, 176] → float32 [B, 256] (ggml's dequantize_row_q5_K, op for op)."""
    q = unpack_nibbles_k(blocks[:, 48:176]) | (unbit_planes(blocks[:, 16:48], 8) << 4)
    return _dequantize_k_scale_min(blocks, q)


# ---- Q6_K ------------------------------------------------------------------------------------------
def quantize_q6_k(x: Tensor, imp: Tensor | None) -> Tensor:
    """Super-blocks x [B, 256] → Q6_K bytes [B, 210]: 16 sub-blocks of 16, 6-bit codes, int8 scales."""
    b = x.shape[0]
    xs = x.reshape(-1, 16)
    # weights x² (None) or, as llama.cpp does for Q6_K, the raw importance
    scales, codes = qx_search(xs, 32, None if imp is None else imp.reshape(-1, 16))
    scales = scales.view(b, 16)
    amax, vmax = signed_absmax(scales, 1)
    live = amax >= GROUP_MAX_EPS
    iscale = fdiv(-128.0, torch.where(live, vmax, 1.0))
    d = half(torch.where(live, fdiv(1.0, iscale), 0.0))
    ls = torch.round(iscale.unsqueeze(-1) * scales).clamp_(max=127)
    ls = torch.where(live.unsqueeze(-1), ls, 0.0)
    q = words(requantize(xs, _sub_scales(d, ls), None, codes, -32, 31).view(b, QK_K)).view(b, 2, 4, 8)
    low, high = q & 0x0F0F0F0F, (q >> 4) & 0x03030303
    ql = as_bytes(torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2), 128)
    qh = as_bytes(high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6), 64)
    out = torch.cat([ql, qh, ls.to(torch.int8).view(torch.uint8), half_bytes(d)], 1)
    dead = (~live).nonzero().squeeze(1)
    if dead.numel():
        out[dead] = 0  # an all-zero super-block is all zero bytes, as llama.cpp writes it
    return out


def dequantize_q6_k(blocks: Tensor) -> Tensor:
    """Q6_K bytes uint8 [B, 210] → float32 [B, 256] (ggml's dequantize_row_q6_K, op for op)."""
    ql = blocks[:, :128].reshape(-1, 2, 1, 64)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = blocks[:, 208:210].contiguous().view(torch.float16).float()
    low = torch.cat([ql & 0x0F, ql >> 4], 2).reshape(-1, 2, 4, 32)  # [h, t, l]: element 128h + 32t + l
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    high = (qh >> shifts) & 3
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).float()
    return ((d * scales).unsqueeze(-1) * q).reshape(-1, QK_K)

