// GGUF k-quant searches (lowbit.io.gguf.quants_k): llama.cpp's scalar quantization helpers
// (ggml-quants.c) as torch custom ops, bit for bit.
//
//   gguf_qkx_search(x, w?, nmax, rmin, rdelta, nstep, use_mad) -> (scale, neg_min, codes)
//       make_qkx2_quants / make_qkx3_quants: asymmetric scale + min (Q2_K, Q4_K, Q5_K, Q4_1, Q5_1)
//   gguf_qx_search(x, w?, nmax) -> (scale, codes)       make_qx_quants, rmse_type 1 (Q3_K, Q6_K, …)
//   gguf_q3_search(x, nmax) -> (scale, codes)           make_q3_quants with do_rmse (Q3_K reference)
//   gguf_qp_search(x, w, nmax) -> (scale, codes)        make_qp_quants (super-block scales, importance)
//   gguf_requantize(x, d, dmin?, codes, lo, hi) -> codes   final codes against the stored scales
//   gguf_row_sums(x) -> sums                            sequential float sums (sub-block weight sums)
//   gguf_importance_weights(x, imp, sigma2_scale) -> w  imp · sqrt(σ² + x²) of super-blocks
//
// Blocks are rows: x, w float32 [B, n]; codes come back as uint8 [B, n]. Each block gets exactly the
// float32 operations of ggml-quants.c's scalar code in the same order — no FMA contraction,
// llama.cpp's nearest_int, sums in sequence — so the results are llama.cpp's, bitwise. The speed
// comes from running blocks side by side: a tile of 16 (AVX2) or 8 blocks is transposed to [n][lanes]
// and every vector lane follows one block's scalar computation, with the branches of the C code
// turned into per-lane selects. Tiles run in parallel with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#if defined(__x86_64__)  // AVX2 kernels chosen at run time; SSE2 is the baseline
#include <immintrin.h>
#define LB_HAVE_X86 1
#else
#define LB_HAVE_X86 0
#endif

