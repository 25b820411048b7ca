"""The C++ k-quant searches (csrc/gguf_search.cpp) against llama.cpp's scalar algorithms and the torch fallback.

``ref_*`` below restate ggml-quants.c's make_qkx2_quants, make_qx_quants, make_q3_quants and
make_qp_quants in numpy float32, block by block in lock step (a loop over elements and candidates,
vectorised over blocks only), so every block sees the C code's float operations in its order: the
C++ ops must reproduce them bit for bit. The torch fallback is only required to agree closely.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch

from lowbit.io.gguf import quants_k as K

f32 = np.float32


@pytest.fixture(scope="module", autouse=True)
def cpp() -> None:
    if not K.cpp_searches(torch.device("cpu")):
        pytest.skip("the C++ kernels cannot be built here")


def ops():
    return torch.ops.lowbit_cpu


# ---- llama.cpp's scalar algorithms in numpy float32 (lanes = blocks) ----------------------------------
def nearest_int(v: np.ndarray) -> np.ndarray:
    t = (v.astype(f32) + f32(12582912.0)).astype(f32)
    return ((t.view(np.int32) & 0x007FFFFF) - 0x00400000).astype(f32)


def ref_qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """make_qkx2_quants of blocks x, w [B, n] → (scale, neg_min, codes)."""
    b, n = x.shape
    mn, mx, sum_w = x[:, 0].copy(), x[:, 0].copy(), w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        mn = np.where(x[:, i] < mn, x[:, i], mn)
        mx = np.where(x[:, i] > mx, x[:, i], mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    mn = np.where(mn > 0, f32(0), mn)
    dead = mx == mn
    with np.errstate(all="ignore"):
        iscale = f32(nmax) / (mx - mn)
        scale = f32(1) / iscale
        codes = np.zeros((b, n), f32)
        best = np.zeros(b, f32)
        for i in range(n):
            codes[:, i] = np.clip(nearest_int(iscale * (x[:, i] - mn)), 0, nmax)
            diff = scale * codes[:, i] + mn - x[:, i]
            best = best + w[:, i] * (np.abs(diff) if use_mad else diff * diff)
        vmin = mn.copy()
        for step in range(nstep + 1) if nstep >= 1 else []:
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (mx - vmin)
            laux = np.zeros((b, n), f32)
            sum_l = np.zeros(b, f32)
            sum_l2 = np.zeros(b, f32)
            sum_xl = np.zeros(b, f32)
            for i in range(n):
                laux[:, i] = np.clip(nearest_int(iscale * (x[:, i] - vmin)), 0, nmax)
                wl = w[:, i] * laux[:, i]
                sum_l, sum_l2, sum_xl = sum_l + wl, sum_l2 + wl * laux[:, i], sum_xl + wl * x[:, i]
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, f32(0), this_min)
            err = np.zeros(b, f32)
            for i in range(n):
                diff = this_scale * laux[:, i] + this_min - x[:, i]
                err = err + w[:, i] * (np.abs(diff) if use_mad else diff * diff)
            take = (det > 0) & (err < best) & ~dead
            best = np.where(take, err, best)
            scale = np.where(take, this_scale, scale)
            vmin = np.where(take, this_min, vmin)
            codes = np.where(take[:, None], laux, codes)
    return np.where(dead, f32(0), scale), -vmin, np.where(dead[:, None], f32(0), codes)


def signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amax, vmax = np.zeros(len(x), f32), np.zeros(len(x), f32)
    for i in range(x.shape[1]):
        ax = np.abs(x[:, i])
        vmax = np.where(ax > amax, x[:, i], vmax)
        amax = np.where(ax > amax, ax, amax)
    return amax, vmax


def ref_qx(x: np.ndarray, w: np.ndarray, nmax: int):
    """make_qx_quants(rmse_type 1, qw = w) → (scale, codes in [0, 2·nmax − 1])."""
    amax, vmax = signed_absmax(x)

    def sums(iscale):
        l = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        sumlx, suml2 = np.zeros(len(x), f32), np.zeros(len(x), f32)
        for i in range(x.shape[1]):
            sumlx = sumlx + w[:, i] * x[:, i] * l[:, i]
            suml2 = suml2 + w[:, i] * l[:, i] * l[:, i]
        return l, sumlx, suml2

    with np.errstate(all="ignore"):
        codes, sumlx, suml2 = sums(f32(-nmax) / vmax)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = sums(-(f32(nmax) + f32(0.1) * f32(step)) / vmax)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            codes = np.where(take[:, None], l, codes)
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
    dead = amax < f32(1e-15)
    return np.where(dead, f32(0), scale), np.where(dead[:, None], f32(0), codes + nmax)


def refine(x, w, codes, sumlx, suml2, lo, hi, q3: bool):
    """The 5 coordinate-descent sweeps of make_q3_quants (q3) / make_qp_quants, in place on codes."""
    for _ in range(5):
        for i in range(x.shape[1]):
            li = codes[:, i]
            slx = sumlx - w[:, i] * x[:, i] * li
            sl2 = suml2 - w[:, i] * li * li
            new = np.clip(nearest_int(x[:, i] * sl2 / slx), lo, hi)
            slx2 = slx + w[:, i] * x[:, i] * new
            sl22 = sl2 + w[:, i] * new * new
            take = (slx > 0) & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            take &= (sl22 > 0) if q3 else (sl2 > 0)
            codes[:, i] = np.where(take, new if q3 else np.where(new < 0, new + 256, new), li)
            sumlx, suml2 = np.where(take, slx2, sumlx), np.where(take, sl22, suml2)
    return sumlx, suml2


def ref_q3(x: np.ndarray, nmax: int):
    """make_q3_quants(do_rmse = true) → (scale, codes in [0, 2·nmax − 1])."""
    amax, vmax = signed_absmax(x)
    w = x * x
    with np.errstate(all="ignore"):
        codes = np.clip(nearest_int((f32(-nmax) / vmax)[:, None] * x), -nmax, nmax - 1)
        sumlx, suml2 = np.zeros(len(x), f32), np.zeros(len(x), f32)
        for i in range(x.shape[1]):
            sumlx = sumlx + w[:, i] * x[:, i] * codes[:, i]
            suml2 = suml2 + w[:, i] * codes[:, i] * codes[:, i]
        sumlx, suml2 = refine(x, w, codes, sumlx, suml2, -nmax, nmax - 1, q3=True)
        scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    dead = amax < f32(1e-15)
    return np.where(dead, f32(0), scale), np.where(dead[:, None], f32(0), codes + nmax)


def ref_qp(x: np.ndarray, w: np.ndarray, nmax: int):
    """make_qp_quants → (scale, codes)."""
    vmax = np.zeros(len(x), f32)
    for i in range(x.shape[1]):
        vmax = np.where(vmax > x[:, i], vmax, x[:, i])

    def wrap(l: np.ndarray) -> np.ndarray:  # a level as the uint8_t L[i] keeps it
        return np.where(l < 0, l + 256, l)

    with np.errstate(all="ignore"):
        iscale = f32(nmax) / vmax
        start = wrap(nearest_int(iscale[:, None] * x))
        best = np.zeros(len(x), f32)
        for i in range(x.shape[1]):
            diff = x[:, i] - (f32(1) / iscale) * start[:, i]
            best = best + w[:, i] * diff * diff
        for step in range(-4, 5):
            if step == 0:
                continue
            cand = (f32(0.1) * f32(step) + f32(nmax)) / vmax
            l = np.minimum(f32(nmax), nearest_int(cand[:, None] * x))
            mse = np.zeros(len(x), f32)
            for i in range(x.shape[1]):
                diff = x[:, i] - (f32(1) / cand) * l[:, i]
                mse = mse + w[:, i] * diff * diff
            iscale = np.where(mse < best, cand, iscale)
            best = np.where(mse < best, mse, best)
        l = np.minimum(f32(nmax), nearest_int(iscale[:, None] * x))
        sumlx, suml2 = np.zeros(len(x), f32), np.zeros(len(x), f32)
        for i in range(x.shape[1]):
            sumlx = sumlx + w[:, i] * x[:, i] * l[:, i]
            suml2 = suml2 + w[:, i] * l[:, i] * l[:, i]
        codes = wrap(l)
        sumlx, suml2 = refine(x, w, codes, sumlx, suml2, -np.inf, nmax, q3=False)
        scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    dead = vmax < f32(1e-15)
    return np.where(dead, f32(0), scale), np.where(dead[:, None], f32(0), codes)


# ---- blocks ---------------------------------------------------------------------------------------------
def blocks(count: int, n: int, seed: int) -> torch.Tensor:
    """Gaussian blocks at several magnitudes plus the special ones: all zero, constant (±), one nonzero,
    ±max ties, exact halves, huge and tiny values, one spike, all negative, all positive."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, n, generator=g) * torch.exp(2 * torch.randn(count, 1, generator=g))
    one, last = torch.zeros(n), torch.zeros(n)
    one[3], last[n - 1] = 2.0, -5.0
    special = [torch.zeros(n), torch.full((n,), 0.7), torch.full((n,), -1.3), one, last, torch.linspace(-1, 1, n),
               torch.round(torch.randn(n, generator=g) * 8) / 2, torch.randn(n, generator=g) * 3e11,
               torch.randn(n, generator=g) * 1e-12, torch.randn(n, generator=g) * 1e-30,
               torch.randn(n, generator=g).abs() + 0.5, -torch.randn(n, generator=g).abs() - 0.5]
    tie = torch.randn(n, generator=g)
    tie[1], tie[5] = 3.0, -3.0
    spike = torch.randn(n, generator=g) * 1e-3
    spike[7] = 10.0
    return torch.cat([x, torch.stack(special + [tie, spike])])


