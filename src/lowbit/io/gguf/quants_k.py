"""GGUF k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): llama.cpp's scale searches and bit layouts.

Every encoder takes a batch of super-blocks ``x`` float32 [B, 256] (plus, for the importance path,
per-element importance [B, 256]) and returns the stored bytes uint8 [B, type_size]; every decoder
is the inverse uint8 [B, type_size] → float32 [B, 256], with the same float operations, in the same
order, as ``gguf.quants`` / ggml's ``dequantize_row_*`` (so the results are bitwise equal).

On CPU the per-block work — the scale searches (make_qkx2/3_quants, make_qx_quants, make_q3_quants,
make_qp_quants), the importance weights and sums, the final requantization — runs in C++
(``lowbit_cpu::gguf_*`` ops, ``kernels/cpu_lowbit/csrc/gguf_search.cpp``, built on first use) with
llama.cpp's float operations in its order, so the bytes are llama.cpp's (``llama-quantize``, with or
without an imatrix). The torch versions below are the fallback, off the CPU, without a compiler, or
with ``LOWBIT_GGUF_SEARCH=torch``: the same algorithms over all blocks at once (Python loops only over
candidate scales and refinement steps), which agree with llama.cpp except where float summation order
decides a near tie. Scale coding and bit packing are torch in both cases. Block layouts (bytes):

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

import numpy as np
import torch

QK_K = 256
GROUP_MAX_EPS = 1e-15  # llama.cpp: a group whose max |x| is below this is all zero

Tensor = torch.Tensor
Encoder = Callable[[Tensor, "Tensor | None"], Tensor]  # blocks x float32 [B, bs] (+ importance [B, bs]) → bytes
Decoder = Callable[[Tensor], Tensor]  # bytes uint8 [B, type_size] → float32 [B, bs]


# ---- small float helpers (C semantics, and no bool kernels in hot loops) ------------------------
# On CPU torch's comparison / where / masked_fill / index-returning reductions run 10-100x slower per
# element than arithmetic, so the searches keep masks as float 0/1 and select with lerp (exact for
# finite values and weights in {0, 1}); candidates stay finite (clamped) so that no NaN appears.
TINY = 1e-30
BIG = 3.0e38
HUGE = 1e30
TILE_ELEMS = 1 << 19  # elements per full-size op in the searches (2 MiB): measured fastest with 2 threads


def f32(value: float) -> float:
    """``value`` rounded to float32 (C's float constants such as ``0.1f*is + nmax``)."""
    return float(np.float32(value))


def fdiv(num: float, t: Tensor) -> Tensor:
    """C's ``num / t`` in float32 (torch's ``num / t`` computes ``num * (1/t)``, two roundings)."""
    return torch.full_like(t, num).div_(t)


def positive(v: Tensor) -> Tensor:
    """Float mask: 1.0 where v > 0, else 0.0 (v must hold no NaN)."""
    return torch.sign(v).clamp_(min=0)


def half(t: Tensor) -> Tensor:
    """float32 → float16 (round to nearest even, as GGML_FP32_TO_FP16); Inf means a too-large scale."""
    h = t.to(torch.float16)
    if h.numel() and not torch.isfinite(h.abs().amax()):
        from lowbit.errors import InvalidWeightError

        raise InvalidWeightError("weight magnitudes overflow GGUF's float16 block scales (|scale| > 65504)")
    return h


def half_bytes(h: Tensor) -> Tensor:
    """float16 [B] → its little-endian bytes uint8 [B, 2]."""
    return h.contiguous().view(torch.uint8).reshape(-1, 2)


def signed_absmax(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Along ``dim`` of a 2-D x: (max |x|, the signed value of the first element reaching it).

    Without index-returning reductions (slow on CPU): only blocks where +max and −max tie (or that
    are all zero, where the sign of the first zero decides) are resolved by argmax.
    """
    hi, lo = x.amax(dim), x.amin(dim)
    vmax = torch.where(hi >= -lo, hi, lo)
    tie = (hi == -lo).nonzero().squeeze(1)
    if tie.numel():
        rows = (x if dim in (1, -1) else x.t())[tie]
        vmax[tie] = rows.gather(1, rows.abs().argmax(1, keepdim=True)).squeeze(1)
    return torch.maximum(hi, -lo), vmax


# ---- scale searches in torch (llama.cpp's make_*_quants) over blocks laid out as columns [n, B] ----
def tiles(b: int, width: int) -> list[tuple[int, int]]:
    """[start, stop) column ranges of at most ``width`` blocks covering b blocks."""
    return [(t0, min(b, t0 + width)) for t0 in range(0, b, width)]


def make_qx_quants_torch(xt: Tensor, nmax: int, wt: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric weighted scale search (make_qx_quants, rmse_type 1) of blocks xt [n, B] (one block a column).

    Tries ``iscale = -(nmax + 0.1 i)/max`` for i in -9..9 and keeps the least-squares scale of the
    first best (largest sumlx²/suml2). The 19 candidates are independent, so they are evaluated
    together, a tile of blocks at a time. Returns (scale [B], signed so that ``scale·(code − nmax)``
    ≈ x, codes [n, B] float in [0, 2·nmax − 1]); all-zero blocks get scale 0 and codes 0.
    """
    n, b = xt.shape
    amax, vmax = signed_absmax(xt, 0)
    live = positive(amax - GROUP_MAX_EPS)
    vmax = vmax + (1 - live)
    wx = wt * xt
    consts = [-float(nmax)] + [-f32(np.float32(nmax) + np.float32(0.1) * np.float32(i)) for i in range(-9, 10) if i]
    c = len(consts)
    iscale = torch.tensor(consts, dtype=xt.dtype, device=xt.device).unsqueeze(1).expand(c, b).div(vmax)
    order = torch.arange(c, dtype=xt.dtype, device=xt.device).unsqueeze(1)
    width = max(1, TILE_ELEMS // (c * n))
    q, tmp = xt.new_empty(c, n, width), xt.new_empty(c, n, width)
    codes, best_scale = xt.new_empty(n, b), xt.new_empty(b)
    for t0, t1 in tiles(b, width):
        qv, tv = q[..., :t1 - t0], tmp[..., :t1 - t0]
        torch.mul(xt[None, :, t0:t1], iscale[:, None, t0:t1], out=qv).round_().clamp_(-nmax, nmax - 1)
        sumlx = torch.sum(torch.mul(qv, wx[None, :, t0:t1], out=tv), dim=1)  # [c, width]
        suml2 = torch.sum(torch.mul(qv, wt[None, :, t0:t1], out=tv).mul_(qv), dim=1)
        scale = sumlx / suml2.clamp_(min=TINY)  # 0 when suml2 == 0 (then sumlx == 0 too)
        metric = scale * sumlx
        # the first candidate reaching the best metric (C keeps a later one only when strictly better)
        worse = positive(metric.amax(0) - metric)
        first = worse.mul_(c).add_(order).amin(0).long()
        best_scale[t0:t1] = scale.gather(0, first.unsqueeze(0))[0]
        codes[:, t0:t1] = qv.gather(0, first.view(1, 1, -1).expand(1, n, -1))[0]
    return best_scale * live, codes.add_(nmax).mul_(live)


def _refine(xt: Tensor, wt: Tensor, qt: Tensor, sumlx: Tensor, suml2: Tensor, lo: float, hi: float,
            check_sl2_first: bool) -> None:
    """llama.cpp's coordinate descent on the integer levels qt [n, B] (5 sweeps), in place.

    Element by element: re-round ``x_i`` against the scale the other elements imply and keep the new
    level when it raises sumlx²/suml2. Only blocks that changed in a sweep are swept again (the
    others are at a fixed point). Updates qt, sumlx, suml2 [B].
    """
    wxt = wt * xt
    active: Tensor | None = None
    for _ in range(5):
        if active is None:
            xa, wa, wxa, qa, slx_a, sl2_a = xt, wt, wxt, qt, sumlx, suml2
        else:
            xa, wa, wxa, qa = xt[:, active], wt[:, active], wxt[:, active], qt[:, active]
            slx_a, sl2_a = sumlx[active], suml2[active]
        changed = torch.zeros_like(slx_a)
        for i in range(xa.shape[0]):
            qi = qa[i]
            slx = slx_a - wxa[i] * qi
            sl2 = sl2_a - wa[i] * qi * qi
            ok = positive(slx) * positive(sl2) if check_sl2_first else positive(slx)
            new = (xa[i] * sl2 / slx.clamp(min=TINY)).round_().clamp_(lo, hi)
            slx_new = slx + wxa[i] * new
            sl2_new = sl2 + wa[i] * new * new
            gain = torch.nan_to_num_(slx_new * slx_new * sl2_a - slx_a * slx_a * sl2_new, nan=0.0)
            take = ok * positive((new - qi).abs_()) * positive(gain)
            if not check_sl2_first:
                take *= positive(sl2_new)
            qi.lerp_(new, take)
            slx_a.lerp_(slx_new, take)
            sl2_a.lerp_(sl2_new, take)
            changed += take
        moved = changed.nonzero().squeeze(1)
        if active is not None:
            qt[:, active], sumlx[active], suml2[active] = qa, slx_a, sl2_a
            moved = active[moved]
        if moved.numel() == 0:
            return
        active = moved


def make_q3_quants(xt: Tensor) -> tuple[Tensor, Tensor]:
    """Q3_K's reference sub-block search (make_q3_quants: nmax 4, weights x², refined): xt [16, B] →
    (signed scale [B], codes [16, B] in [0, 7] with value ``scale·(code − 4)``)."""
    nmax = 4
    amax, vmax = signed_absmax(xt, 0)
    live = positive(amax - GROUP_MAX_EPS)
    iscale = fdiv(-float(nmax), vmax + (1 - live))
    q = (xt * iscale).round_().clamp_(-nmax, nmax - 1)
    w = xt * xt
    sumlx, suml2 = (w * xt * q).sum(0), (w * q * q).sum(0)
    _refine(xt, w, q, sumlx, suml2, -nmax, nmax - 1, check_sl2_first=False)
    scale = sumlx / suml2.clamp(min=TINY)
    return scale * live, q.add_(nmax).mul_(live)


def make_qp_quants(xt: Tensor, nmax: int, wt: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted search of one positive scale for non-negative values xt [n, B] (make_qp_quants): how the
    importance path quantizes a super-block's sub-block scales and mins. Returns (scale [B], codes
    [n, B] in [0, nmax])."""
    vmax = xt.amax(0).clamp(min=0)
    live = positive(vmax - GROUP_MAX_EPS)
    vmax = vmax + (1 - live)

    def mse(iscale: Tensor, clamp: bool) -> Tensor:
        q = (xt * iscale).round_()
        if clamp:
            q = q.clamp_(max=nmax)
        diff = xt - fdiv(1.0, iscale) * q
        return (wt * diff * diff).sum(0)

    iscale = fdiv(float(nmax), vmax)
    best = mse(iscale, clamp=False)
    for step in range(-4, 5):
        if step == 0:
            continue
        cand = fdiv(f32(np.float32(0.1) * np.float32(step) + np.float32(nmax)), vmax)
        err = mse(cand, clamp=True)
        better = positive(best - err)
        best = torch.minimum(best, err)
        iscale = torch.lerp(iscale, cand, better)
    q = (xt * iscale).round_().clamp_(max=nmax)
    sumlx, suml2 = (wt * xt * q).sum(0), (wt * q * q).sum(0)
    _refine(xt, wt, q, sumlx, suml2, -HUGE, nmax, check_sl2_first=True)
    scale = sumlx / suml2.clamp(min=TINY)
    return scale * live, q.clamp_(min=0).mul_(live)


def make_qkx_quants_torch(xt: Tensor, wt: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                          use_mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric scale/min search (make_qkx2_quants / make_qkx3_quants) of blocks xt [n, B] (columns).

    Starts from the min/max grid, then tries ``iscale = (rmin + rdelta·i + nmax)/(max − min)`` for
    i in 0..nstep, each time fitting scale and min by weighted least squares (min ≤ 0) and keeping
    the fit of lowest weighted error (squared — in closed form from the moments —, or absolute
    when ``use_mad``); the best min so far shifts the next candidate's grid, as in llama.cpp.
    Per-block state lives in [B] vectors; the grid and moments run a tile of blocks at a time.
    Returns (scale [B], neg_min [B] ≥ 0, codes [n, B] in [0, nmax]) with x ≈ scale·code − neg_min.
    """
    n, b = xt.shape
    xmin, xmax = torch.aminmax(xt, dim=0)
    xmin = xmin.clamp_(max=0)
    live = positive(xmax - xmin)
    wx = wt * xt
    sum_w, sum_x = wt.sum(0), wx.sum(0)
    sum_xx = (wx * xt).sum(0)
    neg2_sum_x = -2 * sum_x
    bound = 2 * (xmax - xmin)
    bound_min = -(nmax + 1) * bound
    width = max(1, TILE_ELEMS // n)
    q = xt.new_empty(n, b) if use_mad else xt.new_empty(n, min(b, width))
    prod = xt.new_empty(3, n, min(b, width))
    mom = xt.new_empty(3, b)  # Σw·l, Σw·l², Σw·l·x
    err_mad = xt.new_empty(b)

    def grid_moments(shift: Tensor, iscale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        for t0, t1 in tiles(b, width):
            qv = q[:, t0:t1] if use_mad else q[:, :t1 - t0]
            pv = prod[..., :t1 - t0]
            torch.sub(xt[:, t0:t1], shift[t0:t1], out=qv).mul_(iscale[t0:t1]).round_().clamp_(0, nmax)
            torch.mul(qv, wt[:, t0:t1], out=pv[0])
            torch.mul(pv[0], qv, out=pv[1])
            torch.mul(pv[0], xt[:, t0:t1], out=pv[2])
            torch.sum(pv, dim=1, out=mom[:, t0:t1])
        return mom[0], mom[1], mom[2]

    def error(scale: Tensor, vmin: Tensor, s_l: Tensor, s_l2: Tensor, s_xl: Tensor) -> Tensor:
        if use_mad:
            for t0, t1 in tiles(b, width):
                pv = prod[0, :, :t1 - t0]
                torch.mul(q[:, t0:t1], scale[t0:t1], out=pv).add_(vmin[t0:t1]).sub_(xt[:, t0:t1]).abs_()
                torch.sum(pv.mul_(wt[:, t0:t1]), dim=0, out=err_mad[t0:t1])
            err = err_mad.clone()
        else:  # Σw(s·l + m − x)² = Σwx² + s·(s·Σwl² − 2·(Σwlx − m·Σwl)) + m·(m·Σw − 2·Σwx)
            inner = torch.addcmul(s_xl, vmin, s_l, value=-1).mul_(-2).addcmul_(scale, s_l2)
            err = torch.addcmul(sum_xx, scale, inner).addcmul_(vmin, torch.addcmul(neg2_sum_x, vmin, sum_w))
        return torch.nan_to_num_(err, nan=BIG, posinf=BIG)

    iscale = fdiv(float(nmax), (xmax - xmin).clamp(min=TINY))
    scale, vmin = fdiv(1.0, iscale), xmin
    best = error(scale, vmin, *grid_moments(vmin, iscale))
    best_iscale, best_shift = iscale, vmin
    for step in range(nstep + 1):
        c = f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = fdiv(c, (xmax - vmin).clamp_(min=TINY))
        s_l, s_l2, s_xl = grid_moments(vmin, iscale)
        det = torch.addcmul(sum_w * s_l2, s_l, s_l, value=-1).clamp_(min=TINY)
        this_scale = torch.addcmul(sum_w * s_xl, sum_x, s_l, value=-1).div_(det)
        this_min = torch.addcmul(s_l2 * sum_x, s_l, s_xl, value=-1).div_(det)
        this_scale = torch.lerp(this_scale.clamp_(-HUGE, HUGE), (s_xl / s_l2.clamp(min=TINY)).clamp_(max=HUGE),
                                positive(this_min.clamp_(-HUGE, HUGE)))
        # A least-squares slope is a weighted mean of pairwise slopes, so a real fit has |scale| ≤ max − min
        # and |min| ≤ (nmax + 1)(max − min). Degenerate candidates (all levels equal: det is rounding
        # noise, llama.cpp skips them) are clamped into that box, where their error is honest and loses.
        this_scale = torch.minimum(torch.maximum(this_scale, -bound), bound)
        this_min = torch.maximum(this_min.clamp_(max=0), bound_min)
        err = error(this_scale, this_min, s_l, s_l2, s_xl)
        better = positive(best - err)
        best = torch.minimum(best, err)
        scale = torch.lerp(scale, this_scale, better)
        best_iscale = torch.lerp(best_iscale, iscale, better)
        best_shift = torch.lerp(best_shift, vmin, better)
        vmin = torch.lerp(vmin, this_min, better)
    codes = torch.sub(xt, best_shift).mul_(best_iscale).round_().clamp_(0, nmax).mul_(live)
    return scale * live, -vmin, codes


# ---- the same in C++ (lowbit_cpu::gguf_*, csrc/gguf_search.cpp), blocks as rows [B, n] --------------
# The C++ ops run llama.cpp's scalar code op for op (blocks side by side in SIMD lanes; sums in
# sequence), so their bytes are llama.cpp's, and they are over ten times faster than the torch
# versions above. Those remain the fallback: for tensors off the CPU, when the C++ kernels cannot be
# built (BuildError: no compiler …), and with LOWBIT_GGUF_SEARCH=torch. The functions below take
# either path.
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