namespace lowbit_cpu {
namespace gguf_search {
namespace {

constexpr int kMaxN = 256;
constexpr float kGroupMaxEps = 1e-15f;  // ggml-quants.c's GROUP_MAX_EPS

// Weights the searches compute themselves when none are given (llama.cpp's reference quantizers).
enum WeightMode : int { kGiven = 0, kAbs = 1, kAbsPlusRms = 2, kSquare = 3 };

#pragma GCC push_options
// ggml-quants.c is scalar C, and llama.cpp built for the baseline ISA (as llama-cpp-python's wheels
// are) rounds every a*b + c twice: so must this code, where GCC would contract to FMA by default
// wherever the target has it.
#pragma GCC optimize("fp-contract=off")
#pragma GCC diagnostic ignored "-Wpsabi"
#ifdef __clang__
#pragma clang fp contract(off)
#endif

#define LB_INLINE static inline __attribute__((always_inline))

// llama.cpp's nearest_int: round half to even through the 1.5·2^23 trick.
LB_INLINE int nearest_int(float v) {
  float t = v + 12582912.f;
  int32_t i;
  std::memcpy(&i, &t, sizeof i);
  return (i & 0x007fffff) - 0x00400000;
}

// A tile's lanes: U vectors of W floats (GCC vector extensions, W·4 bytes = the ISA's register);
// two vectors per tile hide the latency of the sequential sums. Every select is a ?: whose condition
// is a comparison written in place: GCC 12 compiles those to compare + blend, but scalarizes
// comparisons whose result it must keep as an integer vector (masks held in variables), and all
// comparisons of vectors wider than the ISA's registers (hence no 512-bit variant).
template <int W, int U>
struct P {
  typedef float vf __attribute__((vector_size(4 * W)));
  typedef int32_t vi __attribute__((vector_size(4 * W)));
  static constexpr int kLanes = W * U;
  vf v[U];
  float lane(int l) const { return v[l / W][l % W]; }
};

#define LB_EACH for (int u = 0; u < U; ++u)
#define LB_BINARY(op)                                                 \
  template <int W, int U>                                             \
  LB_INLINE P<W, U> operator op(const P<W, U>& a, const P<W, U>& b) { \
    P<W, U> r;                                                        \
    LB_EACH r.v[u] = a.v[u] op b.v[u];                                \
    return r;                                                         \
  }                                                                   \
  template <int W, int U>                                             \
  LB_INLINE P<W, U> operator op(float a, const P<W, U>& b) {          \
    P<W, U> r;                                                        \
    LB_EACH r.v[u] = a op b.v[u];                                     \
    return r;                                                         \
  }                                                                   \
  template <int W, int U>                                             \
  LB_INLINE P<W, U>& operator op##=(P<W, U>& a, const P<W, U>& b) {   \
    LB_EACH a.v[u] = a.v[u] op b.v[u];                                \
    return a;                                                         \
  }
LB_BINARY(+)
LB_BINARY(-)
LB_BINARY(*)
LB_BINARY(/)
#undef LB_BINARY

template <int W, int U>
LB_INLINE P<W, U> operator-(const P<W, U>& a) {
  P<W, U> r;
  LB_EACH r.v[u] = -a.v[u];
  return r;
}

template <int W, int U>
LB_INLINE P<W, U> splat(float value) {
  P<W, U> r;
  LB_EACH r.v[u] = typename P<W, U>::vf{} + value;
  return r;
}

// cmp(a, b) ? x : y, lane by lane.
#define LB_SELECT(name, cmp)                                                                       \
  template <int W, int U>                                                                          \
  LB_INLINE P<W, U> name(const P<W, U>& a, const P<W, U>& b, const P<W, U>& x, const P<W, U>& y) { \
    P<W, U> r;                                                                                     \
    LB_EACH r.v[u] = a.v[u] cmp b.v[u] ? x.v[u] : y.v[u];                                          \
    return r;                                                                                      \
  }
LB_SELECT(if_lt, <)
LB_SELECT(if_gt, >)
LB_SELECT(if_eq, ==)
#undef LB_SELECT

// (c > 0 && a > b) ? x : y, lane by lane.
template <int W, int U>
LB_INLINE P<W, U> if_pos_gt(const P<W, U>& c, const P<W, U>& a, const P<W, U>& b, const P<W, U>& x,
                            const P<W, U>& y) {
  P<W, U> r;
  LB_EACH r.v[u] = c.v[u] > 0.f ? (a.v[u] > b.v[u] ? x.v[u] : y.v[u]) : y.v[u];
  return r;
}

// The coordinate-descent step of make_q3_quants / make_qp_quants: (c1 > 0 && c2 > 0 && l != m &&
// c3 > 0 && a > b) ? x : y, lane by lane.
template <int W, int U>
LB_INLINE P<W, U> if_step(const P<W, U>& c1, const P<W, U>& c2, const P<W, U>& l, const P<W, U>& m,
                          const P<W, U>& c3, const P<W, U>& a, const P<W, U>& b, const P<W, U>& x,
                          const P<W, U>& y) {
  P<W, U> r;
  LB_EACH r.v[u] = c1.v[u] > 0.f
                       ? (c2.v[u] > 0.f ? (l.v[u] != m.v[u] ? (c3.v[u] > 0.f ? (a.v[u] > b.v[u] ? x.v[u] : y.v[u])
                                                                              : y.v[u])
                                                            : y.v[u])
                                        : y.v[u])
                       : y.v[u];
  return r;
}

template <int W, int U>
LB_INLINE P<W, U> clamp(const P<W, U>& a, const P<W, U>& lo, const P<W, U>& hi) {
  P<W, U> r;
  LB_EACH {
    typename P<W, U>::vf t = a.v[u] > hi.v[u] ? hi.v[u] : a.v[u];
    r.v[u] = t < lo.v[u] ? lo.v[u] : t;
  }
  return r;
}

template <int W, int U>
LB_INLINE P<W, U> fabs(const P<W, U>& a) {
  typedef typename P<W, U>::vi vi;
  typedef typename P<W, U>::vf vf;
  P<W, U> r;
  LB_EACH r.v[u] = (vf)((vi)a.v[u] & 0x7fffffff);
  return r;
}

// nearest_int lane by lane (bit for bit, also for out-of-range, infinite or NaN arguments), as float.
template <int W, int U>
LB_INLINE P<W, U> nearest(const P<W, U>& a) {
  typedef typename P<W, U>::vi vi;
  typedef typename P<W, U>::vf vf;
  P<W, U> r;
  LB_EACH {
    vf t = a.v[u] + 12582912.f;
    vi i = ((vi)t & 0x007fffff) - 0x00400000;
    r.v[u] = __builtin_convertvector(i, vf);
  }
  return r;
}
#undef LB_EACH

// The given weights, or the reference quantizers' own: |x| (Q2_K), av_x + |x| with
// av_x = sqrt(Σx²/n) (Q4_K, Q5_K), x² (make_qx_quants without weights: Q6_K).
template <int W, int U>
LB_INLINE void block_weights(const P<W, U>* x, P<W, U>* w, int n, int mode) {
  typedef P<W, U> V;
  if (mode == kAbs || mode == kAbsPlusRms) {
    V av = splat<W, U>(0.f);
    if (mode == kAbsPlusRms) {
      V sum_x2 = splat<W, U>(0.f);
      for (int i = 0; i < n; ++i) sum_x2 += x[i] * x[i];
      for (int u = 0; u < U; ++u)
        for (int j = 0; j < W; ++j) av.v[u][j] = __builtin_sqrtf(sum_x2.v[u][j] / (float)n);
    }
    for (int i = 0; i < n; ++i) w[i] = mode == kAbs ? fabs(x[i]) : av + fabs(x[i]);
  } else if (mode == kSquare) {
    for (int i = 0; i < n; ++i) w[i] = x[i] * x[i];
  }
}

// make_qkx2_quants (= make_qkx3_quants with weights) of a tile of blocks x[n], w[n] (lane = block).
template <bool kMad, int W, int U>
LB_INLINE void qkx_tile(const P<W, U>* x, const P<W, U>* w, P<W, U>* laux, int n, int nmax_i, float rmin,
                        float rdelta, int nstep, P<W, U>& scale_out, P<W, U>& neg_min_out, P<W, U>* codes) {
  typedef P<W, U> V;
  const V zero = splat<W, U>(0.f);
  const float nmax = (float)nmax_i;
  const V nmaxv = splat<W, U>(nmax);
  V mn = x[0], mx = x[0], sum_w = w[0];
  V sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    mn = if_lt(x[i], mn, x[i], mn);
    mx = if_gt(x[i], mx, x[i], mx);
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  mn = if_gt(mn, zero, zero, mn);
  V iscale = nmax / (mx - mn);
  V scale = 1.f / iscale;
  V best = zero;
  for (int i = 0; i < n; ++i) {
    V l = clamp(nearest(iscale * (x[i] - mn)), zero, nmaxv);
    V diff = scale * l + mn - x[i];
    diff = kMad ? fabs(diff) : diff * diff;
    best += w[i] * diff;
  }
  V best_iscale = iscale, best_shift = mn, vmin = mn;
  if (nstep >= 1) {
    for (int is = 0; is <= nstep; ++is) {
      const float c = rmin + rdelta * (float)is + nmax;
      iscale = c / (mx - vmin);
      V sum_l = zero, sum_l2 = zero, sum_xl = zero;
      for (int i = 0; i < n; ++i) {
        V l = clamp(nearest(iscale * (x[i] - vmin)), zero, nmaxv);
        laux[i] = l;
        V wl = w[i] * l;
        sum_l += wl;
        sum_l2 += wl * l;
        sum_xl += wl * x[i];
      }
      V det = sum_w * sum_l2 - sum_l * sum_l;
      V this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
      V this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
      this_scale = if_gt(this_min, zero, sum_xl / sum_l2, this_scale);
      this_min = if_gt(this_min, zero, zero, this_min);
      V err = zero;
      for (int i = 0; i < n; ++i) {
        V diff = this_scale * laux[i] + this_min - x[i];
        diff = kMad ? fabs(diff) : diff * diff;
        err += w[i] * diff;
      }
      // llama.cpp: if (D > 0) { … if (cur_error < best_error) take this candidate }. A block whose
      // max equals its min (returned early by llama.cpp) has all levels 0 here, so D = 0: never taken.
      const V prev = best;
      best = if_pos_gt(det, prev, err, err, best);
      scale = if_pos_gt(det, prev, err, this_scale, scale);
      best_iscale = if_pos_gt(det, prev, err, iscale, best_iscale);
      best_shift = if_pos_gt(det, prev, err, vmin, best_shift);
      vmin = if_pos_gt(det, prev, err, this_min, vmin);
    }
  }
  for (int i = 0; i < n; ++i)  // the best candidate's levels, recomputed exactly as it computed them
    codes[i] = if_eq(mx, mn, zero, clamp(nearest(best_iscale * (x[i] - best_shift)), zero, nmaxv));
  scale_out = if_eq(mx, mn, zero, scale);
  neg_min_out = -vmin;
}

// The signed value of largest magnitude of each block (the first one reaching it) and that magnitude.
template <int W, int U>
LB_INLINE void signed_absmax(const P<W, U>* x, int n, P<W, U>& amax, P<W, U>& vmax) {
  amax = vmax = splat<W, U>(0.f);
  for (int i = 0; i < n; ++i) {
    P<W, U> ax = fabs(x[i]);
    vmax = if_gt(ax, amax, x[i], vmax);
    amax = if_gt(ax, amax, ax, amax);
  }
}

// One make_qx_quants candidate: Σ w·x·l and Σ w·l² over the levels l of iscale (wx = w·x).
template <int W, int U>
LB_INLINE void qx_sums(const P<W, U>* x, const P<W, U>* w, const P<W, U>* wx, int n, const P<W, U>& iscale,
                       const P<W, U>& lo, const P<W, U>& hi, P<W, U>& sumlx, P<W, U>& suml2) {
  sumlx = splat<W, U>(0.f);
  suml2 = splat<W, U>(0.f);
  for (int i = 0; i < n; ++i) {
    P<W, U> l = clamp(nearest(iscale * x[i]), lo, hi);
    sumlx += wx[i] * l;
    suml2 += w[i] * l * l;
  }
}

// make_qx_quants(n, nmax, x, L, rmse_type = 1, qw = w) of a tile of blocks (lane = block).
template <int W, int U>
LB_INLINE void qx_tile(const P<W, U>* x, const P<W, U>* w, P<W, U>* wx, int n, int nmax_i, P<W, U>& scale_out,
                       P<W, U>* codes) {
  typedef P<W, U> V;
  const V zero = splat<W, U>(0.f), eps = splat<W, U>(kGroupMaxEps);
  const V lo = splat<W, U>(-(float)nmax_i), hi = splat<W, U>((float)(nmax_i - 1));
  V amax, vmax;
  signed_absmax(x, n, amax, vmax);
  for (int i = 0; i < n; ++i) wx[i] = w[i] * x[i];
  V iscale = (float)(-nmax_i) / vmax;
  V sumlx, suml2;
  qx_sums(x, w, wx, n, iscale, lo, hi, sumlx, suml2);
  V scale = if_eq(suml2, zero, zero, sumlx / suml2);
  V best = scale * sumlx;
  V best_iscale = iscale;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    const float c = -((float)nmax_i + 0.1f * (float)is);
    iscale = c / vmax;
    qx_sums(x, w, wx, n, iscale, lo, hi, sumlx, suml2);
    // llama.cpp: if (suml2 > 0 && sumlx*sumlx > best*suml2) take this candidate
    const V gain = sumlx * sumlx, bar = best * suml2;
    scale = if_pos_gt(suml2, gain, bar, sumlx / suml2, scale);
    best = if_pos_gt(suml2, gain, bar, scale * sumlx, best);
    best_iscale = if_pos_gt(suml2, gain, bar, iscale, best_iscale);
  }
  const V nmaxv = splat<W, U>((float)nmax_i);
  for (int i = 0; i < n; ++i) codes[i] = if_lt(amax, eps, zero, nmaxv + clamp(nearest(best_iscale * x[i]), lo, hi));
  scale_out = if_lt(amax, eps, zero, scale);
}

// make_q3_quants(n, nmax, x, L, do_rmse = true) of a tile of blocks: weights x², 5 sweeps of
// coordinate descent (llama.cpp stops after a sweep that changes nothing; the sweeps after such a
// sweep change nothing either, so every lane can run all 5).
template <int W, int U>
LB_INLINE void q3_tile(const P<W, U>* x, P<W, U>* w, P<W, U>* wx, int n, int nmax_i, P<W, U>& scale_out,
                       P<W, U>* codes) {
  typedef P<W, U> V;
  const V zero = splat<W, U>(0.f), eps = splat<W, U>(kGroupMaxEps);
  const V lo = splat<W, U>(-(float)nmax_i), hi = splat<W, U>((float)(nmax_i - 1));
  V amax, vmax;
  signed_absmax(x, n, amax, vmax);
  const V iscale = (float)(-nmax_i) / vmax;
  V sumlx = zero, suml2 = zero;
  for (int i = 0; i < n; ++i) {
    w[i] = x[i] * x[i];
    wx[i] = w[i] * x[i];
    codes[i] = clamp(nearest(iscale * x[i]), lo, hi);
    sumlx += wx[i] * codes[i];
    suml2 += w[i] * codes[i] * codes[i];
  }
  for (int itry = 0; itry < 5; ++itry) {
    for (int i = 0; i < n; ++i) {
      const V l = codes[i];
      V slx = sumlx - wx[i] * l;
      V sl2 = suml2 - w[i] * l * l;
      const V ok = slx;  // only when slx > 0 (llama.cpp computes the rest inside that branch)
      const V new_l = clamp(nearest(x[i] * sl2 / slx), lo, hi);
      slx = slx + wx[i] * new_l;
      sl2 = sl2 + w[i] * new_l * new_l;
      const V gain = slx * slx * suml2, bar = sumlx * sumlx * sl2, one = splat<W, U>(1.f);
      codes[i] = if_step(ok, one, new_l, l, sl2, gain, bar, new_l, l);
      sumlx = if_step(ok, one, new_l, l, sl2, gain, bar, slx, sumlx);
      suml2 = if_step(ok, one, new_l, l, sl2, gain, bar, sl2, suml2);
    }
  }
  const V nmaxv = splat<W, U>((float)nmax_i);
  for (int i = 0; i < n; ++i) codes[i] = if_lt(amax, eps, zero, codes[i] + nmaxv);
  scale_out = if_lt(amax, eps, zero, if_gt(suml2, zero, sumlx / suml2, zero));
}

// A level as a uint8_t L[i] keeps it (llama.cpp's make_qp_quants stores unclamped negatives there).
template <int W, int U>
LB_INLINE P<W, U> as_uint8(const P<W, U>& l) {
  return if_lt(l, splat<W, U>(0.f), l + splat<W, U>(256.f), l);
}

// make_qp_quants(n, nmax, x, L, quant_weights = w) of a tile of blocks (lane = block).
template <int W, int U>
LB_INLINE void qp_tile(const P<W, U>* x, const P<W, U>* w, P<W, U>* wx, int n, int nmax_i, P<W, U>& scale_out,
                       P<W, U>* codes) {
  typedef P<W, U> V;
  const V zero = splat<W, U>(0.f), eps = splat<W, U>(kGroupMaxEps);
  const float nmax = (float)nmax_i;
  const V nmaxv = splat<W, U>(nmax);
  V vmax = zero;
  for (int i = 0; i < n; ++i) vmax = if_gt(vmax, x[i], vmax, x[i]);  // MAX(max, x[i])
  V iscale = nmax / vmax;
  const V scale0 = 1.f / iscale;
  V best = zero;
  for (int i = 0; i < n; ++i) {
    wx[i] = w[i] * x[i];
    V diff = x[i] - scale0 * as_uint8(nearest(iscale * x[i]));
    best += w[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const V iscale_is = (0.1f * (float)is + nmax) / vmax;
    const V scale_is = 1.f / iscale_is;
    V mse = zero;
    for (int i = 0; i < n; ++i) {
      V l = nearest(iscale_is * x[i]);
      l = if_lt(nmaxv, l, nmaxv, l);  // MIN(nmax, l)
      V diff = x[i] - scale_is * l;
      mse += w[i] * diff * diff;
    }
    iscale = if_lt(mse, best, iscale_is, iscale);
    best = if_lt(mse, best, mse, best);
  }
  V sumlx = zero, suml2 = zero;
  for (int i = 0; i < n; ++i) {
    V l = nearest(iscale * x[i]);
    l = if_lt(nmaxv, l, nmaxv, l);
    codes[i] = as_uint8(l);
    sumlx += wx[i] * l;
    suml2 += w[i] * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    for (int i = 0; i < n; ++i) {
      const V l = codes[i];
      V slx = sumlx - wx[i] * l;
      V sl2 = suml2 - w[i] * l * l;
      const V ok1 = slx, ok2 = sl2;  // llama.cpp: if (slx > 0 && sl2 > 0)
      V new_l = nearest(x[i] * sl2 / slx);
      new_l = if_lt(nmaxv, new_l, nmaxv, new_l);
      slx = slx + wx[i] * new_l;
      sl2 = sl2 + w[i] * new_l * new_l;
      const V gain = slx * slx * suml2, bar = sumlx * sumlx * sl2, one = splat<W, U>(1.f);
      codes[i] = if_step(ok1, ok2, new_l, l, one, gain, bar, as_uint8(new_l), l);
      sumlx = if_step(ok1, ok2, new_l, l, one, gain, bar, slx, sumlx);
      suml2 = if_step(ok1, ok2, new_l, l, one, gain, bar, sl2, suml2);
    }
  }
  for (int i = 0; i < n; ++i) codes[i] = if_lt(vmax, eps, zero, codes[i]);
  scale_out = if_lt(vmax, eps, zero, if_gt(suml2, zero, sumlx / suml2, zero));
}

// Rows [b0, b0 + rows) of src [B, n] → dst[n][L] (missing lanes: 0).
template <int L>
LB_INLINE void load_tile(const float* src, int64_t b0, int64_t rows, int n, float* dst) {
  for (int64_t l = 0; l < rows; ++l) {
    const float* s = src + (b0 + l) * n;
    for (int i = 0; i < n; ++i) dst[i * L + l] = s[i];
  }
  for (int64_t l = rows; l < L; ++l)
    for (int i = 0; i < n; ++i) dst[i * L + l] = 0.f;
}

template <int L>
LB_INLINE void store_codes(const float* codes, int64_t b0, int64_t rows, int n, uint8_t* dst) {
  for (int64_t l = 0; l < rows; ++l) {
    uint8_t* o = dst + (b0 + l) * n;
    for (int i = 0; i < n; ++i) o[i] = (uint8_t)(int)codes[i * L + l];
  }
}

enum Kind : int { kQkx = 0, kQx = 1, kQ3 = 2, kQp = 3 };

struct Args {
  int kind;
  const float *x, *w;  // w: null unless weight_mode == kGiven
  float *scale, *neg_min;
  uint8_t* codes;
  int64_t blocks;
  int n, nmax, nstep, weight_mode;
  float rmin, rdelta;
  bool use_mad;
};

// Tiles [t0, t1) of P<W, U>::kLanes blocks.
template <int W, int U>
LB_INLINE void run_tiles(const Args& a, int64_t t0, int64_t t1) {
  typedef P<W, U> V;
  constexpr int L = V::kLanes;
  alignas(64) V x[kMaxN], w[kMaxN], aux[kMaxN], codes[kMaxN];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b0 = t * L, rows = std::min<int64_t>(L, a.blocks - b0);
    load_tile<L>(a.x, b0, rows, a.n, (float*)x);
    if (a.weight_mode == kGiven)
      load_tile<L>(a.w, b0, rows, a.n, (float*)w);
    else
      block_weights(x, w, a.n, a.weight_mode);
    V scale, neg_min;
    if (a.kind == kQkx && a.use_mad)
      qkx_tile<true>(x, w, aux, a.n, a.nmax, a.rmin, a.rdelta, a.nstep, scale, neg_min, codes);
    else if (a.kind == kQkx)
      qkx_tile<false>(x, w, aux, a.n, a.nmax, a.rmin, a.rdelta, a.nstep, scale, neg_min, codes);
    else if (a.kind == kQx)
      qx_tile(x, w, aux, a.n, a.nmax, scale, codes);
    else if (a.kind == kQ3)
      q3_tile(x, w, aux, a.n, a.nmax, scale, codes);
    else
      qp_tile(x, w, aux, a.n, a.nmax, scale, codes);
    for (int64_t l = 0; l < rows; ++l) {
      a.scale[b0 + l] = scale.lane((int)l);
      if (a.neg_min) a.neg_min[b0 + l] = neg_min.lane((int)l);
    }
    store_codes<L>((const float*)codes, b0, rows, a.n, a.codes);
  }
}

// gguf_requantize's rows [r0, r1) (see there); GCC vectorizes the inner loop.
template <bool kMin>
LB_INLINE void requantize_rows(const float* x, const float* d, const float* dmin, const uint8_t* codes, uint8_t* out,
                               int64_t n, int lo, int hi, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float dd = d[r];
    const float* xr = x + r * n;
    uint8_t* o = out + r * n;
    if (!dd) {  // llama.cpp: if (!d) continue; — the search's codes stay
      std::memcpy(o, codes + r * n, n);
      continue;
    }
    const float dm = kMin ? dmin[r] : 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const int l = nearest_int(kMin ? (xr[i] + dm) / dd : xr[i] / dd);
      o[i] = (uint8_t)(std::max(lo, std::min(hi, l)) - lo);
    }
  }
}