def as_bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(a, dtype=f32).view(np.uint32)


def same_floats(a, b) -> bool:
    """Bitwise equal, NaN equal to NaN (+0 ≠ −0)."""
    return bool(np.array_equal(as_bits(a), as_bits(b)))


# ---- bitwise llama.cpp --------------------------------------------------------------------------------------
QKX_CASES = [  # (n, nmax, rmin, rdelta, nstep, use_mad, weights)
    (32, 15, -1.0, 0.1, 20, False, "ref"),  # Q4_K reference: sqrt(Σx²/32) + |x|, computed in C++
    (32, 31, -0.5, 0.1, 15, False, "ref"),  # Q5_K reference
    (16, 3, -0.5, 0.1, 15, True, "ref"),  # Q2_K reference: |x|, mean absolute error
    (32, 15, -0.9, 0.05, 36, False, "imp"),  # importance paths
    (16, 3, -0.9, 0.05, 36, False, "imp"),
    (32, 31, -0.9, 0.05, 36, False, "imp"),
]


def ref_weights(x: np.ndarray, use_mad: bool) -> np.ndarray:
    if use_mad:
        return np.abs(x)
    sum_x2 = np.zeros(len(x), f32)
    for i in range(x.shape[1]):
        sum_x2 = sum_x2 + x[:, i] * x[:, i]
    return np.sqrt(sum_x2 / f32(x.shape[1]))[:, None] + np.abs(x)


