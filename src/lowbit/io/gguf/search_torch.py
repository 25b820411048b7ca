"""The k-quant scale searches in vectorised torch (llama.cpp's make_*_quants), and their float helpers.

The fallback of :mod:`lowbit.io.gguf.quants_k`'s C++ searches (off the CPU, without a compiler, or with
``LOWBIT_GGUF_SEARCH=torch``): the same algorithms over all blocks at once, blocks laid out as columns
[n, B]; the only Python loops are over candidate scales and refinement steps. They agree with llama.cpp
except where float summation order decides a near tie.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15  # llama.cpp: a group whose max |x| is below this is all zero
Tensor = torch.Tensor


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