// Σ x (Σ x²) of rows [r0, r1) of x [R, m], in order from 0: 8 rows side by side (each sum sequential).
LB_INLINE void row_sums_range(const float* x, int64_t m, int64_t r0, int64_t r1, float* out, bool square) {
  for (int64_t g = r0; g < r1; g += 8) {
    const int64_t rows = std::min<int64_t>(8, r1 - g);
    float acc[8] = {};
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < rows; ++k) {
        const float v = x[(g + k) * m + j];
        acc[k] += square ? v * v : v;
      }
    for (int64_t k = 0; k < rows; ++k) out[g - r0 + k] = acc[k];
  }
}

// o = imp · sqrt(σ² + x²) over m elements, with the (correctly rounded) sqrt instructions: GCC keeps
// sqrtf scalar, with an errno branch, unless the whole file is built with -fno-math-errno (which a
// pragma cannot set). torch.sqrt is not always correctly rounded, hence this op.
#if LB_HAVE_X86
__attribute__((target("avx2"))) void sqrt_weights_avx2(const float* x, const float* imp, float* o, int64_t m,
                                                         float sigma2) {
  const __m256 s = _mm256_set1_ps(sigma2);
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 r = _mm256_sqrt_ps(_mm256_add_ps(s, _mm256_mul_ps(v, v)));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(imp + i), r));
  }
  for (; i < m; ++i) o[i] = imp[i] * __builtin_sqrtf(sigma2 + x[i] * x[i]);
}
#endif