@pytest.mark.parametrize("case", QKX_CASES)
def test_qkx_search_is_llama_cpp_bitwise(case) -> None:
    n, nmax, rmin, rdelta, nstep, use_mad, weights = case
    x = blocks(300, n, seed=n + nmax)
    if weights == "ref":
        w = None
        wn = ref_weights(x.numpy(), use_mad)
    else:
        imp = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2
        imp[::7, 2] = 0.0  # a weight of zero inside a block
        w = imp * torch.sqrt(x * x + 1.0)
        wn = w.numpy()
    scale, neg_min, codes = ops().gguf_qkx_search(x, w, nmax, rmin, rdelta, nstep, use_mad)
    rs, rm, rc = ref_qkx(x.numpy(), wn, nmax, rmin, rdelta, nstep, use_mad)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert np.array_equal(codes.numpy(), rc.astype(np.uint8))
    assert same_floats(scale, rs) and same_floats(neg_min, rm)


@pytest.mark.parametrize("n,nmax,weights", [(16, 32, "square"), (16, 32, "imp"), (16, 4, "imp"), (32, 8, "imp"),
                                            (32, 128, "imp"), (16, 32, "imp-zeros")])
def test_qx_search_is_llama_cpp_bitwise(n: int, nmax: int, weights: str) -> None:
    x = blocks(300, n, seed=nmax)
    if weights == "square":
        w, wn = None, (x * x).numpy()
    else:
        w = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) + (0.0 if weights == "imp-zeros" else 0.1)
        if weights == "imp-zeros":
            w[::3] = 0.0
        wn = w.numpy()
    scale, codes = ops().gguf_qx_search(x, w, nmax)
    rs, rc = ref_qx(x.numpy(), wn, nmax)
    assert np.array_equal(codes.numpy(), rc.astype(np.uint8))
    assert same_floats(scale, rs)