void sqrt_weights(const float* x, const float* imp, float* o, int64_t m, float sigma2) {
  int64_t i = 0;
#if LB_HAVE_X86
  const __m128 s = _mm_set1_ps(sigma2);
  for (; i + 4 <= m; i += 4) {
    const __m128 v = _mm_loadu_ps(x + i);
    const __m128 r = _mm_sqrt_ps(_mm_add_ps(s, _mm_mul_ps(v, v)));
    _mm_storeu_ps(o + i, _mm_mul_ps(_mm_loadu_ps(imp + i), r));
  }
#endif
  for (; i < m; ++i) o[i] = imp[i] * __builtin_sqrtf(sigma2 + x[i] * x[i]);
}

// gguf_importance_weights of rows [r0, r1) (see there).
LB_INLINE void importance_weights_rows(const float* x, const float* imp, float* out, int64_t m, float sigma2_scale,
                                       int64_t r0, int64_t r1, bool avx2) {
  for (int64_t g = r0; g < r1; g += 64) {
    const int64_t g1 = std::min(r1, g + 64);
    float sum_x2[64];
    row_sums_range(x, m, g, g1, sum_x2, true);
    for (int64_t r = g; r < g1; ++r) {
      const float sigma2 = sigma2_scale * sum_x2[r - g] / (float)m;
#if LB_HAVE_X86
      if (avx2) {
        sqrt_weights_avx2(x + r * m, imp + r * m, out + r * m, m, sigma2);
        continue;
      }
#endif
      sqrt_weights(x + r * m, imp + r * m, out + r * m, m, sigma2);
    }
  }
}

struct RowArgs {
  const float *x, *a, *b;  // requantize: x, d, dmin; weights: x, imp
  const uint8_t* codes;
  void* out;
  int64_t n;
  int lo, hi;
  float sigma2_scale;
};

template <int W>
LB_INLINE void run_rows(int op, const RowArgs& a, int64_t r0, int64_t r1) {
  if (op == 0 && a.b)
    requantize_rows<true>(a.x, a.a, a.b, a.codes, (uint8_t*)a.out, a.n, a.lo, a.hi, r0, r1);
  else if (op == 0)
    requantize_rows<false>(a.x, a.a, a.b, a.codes, (uint8_t*)a.out, a.n, a.lo, a.hi, r0, r1);
  else if (op == 1)
    importance_weights_rows(a.x, a.a, (float*)a.out, a.n, a.sigma2_scale, r0, r1, W == 8);
  else
    row_sums_range(a.x, a.n, r0, r1, (float*)a.out + r0, false);
}

// One copy of the tile loops per instruction set (the always_inline kernels compile into each), with
// its tile width in lanes. Baseline: registers of 4 floats (SSE2, NEON).
constexpr int kBaseLanes = 8;
void run_tiles_base(const Args& a, int64_t t0, int64_t t1) { run_tiles<4, 2>(a, t0, t1); }
void run_rows_base(int op, const RowArgs& a, int64_t r0, int64_t r1) { run_rows<4>(op, a, r0, r1); }