def test_q3_and_qp_searches_are_llama_cpp_bitwise() -> None:
    x = blocks(300, 16, seed=5)
    scale, codes = ops().gguf_q3_search(x, 4)
    rs, rc = ref_q3(x.numpy(), 4)
    assert np.array_equal(codes.numpy(), rc.astype(np.uint8)) and same_floats(scale, rs)
    g = torch.Generator().manual_seed(6)
    for m, nmax in ((8, 63), (16, 15)):  # super-block scales / mins of Q4_K, Q5_K / Q2_K
        v = torch.rand(400, m, generator=g) * torch.exp(torch.randn(400, 1, generator=g))
        v[::5, 1] = 0.0
        v[3] = 0.0
        v[4] = -0.0
        w = torch.rand(400, m, generator=g) * 30
        scale, codes = ops().gguf_qp_search(v, w, nmax)
        rs, rc = ref_qp(v.numpy(), w.numpy(), nmax)
        assert np.array_equal(codes.numpy(), rc.astype(np.uint8)) and same_floats(scale, rs)


def test_requantize_row_sums_and_weights_are_exact() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 32, generator=g)
    d = torch.rand(64, generator=g) * 0.3
    d[5] = 0.0
    dmin = torch.rand(64, generator=g)
    codes = torch.randint(0, 16, (64, 32), dtype=torch.uint8, generator=g)
    out = ops().gguf_requantize(x, d, dmin, codes, 0, 15)
    with np.errstate(all="ignore"):
        ref = np.clip(nearest_int((x.numpy() + dmin.numpy()[:, None]) / d.numpy()[:, None]), 0, 15)
    ref[5] = codes[5].numpy()
    assert np.array_equal(out.numpy(), ref.astype(np.uint8))
    out = ops().gguf_requantize(x, d, None, codes, -32, 31)
    with np.errstate(all="ignore"):
        ref = np.clip(nearest_int(x.numpy() / d.numpy()[:, None]), -32, 31) + 32
    ref[5] = codes[5].numpy()
    assert np.array_equal(out.numpy(), ref.astype(np.uint8))

    xs = torch.randn(37, 256, generator=g) * 3
    seq = np.zeros(37, f32)
    for i in range(256):
        seq = seq + xs.numpy()[:, i]
    assert same_floats(ops().gguf_row_sums(xs), seq)
    imp = torch.rand(37, 256, generator=g)
    sum_x2 = np.zeros(37, f32)
    for i in range(256):
        sum_x2 = sum_x2 + xs.numpy()[:, i] * xs.numpy()[:, i]
    sigma2 = f32(2) * sum_x2 / f32(256)
    ref = imp.numpy() * np.sqrt(sigma2[:, None] + xs.numpy() * xs.numpy())
    assert same_floats(ops().gguf_importance_weights(xs, imp, 2.0), ref)


# ---- the torch fallback ----------------------------------------------------------------------------------
def weighted_error(x, w, scale, neg_min, codes) -> torch.Tensor:
    x, w = x.double(), w.double()
    return (w * (scale.double()[:, None] * codes.double() - neg_min.double()[:, None] - x) ** 2).sum(1)


@pytest.mark.parametrize("n,nmax,rmin,rdelta,nstep,use_mad", [(32, 15, -1.0, 0.1, 20, False),
                                                              (32, 15, -0.9, 0.05, 36, False),
                                                              (16, 3, -0.5, 0.1, 15, True),
                                                              (32, 31, -0.5, 0.1, 15, False)])
def test_qkx_torch_and_cpp_agree(n, nmax, rmin, rdelta, nstep, use_mad) -> None:
    x = blocks(4000, n, seed=11)
    w = x.abs() if use_mad else x.abs() + x.pow(2).mean(1, keepdim=True).sqrt()
    scale, neg_min, codes = K.qkx_search(x, w, nmax, rmin, rdelta, nstep, use_mad)
    st, mt, ct = K.make_qkx_quants_torch(x.t().contiguous(), w.t().contiguous(), nmax, rmin, rdelta, nstep, use_mad)
    assert (codes.float() == ct.t()).all(1).float().mean() > 0.98
    if use_mad:  # what it minimises
        ec = (w * (scale[:, None] * codes.float() - neg_min[:, None] - x).abs()).double().sum(1)
        et = (w * (st[:, None] * ct.t() - mt[:, None] - x).abs()).double().sum(1)
    else:
        ec, et = weighted_error(x, w, scale, neg_min, codes), weighted_error(x, w, st, mt, ct.t())
    assert ec.sum() <= 1.0005 * et.sum()
    assert ((ec > 1.01 * et + 1e-30).float().mean()) < 0.005  # a different greedy path now and then