#if LB_HAVE_X86
constexpr int kAvx2Lanes = 16;
__attribute__((target("avx2"))) void run_tiles_avx2(const Args& a, int64_t t0, int64_t t1) {
  run_tiles<8, 2>(a, t0, t1);
}
__attribute__((target("avx2"))) void run_rows_avx2(int op, const RowArgs& a, int64_t r0, int64_t r1) {
  run_rows<8>(op, a, r0, r1);
}
#endif

#pragma GCC pop_options

bool use_avx2() {
  static const bool avx2 = [] {
#if LB_HAVE_X86
    __builtin_cpu_init();
    return (bool)__builtin_cpu_supports("avx2");
#else
    return false;
#endif
  }();
  return avx2;
}

void search(const Args& a) {
  constexpr int64_t kGrainTiles = 8;
#if LB_HAVE_X86
  if (use_avx2()) {
    at::parallel_for(0, (a.blocks + kAvx2Lanes - 1) / kAvx2Lanes, kGrainTiles,
                     [&](int64_t t0, int64_t t1) { run_tiles_avx2(a, t0, t1); });
    return;
  }
#endif
  at::parallel_for(0, (a.blocks + kBaseLanes - 1) / kBaseLanes, kGrainTiles,
                   [&](int64_t t0, int64_t t1) { run_tiles_base(a, t0, t1); });
}

// Row-wise op (0: requantize, 1: importance weights, 2: row sums) over rows [0, rows).
void rows_op(int op, const RowArgs& a, int64_t rows) {
  const int64_t grain = std::max<int64_t>(64, 16384 / std::max<int64_t>(1, a.n));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
#if LB_HAVE_X86
    if (use_avx2()) return run_rows_avx2(op, a, r0, r1);
#endif
    run_rows_base(op, a, r0, r1);
  });
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name, " must be a float32 CPU tensor");
}

// x (and w) [B, n] → Args with fresh outputs scale [B] (neg_min [B]) and codes uint8 [B, n].
struct Blocks {
  at::Tensor x, w, scale, neg_min, codes;
  Args args;
  Blocks(const at::Tensor& x_in, const c10::optional<at::Tensor>& w_in, int kind, int64_t nmax, int64_t max_nmax,
         int default_weights, bool with_min, const char* op) {
    check_float(x_in, op, "x");
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) >= 1 && x_in.size(1) <= kMaxN, op, ": x must be [B, n] with n in 1..",
                kMaxN, ", got ", x_in.sizes());
    TORCH_CHECK(nmax >= 1 && nmax <= max_nmax, op, ": nmax must be in 1..", max_nmax, ", got ", nmax);
    x = x_in.contiguous();
    const int64_t blocks = x.size(0);
    const int n = (int)x.size(1);
    int mode = default_weights;
    if (w_in.has_value()) {
      check_float(*w_in, op, "w");
      TORCH_CHECK(w_in->sizes() == x.sizes(), op, ": w must have x's shape ", x.sizes(), ", got ", w_in->sizes());
      w = w_in->contiguous();
      mode = kGiven;
    }
    TORCH_CHECK(mode != kGiven || w.defined(), op, ": weights are required");
    scale = at::empty({blocks}, x.options());
    if (with_min) neg_min = at::empty({blocks}, x.options());
    codes = at::empty({blocks, n}, x.options().dtype(at::kByte));
    args = Args{kind, x.data_ptr<float>(), w.defined() ? w.data_ptr<float>() : nullptr, scale.data_ptr<float>(),
                with_min ? neg_min.data_ptr<float>() : nullptr, codes.data_ptr<uint8_t>(), blocks, n, (int)nmax, 0,
                mode, 0.f, 0.f, false};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> gguf_qkx_search(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                                                               int64_t nmax, double rmin, double rdelta, int64_t nstep,
                                                               bool use_mad) {
  Blocks b(x, w, kQkx, nmax, 255, use_mad ? kAbs : kAbsPlusRms, true, "gguf_qkx_search");
  b.args.nstep = (int)nstep;
  b.args.rmin = (float)rmin;
  b.args.rdelta = (float)rdelta;
  b.args.use_mad = use_mad;
  search(b.args);
  return {b.scale, b.neg_min, b.codes};
}

std::tuple<at::Tensor, at::Tensor> gguf_qx_search(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                                                  int64_t nmax) {
  Blocks b(x, w, kQx, nmax, 128, kSquare, false, "gguf_qx_search");
  search(b.args);
  return {b.scale, b.codes};
}

std::tuple<at::Tensor, at::Tensor> gguf_q3_search(const at::Tensor& x, int64_t nmax) {
  Blocks b(x, c10::nullopt, kQ3, nmax, 128, kSquare, false, "gguf_q3_search");
  search(b.args);
  return {b.scale, b.codes};
}

std::tuple<at::Tensor, at::Tensor> gguf_qp_search(const at::Tensor& x, const at::Tensor& w, int64_t nmax) {
  Blocks b(x, w, kQp, nmax, 255, kGiven, false, "gguf_qp_search");
  search(b.args);
  return {b.scale, b.codes};
}