@pytest.mark.parametrize("n,nmax", [(16, 32), (16, 4), (32, 8), (32, 128)])
def test_qx_torch_and_cpp_agree(n: int, nmax: int) -> None:
    x = blocks(4000, n, seed=12)
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(13)) + 0.1
    scale, codes = K.qx_search(x, nmax, w)
    st, ct = K.make_qx_quants_torch(x.t().contiguous(), nmax, w.t().contiguous())
    assert (codes.float() == ct.t()).all(1).float().mean() > (0.75 if nmax == 128 else 0.97)
    zero = torch.zeros_like(scale)
    ec = weighted_error(x, w, scale, zero, codes.float() - nmax)
    et = weighted_error(x, w, st, zero, ct.t() - nmax)
    assert ec.sum() <= 1.001 * et.sum()


def test_column_entry_points_keep_their_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """make_qkx_quants / make_qx_quants (columns, float codes) give the same through both paths' layouts."""
    x = blocks(200, 32, seed=14)
    w = x.abs() + 0.5
    s, m, c = K.make_qkx_quants(x.t().contiguous(), w.t().contiguous(), 15, -0.9, 0.05, 36, False)
    s2, m2, c2 = ops().gguf_qkx_search(x, w, 15, -0.9, 0.05, 36, False)
    assert c.shape == (32, len(x)) and c.dtype == torch.float32
    assert torch.equal(c.t(), c2.float()) and torch.equal(s, s2) and torch.equal(m, m2)
    s, c = K.make_qx_quants(x.t().contiguous(), 8, w.t().contiguous())
    assert c.shape == (32, len(x)) and torch.equal(c.t(), ops().gguf_qx_search(x, w, 8)[1].float())
    monkeypatch.setenv(K.SEARCH_ENV, "torch")
    assert not K.cpp_searches(torch.device("cpu"))
    s, m, c = K.make_qkx_quants(x.t().contiguous(), w.t().contiguous(), 15, -0.9, 0.05, 36, False)
    assert c.shape == (32, len(x)) and c.dtype == torch.float32
    assert not K.cpp_searches(torch.device("meta"))


# ---- whole tensors ------------------------------------------------------------------------------------------
gguf = pytest.importorskip("gguf")
from lowbit.io.gguf import quants as Q  # noqa: E402

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def rmse(x: torch.Tensor, name: str, imp: torch.Tensor | None) -> float:
    out = Q.dequantize(Q.quantize(x, name, imp), name, tuple(x.shape))
    return float(((out - x) ** 2).mean().sqrt())


@pytest.mark.parametrize("name", K_TYPES)
def test_quantize_through_both_paths_has_the_same_error(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(15)
    x = torch.randn(48, 1024, generator=g)
    imp = torch.exp(torch.randn(1024, generator=g))
    for importance in (None, imp):
        cpp_rmse = rmse(x, name, importance)
        monkeypatch.setenv(K.SEARCH_ENV, "torch")
        torch_rmse = rmse(x, name, importance)
        monkeypatch.delenv(K.SEARCH_ENV)
        assert abs(cpp_rmse - torch_rmse) <= 0.005 * torch_rmse, (name, importance is not None, cpp_rmse, torch_rmse)


def llama_quantize_chunk():
    """llama.cpp's ggml_quantize_chunk from the installed llama-cpp-python, or None."""
    try:
        import llama_cpp
    except (ImportError, OSError):
        return None
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    if not os.path.isfile(path):
        return None
    lib = ctypes.CDLL(path)
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quants_are_llama_cpp_bytes(name: str) -> None:
    lib = llama_quantize_chunk()
    if lib is None:
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    g = torch.Generator().manual_seed(16)
    x = torch.randn(64, 512, generator=g) * torch.exp(torch.randn(64, 1, generator=g))
    x[3] = 0.0
    x[5, :256] = 0.25
    x[6, 100] = 7.0
    imp = torch.exp(torch.randn(512, generator=g)) * 0.5  # a power-of-two rescale (lowbit's) changes nothing
    t = gguf.GGMLQuantizationType[name]
    for importance in (None, imp):
        lib.ggml_quantize_init(int(t))
        xn = np.ascontiguousarray(x.numpy())
        ref = np.zeros(Q.row_bytes(name, 512) * 64, np.uint8)
        ip = None if importance is None else np.ascontiguousarray(importance.numpy())
        lib.ggml_quantize_chunk(int(t), xn.ctypes.data, ref.ctypes.data, 0, 64, 512,
                                None if ip is None else ip.ctypes.data)
        ours = Q.quantize(x, name, importance).numpy().reshape(-1)
        assert np.array_equal(ours, ref), (name, importance is not None, int((ours != ref).sum()))