// Final codes of sub-blocks x [S, n] against their stored scales d [S] (and mins dmin [S]):
// nearest_int((x + dmin)/d) (x/d without mins) clamped to [lo, hi], minus lo; a sub-block whose scale
// is 0 keeps its codes from the search (llama.cpp's `if (!d) continue;`).
at::Tensor gguf_requantize(const at::Tensor& x_in, const at::Tensor& d_in, const c10::optional<at::Tensor>& dmin_in,
                           const at::Tensor& codes_in, int64_t lo, int64_t hi) {
  const char* op = "gguf_requantize";
  check_float(x_in, op, "x");
  check_float(d_in, op, "d");
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be [S, n]");
  TORCH_CHECK(codes_in.scalar_type() == at::kByte && codes_in.sizes() == x_in.sizes(), op,
              ": codes must be uint8 of x's shape");
  TORCH_CHECK(lo <= 0 && lo <= hi && hi - lo <= 255, op, ": need lo <= 0 <= hi - lo <= 255");
  const at::Tensor x = x_in.contiguous(), d = d_in.contiguous(), codes = codes_in.contiguous();
  const int64_t s = x.size(0), n = x.size(1);
  TORCH_CHECK(d.numel() == s, op, ": d must have one scale per row");
  at::Tensor dmin;
  if (dmin_in.has_value()) {
    check_float(*dmin_in, op, "dmin");
    dmin = dmin_in->contiguous();
    TORCH_CHECK(dmin.numel() == s, op, ": dmin must have one min per row");
  }
  at::Tensor out = at::empty({s, n}, codes.options());
  RowArgs args{x.data_ptr<float>(), d.data_ptr<float>(), dmin.defined() ? dmin.data_ptr<float>() : nullptr,
               codes.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), n, (int)lo, (int)hi, 0.f};
  rows_op(0, args, s);
  return out;
}

// Σ x of each row of x [R, m], summed in order from 0 as llama.cpp's loops do.
at::Tensor gguf_row_sums(const at::Tensor& x_in) {
  check_float(x_in, "gguf_row_sums", "x");
  TORCH_CHECK(x_in.dim() == 2, "gguf_row_sums: x must be [R, m]");
  const at::Tensor x = x_in.contiguous();
  const int64_t r = x.size(0), m = x.size(1);
  at::Tensor out = at::empty({r}, x.options());
  RowArgs args{x.data_ptr<float>(), nullptr, nullptr, nullptr, out.data_ptr<float>(), m, 0, 0, 0.f};
  rows_op(2, args, r);
  return out;
}

// llama.cpp's importance weights of super-blocks x, imp [B, m]: imp · sqrt(σ² + x²) with
// σ² = sigma2_scale · Σx² / m (Σ in order; sqrtf, correctly rounded, where torch.sqrt may not be).
at::Tensor gguf_importance_weights(const at::Tensor& x_in, const at::Tensor& imp_in, double sigma2_scale) {
  check_float(x_in, "gguf_importance_weights", "x");
  check_float(imp_in, "gguf_importance_weights", "imp");
  TORCH_CHECK(x_in.dim() == 2 && imp_in.sizes() == x_in.sizes(), "gguf_importance_weights: x and imp must be [B, m]");
  const at::Tensor x = x_in.contiguous(), imp = imp_in.contiguous();
  const int64_t r = x.size(0), m = x.size(1);
  at::Tensor out = at::empty({r, m}, x.options());
  RowArgs args{x.data_ptr<float>(), imp.data_ptr<float>(), nullptr, nullptr, out.data_ptr<float>(), m, 0, 0,
               (float)sigma2_scale};
  rows_op(1, args, r);
  return out;
}

}  // namespace
}  // namespace gguf_search
}  // namespace lowbit_cpu

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("gguf_qkx_search(Tensor x, Tensor? w, int nmax, float rmin, float rdelta, int nstep, bool use_mad) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("gguf_qx_search(Tensor x, Tensor? w, int nmax) -> (Tensor, Tensor)");
  m.def("gguf_q3_search(Tensor x, int nmax) -> (Tensor, Tensor)");
  m.def("gguf_qp_search(Tensor x, Tensor w, int nmax) -> (Tensor, Tensor)");
  m.def("gguf_requantize(Tensor x, Tensor d, Tensor? dmin, Tensor codes, int lo, int hi) -> Tensor");
  m.def("gguf_row_sums(Tensor x) -> Tensor");
  m.def("gguf_importance_weights(Tensor x, Tensor imp, float sigma2_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("gguf_qkx_search", &lowbit_cpu::gguf_search::gguf_qkx_search);
  m.impl("gguf_qx_search", &lowbit_cpu::gguf_search::gguf_qx_search);
  m.impl("gguf_q3_search", &lowbit_cpu::gguf_search::gguf_q3_search);
  m.impl("gguf_qp_search", &lowbit_cpu::gguf_search::gguf_qp_search);
  m.impl("gguf_requantize", &lowbit_cpu::gguf_search::gguf_requantize);
  m.impl("gguf_row_sums", &lowbit_cpu::gguf_search::gguf_row_sums);
  m.impl("gguf_importance_weights", &lowbit_cpu::gguf_search::gguf_importance_weights);
}
